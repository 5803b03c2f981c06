"""Typed experiment configuration: YAML composition, dotted overrides, content hash.

A config file under ``configs/`` may list ``defaults`` (other config files, relative
to the configs folder, without ``.yaml``); they are deep-merged in order and the file
itself is merged last. Command-line overrides (``train.max_iter=300``) are applied on
top, their values parsed as YAML scalars. Validation is strict (unknown keys are
errors) and happens before any Ray work: :func:`load_config` raises
:class:`ConfigError` naming the dotted field and, for choices, the allowed values.

Paths: :func:`load_config` runs in the driver and returns a config whose every path is
absolute (:func:`resolve_paths`): Ray Train runs each worker in its own folder, so a
relative path would mean something else there. A relative ``work_dir`` is taken against
the driver's current directory, a relative ``dataset.root`` against ``work_dir``, the
dataset files against ``dataset.root``, and every other path (teacher weights, proposal
files and checkpoints, backbone weights, a training phase's ``train.init_from``
checkpoint, a tracking database) against the current directory (docs/architecture.md,
"Paths").
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the dotted field."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DEFAULT_NOVEL = (
    "red circle", "green square", "blue triangle", "yellow cross",  # new pairs of known attributes
    "red star", "green star", "blue star", "yellow star",  # "star": a shape no base class shows
)
"""The shapes world's novel classes: four compositional pairs and one held-out concept."""


class ShapesConfig(Section):
    """Parameters of the synthetic ``shapes`` world (see ``ovdlab.platform.data.shapes``)."""

    seed: int = 0
    train_images: int = Field(800, ge=1)
    val_images: int = Field(200, ge=1)
    image_size: int = Field(128, ge=32)
    image_format: Literal["png", "jpg"] = "png"
    min_objects: int = Field(1, ge=1)
    max_objects: int = Field(6, ge=1)
    novel: list[str] = Field(default_factory=lambda: list(DEFAULT_NOVEL))
    oracle: bool = Field(False, description="annotate novel objects in train.json too: the ceiling run's world")

    @model_validator(mode="after")
    def _objects_range(self) -> "ShapesConfig":
        if self.max_objects < self.min_objects:
            raise ValueError("max_objects must be >= min_objects")
        return self


class DatasetConfig(Section):
    """A COCO-format OVD dataset: annotation files carry a ``split`` tag per category.

    Relative paths are resolved against ``root``; a relative ``root`` against
    ``work_dir``.
    """

    kind: Literal["shapes", "coco", "lvis"] = "shapes"
    root: str = "data/shapes"
    train_json: str = "annotations/train.json"
    val_json: str = "annotations/val.json"
    train_images: str = "images/train"
    val_images: str = "images/val"
    shapes: ShapesConfig | None = Field(default_factory=ShapesConfig)


class TeacherConfig(Section):
    """The CLIP teacher: an open_clip model by name, or ``shapes-tiny`` (pretrained here)."""

    model: str = "shapes-tiny"
    pretrained: str | None = None
    weights: str | None = None
    prompt: Literal["photo", "names", "vild"] = "photo"
    ln_tuned: bool = False
    batch_size: int = Field(256, ge=1)


class ProposalsConfig(Section):
    """Class-agnostic proposal source for distillation and retrieval."""

    source: Literal["gt", "file", "clip", "rpn"] = "gt"
    file: str | None = None
    checkpoint: str | None = None
    per_image: int = Field(100, ge=1)
    nms_thresh: float = Field(0.7, gt=0, le=1)
    anchor_stride: int = Field(32, ge=1)
    anchor_sizes: list[int] = Field(default_factory=lambda: [32, 64, 128, 256, 512])
    anchor_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])
    drop_base_iou: float | None = None
    drop_base_argmax: bool = False

    @model_validator(mode="after")
    def _source_inputs(self) -> "ProposalsConfig":
        if self.source == "file" and not self.file:
            raise ValueError("source 'file' needs proposals.file")
        return self


class StoreConfig(Section):
    """Region store written by the extraction pipeline."""

    crop: Literal["plain", "1x+1.5x", "1.2x-square"] = "plain"
    rows_per_part: int = Field(512, ge=1)


BASE_CROP_BACKBONE = "base-crops"
"""``model.backbone_weights`` value: a backbone pretrained once on the shapes world's
base-class crops (``ovdlab.platform.detector.backbone_pretraining``), not a file."""


