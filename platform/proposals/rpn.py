"""Detector RPN proposals: a trained detector's top class-agnostic boxes with objectness.

ViLD distils on proposals of an RPN trained on base classes. This source rebuilds the
detector from the model config, loads only the backbone and RPN weights of a
checkpoint (an ovdlab checkpoint folder or any torch state dict file, read with
``weights_only=True``; the RoI head and the method's classifier play no part in
proposing), resizes the image as the data path does (shorter side ``model.min_size``,
longer side at most ``model.max_size``), runs
:meth:`~ovdlab.platform.detector.model.OVDDetector.proposals_only` (test-time RPN: NMS
0.7, ``model.rpn_post_nms_top_n`` boxes) and maps the boxes back to original pixels.
The ``per_image`` best are kept; the score is the RPN objectness probability.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ovdlab.platform.config import file_digest
from ovdlab.platform.proposals.base import Proposals

if TYPE_CHECKING:
    from ovdlab.platform.config import MethodConfig, ModelConfig
    from ovdlab.platform.detector.model import OVDDetector

PROPOSER_PREFIXES = ("backbone.", "rpn.")


def proposer_state(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The backbone and RPN entries of a detector state dict (``model.``/``module.`` prefixes removed)."""
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    elif "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out = {}
    for key, value in state.items():
        name = key
        for prefix in ("module.", "model."):
            name = name[len(prefix):] if name.startswith(prefix) else name
        if name.startswith(PROPOSER_PREFIXES):
            out[name] = value
    if not out:
        raise ValueError(f"{path}: no backbone.* / rpn.* weights; not a detector checkpoint")
    return out


class RPNProposalSource:
    """Top ``per_image`` RPN boxes (objectness as score) of a trained detector checkpoint."""

    name = "rpn"
    extra_names: tuple[str, ...] = ()
    needs_accelerator = True

    def __init__(
        self,
        checkpoint: str | Path,
        model_cfg: "ModelConfig",
        method_cfg: "MethodConfig",
        embed_dim: int,
        *,
        per_image: int,
        device: str = "cpu",
    ) -> None:
        from ovdlab.platform.train.checkpoint import resolve_checkpoint

        self.checkpoint = resolve_checkpoint(checkpoint, "proposals.checkpoint").resolve()
        self.model_cfg = model_cfg
        self.method_cfg = method_cfg
        self.embed_dim = int(embed_dim)
        self.per_image = int(per_image)
        self.device = device
        self.digest = file_digest(self.checkpoint)
        self._model: OVDDetector | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}

    def fingerprint(self) -> dict[str, Any]:
        return {"checkpoint_digest": self.digest, "model": self.model_cfg.model_dump(mode="json")}

    def _detector(self) -> "OVDDetector":
        if self._model is None:
            from ovdlab.methods.registry import build_method
            from ovdlab.platform.detector.model import build_detector
            from ovdlab.platform.train.checkpoint import load_weights

            from ovdlab.platform.config import uncalibrated

            # Only the proposer's weights load; the classifier head is built but never used,
            # so a calibration left to the teacher (a bare state-dict's config) gets a placeholder.
            placeholder = {key: 1.0 for key in uncalibrated(self.method_cfg)}
            model = build_detector(self.model_cfg, build_method(self.method_cfg.model_copy(update=placeholder)), self.embed_dim)
            state = load_weights(self.checkpoint)
            if not isinstance(state, dict):
                raise ValueError(f"{self.checkpoint}: expected a state dict, got {type(state).__name__}")
            wanted = proposer_state(state, self.checkpoint)
            own = {k for k in model.state_dict() if k.startswith(PROPOSER_PREFIXES)}
            missing, unexpected = sorted(own - wanted.keys()), sorted(wanted.keys() - own)
            if missing or unexpected:
                raise ValueError(
                    f"{self.checkpoint}: does not fit model config {self.model_cfg.backbone}/{self.model_cfg.neck}: "
                    f"{len(missing)} proposer weights missing (e.g. {missing[:3]}), "
                    f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
                )
            try:
                model.load_state_dict(wanted, strict=False)
            except RuntimeError as err:  # shape mismatches
                raise ValueError(f"{self.checkpoint}: does not fit the model config: {err}") from err
            self._model = model.to(self.device).eval()
        return self._model

    @torch.no_grad()
    def propose(self, image: np.ndarray, image_id: int, annotations: list[dict[str, Any]]) -> Proposals:
        from ovdlab.platform.detector.transforms import resize

        height, width = image.shape[:2]
        tensor = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
        resized, _, (scale_x, scale_y) = resize(tensor, {}, self.model_cfg.min_size, self.model_cfg.max_size)
        boxes, objectness = self._detector().proposals_only([resized.to(self.device)])[0]
        boxes = boxes.float().cpu() / torch.tensor([scale_x, scale_y, scale_x, scale_y])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return Proposals(boxes[keep].numpy(), objectness.float().cpu()[keep].numpy()).top_k(self.per_image)
