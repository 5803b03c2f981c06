"""CLIFF (Li et al., "CLIFF: Continual Latent Diffusion for Open-Vocabulary Object
Detection", ECCV 2024): the diffusion model (:mod:`.diffusion`) and the method with its
three-phase recipe (:mod:`.method`)."""