class ModelConfig(Section):
    """Two-stage detector built from torchvision parts.

    ``backbone_weights``: a ResNet state dict file (ImageNet weights for COCO/LVIS), or
    ``base-crops`` on shapes; None trains the backbone from scratch.
    """

    backbone: Literal["resnet18", "resnet50"] = "resnet18"
    neck: Literal["fpn", "c4"] = "fpn"
    backbone_weights: str | None = None
    trainable_layers: int = Field(3, ge=0, le=5)
    fpn_channels: int = Field(64, ge=8)
    min_size: int = Field(128, ge=32)
    max_size: int = Field(128, ge=32)
    anchor_sizes: list[int] = Field(
        default_factory=lambda: [32, 64, 128, 256, 512], min_length=5, max_length=5,
        description="one anchor size per FPN level (P2..P6); C4 puts all five on res4",
    )
    anchor_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=1)
    rpn_pre_nms_top_n: int = Field(600, ge=1)
    rpn_post_nms_top_n: int = Field(300, ge=1)
    rpn_batch_size_per_image: int = Field(128, ge=1)
    roi_batch_size_per_image: int = Field(128, ge=1)
    representation_size: int = Field(256, ge=8)
    embed_dim: int | None = None


TEACHER_SCALE = "the teacher's logit scale"


class MethodSection(Section):
    """Base of a method family's config section.

    ``teacher_calibrated`` maps a knob that is a *calibration* -- a temperature or a logit
    scale, a property of the teacher's embedding space rather than of the method -- to
    how its value follows from the teacher's learned logit scale ``s`` (open_clip's
    ``logit_scale.exp()``: 100 for CLIP ViT-B/32, about 16.8 for ``shapes-tiny``). Such a
    knob defaults to None, "the teacher's", and :func:`calibrate` fills it in on the
    driver once the teacher is loaded, before any worker builds a head; the resolved
    number is then part of the config every run logs. An explicit number stays possible.
    """

    teacher_calibrated: ClassVar[dict[str, Callable[[float], float]]] = {}


def _inverse_scale(scale: float) -> float:
    return 1.0 / scale


CLIFF_SCALE_RATIO = 0.5
"""CLIFF's cosine logit scale relative to its teacher's: the reference's ``NORM_TEMP = 50.0``
(CUHK-AIM-Group/CLIFF ``ovd/config.py``) under CLIP ViT-B/32, whose logit scale is 100."""


def _half_scale(scale: float) -> float:
    return CLIFF_SCALE_RATIO * scale


class ViLDConfig(MethodSection):
    """ViLD-text, ViLD and ViLD-ensemble (``methods/vild.py``): softmax temperature and the
    weight of the image distillation (summed L1, Eq. 3).

    ``temperature`` None: ``1 / s``, the teacher's (ViLD's 0.01 is CLIP's 1/100)."""

    teacher_calibrated: ClassVar[dict[str, Callable[[float], float]]] = {"temperature": _inverse_scale}
    name: Literal["vild-text", "vild", "vild-ensemble"] = "vild-text"
    temperature: float | None = Field(None, gt=0, description=f"None: 1 / {TEACHER_SCALE}")
    distill_weight: float = Field(0.0, ge=0)
    learn_temperature: bool = False


class LPOVODConfig(MethodSection):
    """LP-OVOD (``methods/lp_ovod.py``, Pham et al. WACV 2024).

    ``distill_weight`` multiplies the element-wise mean L1 between the image branch and
    the teacher (mmdet's ``L1Loss(loss_weight=256)``; 256 / D times ViLD's summed form).
    ``temperature`` is that of the image branch's softmax at test time (None: ``1 / s``,
    the teacher's; the reference's 0.01 is CLIP's). ``focal_gamma`` /
    ``focal_alpha``: the sigmoid focal loss of the prototype logits. ``retrieval_k`` /
    ``objectness_floor``: the retrieval stage keeps the top K training proposals per
    novel class among those with objectness >= the floor, the pseudo-labels of the probe.
    """

    teacher_calibrated: ClassVar[dict[str, Callable[[float], float]]] = {"temperature": _inverse_scale}
    name: Literal["lp-ovod"] = "lp-ovod"
    temperature: float | None = Field(None, gt=0, description=f"None: 1 / {TEACHER_SCALE}")
    distill_weight: float = Field(256.0, ge=0)
    focal_gamma: float = Field(2.0, ge=0)
    focal_alpha: float = Field(0.25, ge=0, le=1)
    retrieval_k: int = Field(100, ge=1)
    objectness_floor: float = Field(0.6, ge=0, le=1)


