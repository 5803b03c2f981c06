"""Load the CLIP teacher: any open_clip model, a local weights file or folder, or ``shapes-tiny``.

Weights are looked up in this order (``TeacherConfig`` fields):

1. ``weights``: a local ``.pt``/``.bin``/``.safetensors`` file (architecture from
   ``model``, activation from the ``pretrained`` tag when one is given), or a folder
   holding ``open_clip_config.json`` and the weights (open_clip's ``local-dir:`` schema).
2. ``pretrained``: an open_clip tag (``ViT-B-32`` + ``openai``), fetched from the hub or
   taken from the local hub cache. Offline without a cached copy this raises one
   :class:`TeacherWeightsError` that says how to supply the file; it never hangs.
3. ``model == "shapes-tiny"`` with neither: the checkpoint made by
   :func:`ovdlab.platform.teacher.shapes_teacher.pretrain_shapes_teacher` under
   ``work_dir/teachers/``.

``pretrained == "random"`` is the explicit way to get a randomly initialised model of
any architecture (benchmarks, tests). Initialisation is seeded (seed 0) so the same
architecture always yields the same weights and the same digest. ``pretrained: null``
with no weights for a hub architecture is an error, never a silent random model.

``ln_tuned`` loads the base teacher as above and then the LayerNorm-tuned weights written
by :func:`ovdlab.platform.teacher.ln_tuning.tune_layernorm` (EZSD stage 1), after checking
they were tuned from this very base (same weights digest).

Every teacher carries ``digest``: 16 hex digits of the SHA-256 of its state dict
(names, dtypes, shapes, bytes), which downstream content keys (text banks, region stores)
include so that different weights never share a cache entry.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
import torch.nn.functional as F
from open_clip import factory as oc_factory
from open_clip import pretrained as oc_pretrained
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from torch import nn

from ovdlab.platform.config import TeacherConfig

log = logging.getLogger(__name__)

TINY_MODEL = "shapes-tiny"
RANDOM_TAG = "random"
TEACHERS_SUBDIR = "teachers"
RANDOM_INIT_SEED = 0
MAX_LOGIT_SCALE = 100.0
"""CLIP clamps its learned logit scale at 100 (open_clip stores its log)."""
# ``shapes-tiny-<12 hex key>.pt``; the pattern excludes ``shapes-tiny-ln-*`` (LN-tuned copies).
TINY_CHECKPOINT_GLOB = f"{TINY_MODEL}-" + "[0-9a-f]" * 12 + ".pt"

# A CLIP small enough to pretrain on shapes crops in a few minutes on 2 CPU cores: a
# 4-layer ViT of width 64 over the four 16x16 patches of a 32x32 crop, and a 2-layer text
# transformer over 16 tokens (captions are short). Measured on the shapes world, 16x16
# patches learn shape (the hard part; colour is learnt at once) several times faster per
# CPU-second than 8x8 patches on 32 or 48 px crops or a 128-wide tower. The BPE tokenizer
# is CLIP's, so the vocabulary size is CLIP's too.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 32, "patch_size": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}


class TeacherWeightsError(RuntimeError):
    """Weights for the configured teacher cannot be found; the message says how to supply them."""


@dataclass(eq=False)
class Teacher:
    """An open_clip model in eval mode with what callers need to feed it.

    ``image_size`` is the square crop side the image tower expects; ``mean``/``std`` are
    the CLIP normalisation constants applied to crops in [0, 1]. ``arch`` is the open_clip
    architecture name (or ``local-dir:<path>``) so a tuned copy can be rebuilt.
    """

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    teacher_id: str
    digest: str
    device: torch.device
    arch: str
    batch_size: int = 256

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """[N, D] L2-normalised float32 text embeddings on the CPU, in batches."""
        if not texts:
            return torch.zeros(0, self.embed_dim)
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[start : start + self.batch_size]).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] normalised crops -> [N, D] L2-normalised float32 (on the CPU)."""
        if crops.ndim != 4 or crops.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"crops must be [N, 3, {self.image_size}, {self.image_size}] for {self.teacher_id}, "
                f"got {tuple(crops.shape)}"
            )
        out = []
        for start in range(0, crops.shape[0], self.batch_size):
            batch = crops[start : start + self.batch_size].to(self.device, torch.float32)
            out.append(F.normalize(self.model.encode_image(batch).float(), dim=-1).cpu())
        if not out:
            return torch.zeros(0, self.embed_dim)
        return torch.cat(out)

    @property
    def logit_scale(self) -> float:
        """The teacher's learned logit scale ``exp(logit_scale)``, clamped at CLIP's 100 as
        CLIP's training clamps it (100 for ViT-B/32 ``openai``; about 16.8 for
        ``shapes-tiny``): the calibration of cosine logits in its embedding space, from
        which every method's temperature follows (``ovdlab.platform.config.calibrate``).
        A model without one (not a CLIP) is an error, not a silent default."""
        scale = getattr(self.model, "logit_scale", None)
        if scale is None:
            raise ValueError(f"teacher {self.teacher_id} has no learned logit_scale; set the method's temperature explicitly")
        return float(torch.as_tensor(scale).detach().float().exp().clamp(max=MAX_LOGIT_SCALE))


