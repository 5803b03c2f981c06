"""CLIFF: the cosine schedule, one reverse step, x0 clamping, the VAE's KL, the gate, the
zero background column, the applied loss weights, seeded sampling and the recipe."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ovdlab.methods.base import DistillOutputs, RegionContext, Vocabulary
from ovdlab.methods.cliff.diffusion import CosineSchedule, Diffuser, cosine_betas, reverse_step
from ovdlab.methods.cliff.method import CLIFF, kl_divergence, phase_lengths, phase_schedule
from ovdlab.methods.registry import build_method
from ovdlab.platform.config import CLIFFConfig, EvalConfig, ModelConfig, load_config
from ovdlab.platform.detector import build_detector
from ovdlab.platform.recipes.runner import over_seeds

IN, D, C, R = 12, 8, 4, 6


def method(**cfg) -> CLIFF:
    return build_method(CLIFFConfig(**{"logit_scale": 50.0, **cfg}))  # type: ignore[return-value]


def vocab(classes: int = C) -> Vocabulary:
    torch.manual_seed(5)
    return Vocabulary.trained(F.normalize(torch.randn(classes, D), dim=1))


def test_schedule_constants_follow_the_cosine_formula():
    steps, s = 10, 0.008
    f = [math.cos(((t / steps) + s) / (1 + s) * math.pi / 2) ** 2 for t in range(steps + 1)]
    abar = [v / f[0] for v in f]
    expected = [min(1 - abar[t + 1] / abar[t], 0.999) for t in range(steps)]
    assert cosine_betas(steps, s).tolist() == pytest.approx(expected, rel=1e-12)
    assert expected[-1] == 0.999  # the last step is clipped
    sched = CosineSchedule(steps, s)
    alpha_bar = torch.cumprod(1 - cosine_betas(steps, s), 0)
    assert sched.alpha_bar.tolist() == pytest.approx(alpha_bar.tolist(), rel=1e-6)
    assert sched.alpha_bar_prev[0] == 1.0 and sched.alpha_bar_prev[1:].tolist() == pytest.approx(alpha_bar[:-1].tolist(), rel=1e-6)
    # At t = 0 the posterior mean is the x0 prediction itself.
    assert sched.coef_x0[0].item() == pytest.approx(1.0) and sched.coef_xt[0].item() == pytest.approx(0.0, abs=1e-7)


def test_one_reverse_step_matches_the_hand_computed_ddpm_step():
    sched = CosineSchedule(10)
    t = 4
    b = cosine_betas(10)
    abar = torch.cumprod(1 - b, 0)
    x_t = torch.tensor([[0.3, -0.2]])
    eps = torch.tensor([[0.1, 0.4]])
    x0 = ((x_t - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
    mean = b[t] * abar[t - 1].sqrt() / (1 - abar[t]) * x0 + (1 - abar[t - 1]) * (1 - b[t]).sqrt() / (1 - abar[t]) * x_t
    z = torch.randn(1, 2, generator=torch.Generator().manual_seed(3))
    expected = mean + (b[t] * (1 - abar[t - 1]) / (1 - abar[t])).sqrt() * z
    got, got_x0 = reverse_step(sched, eps, x_t, t, torch.Generator().manual_seed(3))
    assert torch.allclose(got_x0, x0.float(), atol=1e-6) and torch.allclose(got, expected.float(), atol=1e-6)
    last, last_x0 = reverse_step(sched, eps, x_t, 0, torch.Generator().manual_seed(3))
    assert torch.allclose(last, last_x0, atol=1e-6)  # no noise at the last step


def test_x0_prediction_is_clamped():
    sched = CosineSchedule(10)
    x_t = torch.tensor([[50.0, -50.0, 0.0]])
    _, x0 = reverse_step(sched, torch.zeros_like(x_t), x_t, 2)
    assert x0.tolist() == [[1.0, -1.0, 0.0]]


def test_kl_of_the_vae_layer():
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # 0.5 (mu^2 + sigma^2 - 1 - log sigma^2) per element: 0.5, 0.5 (1 - log 2), 0, 2;
    # summed over the dimensions, averaged over the rows (the reference's diffusion_lib.py)
    expected = (0.5 + 0.5 * (1 - math.log(2.0)) + 0.0 + 2.0) / 2
    assert kl_divergence(mu, logvar).item() == pytest.approx(expected)
    assert kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0


def test_gate_starts_at_one_half_and_keeps_the_object_shape():
    m = method()
    head = m.build_head(IN, D)
    out = head(torch.randn(R, IN))
    cond = m.condition(head, out["object"], out["mu"])
    assert cond.shape == (R, D) and torch.allclose(cond, 0.5 * out["object"])
    assert torch.equal(method(image_chain=False).condition(head, out["object"], out["mu"]), out["object"])
    # The condition's LayerNorm removes the constant 1/2: stage 2 starts as stage 1 ended.
    diffuser = Diffuser(D)
    t = torch.full((R,), 3)
    assert torch.allclose(diffuser(out["mu"], t, out["object"]), diffuser(out["mu"], t, cond), atol=1e-5)


def test_logits_have_a_zero_background_column_scaled_cosines():
    m = method()
    head = m.build_head(IN, D)
    out = head(torch.randn(R, IN))
    logits = m.logits(head, out, vocab())
    assert logits.shape == (R, 1 + C) and torch.equal(logits[:, 0], torch.zeros(R))
    assert logits[:, 1:].abs().max() <= 50.0 + 1e-4


def _losses(m: CLIFF, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(11)
    head = m.build_head(IN, D)
    out = head(torch.randn(R, IN))
    regions = head(torch.randn(3, IN))
    distill = DistillOutputs(regions, torch.randn(3, D), torch.ones(3), torch.zeros(3, dtype=torch.long))
    torch.manual_seed(seed)
    return m.losses(head, out, torch.tensor([0, 1, 2, 0, 4, 3]), vocab(), distill)


@pytest.mark.parametrize("weight,loss", [("kl_weight", "loss_kl"), ("rec_weight", "loss_rec"), ("gen_weight", "loss_gen")])
def test_each_loss_weight_scales_its_term_only(weight, loss):
    one, three = _losses(method(**{weight: 1.0})), _losses(method(**{weight: 3.0}))
    assert one[loss].item() > 0
    assert three[loss].item() == pytest.approx(3.0 * one[loss].item(), rel=1e-5)
    for other in one:
        if other != loss:
            assert three[other].item() == pytest.approx(one[other].item(), rel=1e-5)


def test_stage_one_has_no_image_chain_nor_object_noise_but_keeps_its_parameters_in_the_graph():
    m = method(image_chain=False, object_noise=False, gen_loss="mse-all-steps")
    assert not m.needs_store and method().needs_store and not method(rec_weight=0.0).needs_store
    losses = _losses(m)
    assert losses["loss_rec"].item() == 0.0 and losses["loss_kl"].item() == 0.0
    head = m.build_head(IN, D)
    out = head(torch.randn(R, IN))
    total = sum(m.losses(head, out, torch.tensor([0, 1, 2, 0, 4, 3]), vocab(), None).values())
    total.backward()
    assert all(p.grad is not None for p in head.parameters())
    assert all(p.grad.abs().sum() == 0 for p in [*head.gate.parameters(), *head.vae.parameters()])
    assert any(p.grad.abs().sum() > 0 for p in head.diffuser.parameters())


def test_one_diffuser_serves_both_chains_and_the_image_loss_is_on_normalized_output():
    """The reference's single ddpm_module; F.normalize before the L1 (zero_shot_classifier.py)."""
    m = method()
    head = m.build_head(IN, D)
    assert not hasattr(head, "image_diffuser") and not hasattr(head, "text_diffuser")
    regions = head(torch.randn(3, IN))
    torch.manual_seed(1)
    image = m.image(head, regions["object"], m.start(regions, training=True))
    target = torch.randn(3, D)
    distill = DistillOutputs(regions, target, torch.ones(3), torch.zeros(3, dtype=torch.long))
    torch.manual_seed(1)
    expected = F.l1_loss(F.normalize(image, dim=-1), F.normalize(target, dim=-1))
    assert m.reconstruction_loss(head, regions, distill).item() == pytest.approx(expected.item(), rel=1e-5)


