"""Ground-truth and imported proposal sources; box fitting; building from the config."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from ovdlab.platform.config import ExperimentConfig
from ovdlab.platform.data.catalog import OVDDataset
from ovdlab.platform.proposals import (
    BoxError,
    GroundTruthSource,
    ImportedProposalSource,
    ProposalFileError,
    Proposals,
    build_proposal_source,
    fit_to_image,
)
from ovdlab.platform.proposals.ground_truth import WithGroundTruth

IMAGE = np.zeros((60, 80, 3), np.uint8)


@pytest.fixture()
def dataset(tmp_path):
    """Three images (listed out of id order, as in COCO files) and two categories."""
    data = {
        "images": [
            {"id": 7, "file_name": "b.jpg", "width": 80, "height": 60},
            {"id": 3, "file_name": "a.jpg", "width": 80, "height": 60},
            {"id": 5, "file_name": "c.jpg", "width": 80, "height": 60},
        ],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 1, "bbox": [10, 5, 20, 30], "iscrowd": 0},
            {"id": 2, "image_id": 3, "category_id": 2, "bbox": [0, 0, 40, 40], "iscrowd": 1},
            {"id": 3, "image_id": 3, "category_id": 2, "bbox": [50, 10, 10, 10]},
        ],
        "categories": [{"id": 1, "name": "cat", "split": "base"}, {"id": 2, "name": "dog", "split": "novel"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    (tmp_path / "images").mkdir()
    return OVDDataset(path, tmp_path / "images")


def test_ground_truth_boxes_are_xyxy_without_crowd(dataset):
    source = GroundTruthSource()
    p = source.propose(IMAGE, 3, dataset.annotations(3))
    np.testing.assert_array_equal(p.boxes, [[10, 5, 30, 35], [50, 10, 60, 20]])
    np.testing.assert_array_equal(p.scores, [1, 1])
    assert p.boxes.dtype == np.float32 and p.extras == {}
    empty = source.propose(IMAGE, 7, dataset.annotations(7))
    assert len(empty) == 0 and empty.boxes.shape == (0, 4)


class _Fixed:
    """A source without extra columns (as the RPN's) returning two fixed boxes."""

    name, extra_names, needs_accelerator = "rpn", (), False

    def fingerprint(self):
        return {"checkpoint": "x"}

    def propose(self, image, image_id, annotations):
        return Proposals(np.array([[1, 1, 9, 9], [20, 20, 40, 50]], np.float32), np.array([0.9, 0.4], np.float32))


def test_ground_truth_joins_another_sources_proposals_first(dataset):
    source = WithGroundTruth(_Fixed())
    p = source.propose(IMAGE, 3, dataset.annotations(3))
    np.testing.assert_array_equal(p.boxes, [[10, 5, 30, 35], [50, 10, 60, 20], [1, 1, 9, 9], [20, 20, 40, 50]])
    np.testing.assert_allclose(p.scores, [1, 1, 0.9, 0.4])
    np.testing.assert_array_equal(p.extras["ground_truth"], [1, 1, 0, 0])  # every GT row distilled, flagged
    assert set(p.extras) == {"ground_truth"} and source.name == "rpn" and source.extra_names == ("ground_truth",)
    assert source.fingerprint() == {"checkpoint": "x", "with_ground_truth": "ground_truth"}
    assert len(source.propose(IMAGE, 7, dataset.annotations(7))) == 2  # no annotations: the proposals alone
    assert pickle.loads(pickle.dumps(source)).fingerprint() == source.fingerprint()


def _write(tmp_path, name, obj):
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(obj))
    else:
        path.write_bytes(pickle.dumps(obj))
    return path