def register_tiny_config() -> None:
    """Make ``shapes-tiny`` a known open_clip architecture (idempotent)."""
    oc_factory._MODEL_CONFIGS.setdefault(TINY_MODEL, copy.deepcopy(TINY_CONFIG))


def state_digest(model: nn.Module) -> str:
    """16 hex digits of SHA-256 over the state dict (sorted names, dtype, shape, raw bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def safe_name(teacher_id: str) -> str:
    """``ViT-B-32/openai`` -> ``ViT-B-32-openai`` (a file-name-safe teacher id)."""
    return "".join(c if c.isalnum() or c in "-_.+" else "-" for c in teacher_id)


def teachers_dir(work_dir: Path) -> Path:
    return Path(work_dir).expanduser().resolve() / TEACHERS_SUBDIR


def read_sidecar(checkpoint: Path) -> dict[str, Any]:
    """The JSON written next to a teacher checkpoint (``<name>.json``), or ``{}``."""
    side = checkpoint.with_suffix(".json")
    return json.loads(side.read_text()) if side.is_file() else {}


def write_checkpoint(model: nn.Module, path: Path, meta: dict[str, Any]) -> Path:
    """Save ``{"state_dict", "meta"}`` (``weights_only`` loadable) plus a JSON sidecar, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def find_checkpoint(directory: Path, pattern: str, what: str, how: str, match: dict[str, Any] | None = None) -> Path:
    """The checkpoint in ``directory`` matching ``pattern`` (and sidecar fields ``match``).

    Several matches: the newest is used and the others are named in a warning, so a
    work dir shared by a sweep stays usable; pass ``checkpoint=`` to choose explicitly.
    """
    found = sorted(directory.glob(pattern)) if directory.is_dir() else []
    if match:
        found = [p for p in found if all(read_sidecar(p).get(k) == v for k, v in match.items())]
    if not found:
        raise TeacherWeightsError(f"no {what} checkpoint {directory / pattern} found; {how}")
    if len(found) > 1:
        found.sort(key=lambda p: p.stat().st_mtime)
        log.warning("several %s checkpoints match %s: %s; using the newest", what, pattern, [p.name for p in found])
    return found[-1]


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(constants.is_offline_mode())


def _cached_pretrained(pcfg: dict[str, Any]) -> str | None:
    """Local copy of a tagged checkpoint (hub cache or open_clip's URL cache), no network."""
    hub = pcfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import hf_hub_download

        repo_id, filename = os.path.split(hub)
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            try:
                return hf_hub_download(repo_id=repo_id, filename=name, local_files_only=True)
            except Exception:  # noqa: BLE001 - any miss means "not cached"
                continue
    url = pcfg.get("url", "")
    if url:
        target = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if target.is_file():
            return str(target)
    return None


