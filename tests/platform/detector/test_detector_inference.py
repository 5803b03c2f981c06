"""predict_images / propose_images map back to original pixels; COCO results format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdlab.methods.base import Vocabulary
from ovdlab.methods.registry import build_method
from ovdlab.platform.config import EvalConfig, ViLDConfig, ModelConfig
from ovdlab.platform.detector import build_detector, detections_to_coco, predict_images, propose_images
from ovdlab.platform.detector.data import image_to_tensor
from ovdlab.platform.detector.transforms import resize

EMBED = 16


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(fpn_channels=16, representation_size=32, rpn_pre_nms_top_n=100, rpn_post_nms_top_n=30)
    det = build_detector(cfg, build_method(ViLDConfig(temperature=0.01, name="vild-text")), EMBED)
    det.set_vocabulary(Vocabulary.trained(F.normalize(torch.randn(3, EMBED), dim=1)))
    return det


def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), rng.integers(0, 256, (70, 30, 3), dtype=np.uint8)]


def test_predict_images_maps_to_original_pixels_and_restores_state(model):
    train_text = model.text.clone()
    model.train()
    eval_cfg = EvalConfig(score_thresh=0.0, detections_per_image=20, batch_size=1)
    text = Vocabulary.trained(F.normalize(torch.randn(6, EMBED), dim=1))
    results = predict_images(model, images(), text, eval_cfg, min_size=64, max_size=96)

    assert model.training and torch.equal(model.text, train_text)  # state restored
    assert model.roi_heads.detections_per_image == EvalConfig().detections_per_image
    assert len(results) == 2
    for det, image in zip(results, images()):
        h, w = image.shape[:2]
        assert 0 < len(det["boxes"]) <= 20 and det["labels"].max() < 6
        assert (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all() and (det["boxes"] >= 0).all()

    # the same detections, by hand: resize, detect, divide by the per-axis scale
    model.eval()
    model.set_vocabulary(text)
    model.set_inference(eval_cfg)
    tensor, _, (sx, sy) = resize(image_to_tensor(images()[1]), {}, 64, 96)
    with torch.no_grad():
        (manual,) = model([tensor])
    expected = manual["boxes"] / torch.tensor([sx, sy, sx, sy])
    expected[:, 0::2] = expected[:, 0::2].clamp(0, 30)
    expected[:, 1::2] = expected[:, 1::2].clamp(0, 70)
    assert torch.allclose(results[1]["boxes"], expected, atol=1e-4)
    assert torch.equal(results[1]["labels"], manual["labels"])
    model.set_vocabulary(Vocabulary.trained(train_text))
    model.set_inference(EvalConfig())


def test_propose_images_in_original_pixels(model):
    proposals = propose_images(model, images(), min_size=64, max_size=96)
    for (boxes, scores), image in zip(proposals, images()):
        h, w = image.shape[:2]
        assert 0 < len(boxes) <= 30 and scores.shape == (len(boxes),)
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()


def test_detections_to_coco():
    detections = [
        {"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    results = detections_to_coco(detections, [7, 8], category_ids=[5, 17])
    assert results == [{"image_id": 7, "category_id": 17, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]
    with pytest.raises(ValueError, match="label 1 outside the vocabulary of 1"):
        detections_to_coco(detections, [7, 8], category_ids=[5])
    with pytest.raises(ValueError, match="2 detection sets but 1 image ids"):
        detections_to_coco(detections, [7], category_ids=[5, 17])