def test_imported_list_follows_annotation_file_order(tmp_path, dataset):
    # OLN / mmdetection: one [N, 5] array per image in the file's image order (7, 3, 5).
    entries = [
        np.array([[1, 1, 5, 5, 0.2], [2, 2, 9, 9, 0.9]], np.float32),
        np.array([[0, 0, 10, 10, 0.5]], np.float32),
        np.zeros((0, 5), np.float32),
    ]
    source = ImportedProposalSource.from_dataset(_write(tmp_path, "oln.pkl", entries), dataset, per_image=1)
    p7 = source.propose(IMAGE, 7, [])
    np.testing.assert_array_equal(p7.boxes, [[2, 2, 9, 9]])  # top-1 by objectness
    np.testing.assert_allclose(p7.scores, [0.9])
    np.testing.assert_array_equal(source.propose(IMAGE, 3, []).boxes, [[0, 0, 10, 10]])
    assert len(source.propose(IMAGE, 5, [])) == 0
    assert len(source.fingerprint()["file_digest"]) == 16


@pytest.mark.parametrize("name", ["props.json", "props.pkl"])
def test_imported_mappings_and_records(tmp_path, dataset, name):
    by_key = {"3": [[1, 2, 3, 4, 0.5]], "b.jpg": {"boxes": [[0, 0, 8, 8]], "scores": [0.7]}, "999": [[0, 0, 1, 1, 1]]}
    source = ImportedProposalSource.from_dataset(_write(tmp_path, name, by_key), dataset, per_image=10)
    np.testing.assert_array_equal(source.propose(IMAGE, 3, []).boxes, [[1, 2, 3, 4]])
    np.testing.assert_allclose(source.propose(IMAGE, 7, []).scores, [0.7])
    with pytest.raises(KeyError, match="no entry for image 5"):
        source.propose(IMAGE, 5, [])
    records = [{"image_id": 5, "boxes": [[1, 1, 4, 4], [0, 0, 2, 2]], "scores": [0.1, 0.3]}]
    source = ImportedProposalSource.from_dataset(_write(tmp_path, "rec" + name, records), dataset, per_image=10)
    np.testing.assert_allclose(source.propose(IMAGE, 5, []).scores, [0.3, 0.1])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"3": [[1, 2, 3, 4, 0.5], [5, 5, 5, 9, 0.1]]}, r"image 3 .* row 1: box \[5.0, 5.0, 5.0, 9.0\] needs x2 > x1"),
        ({"7": [[0, 0, 4, 4, 0.5], [0, 0, 3, 3, 0.1], [0, 9, 4, 2, 0.3]]}, r"image 7 .* row 2: .* y2 > y1"),
        ({"5": [[0, 0, 4, float("nan"), 0.5]]}, r"image 5 .* row 0: non-finite"),
        ({"5": [[0, 0, 4, 4]]}, r"image 5 .*\[N, 5\] array"),
        ([[[0, 0, 1, 1, 1]]], r"1 entries but the annotation file lists 3 images"),
        ({"5": {"boxes": [[0, 0, 1, 1]], "scores": [1, 2]}}, r"image 5 .*'scores' must be \[1\]"),
        ("just text", r"expected a list or a mapping"),
    ],
)
def test_imported_validation_names_image_and_row(tmp_path, dataset, content, message):
    path = _write(tmp_path, "bad.pkl", content)
    with pytest.raises(ProposalFileError, match=message):
        ImportedProposalSource.from_dataset(path, dataset, per_image=10)


def test_imported_file_errors(tmp_path, dataset):
    with pytest.raises(ProposalFileError, match="not found"):
        ImportedProposalSource.from_dataset(tmp_path / "nope.pkl", dataset, per_image=10)
    with pytest.raises(ProposalFileError, match="unknown proposal file type"):
        ImportedProposalSource.from_dataset(_write(tmp_path, "p.txt", "x"), dataset, per_image=10)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ProposalFileError, match="cannot read proposals"):
        ImportedProposalSource.from_dataset(broken, dataset, per_image=10)


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_imported_pickle_refuses_code(tmp_path, dataset):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"3": _Payload()}))
    with pytest.raises(ProposalFileError, match="refusing to load builtins.print"):
        ImportedProposalSource.from_dataset(path, dataset, per_image=10)