def _no_weights_message(cfg: TeacherConfig, cause: str) -> str:
    return (
        f"no local weights for {cfg.model} (pretrained={cfg.pretrained}) and the hub is unreachable ({cause}): "
        f"download them where there is network (open_clip.create_model({cfg.model!r}, pretrained={cfg.pretrained!r}) "
        f"or huggingface-cli download) and set teacher.weights=/path/to/open_clip_pytorch_model.bin "
        f"(or a folder with open_clip_config.json and the weights)"
    )


def _fetch_pretrained(cfg: TeacherConfig) -> tuple[str, dict[str, Any]]:
    """Path of the weights for ``cfg.pretrained`` and the tag's config; one clear error offline."""
    assert cfg.pretrained is not None
    pcfg = oc_pretrained.get_pretrained_cfg(cfg.model, cfg.pretrained)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(cfg.model)
        raise TeacherWeightsError(
            f"teacher.pretrained={cfg.pretrained!r} is not an open_clip tag for {cfg.model} "
            f"(known tags: {tags}); use teacher.weights=/path for a local file or pretrained=random"
        )
    cached = _cached_pretrained(pcfg)
    if cached:
        return cached, pcfg
    if _hub_offline():
        raise TeacherWeightsError(_no_weights_message(cfg, "HF_HUB_OFFLINE is set"))
    try:
        return oc_pretrained.download_pretrained(pcfg), pcfg
    except Exception as err:  # noqa: BLE001 - network errors come in many types
        raise TeacherWeightsError(_no_weights_message(cfg, f"{type(err).__name__}: {err}")) from err


def _check_arch(name: str) -> None:
    if oc_factory.get_model_config(name) is None:
        raise TeacherWeightsError(
            f"teacher.model={name!r} is not an open_clip architecture (known: {open_clip.list_models()[:12]}...)"
        )


def _create(arch: str, weights: str | None, pcfg: dict[str, Any] | None = None) -> nn.Module:
    """Build ``arch`` and load ``weights`` (a file) with the tag's activation and preprocessing."""
    pcfg = pcfg or {}
    preprocess = {k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pcfg}
    kwargs: dict[str, Any] = {
        "force_quick_gelu": bool(pcfg.get("quick_gelu", False)),
        "force_preprocess_cfg": preprocess or None,
    }
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return open_clip.create_model(arch, pretrained=None, **kwargs)
    try:
        return open_clip.create_model(arch, pretrained=weights, **kwargs)
    except Exception as err:  # noqa: BLE001 - torch.load/safetensors/load_state_dict raise many types
        raise TeacherWeightsError(f"cannot load weights {weights} into {arch}: {err}") from err


def _load_base(cfg: TeacherConfig, work_dir: Path, checkpoint: Path | None) -> tuple[nn.Module, str, str]:
    """(model, teacher_id, arch) for the untuned teacher."""
    if cfg.model == TINY_MODEL:
        register_tiny_config()
    if cfg.model == TINY_MODEL and not cfg.weights:
        if cfg.pretrained == RANDOM_TAG:
            log.warning("teacher %s: random initialisation (pretrained=random)", TINY_MODEL)
            return _create(TINY_MODEL, None), f"{TINY_MODEL}/random", TINY_MODEL
        if cfg.pretrained:
            raise TeacherWeightsError(
                f"{TINY_MODEL} has no pretrained tags (got pretrained={cfg.pretrained!r}): leave it null to use "
                f"the checkpoint pretrained on the shapes world, or use pretrained=random"
            )
        if checkpoint is not None:
            path = Path(checkpoint)
        else:
            path = find_checkpoint(
                teachers_dir(work_dir),
                TINY_CHECKPOINT_GLOB,
                TINY_MODEL,
                "pretrain it first: ovdlab.platform.teacher.ensure_shapes_teacher(cfg) (the shapes demo does this)",
                match={"model_cfg": TINY_CONFIG},
            )
        if not path.is_file():
            raise TeacherWeightsError(f"teacher weights file {path} does not exist")
        return _create(TINY_MODEL, str(path)), TINY_MODEL, TINY_MODEL

    if cfg.weights:
        path = Path(cfg.weights).expanduser().resolve()
        if path.is_dir():
            if not (path / "open_clip_config.json").is_file():
                raise TeacherWeightsError(f"teacher.weights folder {path} has no open_clip_config.json")
            arch = f"local-dir:{path}"
            try:
                model = open_clip.create_model(arch)
            except (RuntimeError, KeyError, ValueError) as err:
                raise TeacherWeightsError(f"cannot load the open_clip folder {path}: {err}") from err
            return model, f"{cfg.model}/{cfg.pretrained or path.name}", arch
        if not path.is_file():
            raise TeacherWeightsError(f"teacher.weights={path} does not exist")
        _check_arch(cfg.model)
        pcfg = oc_pretrained.get_pretrained_cfg(cfg.model, cfg.pretrained) if cfg.pretrained else {}
        return _create(cfg.model, str(path), pcfg), f"{cfg.model}/{cfg.pretrained or path.stem}", cfg.model

    _check_arch(cfg.model)
    if cfg.pretrained == RANDOM_TAG:
        log.warning("teacher %s: random initialisation (pretrained=random)", cfg.model)
        return _create(cfg.model, None), f"{cfg.model}/random", cfg.model
    if not cfg.pretrained:
        raise TeacherWeightsError(
            f"teacher {cfg.model} has neither teacher.pretrained nor teacher.weights: set pretrained to an "
            f"open_clip tag (e.g. openai), weights to a local file or folder, or pretrained=random"
        )
    path_str, pcfg = _fetch_pretrained(cfg)
    return _create(cfg.model, path_str, pcfg), f"{cfg.model}/{cfg.pretrained}", cfg.model