def test_stage_one_generation_loss_is_the_mse_over_every_step():
    m = method(gen_loss="mse-all-steps")
    head = m.build_head(IN, D)
    labels, noise, cond = torch.tensor([0, 2, 1]), torch.randn(3, D), torch.randn(3, D)
    text = F.normalize(vocab().embeddings, dim=-1)
    x0 = torch.cat([torch.zeros_like(text[:1]), text])[labels]
    per_step = []
    for t in range(m.cfg.diffusion_steps):
        steps = torch.full((3,), t)
        eps = head.diffuser(head.schedule.q_sample(x0, steps, noise), steps, cond)
        per_step.append(F.mse_loss(eps, noise))
    expected = torch.stack(per_step).mean()
    assert m.generation_loss(head, labels, vocab(), noise, cond).item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_same_seed_samples_the_same_scores_and_another_seed_others():
    m = method()
    head = m.build_head(IN, D)
    with torch.no_grad():
        out = head(torch.randn(R, IN))
        scores = [m.scores(head, out, vocab(), RegionContext(generator=torch.Generator().manual_seed(s))) for s in (7, 7, 8)]
    assert torch.equal(scores[0], scores[1]) and not torch.equal(scores[0], scores[2])
    assert scores[0].shape == (R, C) and (scores[0] >= 0).all() and (scores[0] <= 1).all()


