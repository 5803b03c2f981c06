"""The ``ovdlab`` command line: data generation, evaluation, config errors."""

from __future__ import annotations

import json
import subprocess
import sys

from ovdlab.platform.cli import main


def test_help_lists_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as stop:
        assert stop.code == 0
    out = capsys.readouterr().out
    for command in ("config", "data", "eval"):
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
