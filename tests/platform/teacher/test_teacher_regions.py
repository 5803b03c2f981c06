"""Batched region crops (antialiased resize of uint8 windows) against a per-crop Pillow reference.

Both paths cut the same integer windows and resize them with the same filter (torch's
antialiased bilinear is the port of Pillow's), so they differ only by fixed-point
rounding: measured on shapes images with 12 random boxes each (some leaving the image),
at most one uint8 level at 32 px and two at 224 px, i.e. 0.015 / 0.030 in
CLIP-normalised units (one level is 1 / (255 * std) <= 0.0152), mean below 0.004.
Asserted: every pixel within 2.5 levels, every crop's mean difference below 0.005.
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
    pixel_windows,
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
    level = 1 / (255 * min(t.std))
    for index in range(3):
        image, boxes = _scene(index)
        for size in (224, t.image_size):
            crops = crop_regions(image, boxes, crop, size, t.mean, t.std)
            reference = pil_reference_crops(image, boxes, crop, size, t.mean, t.std)
            assert crops.shape == reference.shape == (num_views(crop) * 12, 3, size, size)
            assert (crops - reference).abs().max() < level * 2.5
            assert (crops - reference).abs().mean(dim=(1, 2, 3)).max() < 0.005

        small = crop_regions(image, boxes, crop, t.image_size, t.mean, t.std)
        small_ref = pil_reference_crops(image, boxes, crop, t.image_size, t.mean, t.std)
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


def test_pixel_windows_round_like_pillow_and_keep_one_pixel():
    boxes = torch.tensor([[0.4, 1.5, 10.6, 2.5], [3.6, 7.2, 3.9, 7.3], [-2.5, -0.5, 5.5, 6.5]])
    assert pixel_windows(boxes).tolist() == [[0, 2, 11, 2 + 1], [4, 7, 5, 8], [-2, 0, 6, 6]]


def test_sub_pixel_box_gives_a_crop(tiny_teacher):
    t = tiny_teacher
    image, _ = _scene(0)
    box = torch.tensor([[40.2, 40.3, 40.4, 40.45]])
    crop = crop_regions(image, box, "plain", t.image_size, t.mean, t.std)
    pixel = (image[:, 40, 40].float() / 255 - torch.tensor(t.mean)) / torch.tensor(t.std)
    assert torch.allclose(crop[0], pixel.view(3, 1, 1).expand_as(crop[0]), atol=1e-5)


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
