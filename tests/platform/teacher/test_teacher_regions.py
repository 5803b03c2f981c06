"""Batched region crops (roi_align on the tensor) against a per-crop PIL reference.

Tolerances, measured on shapes-world images with 12 random boxes each (some leaving the
image), in CLIP-normalised units (1/255 of a pixel is ~0.015):

- 224 px crops (every box is upsampled): roi_align's bilinear sample at the bin centre is
  PIL's bilinear upsampling; the only difference is PIL rounding its output to uint8,
  so every pixel is within 0.016 and the mean difference of a crop below 0.006.
- 32 px crops (the shapes-tiny teacher; boxes are mostly shrunk): roi_align averages
  ceil(scale)^2 bilinear samples per output pixel where PIL applies a triangle filter
  of width 2 x scale, two slightly different antialiasing filters. Measured worst crop
  mean 0.024 and single-pixel differences up to 0.36 on shape edges; we assert a crop
  mean below 0.04 and embedding cosine above 0.999 (random-init teacher; the pretrained
  teacher's check is in test_teacher_shapes.py).
"""

from __future__ import annotations

import pytest
import torch

from ovdlab.platform.config import ShapesConfig
from ovdlab.platform.data.shapes import generate_image
from ovdlab.platform.teacher.regions import (
    CROPS,
    combine_views,
    crop_regions,
    embed_regions,
    num_views,
    pil_reference_crops,
    scale_boxes,
)


def _scene(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A shapes image (uint8 [3, H, W]) and 12 random boxes, some reaching past its border."""
    img, _ = generate_image(ShapesConfig(), "val", index)
    image = torch.from_numpy(img.copy()).permute(2, 0, 1).contiguous()
    gen = torch.Generator().manual_seed(index)
    xy = torch.rand(12, 2, generator=gen) * 110 - 5
    wh = 6 + torch.rand(12, 2, generator=gen) * 60
    return image, torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("crop", CROPS)
def test_batched_crops_match_pil_reference(tiny_teacher, crop):
    t = tiny_teacher
    for index in range(3):
        image, boxes = _scene(index)
        big = crop_regions(image, boxes, crop, 224, t.mean, t.std)
        big_ref = pil_reference_crops(image, boxes, crop, 224, t.mean, t.std)
        assert big.shape == big_ref.shape == (num_views(crop) * 12, 3, 224, 224)
        assert (big - big_ref).abs().max() < 0.016
        assert (big - big_ref).abs().mean(dim=(1, 2, 3)).max() < 0.006

        small = crop_regions(image, boxes, crop, t.image_size, t.mean, t.std)
        small_ref = pil_reference_crops(image, boxes, crop, t.image_size, t.mean, t.std)
        assert (small - small_ref).abs().mean(dim=(1, 2, 3)).max() < 0.04
        emb = combine_views(t.encode_crops(small), num_views(crop))
        emb_ref = combine_views(t.encode_crops(small_ref), num_views(crop))
        assert (emb * emb_ref).sum(dim=1).min() > 0.999


def test_square_crop_pads_with_black(tiny_teacher):
    t = tiny_teacher
    image = torch.full((3, 40, 60), 200, dtype=torch.uint8)
    box = torch.tensor([[0.0, 0.0, 20.0, 40.0]])  # 1.2x -> 24x48, square 48x48 centred at (10, 20)
    crop = crop_regions(image, box, "1.2x-square", 48, t.mean, t.std)[0]
    black = (-torch.tensor(t.mean) / torch.tensor(t.std)).view(3, 1)
    grey = ((200 / 255 - torch.tensor(t.mean)) / torch.tensor(t.std)).view(3, 1)
    # The square spans x in [-14, 34]: the left 13 output columns lie outside the image.
    assert torch.allclose(crop[:, :, :13].reshape(3, -1), black.expand(3, 48 * 13), atol=1e-5)
    assert torch.allclose(crop[:, 4:44, 16:32].reshape(3, -1), grey.expand(3, 40 * 16), atol=1e-4)


def test_one_and_a_half_is_sum_of_two_plain_crops(tiny_teacher):
    t = tiny_teacher
    image, boxes = _scene(0)
    h, w = image.shape[1:]
    plain = embed_regions(t, [image, image], [boxes, scale_boxes(boxes, 1.5)], "plain", 64)
    both = embed_regions(t, [image], [boxes], "1x+1.5x", 64)[0]
    want = torch.nn.functional.normalize(plain[0] + plain[1], dim=1)
    assert torch.allclose(both, want, atol=1e-5)
    assert torch.allclose(both.norm(dim=1), torch.ones(len(boxes)), atol=1e-5)
    assert (h, w) == (128, 128)


def test_batching_does_not_change_embeddings(tiny_teacher):
    scenes = [_scene(i) for i in range(3)]
    images = [s[0] for s in scenes]
    boxes = [s[1] for s in scenes]
    boxes[1] = torch.zeros(0, 4)
    one = embed_regions(tiny_teacher, images, boxes, "1.2x-square", 1)
    many = embed_regions(tiny_teacher, images, boxes, "1.2x-square", 1000)
    assert [e.shape[0] for e in many] == [12, 0, 12]
    assert many[1].shape == (0, tiny_teacher.embed_dim)
    for a, b in zip(one, many):
        assert torch.allclose(a, b, atol=1e-5)


def test_bad_inputs_name_the_image(tiny_teacher):
    image, boxes = _scene(0)
    outside = torch.tensor([[130.0, 130.0, 140.0, 150.0]])
    with pytest.raises(ValueError, match=r"image 1: box 0 .* outside the 128x128 image"):
        embed_regions(tiny_teacher, [image, image], [boxes, outside], "plain", 8)
    with pytest.raises(ValueError, match="image 0: expected a uint8"):
        embed_regions(tiny_teacher, [image.float()], [boxes], "plain", 8)
    with pytest.raises(ValueError, match="image 0: boxes contain NaN"):
        embed_regions(tiny_teacher, [image], [torch.full((1, 4), float("nan"))], "plain", 8)
    with pytest.raises(ValueError, match="unknown crop recipe"):
        embed_regions(tiny_teacher, [image], [boxes], "2x", 8)
    with pytest.raises(ValueError, match="2 images but 1 box lists"):
        embed_regions(tiny_teacher, [image, image], [boxes], "plain", 8)