class EZSDConfig(MethodSection):
    """EZSD (``methods/ezsd.py``, Liu, Hu & Nevatia 2023).

    ``temperature``: the initial softmax temperature, learned (``learn_temperature``);
    None: ``1 / s``, the teacher's (the reference initialises CLIP's logit scale, 100).
    ``distill_weight``: the distillation factor (1.0 COCO, 0.5 LVIS) multiplying
    ``512 x`` the confidence-weighted, element-wise mean L1 between region and teacher
    embeddings.
    """

    teacher_calibrated: ClassVar[dict[str, Callable[[float], float]]] = {"temperature": _inverse_scale}
    name: Literal["ezsd"] = "ezsd"
    temperature: float | None = Field(None, gt=0, description=f"None: 1 / {TEACHER_SCALE}")
    learn_temperature: bool = True
    distill_weight: float = Field(1.0, ge=0)


class CLIFFConfig(MethodSection):
    """CLIFF (``methods/cliff/``, Li et al. 2024): the object feature diffused to CLIP spaces.

    Defaults are the reference's (CUHK-AIM-Group/CLIFF ``configs/CLIFF_COCO_RCNN-C4_*.yaml``
    and ``ovd/config.py``; docs/methods.md, "Fidelity"). ``diffusion_steps``: T of the
    cosine schedule (``cosine_s``); ``image_steps`` of the reverse steps take the object to
    CLIP image space (the first ``T - 1 .. T - image_steps``). ``logit_scale``: the cosine
    logits' scale (None: half the teacher's, as the reference's 50 is half of CLIP's 100;
    on shapes-tiny about 8.4). Loss weights: ``kl_weight`` (the VAE layer's KL, summed
    over dimensions; the reference applies 1 whatever its config says), ``rec_weight``
    (the image chain's L1 to the teacher's embeddings of the stored class-agnostic
    proposals: 15 in stage 2) and ``final_rec_weight`` (75 in stage 3), ``gen_weight``
    (the noise-prediction loss). ``gen_loss``: ``l1`` at one random step (stages 2 and 3)
    or ``mse-all-steps`` (stage 1, the reference's over-sampling). ``object_noise``: the
    diffusion starts from the VAE layer's sample (stages 2 and 3) rather than ``N(0, I)``
    (stage 1). ``image_chain``: whether the condition of the text generation is gated by
    the generated image embedding (stages 2 and 3; off in stage 1). ``stage_split``: how
    the three training phases share ``train.max_iter`` (the paper's 90k / 360k / 120k:
    3 : 12 : 4); ``phase_steps``: where each phase decays its LR, as fractions of its
    length; ``final_lr_factor``: the last phase's LR relative to ``train.lr``. The recipe
    sets the per-phase values (``methods/cliff/method.py``).
    """

    teacher_calibrated: ClassVar[dict[str, Callable[[float], float]]] = {"logit_scale": _half_scale}
    name: Literal["cliff"] = "cliff"
    diffusion_steps: int = Field(10, ge=2)
    image_steps: int = Field(3, ge=1)
    cosine_s: float = Field(0.008, gt=0)
    logit_scale: float | None = Field(None, gt=0, description=f"None: {CLIFF_SCALE_RATIO} x {TEACHER_SCALE}")
    kl_weight: float = Field(1.0, ge=0)
    rec_weight: float = Field(15.0, ge=0)
    final_rec_weight: float = Field(75.0, ge=0)
    gen_weight: float = Field(1.0, ge=0)
    gen_loss: Literal["l1", "mse-all-steps"] = "l1"
    object_noise: bool = True
    image_chain: bool = True
    stage_split: list[float] = Field(default_factory=lambda: [3.0, 12.0, 4.0], min_length=3, max_length=3)
    phase_steps: list[list[float]] = Field(
        default_factory=lambda: [[2 / 3, 8 / 9], [2 / 3, 8 / 9], [1 / 2, 2 / 3]], min_length=3, max_length=3)
    final_lr_factor: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _chain_fits(self) -> "CLIFFConfig":
        if self.image_steps > self.diffusion_steps:
            raise ValueError(f"image_steps ({self.image_steps}) must be <= diffusion_steps ({self.diffusion_steps})")
        if any(n <= 0 for n in self.stage_split):
            raise ValueError(f"stage_split must be positive, got {self.stage_split}")
        if any(not 0 < f < 1 for phase in self.phase_steps for f in phase):
            raise ValueError(f"phase_steps are fractions of a phase, each in (0, 1), got {self.phase_steps}")
        return self


