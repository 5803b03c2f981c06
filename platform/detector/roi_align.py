"""RoIAlign as a weighted gather, so that its backward is fast on CPU.

torchvision's CPU ``roi_align`` backward is a serial scatter, one multiply-add per
channel, bin, sample and bilinear corner: in a shapes training step (R18-FPN, 128 px,
batch 8, 64 RoIs per image) it took 28% of the step on 2 cores in a ``torch.profiler``
run, more than every convolution's backward together. ``jobs/bench_roi_align.py`` times
that step with either pooler.

The same values come from a gather: every output bin is a weighted sum of at most
``4 * sampling_ratio**2`` feature-map cells, the bilinear corners of its samples. With
the feature map flattened channels-last to ``(images * H * W, C)`` that is
``F.embedding_bag(index, table, per_sample_weights=w, mode="sum")``, and its backward
is the transposed sparse matrix times the output gradient (a CSR matmul, built by one
sort of the indices), both over whole channel rows. The indices and weights reproduce
torchvision's kernel (``roi_align_kernel.cpp``): sample ``(iy + 0.5) * bin / grid``
within each bin, zero outside ``[-1, size]``, clamped to ``[0, size - 1]``, averaged
over the ``grid_h * grid_w`` samples, ``aligned`` shifting by half a cell and lifting
the minimum RoI size of 1. Boxes get no gradient, as in torchvision.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def _axis_taps(start: Tensor, length: Tensor, bins: int, grid: int, size: int) -> tuple[Tensor, Tensor]:
    """Cell indices and weights along one axis: ``(R, bins, grid * 2)`` each.

    Tap ``2 * i`` is sample ``i``'s lower cell, ``2 * i + 1`` its upper one; a sample
    outside ``[-1, size]`` weighs 0, as in torchvision's ``bilinear_interpolate``.
    """
    steps = torch.arange(bins, dtype=start.dtype, device=start.device)
    within = (torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5) / grid
    bin_size = (length / bins)[:, None, None]
    pos = start[:, None, None] + (steps[None, :, None] + within[None, None, :]) * bin_size
    inside = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    pos = torch.where(at_edge, low.to(pos.dtype), pos)
    frac = pos - low.to(pos.dtype)
    weight = torch.stack([1.0 - frac, frac], dim=-1) * inside[..., None]
    index = torch.stack([low, high], dim=-1)
    return index.flatten(2), weight.flatten(2)


class _WeightedGather(torch.autograd.Function):
    """``out[m] = sum_k weight[m, k] * table[index[m, k]]``; gradient to ``table`` only.

    PyTorch's own backward of ``embedding_bag`` accumulates tap by tap (3-4x slower
    here); the transposed matrix ``W^T`` in CSR form turns it into a sparse matmul.
    """

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index, weight)
        ctx.table_rows = table.shape[0]
        return F.embedding_bag(index, table, per_sample_weights=weight, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        index, weight = ctx.saved_tensors
        taps = index.flatten()
        _, order = torch.sort(taps.to(torch.int32), stable=True)
        rows = torch.zeros(ctx.table_rows + 1, dtype=torch.int64, device=taps.device)
        rows[1:] = torch.bincount(taps, minlength=ctx.table_rows).cumsum(0)
        # Valid by construction (row pointers from the counts, columns sorted by the stable
        # sort), so the invariant check is skipped; the "beta" notice would print once per
        # training process.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            transposed = torch.sparse_csr_tensor(
                rows, order // index.shape[1], weight.flatten()[order], (ctx.table_rows, index.shape[0]),
                check_invariants=False,
            )
        return transposed @ grad.contiguous(), None, None


def roi_align_gather(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = False,
) -> Tensor:
    """``torchvision.ops.roi_align(features, rois, ...)`` for a fixed ``sampling_ratio`` > 0.

    ``rois``: ``(R, 5)`` rows of (image index, x1, y1, x2, y2) in image coordinates.
    Computed in float32 at least (as torchvision's autocast rule does) and returned in
    the features' dtype.
    """
    if sampling_ratio <= 0:
        raise ValueError(f"roi_align_gather needs a fixed sampling_ratio > 0, got {sampling_ratio}")
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    n, c, h, w = features.shape
    r = rois.shape[0]
    if r == 0:
        return features.new_zeros((0, c, out_h, out_w))
    dtype = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(features.device.type, enabled=False):
        table = features.to(dtype).permute(0, 2, 3, 1).reshape(n * h * w, c)
        boxes = rois[:, 1:].to(dtype) * spatial_scale - (0.5 if aligned else 0.0)
        width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        if not aligned:
            width, height = width.clamp(min=1.0), height.clamp(min=1.0)
        ys, wy = _axis_taps(boxes[:, 1], height, out_h, sampling_ratio, h)
        xs, wx = _axis_taps(boxes[:, 0], width, out_w, sampling_ratio, w)
        base = rois[:, 0].long() * (h * w)
        index = base[:, None, None, None, None] + ys[:, :, None, :, None] * w + xs[:, None, :, None, :]
        weight = wy[:, :, None, :, None] * wx[:, None, :, None, :] / (sampling_ratio * sampling_ratio)
        taps = index.shape[-1] * index.shape[-2]
        pooled = _WeightedGather.apply(table, index.reshape(-1, taps), weight.reshape(-1, taps))
    return pooled.view(r, out_h, out_w, c).permute(0, 3, 1, 2).to(features.dtype)


class GatherMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's FPN pooler (same level mapping, scales and output) over :func:`roi_align_gather`
    on CPU; on an accelerator torchvision's own kernel, whose backward is already parallel."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        maps = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(maps, image_shapes, self.canonical_scale, self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes) if len(maps) > 1 else torch.zeros(len(rois), dtype=torch.long)
        pooled, order = [], []
        for level, (feature, scale) in enumerate(zip(maps, self.scales)):
            at_level = torch.where(levels.to(rois.device) == level)[0]
            align = roi_align_gather if feature.device.type == "cpu" else roi_align
            pooled.append(align(feature, rois[at_level], self.output_size, scale, self.sampling_ratio))
            order.append(at_level)
        dtype = maps[0].dtype
        return torch.cat([p.to(dtype) for p in pooled])[torch.argsort(torch.cat(order))]