def _load_ln_tuned(model: nn.Module, base_id: str, base_digest: str, work_dir: Path, checkpoint: Path | None) -> None:
    path = checkpoint or find_checkpoint(
        teachers_dir(work_dir),
        f"{safe_name(base_id)}-ln-*.pt",
        f"LayerNorm-tuned {base_id}",
        "run ovdlab.platform.teacher.tune_layernorm first (EZSD stage 1)",
        match={"base_digest": base_digest},
    )
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = blob.get("meta", {}) if isinstance(blob, dict) else {}
    if meta.get("base_digest") != base_digest:
        raise TeacherWeightsError(
            f"{path} was tuned from weights {meta.get('base_digest')} but the configured base {base_id} "
            f"has digest {base_digest}"
        )
    model.load_state_dict(blob["state_dict"], strict=True)


def load_teacher(
    cfg: TeacherConfig, work_dir: Path | str, device: str = "cpu", checkpoint: Path | str | None = None
) -> Teacher:
    """Build the teacher that ``cfg`` names, in eval mode on ``device``.

    ``checkpoint`` picks a file explicitly where the config alone leaves a choice: the
    ``shapes-tiny`` pretraining checkpoint, or with ``ln_tuned`` the tuned checkpoint.
    """
    work_dir = Path(work_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    model, teacher_id, arch = _load_base(cfg, work_dir, None if cfg.ln_tuned else ckpt)
    if cfg.ln_tuned:
        base_digest = state_digest(model)
        _load_ln_tuned(model, teacher_id, base_digest, work_dir, ckpt)
        teacher_id = f"{teacher_id}+ln"
    return wrap_model(model, arch, teacher_id, device, cfg.batch_size)


def wrap_model(model: nn.Module, arch: str, teacher_id: str, device: str | torch.device, batch_size: int) -> Teacher:
    """A :class:`Teacher` around an open_clip model (frozen, eval mode, on ``device``)."""
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    tokenizer = open_clip.get_tokenizer(arch)
    with torch.no_grad():
        embed_dim = model.encode_text(tokenizer(["a"]).to(device)).shape[-1]
    return Teacher(
        model=model,
        tokenizer=tokenizer,
        image_size=int(size),
        mean=tuple(float(x) for x in pp["mean"]),
        std=tuple(float(x) for x in pp["std"]),
        embed_dim=int(embed_dim),
        teacher_id=teacher_id,
        digest=state_digest(model),
        device=torch.device(device),
        arch=arch,
        batch_size=batch_size,
    )