def test_fit_to_image_clips_small_overhang_and_rejects_the_rest():
    p = Proposals([[-0.5, 0, 80.7, 60], [10, 10, 20, 20]], [0.5, 0.4], {"confidence": [1, 2]})
    fitted = fit_to_image(p, 60, 80)
    np.testing.assert_array_equal(fitted.boxes[0], [0, 0, 80, 60])
    np.testing.assert_array_equal(fitted.extras["confidence"], [1, 2])
    with pytest.raises(BoxError, match=r"box 1 .* outside the 80x60 image"):
        fit_to_image(Proposals([[0, 0, 5, 5], [70, 10, 95, 20]], [1, 1]), 60, 80)
    with pytest.raises(BoxError, match="box 0 .* zero or negative area"):
        fit_to_image(Proposals([[5, 5, 5, 9]], [1]), 60, 80)
    with pytest.raises(BoxError, match="not finite"):
        fit_to_image(Proposals([[0, 0, np.inf, 9]], [1]), 60, 80)
    with pytest.raises(BoxError, match="no area inside"):
        fit_to_image(Proposals([[-0.9, 0, -0.1, 9]], [1]), 60, 80)
    assert len(fit_to_image(Proposals.empty(), 60, 80)) == 0


def test_proposals_record_checks_lengths():
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        Proposals(np.zeros((2, 4)), np.zeros(1))
    with pytest.raises(ValueError, match="extra column 'c' has 3"):
        Proposals(np.zeros((2, 4)), np.zeros(2), {"c": np.zeros(3)})
    p = Proposals([[0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 3, 3]], [0.2, 0.9, 0.5])
    np.testing.assert_allclose(p.top_k(2).scores, [0.9, 0.5])


def test_build_from_config(tmp_path, dataset):
    cfg = ExperimentConfig(work_dir=str(tmp_path))
    assert isinstance(build_proposal_source(cfg, dataset), GroundTruthSource)
    path = _write(tmp_path, "p.json", {"3": [[0, 0, 1, 1, 1]]})
    cfg = ExperimentConfig(work_dir=str(tmp_path), proposals={"source": "file", "file": str(path), "per_image": 5})
    source = build_proposal_source(cfg, dataset)
    assert source.name == "file" and source.per_image == 5
    cfg = ExperimentConfig(work_dir=str(tmp_path), proposals={"source": "clip"})
    clip = build_proposal_source(cfg, dataset)
    assert clip.name == "clip" and clip.extra_names == ("confidence",)
    assert clip.base_classes.tolist() == [True, False]
    cfg = ExperimentConfig(work_dir=str(tmp_path), proposals={"source": "rpn"})
    with pytest.raises(ValueError, match="needs proposals.checkpoint"):
        build_proposal_source(cfg, dataset, embed_dim=8)


@pytest.mark.parametrize(
    ("name", "entry", "dtype"),
    [
        ("p.pkl", np.array([[0, 0, 4, 4, 1]], dtype="datetime64[s]"), "datetime64"),
        ("p.pkl", np.array([[0, 0, 4, 4, 0.5]], dtype=np.complex128), "complex128"),
        ("p.pkl", np.array([[0, 0, 4, 4, 0.5]], dtype=object), "object"),
        ("p.pkl", np.array([[0, 0, 1, 1, 1]], dtype=bool), "bool"),
        ("p.pkl", np.array([["0", "0", "4", "4", "0.5"]]), "<U3"),
        ("p.json", [["0", "0", "4", "4", "0.5"]], "<U3"),
        ("p.json", {"boxes": [[True, True, True, True]], "scores": [0.5]}, "bool"),
    ],
)
def test_imported_values_must_be_real_numbers(tmp_path, dataset, name, entry, dtype):
    path = _write(tmp_path, name, {"3": entry})
    with pytest.raises(ProposalFileError, match=rf"{path}: image 3 .*real integers or floats, got dtype {dtype}"):
        ImportedProposalSource.from_dataset(path, dataset, per_image=10)