METHOD_CONFIGS: tuple[type[MethodSection], ...] = (ViLDConfig, LPOVODConfig, EZSDConfig, CLIFFConfig)
"""One config class per method family; its ``name`` Literal lists the methods it configures."""


def method_names() -> list[str]:
    """Every ``method.name`` the config accepts, from the config classes' ``Literal`` tags."""
    return [name for cls in METHOD_CONFIGS for name in get_args(cls.model_fields["name"].annotation)]


def _method_family(value: Any) -> str | None:
    """The config class of a raw or built ``method`` section, by its name (default
    ``vild-text``); None for an unknown name, which validation reports."""
    name = value.get("name", "vild-text") if isinstance(value, dict) else getattr(value, "name", None)
    return next((cls.__name__ for cls in METHOD_CONFIGS if name in get_args(cls.model_fields["name"].annotation)), None)


MethodConfig = Annotated[
    Union[tuple(Annotated[cls, Tag(cls.__name__)] for cls in METHOD_CONFIGS)],  # type: ignore[valid-type]
    Discriminator(_method_family),
]
"""The ``method`` section: the config class of the method named (a discriminated union,
so a method's knobs exist only on its own config, and an unknown name or another
method's knob is an error naming the field). ``methods/registry.py`` maps the same names
to method classes; a test keeps the two lists equal."""


class TrainConfig(Section):
    """Optimisation schedule; the loop itself is the platform's.

    ``vocabulary``: the classes trained on -- ``base`` (open-vocabulary detection), or
    ``all`` for the oracle ceiling, which needs novel boxes in the training file
    (``dataset.shapes.oracle``).

    ``distill_per_image``: distillation proposals per image and step (None: all of the
    image's stored ones); a store's ground-truth rows (EZSD's) are distilled besides them,
    every one, as EZSD's reference does. ``distill_order``: which proposals, ``random`` (a
    fresh random subset each time the image is drawn) or ``first`` (the store's first,
    i.e. the source's highest-scored: CLIFF's top-5 proposals, EZSD's fixed first 200).
    ViLD distills every one of its M precomputed proposals; on CPU each region costs a
    RoIAlign backward, so a small run samples them instead.

    ``init_from``: a checkpoint (a training checkpoint folder or its ``model.pt``) whose
    model weights start this phase, so that a multi-phase method (CLIFF's phases,
    LP-OVOD's probe) continues from an earlier phase's detector. Only the weights: step,
    optimizer and LR schedule start fresh, since the phase has its own schedule. A
    phase that resumes from its own checkpoint ignores it (the interrupted phase's
    weights are the later ones). A relative path is taken against the current directory.

    ``freeze``: parts that do not train in this phase (a probe trains a head on fixed
    features). Short names ``backbone`` (ResNet body + FPN), ``rpn``, ``box_head`` (the
    RoI box head's shared layers), ``box_predictor`` (class-agnostic box regression);
    any other entry is a parameter-name prefix (``roi_heads.method_head.projection``).
    An entry matching no parameter is an error. Frozen parameters leave the optimizer and
    their BatchNorm statistics stop updating (``ovdlab.platform.train.freezing``);
    ``model.trainable_layers`` still freezes the lower ResNet layers as before.

    ``amp``: mixed precision where the device computes it natively: float16 on GPU,
    bfloat16 on a CPU with AVX512-BF16 or AMX, float32 elsewhere
    (``ovdlab.platform.train.loop.autocast_dtype``).

    ``pseudo_labels``: a JSON file of pseudo-labelled boxes (LP-OVOD's retrieval stage
    writes it: ``categories`` and COCO-style ``annotations``). Its classes join the
    training vocabulary, still marked novel (they never had a ground-truth box), and the
    phase trains on the images that have a pseudo-label: elsewhere the unlabelled objects
    of those classes would be taught as background. Boxes are in original pixels and go
    through the same resize and flip as the image.
    """

    vocabulary: Literal["base", "all"] = "base"
    max_iter: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.02, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["step", "cosine"] = "step"
    steps: list[int] = Field(default_factory=lambda: [200, 260])
    gamma: float = Field(0.1, gt=0)
    warmup_iters: int = Field(50, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    eval_period: int = Field(0, ge=0)
    checkpoint_period: int = Field(100, ge=1)
    amp: bool = True
    loader_workers: int = Field(0, ge=0)
    distill_per_image: int | None = Field(None, ge=1)
    distill_order: Literal["random", "first"] = "random"
    init_from: str | None = None
    freeze: list[str] = Field(default_factory=list)
    pseudo_labels: str | None = None


class EvalConfig(Section):
    """Inference settings for evaluation and prediction.

    ``seed``: seeds the random generator a sampling method draws from at inference
    (``RegionContext.generator``; CLIFF's diffusion): the same seed gives the same
    detections. Deterministic methods ignore it. ``seeds``: how many sampling seeds
    (``seed``, ``seed + 1``, ...) a recipe's ``eval`` stage evaluates, reporting the mean
    and the spread of every metric (CLIFF: 3, as the paper reports).
    """

    score_thresh: float = Field(0.001, ge=0, le=1)
    nms_thresh: float = Field(0.5, gt=0, le=1)
    detections_per_image: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    vis_images: int = Field(8, ge=0)
    seed: int = 0
    seeds: int = Field(1, ge=1)


class TrackingConfig(Section):
    """MLflow tracking; ``uri`` None means a SQLite file in the work dir.

    ``uri``: ``sqlite:///<file>``, ``http(s)://host:port`` of an ``mlflow server``, or a
    plain path, taken as a SQLite database file (MLflow's file store is deprecated).
    """

    enabled: bool = True
    uri: str | None = None
    experiment: str | None = None
    run_name: str | None = None

    @field_validator("uri")
    @classmethod
    def _known_store(cls, uri: str | None) -> str | None:
        """Refused here, before any Ray work, rather than by MLflow inside a worker.

        Imported lazily: the tracking package imports this module (and MLflow).
        """
        from ovdlab.platform.tracking.uri import check_tracking_uri

        check_tracking_uri(uri, source="tracking URI")
        return uri


class RayConfig(Section):
    """Resources; fractional CPUs keep a 2-core machine from deadlocking."""

    address: str | None = None
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    actor_cpus: float = Field(0.5, gt=0)
    actor_gpus: float = Field(0.0, ge=0)
    actor_pool_size: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)


