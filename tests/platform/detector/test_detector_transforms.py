"""Ground-truth and distillation boxes stay aligned with the image through resize + flip.

Each box is drawn into the image (a filled rectangle in its own channel), the image and
boxes are transformed by one call, and the drawn pixels are found again: their extent
must match the transformed box to the pixel.
"""

from __future__ import annotations

import pytest
import torch

from ovdlab.platform.detector.transforms import hflip, resize, resized_shape


def draw(height: int, width: int, boxes: dict[str, torch.Tensor]) -> torch.Tensor:
    """Channel c holds box set c's boxes as filled rectangles (integer pixel boxes)."""
    image = torch.zeros(3, height, width)
    for channel, name in enumerate(boxes):
        for x1, y1, x2, y2 in boxes[name].round().long().tolist():
            image[channel, y1:y2, x1:x2] = 1.0
    return image


def drawn_box(channel: torch.Tensor) -> list[int]:
    """xyxy extent (pixel edges) of pixels above half intensity."""
    ys, xs = torch.where(channel > 0.5)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


BOXES = {
    "boxes": torch.tensor([[10.0, 20.0, 30.0, 45.0]]),
    "distill_boxes": torch.tensor([[41.0, 5.0, 77.0, 33.0]]),
}


def test_resized_shape_follows_resize_shortest_edge():
    assert resized_shape(60, 80, 120, 1000) == (120, 160)
    assert resized_shape(60, 80, 120, 150) == (113, 150)  # longer side capped; 112.5 rounds up
    assert resized_shape(480, 640, 800, 1333) == (800, 1067)  # detectron2 rounding


def test_hflip_is_pixel_exact():
    image = draw(60, 80, BOXES)
    flipped, boxes = hflip(image, BOXES)
    for channel, name in enumerate(BOXES):
        assert drawn_box(flipped[channel]) == boxes[name][0].tolist()
    assert boxes["boxes"][0].tolist() == [50.0, 20.0, 70.0, 45.0]
    # flipping twice is the identity for the image and every box set
    back, again = hflip(flipped, boxes)
    assert torch.equal(back, image)
    for name in BOXES:
        assert torch.equal(again[name], BOXES[name])


@pytest.mark.parametrize(
    "min_size,max_size",
    [(120, 1000), (90, 1000), (45, 1000), (120, 150), (37, 1000)],
)
def test_resize_then_flip_keeps_boxes_on_their_pixels(min_size, max_size):
    image = draw(60, 80, BOXES)
    resized, boxes, (sx, sy) = resize(image, BOXES, min_size, max_size)
    height, width = resized.shape[-2:]
    assert (height, width) == resized_shape(60, 80, min_size, max_size)
    assert sx == pytest.approx(width / 80) and sy == pytest.approx(height / 60)
    flipped, flipped_boxes = hflip(resized, boxes)
    for img, bxs in [(resized, boxes), (flipped, flipped_boxes)]:
        for channel, name in enumerate(BOXES):
            found = torch.tensor(drawn_box(img[channel]), dtype=torch.float32)
            # to the pixel: the drawn edge lies within one pixel of the transformed edge
            assert torch.allclose(found, bxs[name][0], atol=1.0), (name, found, bxs[name][0])


def test_exact_upscale_by_two_is_pixel_exact():
    resized, boxes, scale = resize(draw(60, 80, BOXES), BOXES, 120, 1000)
    assert scale == (2.0, 2.0)
    for channel, name in enumerate(BOXES):
        assert drawn_box(resized[channel]) == boxes[name][0].tolist()


def test_resize_rejects_batched_input():
    with pytest.raises(ValueError, match="C, H, W"):
        resize(torch.zeros(1, 3, 10, 10), {}, 20, 40)
