"""The CLIP teacher shared by every method: loading, text banks, region embeddings, tuning."""

from ovdlab.platform.teacher.ln_tuning import ln_checkpoint_path, ln_parameters, tune_layernorm
from ovdlab.platform.teacher.loading import (
    TINY_CONFIG,
    TINY_MODEL,
    Teacher,
    TeacherWeightsError,
    load_teacher,
    state_digest,
    wrap_model,
)
from ovdlab.platform.teacher.prompts import (
    RECIPES,
    VILD_TEMPLATES,
    TextBank,
    cached_text_bank,
    class_prompts,
    text_bank,
)
from ovdlab.platform.teacher.regions import CROPS, crop_regions, embed_regions, image_tensor
from ovdlab.platform.teacher.shapes_teacher import (
    ensure_shapes_teacher,
    pretrain_shapes_teacher,
    zero_shot_accuracy,
)

__all__ = [
    "CROPS",
    "RECIPES",
    "TINY_CONFIG",
    "TINY_MODEL",
    "VILD_TEMPLATES",
    "Teacher",
    "TeacherWeightsError",
    "TextBank",
    "cached_text_bank",
    "class_prompts",
    "crop_regions",
    "embed_regions",
    "ensure_shapes_teacher",
    "image_tensor",
    "ln_checkpoint_path",
    "ln_parameters",
    "load_teacher",
    "pretrain_shapes_teacher",
    "state_digest",
    "text_bank",
    "tune_layernorm",
    "wrap_model",
    "zero_shot_accuracy",
]