class ExperimentConfig(Section):
    """A whole experiment: what every job, CLI command and sweep trial receives."""

    name: str = "experiment"
    work_dir: str = "work"
    seed: int = 0
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    proposals: ProposalsConfig = Field(default_factory=ProposalsConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=ViLDConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def work_path(self, *parts: str) -> Path:
        """A path under ``work_dir`` (absolute, so Ray workers agree on it)."""
        return Path(self.work_dir).expanduser().resolve().joinpath(*parts)

    def dataset_root(self) -> Path:
        root = Path(self.dataset.root).expanduser()
        return root if root.is_absolute() else self.work_path(str(root))

    def content_hash(self) -> str:
        """Stable hash of the resolved config (12 hex digits)."""
        return content_key(self.model_dump(mode="json"))


def uncalibrated(method: MethodSection) -> list[str]:
    """The method's teacher-calibrated knobs still unset (None: "the teacher's")."""
    return [key for key in method.teacher_calibrated if getattr(method, key) is None]


def calibrate(cfg: ExperimentConfig, teacher_logit_scale: float) -> ExperimentConfig:
    """``cfg`` with every teacher-calibrated method knob left None set from the teacher's
    learned logit scale (:class:`MethodSection`); explicit values are kept.

    Runs on the driver once the teacher is loaded (``prepare_training``), so the workers,
    the checkpoint's ``config.yaml`` and the run's logged params all carry the number.
    """
    scale = float(teacher_logit_scale)
    if not scale > 0 or scale != scale or scale == float("inf"):
        raise ConfigError(f"the teacher's logit scale must be a positive finite number, got {teacher_logit_scale!r}")
    method = cfg.method
    updates = {key: method.teacher_calibrated[key](scale) for key in uncalibrated(method)}
    if not updates:
        return cfg
    return cfg.model_copy(update={"method": method.model_copy(update=updates)})


def content_key(*parts: Any) -> str:
    """Hash of JSON-serialisable parts; identical inputs give identical keys."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def file_digest(path: str | Path) -> str:
    """16 hex digits of a file's SHA-256, read in 1 MiB chunks (files that feed content keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``top`` into a copy of ``base``; mappings merge, others replace."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_config_path(name: str | Path, relative_to: Path) -> Path:
    path = Path(name)
    candidates = [path] if path.suffix in {".yaml", ".yml"} else [path.with_suffix(".yaml")]
    for cand in candidates:
        for base in (Path.cwd(), relative_to, CONFIGS_DIR, CONFIGS_DIR / "experiments"):
            full = cand if cand.is_absolute() else base / cand
            if full.is_file():
                return full.resolve()
    raise ConfigError(f"config file not found: {name} (looked in the current folder, {CONFIGS_DIR} and its experiments/)")


def config_file(name: str | Path) -> Path:
    """The experiment YAML a name or path means, as :func:`load_config` finds it (absolute)."""
    return _resolve_config_path(name, CONFIGS_DIR)


METHOD_DEFAULTS_DIR = CONFIGS_DIR / "methods"
"""Layers here hold a method family's defaults: a later layer naming another family
replaces them. A method key written anywhere else is the user's and is never dropped."""


@dataclass
class Layered:
    """A composed raw config with where each leaf key came from.

    ``origins``: dotted key -> the file that wrote its value. ``dropped``: user-written
    ``method`` keys that a layer naming another method family would discard, by key ->
    ``(value, origin, the file that switched)``; composing fails if any is not written
    again by a later layer (:func:`load_layered`).
    """

    data: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, tuple[Any, str, str]] = field(default_factory=dict)


