"""The ``ovdlab`` command line: data generation, evaluation, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ovdlab.platform.cli import main


def test_help_lists_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as stop:
        assert stop.code == 0
    out = capsys.readouterr().out
    for command in ("config", "data", "eval", "train", "extract", "predict", "sweep", "compare"):
        assert command in out


def test_console_script_runs(repo_root):
    out = subprocess.run([sys.executable, "-m", "ovdlab.platform.cli", "--help"], capture_output=True, text=True,
                         cwd=repo_root, timeout=120)
    assert out.returncode == 0 and "usage: ovdlab" in out.stdout


def test_data_shapes_then_eval_perfect_detections(tmp_path, capsys):
    out_dir = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out_dir), "--images", "6", "--val-images", "5", "--size", "64"]) == 0
    val = json.loads((out_dir / "annotations" / "val.json").read_text())
    assert len(val["images"]) == 5
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in val["annotations"]]
    results_file = tmp_path / "dets.json"
    results_file.write_text(json.dumps(results))
    capsys.readouterr()
    assert main(["eval", "--dataset", str(out_dir / "annotations" / "val.json"), "--results", str(results_file),
                 "--kind", "shapes"]) == 0
    table = capsys.readouterr().out
    assert "100.0" in table and "novel" in table


def test_eval_unknown_category_is_a_clear_error(tmp_path, capsys):
    out_dir = tmp_path / "shapes"
    main(["data", "shapes", "--out", str(out_dir), "--images", "2", "--val-images", "2", "--size", "64"])
    results_file = tmp_path / "dets.json"
    results_file.write_text(json.dumps([{"image_id": 3, "category_id": 999, "bbox": [0, 0, 4, 4], "score": 0.5}]))
    code = main(["eval", "--dataset", str(out_dir / "annotations" / "val.json"), "--results", str(results_file)])
    assert code == 1
    assert "999" in capsys.readouterr().err


def test_bad_config_value_exits_2_naming_the_field(capsys):
    assert main(["config", "vild_text_shapes", "train.optimizer=adam"]) == 2
    err = capsys.readouterr().err
    assert "train.optimizer" in err and "sgd" in err


def test_data_shapes_bad_novel_name(tmp_path, capsys):
    code = main(["data", "shapes", "--out", str(tmp_path / "s"), "--images", "2", "--val-images", "2",
                 "--novel", "purple hexagon"])
    assert code == 1
    assert "purple hexagon" in capsys.readouterr().err


LVIS_GT = {
    "images": [{"id": 1, "width": 50, "height": 50, "neg_category_ids": [3], "not_exhaustive_category_ids": []}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100.0},
                    {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 20, 10, 10], "area": 100.0}],
    "categories": [{"id": 1, "name": "cat", "split": "novel", "frequency": "r"},
                   {"id": 2, "name": "dog", "split": "base", "frequency": "f"},
                   {"id": 3, "name": "emu", "split": "base", "frequency": "c"}],
}


def test_eval_detects_lvis_and_refuses_a_contradicting_kind(tmp_path, capsys):
    gt_file, results_file = tmp_path / "lvis_val.json", tmp_path / "dets.json"
    gt_file.write_text(json.dumps(LVIS_GT))
    results_file.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}]))
    assert main(["eval", "--dataset", str(gt_file), "--results", str(results_file)]) == 0
    assert capsys.readouterr().out.startswith("AP 50.0 | APr 100.0 | APc n/a | APf 0.0")
    assert main(["eval", "--dataset", str(gt_file), "--results", str(results_file), "--kind", "coco"]) == 1
    err = capsys.readouterr().err
    assert f"kind 'coco' asks for the COCO protocol but --dataset {gt_file} is LVIS-format" in err


@pytest.mark.parametrize(
    "argv, option",
    [
        (["predict", "--checkpoint", "ckpt", "--image", "i.png", "--vocab", "a", "--out", "o", "--score-thresh", "5"],
         "--score-thresh"),
        (["predict", "--checkpoint", "ckpt", "--image", "i.png", "--vocab", "a", "--out", "o", "--score-thresh", "nan"],
         "--score-thresh"),
        (["predict", "--checkpoint", "ckpt", "--image", "i.png", "--vocab", "a", "--out", "o", "--score-thresh", "-0.1"],
         "--score-thresh"),
        (["data", "shapes", "--out", "s", "--images", "0"], "--images"),
        (["data", "shapes", "--out", "s", "--val-images", "-3"], "--val-images"),
        (["data", "shapes", "--out", "s", "--size", "8"], "--size"),
        (["data", "shapes", "--out", "s", "--seed", "-1"], "--seed"),
        (["data", "shapes", "--out", "s", "--images", "ten"], "--images"),
        (["train", "vild_text_shapes", "--stop-at", "0"], "--stop-at"),
    ],
)
def test_numeric_options_out_of_range_are_usage_errors(argv, option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "usage: ovdlab" in err and f"argument {option}" in err
    assert list(tmp_path.iterdir()) == []


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_predict_refuses_a_malicious_checkpoint(tmp_path, capsys):
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    torch.save({"model": _Payload()}, folder / "model.pt")
    for given in (folder, folder / "model.pt"):
        code = main(["predict", "--checkpoint", str(given), "--image", "i.png", "--vocab", "a", "--out", str(tmp_path)])
        assert code == 1
        err = capsys.readouterr().err
        assert f"{folder / 'model.pt'} is not a valid ovdlab checkpoint" in err and "non-tensor objects" in err
    missing = tmp_path / "nowhere"
    assert main(["predict", "--checkpoint", str(missing), "--image", "i.png", "--vocab", "a", "--out", "o"]) == 1
    assert f"checkpoint {missing} does not exist; expected an ovdlab checkpoint folder" in capsys.readouterr().err


def test_a_bad_sweep_exits_2_naming_the_field_before_any_ray_work(capsys, monkeypatch):
    import ovdlab.platform.tune.sweep as sweep

    monkeypatch.setattr(sweep, "run_sweep", lambda s: pytest.fail("no sweep may start"))
    assert main(["sweep", "vild_distill_shapes", "sweep.params.method.distill_weight=[-1]"]) == 2
    assert "sweep.params.method.distill_weight = -1" in capsys.readouterr().err
    assert main(["sweep", "vild_distill_shapes", "sweep.scheduler.kind=hyperband"]) == 2
    assert "sweep.scheduler.kind" in capsys.readouterr().err


def test_compare_without_job_runs_is_one_clear_error(tmp_path, capsys):
    assert main(["compare", "--work-dir", str(tmp_path)]) == 1
    assert "no finished job runs with detection metrics in experiment 'shapes'" in capsys.readouterr().err


def test_config_says_where_each_method_key_came_from(capsys):
    assert main(["config", "ezsd_shapes", "method.distill_weight=2"]) == 0
    out = capsys.readouterr().out
    assert "# method.name: configs/methods/ezsd.yaml" in out
    assert "# method.distill_weight: command line" in out
    assert "# method.temperature: the method's default (set from the teacher's logit scale" in out
    assert "temperature: null" in out
