"""Region-embedding geometry: the shared direction and what it decides (hand-built vectors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ovdlab.platform.evaluation.embedding_geometry import embedding_geometry

TEXT = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 1.0]])  # base a, base b, novel c
IS_NOVEL = torch.tensor([False, False, True])
SHARED = torch.tensor([0.0, 0, 0, 1.0])  # orthogonal to both base texts, cosine 0.71 to c's


def test_a_shared_direction_no_base_text_sees_hands_base_objects_to_the_novel_class_it_favours():
    """Base objects carry their class on 0.3 of the length and a shared direction on the
    rest: the base softmax cannot see it, but c's text does, so c is every base object's
    nearest class; with the mean removed each is nearest its own."""
    embeddings = torch.stack([0.3 * TEXT[0] + SHARED] * 2 + [0.3 * TEXT[1] + SHARED] * 2 + [F.normalize(TEXT[2], dim=0)])
    g = embedding_geometry(embeddings, torch.tensor([0, 0, 1, 1, 2]), TEXT, IS_NOVEL, ["a", "b", "c"])
    assert (g.objects, g.base_objects) == (5, 4)
    assert (g.base_right, g.base_named_novel, g.novel_right) == (0.0, 100.0, 100.0)
    assert (g.base_right_without_shared, g.base_named_novel_without_shared) == (100.0, 0.0)
    assert g.novel_nearest_shared == "c" and g.novel_nearest_shared_cos > 0.7
    unit = F.normalize(embeddings, dim=-1)
    assert g.shared_length == pytest.approx(float(unit.mean(0).norm()), abs=1e-6) and g.shared_length > 0.9
    assert "shared direction 0.933" in g.summary() and "c (0.80)" in g.summary()


def test_embeddings_spread_over_their_classes_share_little():
    embeddings = torch.stack([TEXT[0], -TEXT[0] + 0.1 * TEXT[1], TEXT[1], -TEXT[1] + 0.1 * TEXT[0]])
    g = embedding_geometry(embeddings, torch.tensor([0, 0, 1, 1]), TEXT[:2], IS_NOVEL[:2], ["a", "b"])
    assert g.shared_length < 0.1
    assert math.isnan(g.novel_right) and g.novel_nearest_shared == "-"


def test_no_objects_is_an_error_naming_the_cause():
    with pytest.raises(ValueError, match="no objects"):
        embedding_geometry(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), TEXT, IS_NOVEL, ["a", "b", "c"])