def _layer_file(full: Path) -> str:
    try:
        return str(full.relative_to(CONFIGS_DIR.parent))
    except ValueError:
        return str(full)


def load_layered(path: str | Path, _seen: tuple[Path, ...] = ()) -> Layered:
    """A YAML config with its ``defaults`` merged in and the origin of every key, not yet
    validated; refuses a composition that would drop a user's ``method`` setting."""
    full = _resolve_config_path(path, CONFIGS_DIR)
    if full in _seen:
        raise ConfigError(f"config defaults form a cycle: {' -> '.join(map(str, _seen + (full,)))}")
    try:
        data = yaml.safe_load(full.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{full}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{full}: top level must be a mapping")
    defaults = data.pop("defaults", []) or []
    if not isinstance(defaults, list) or not all(isinstance(item, str) and item for item in defaults):
        raise ConfigError(
            f"{full}: defaults must be a list of config names, e.g. [datasets/shapes, methods/vild], got {defaults!r}"
        )
    merged = Layered()
    for item in defaults:
        layer = load_layered(item, _seen + (full,))
        merged = _merge_layered(merged, layer, switcher=_layer_file(_resolve_config_path(item, CONFIGS_DIR)))
    own = Layered(data, {key: _layer_file(full) for key in flatten(data)})
    merged = _merge_layered(merged, own, switcher=_layer_file(full))
    if not _seen and merged.dropped:
        raise ConfigError(_dropped_message(_layer_file(full), merged.dropped))
    return merged


def _dropped_message(top: str, dropped: dict[str, tuple[Any, str, str]]) -> str:
    lines = [f"method.{key}={value!r} (written in {origin}) is dropped by {switcher}, which names another "
             f"method family" for key, (value, origin, switcher) in dropped.items()]
    return (f"{top}: a config layer would silently drop a setting:\n  " + "\n  ".join(lines)
            + "\n  write it again after the switch (in the experiment file), or remove it from the base layer")


def _merge_layered(base: Layered, top: Layered, switcher: str) -> Layered:
    """:func:`merge_layer` with origins: a ``method`` key a user wrote in ``base`` that a
    family switch discards is recorded in ``dropped`` unless ``top`` writes it again;
    keys from ``configs/methods/`` (family defaults) are replaced silently."""
    dropped = {k: v for k, v in base.dropped.items() if f"method.{k}" not in top.origins}
    base_method, top_method = base.data.get("method"), top.data.get("method")
    origins = dict(base.origins)
    if _switches_family(base_method, top_method):
        for key, value in base_method.items():
            origin = base.origins.get(f"method.{key}", "")
            if key != "name" and key not in top_method and not origin.startswith(_layer_file(METHOD_DEFAULTS_DIR) + "/"):
                dropped[key] = (value, origin, switcher)
        origins = {k: v for k, v in origins.items() if not k.startswith("method.")}
    origins.update(top.origins)
    return Layered(merge_layer(base.data, top.data), origins, dropped)


def load_raw(path: str | Path) -> dict[str, Any]:
    """Read a YAML config with its ``defaults`` merged in, not yet validated."""
    return load_layered(path).data


def _switches_family(base_method: Any, top_method: Any) -> bool:
    return (isinstance(base_method, dict) and isinstance(top_method, dict) and "name" in top_method
            and _method_family(top_method) != _method_family(base_method))


def merge_layer(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """:func:`deep_merge` of config layers, except that a layer naming a method of another
    config family replaces the ``method`` section: each family has its own knobs (CLIFF's
    experiment builds on ViLD-text's schedule but has no ``temperature``). A method of the
    same family keeps the inherited knobs (ViLD-ensemble's experiment is ViLD's with
    another name: its distillation weight stays ViLD's). :func:`load_layered` refuses a
    switch that would discard a key the user wrote outside ``configs/methods/``."""
    if _switches_family(base.get("method"), top.get("method")):
        base = {k: v for k, v in base.items() if k != "method"}
    return deep_merge(base, top)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.max_iter=300"`` -> (["train", "max_iter"], 300)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw config dict (validation comes after)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        tags = {cls.__name__ for cls in METHOD_CONFIGS}
        field = ".".join(str(p) for p in item["loc"] if p not in tags) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown field")
        elif item["type"] == "union_tag_not_found":
            name = item["input"].get("name") if isinstance(item["input"], dict) else item["input"]
            lines.append(f"{field}.name: {name!r} is not implemented; implemented methods: {', '.join(method_names())}")
        else:
            lines.append(f"{field}: {item['msg']} (got {item.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw dict into an :class:`ExperimentConfig` or raise :class:`ConfigError`."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, compose, override, validate and make every path absolute (driver side).

    ``path`` None starts from the defaults. Workers rebuild the returned config with
    :func:`build_config` and so see the driver's absolute paths.
    """
    raw = load_raw(path) if path is not None else {}
    return resolve_paths(build_config(apply_overrides(raw, list(overrides or []))))


def absolute_path(path: str | None, base: Path) -> str | None:
    """``path`` with ``~`` expanded, made absolute against ``base`` (None stays None)."""
    if path is None:
        return None
    full = Path(path).expanduser()
    return str(full if full.is_absolute() else (base / full).resolve())


def _weights_path(weights: str | None, base: Path) -> str | None:
    return weights if weights == BASE_CROP_BACKBONE else absolute_path(weights, base)


def resolve_paths(cfg: ExperimentConfig, cwd: Path | None = None) -> ExperimentConfig:
    """A copy of ``cfg`` with every path absolute (see the module doc for the bases).

    Idempotent: an absolute path is kept as it is. ``cwd`` defaults to the process's
    current directory.
    """
    from ovdlab.platform.tracking.uri import absolute_tracking_uri

    cwd = Path.cwd() if cwd is None else Path(cwd)
    work_dir = Path(absolute_path(cfg.work_dir, cwd))
    uri = cfg.tracking.uri
    root = Path(absolute_path(cfg.dataset.root, work_dir))
    ds = cfg.dataset
    dataset = ds.model_copy(update={
        "root": str(root),
        **{field: absolute_path(getattr(ds, field), root) for field in ("train_json", "val_json", "train_images", "val_images")},
    })
    return cfg.model_copy(update={
        "work_dir": str(work_dir),
        "dataset": dataset,
        "teacher": cfg.teacher.model_copy(update={"weights": absolute_path(cfg.teacher.weights, cwd)}),
        "proposals": cfg.proposals.model_copy(update={
            "file": absolute_path(cfg.proposals.file, cwd), "checkpoint": absolute_path(cfg.proposals.checkpoint, cwd)}),
        "model": cfg.model.model_copy(update={"backbone_weights": _weights_path(cfg.model.backbone_weights, cwd)}),
        "train": cfg.train.model_copy(update={
            "init_from": absolute_path(cfg.train.init_from, cwd), "pseudo_labels": absolute_path(cfg.train.pseudo_labels, cwd)}),
        "tracking": cfg.tracking.model_copy(update={"uri": uri and absolute_tracking_uri(uri, cwd)}),
    })


def dump_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML, as logged with every run."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
