"""Text bank: normalised CLIP class embeddings under a named prompt recipe.

Recipes (the methods differ here, see docs/methods.md):

- ``photo``: ``"a photo of a {}"`` (CLIFF, EZSD's LN tuning).
- ``names``: the bare class name (LP-OVOD).
- ``vild``: ViLD's 63-template ensemble. As in ViLD's ``build_text_embedding`` (the ViLD
  demo colab, tensorflow/tpu ``models/official/detection/projects/vild/ViLD_demo.ipynb``,
  with ``FLAGS.prompt_engineering`` and ``FLAGS.this_is`` on): ``{article}`` becomes
  "an"/"a", prompts starting with "a"/"the" get the prefix "This is ", every template
  embedding is L2-normalised, the mean over templates is re-normalised.

Class names go through ViLD's ``processed_name`` (``_`` -> space, ``/`` -> " or ",
lower case, trailing dot dropped) in every recipe, so LVIS names read as words.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from ovdlab.platform.config import content_key
from ovdlab.platform.teacher.loading import Teacher

log = logging.getLogger(__name__)

Recipe = Literal["photo", "names", "vild"]
RECIPES: tuple[str, ...] = ("photo", "names", "vild")
PHOTO_TEMPLATE = "a photo of a {}"

# The 63 templates of ViLD's prompt ensemble (a subset of CLIP's ImageNet ensemble plus
# scene templates), in the order of ViLD's ``multiple_templates``.
VILD_TEMPLATES: tuple[str, ...] = (
    "There is {article} {} in the scene.",
    "There is the {} in the scene.",
    "a photo of {article} {} in the scene.",
    "a photo of the {} in the scene.",
    "a photo of one {} in the scene.",
    "itap of {article} {}.",
    "itap of my {}.",
    "itap of the {}.",
    "a photo of {article} {}.",
    "a photo of my {}.",
    "a photo of the {}.",
    "a photo of one {}.",
    "a photo of many {}.",
    "a good photo of {article} {}.",
    "a good photo of the {}.",
    "a bad photo of {article} {}.",
    "a bad photo of the {}.",
    "a photo of a nice {}.",
    "a photo of the nice {}.",
    "a photo of a cool {}.",
    "a photo of the cool {}.",
    "a photo of a weird {}.",
    "a photo of the weird {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of a clean {}.",
    "a photo of the clean {}.",
    "a photo of a dirty {}.",
    "a photo of the dirty {}.",
    "a bright photo of {article} {}.",
    "a bright photo of the {}.",
    "a dark photo of {article} {}.",
    "a dark photo of the {}.",
    "a photo of a hard to see {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of {article} {}.",
    "a low resolution photo of the {}.",
    "a cropped photo of {article} {}.",
    "a cropped photo of the {}.",
    "a close-up photo of {article} {}.",
    "a close-up photo of the {}.",
    "a jpeg corrupted photo of {article} {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of {article} {}.",
    "a blurry photo of the {}.",
    "a pixelated photo of {article} {}.",
    "a pixelated photo of the {}.",
    "a black and white photo of the {}.",
    "a black and white photo of {article} {}.",
    "a plastic {}.",
    "the plastic {}.",
    "a toy {}.",
    "the toy {}.",
    "a plushie {}.",
    "the plushie {}.",
    "a cartoon {}.",
    "the cartoon {}.",
    "an embroidered {}.",
    "the embroidered {}.",
    "a painting of the {}.",
    "a painting of a {}.",
)


@dataclass
class TextBank:
    """Class names with their normalised [C, D] float32 embeddings and where they came from."""

    names: list[str]
    recipe: str
    teacher_id: str
    digest: str
    embeddings: torch.Tensor

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "recipe": self.recipe,
            "teacher_id": self.teacher_id,
            "digest": self.digest,
            "embeddings": self.embeddings,
        }


def processed_name(name: str) -> str:
    """ViLD's ``processed_name(name, rm_dot=True)``: ``hot_dog`` -> ``hot dog``."""
    return name.replace("_", " ").replace("/", " or ").lower().rstrip(".")


def article(name: str) -> str:
    """ViLD's article rule: "an" before a vowel letter, else "a"."""
    return "an" if name[:1] in "aeiou" else "a"


def vild_prompts(name: str) -> list[str]:
    """The 63 ViLD prompts of one class, with the "This is " prefix ViLD's colab adds."""
    clean = processed_name(name)
    texts = [t.format(clean, article=article(clean)) for t in VILD_TEMPLATES]
    return ["This is " + t if t.startswith("a") or t.startswith("the") else t for t in texts]


def class_prompts(name: str, recipe: str) -> list[str]:
    """Prompts whose embeddings make one class's entry in the bank."""
    if recipe == "photo":
        return [PHOTO_TEMPLATE.format(processed_name(name))]
    if recipe == "names":
        return [processed_name(name)]
    if recipe == "vild":
        return vild_prompts(name)
    raise ValueError(f"unknown prompt recipe {recipe!r}; choose one of {RECIPES}")


def text_bank(teacher: Teacher, class_names: list[str], recipe: str) -> TextBank:
    """Embed every class under ``recipe``; an ensemble is a mean of normalised prompts, re-normalised."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown prompt recipe {recipe!r}; choose one of {RECIPES}")
    if not class_names:
        raise ValueError("text_bank needs at least one class name")
    bad = [n for n in class_names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ValueError(f"empty or non-string class names: {bad!r}")
    prompts = [class_prompts(n, recipe) for n in class_names]
    per_class = len(prompts[0])
    flat = teacher.encode_text([p for ps in prompts for p in ps])
    emb = flat.view(len(class_names), per_class, -1).mean(dim=1)
    emb = F.normalize(emb, dim=-1).float()
    return TextBank(list(class_names), recipe, teacher.teacher_id, teacher.digest, emb.contiguous())


def text_bank_key(teacher: Teacher, names: list[str], recipe: str) -> str:
    """Content key of a bank: the teacher's weights digest, the names in order, the recipe."""
    return content_key(teacher.digest, list(names), recipe)


def cached_text_bank(teacher: Teacher, names: list[str], recipe: str, cache_dir: Path | str) -> TextBank:
    """:func:`text_bank`, stored as ``cache_dir/text-<recipe>-<key>.pt`` and reused on a key hit."""
    key = text_bank_key(teacher, names, recipe)
    path = Path(cache_dir) / f"text-{recipe}-{key}.pt"
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("names") == list(names) and blob.get("digest") == teacher.digest:
            return TextBank(**blob)
        log.warning("text bank %s does not match its key; recomputing", path)
    bank = text_bank(teacher, names, recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(bank.to_dict(), tmp)
    os.replace(tmp, path)
    return bank