def test_same_eval_seed_gives_the_same_detections_bit_for_bit():
    """Through the detector: ``set_inference`` reseeds the generator from ``eval.seed``."""
    torch.manual_seed(0)
    model = build_detector(ModelConfig(backbone="resnet18", neck="c4", min_size=64, max_size=64,
                                       rpn_pre_nms_top_n=50, rpn_post_nms_top_n=20), method(), D)
    model.set_vocabulary(vocab())
    model.eval()
    images = [torch.rand(3, 64, 64)]

    def detect(seed: int) -> dict[str, torch.Tensor]:
        model.set_inference(EvalConfig(seed=seed, score_thresh=0.0))
        with torch.no_grad():
            return model(images)[0]

    first, again, other = detect(1), detect(1), detect(2)
    assert all(torch.equal(first[k], again[k]) for k in ("boxes", "scores", "labels"))
    assert not torch.equal(first["scores"], other["scores"])


def test_recipe_chains_three_phases_and_evaluates_over_seeds():
    cfg = load_config("experiments/cliff_shapes")
    stages = build_method(cfg.method).recipe(cfg)
    assert [s.name for s in stages] == ["proposal-detector", "store", "obj-txt", "obj-img-txt", "final", "eval"]
    _, store, one, two, three, evaluation = stages
    assert store.kind == "extract"
    first, second, third = phase_lengths(cfg.train.max_iter, [3, 12, 4])
    assert "method.image_chain=false" in one.overrides and f"train.max_iter={first}" in one.overrides
    assert f"train.max_iter={second}" in two.overrides and two.reads["train.init_from"] == "obj-txt"
    assert f"train.max_iter={third}" in three.overrides and three.reads["train.init_from"] == "obj-img-txt"
    assert f"train.lr={cfg.train.lr * 0.1:g}" in three.overrides and "method.rec_weight=75" in three.overrides
    assert {"method.object_noise=false", "method.gen_loss=mse-all-steps"} <= set(one.overrides)
    assert cfg.method.rec_weight == 15.0 and cfg.train.distill_per_image == 5 and cfg.train.distill_order == "first"
    assert all(s.reads["proposals.checkpoint"] == "proposal-detector" for s in (store, one, two, three))
    assert evaluation.kind == "eval" and cfg.eval.seeds == 3 and cfg.model.neck == "fpn"
    assert load_config("experiments/cliff_coco").model.neck == "c4"
    assert load_config("experiments/cliff_coco").train.max_iter == sum(phase_lengths(570000, [3, 12, 4]))


def test_each_phase_decays_its_lr_where_the_reference_does():
    """60k/80k of 90k, 240k/320k of 360k, 60k/80k of 120k (the reference's three configs)."""
    cfg = load_config("experiments/cliff_coco")
    stages = {s.name: s for s in build_method(cfg.method).recipe(cfg)}
    assert "train.steps=[60000, 80000]" in stages["obj-txt"].overrides
    assert "train.steps=[240000, 320000]" in stages["obj-img-txt"].overrides
    assert "train.steps=[60000, 80000]" in stages["final"].overrides
    assert phase_schedule(114, [2 / 3, 8 / 9]) == ("train.max_iter=114", "train.steps=[76, 101]")
    assert phase_schedule(1, [2 / 3, 8 / 9]) == ("train.max_iter=1", "train.steps=[]")


def test_phase_lengths_share_the_budget():
    assert phase_lengths(570000, [3, 12, 4]) == (90000, 360000, 120000)
    assert phase_lengths(4, [3, 12, 4]) == (1, 3, 1)
    assert phase_lengths(350, [3, 12, 4]) == (55, 221, 74)
    assert phase_lengths(560, [3, 12, 4]) == (88, 354, 118)
    assert phase_lengths(720, [3, 12, 4]) == (114, 455, 151)  # rounded alone, 152: 721 steps


def test_over_seeds_reports_mean_and_spread():
    runs = [{"ap50_novel": 10.0, "ap50_base": 50.0}, {"ap50_novel": 14.0, "ap50_base": 50.0}]
    out = over_seeds(runs)
    assert out["ap50_novel"] == 12.0 and out["ap50_novel_std"] == pytest.approx(math.sqrt(8.0))
    assert out["ap50_base_std"] == 0.0
    assert over_seeds(runs[:1]) == runs[0]


def test_bad_cliff_config_names_the_field():
    with pytest.raises(Exception, match="image_steps"):
        load_config("experiments/cliff_shapes", ["method.image_steps=11"])
    with pytest.raises(Exception, match="stage_split"):
        load_config("experiments/cliff_shapes", ["method.stage_split=[1,0,1]"])


def test_a_job_prints_the_spread_over_sampling_seeds():
    from ovdlab.platform.evaluation.tables import headline

    metrics = over_seeds([{"ap50_novel": 10.0, "ap50_base": 50.0, "ap50_all": 40.0},
                          {"ap50_novel": 12.0, "ap50_base": 52.0, "ap50_all": 40.0}])
    assert headline(metrics) == ("AP50 novel 11.0 | base 51.0 | all 40.0 "
                                 "(std over sampling seeds: novel 1.4, base 1.4, all 0.0)")
    assert headline({"ap50_novel": 1.0, "ap50_base": 2.0, "ap50_all": 3.0}) == "AP50 novel 1.0 | base 2.0 | all 3.0"
