"""Text banks: prompt recipes, the ViLD ensemble, caching by content key."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovdlab.platform.teacher.prompts import (
    VILD_TEMPLATES,
    cached_text_bank,
    class_prompts,
    text_bank,
    text_bank_key,
)

NAMES = ["red circle", "blue star", "apple", "hot_dog"]


def test_vild_templates_are_63_distinct():
    assert len(VILD_TEMPLATES) == 63 and len(set(VILD_TEMPLATES)) == 63
    assert VILD_TEMPLATES[0] == "There is {article} {} in the scene."
    assert "itap of a {}." not in VILD_TEMPLATES and "itap of {article} {}." in VILD_TEMPLATES
    assert all("{}" in t for t in VILD_TEMPLATES)


def test_class_prompts_per_recipe():
    assert class_prompts("red circle", "photo") == ["a photo of a red circle"]
    assert class_prompts("hot_dog", "names") == ["hot dog"]
    vild = class_prompts("apple", "vild")
    assert len(vild) == 63
    assert vild[0] == "There is an apple in the scene."
    # ViLD's colab prefixes "This is " to prompts starting with "a"/"the".
    assert "This is a photo of an apple." in vild and "This is the toy apple." in vild
    with pytest.raises(ValueError, match="unknown prompt recipe"):
        class_prompts("apple", "fancy")


@pytest.mark.parametrize("recipe", ["photo", "names", "vild"])
def test_text_bank_is_normalized(tiny_teacher, recipe):
    bank = text_bank(tiny_teacher, NAMES, recipe)
    assert bank.names == NAMES and bank.recipe == recipe
    assert bank.teacher_id == tiny_teacher.teacher_id and bank.digest == tiny_teacher.digest
    assert bank.embeddings.shape == (len(NAMES), tiny_teacher.embed_dim)
    assert bank.embeddings.dtype == torch.float32
    assert torch.allclose(bank.embeddings.norm(dim=1), torch.ones(len(NAMES)), atol=1e-5)


def test_vild_bank_is_renormalized_mean_of_normalized_templates(tiny_teacher):
    bank = text_bank(tiny_teacher, NAMES[:2], "vild")
    for row, name in zip(bank.embeddings, NAMES[:2]):
        per_template = tiny_teacher.encode_text(class_prompts(name, "vild"))  # each row normalised
        assert torch.allclose(per_template.norm(dim=1), torch.ones(63), atol=1e-5)
        want = F.normalize(per_template.mean(dim=0), dim=0)
        assert torch.allclose(row, want, atol=1e-5)
    photo = text_bank(tiny_teacher, NAMES[:2], "photo")
    assert not torch.allclose(photo.embeddings, bank.embeddings, atol=1e-3)


def test_text_bank_rejects_bad_names(tiny_teacher):
    with pytest.raises(ValueError, match="at least one"):
        text_bank(tiny_teacher, [], "photo")
    with pytest.raises(ValueError, match="empty or non-string"):
        text_bank(tiny_teacher, ["cat", " "], "photo")


def test_cached_text_bank_hits_without_recomputing(tiny_teacher, tmp_path, monkeypatch):
    first = cached_text_bank(tiny_teacher, NAMES, "vild", tmp_path)
    key = text_bank_key(tiny_teacher, NAMES, "vild")
    path = tmp_path / f"text-vild-{key}.pt"
    assert path.is_file()
    stored = torch.load(path, weights_only=True)
    assert stored["names"] == NAMES and torch.equal(stored["embeddings"], first.embeddings)

    def boom(texts):
        raise AssertionError("cache hit must not re-encode")

    monkeypatch.setattr(tiny_teacher, "encode_text", boom)
    second = cached_text_bank(tiny_teacher, NAMES, "vild", tmp_path)
    assert torch.equal(second.embeddings, first.embeddings)
    assert second.names == first.names and second.digest == first.digest and second.teacher_id == first.teacher_id
    # Another recipe or another name order is another key.
    assert text_bank_key(tiny_teacher, NAMES, "photo") != key
    assert text_bank_key(tiny_teacher, NAMES[::-1], "vild") != key
