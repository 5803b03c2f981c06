"""RoIAlign as a weighted gather: torchvision's values and gradients, FPN level mapping, dtypes."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from ovdlab.platform.detector.roi_align import GatherMultiScaleRoIAlign, roi_align_gather


def _rois(n: int, images: int, span: float, generator: torch.Generator) -> torch.Tensor:
    """Boxes of every kind torchvision's kernel has a rule for: inside, partly and wholly
    outside the map, thinner than a cell, touching the last row and column."""
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * (span + 16) - 12
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * span * 0.8
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([0.0, 0.0, 0.3, 0.3])
    boxes[1] = torch.tensor([-30.0, -30.0, -20.0, -18.0])
    boxes[2] = torch.tensor([span - 3.0, span - 3.0, span + 5.0, span + 9.0])
    index = torch.randint(0, images, (n, 1), generator=generator).to(torch.float64)
    return torch.cat([index, boxes], 1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_values_and_gradients_are_torchvisions(aligned, sampling_ratio):
    generator = torch.Generator().manual_seed(sampling_ratio)
    features = torch.randn(3, 5, 9, 11, generator=generator, dtype=torch.float64)
    rois = _rois(60, 3, 22.0, generator)
    grad_out = torch.randn(60, 5, 7, 6, generator=generator, dtype=torch.float64)
    ref, ours = features.clone().requires_grad_(), features.clone().requires_grad_()
    expected = roi_align(ref, rois, (7, 6), 0.5, sampling_ratio, aligned)
    got = roi_align_gather(ours, rois, (7, 6), 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    (expected * grad_out).sum().backward()
    (got * grad_out).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=0, atol=1e-12)


def test_no_rois_and_no_adaptive_sampling():
    features = torch.randn(2, 4, 8, 8, requires_grad=True)
    empty = roi_align_gather(features, torch.zeros(0, 5), 7, 1.0, 2)
    assert empty.shape == (0, 4, 7, 7)
    with pytest.raises(ValueError, match="sampling_ratio > 0"):
        roi_align_gather(features, torch.zeros(1, 5), 7, 1.0, 0)


def test_fpn_pooler_matches_torchvisions_level_by_level():
    """Boxes from 8 to 1000 px reach all four levels of a 1024-px image's FPN (on shapes'
    128-px images only the first two)."""
    generator = torch.Generator().manual_seed(0)
    names = ["0", "1", "2", "3"]
    maps = {str(i): torch.randn(2, 4, 256 >> i, 256 >> i, generator=generator, dtype=torch.float64) for i in range(4)}
    boxes = []
    for _ in range(2):
        wh = 8 + torch.rand(60, 2, generator=generator, dtype=torch.float64) ** 2 * 992
        xy = torch.rand(60, 2, generator=generator, dtype=torch.float64) * (1024 - wh)
        boxes.append(torch.cat([xy, xy + wh], 1))
    sizes = [(1024, 1024)] * 2
    ref = {k: v.clone().requires_grad_() for k, v in maps.items()}
    ours = {k: v.clone().requires_grad_() for k, v in maps.items()}
    theirs = MultiScaleRoIAlign(names, 7, 2)
    mine = GatherMultiScaleRoIAlign(names, 7, 2)
    expected, got = theirs(ref, boxes, sizes), mine(ours, boxes, sizes)
    assert len(set(theirs.map_levels(boxes).tolist())) == 4
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    expected.sum().backward()
    got.sum().backward()
    for name in names:
        torch.testing.assert_close(ours[name].grad, ref[name].grad, rtol=0, atol=1e-12)


def test_fpn_pooler_under_bfloat16_autocast_returns_the_features_dtype():
    """Under autocast the features and the RPN's boxes arrive in bfloat16; both poolers
    compute in float32 and return bfloat16 (equal up to the rounding of a float32 sum
    taken in another order: one bfloat16 step)."""
    generator = torch.Generator().manual_seed(1)
    maps = {"0": torch.randn(1, 4, 16, 16, generator=generator).to(torch.bfloat16)}
    boxes = [torch.tensor([[2.0, 3.0, 40.0, 50.0], [10.0, 10.0, 20.0, 30.0]], dtype=torch.bfloat16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = MultiScaleRoIAlign(["0"], 7, 2)(maps, boxes, [(64, 64)])
        got = GatherMultiScaleRoIAlign(["0"], 7, 2)(maps, boxes, [(64, 64)])
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=0)
