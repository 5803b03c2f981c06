"""The CLIP teacher shared by every method: loading, text banks, region embeddings, tuning."""

from ovdlab.platform.teacher.loading import (
    TINY_MODEL,
    Teacher,
    TeacherWeightsError,
    load_teacher,
    state_digest,
)
from ovdlab.platform.teacher.prompts import (
    RECIPES,
    VILD_TEMPLATES,
    TextBank,
    cached_text_bank,
    class_prompts,
    text_bank,
)
from ovdlab.platform.teacher.regions import CROPS, crop_regions, embed_regions

__all__ = [
    "CROPS",
    "RECIPES",
    "TINY_MODEL",
    "VILD_TEMPLATES",
    "Teacher",
    "TeacherWeightsError",
    "TextBank",
    "cached_text_bank",
    "class_prompts",
    "crop_regions",
    "embed_regions",
    "load_teacher",
    "state_digest",
    "text_bank",
]
