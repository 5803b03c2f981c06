"""The shared training loop: in-process learning, and Ray Train with stop/resume and one MLflow run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ovdlab.platform.data.images import ImageDecodeError
from ovdlab.platform.train.checkpoint import load_model_checkpoint, load_trainer_state
from ovdlab.platform.train.loop import (
    MAX_BAD_IMAGES_IN_A_ROW,
    LocalSession,
    LoopArgs,
    _collate_with_skips,
    _SkipUndecodable,
    autocast_dtype,
    run_loop,
)
from ovdlab.platform.train.trainer import RUN_INFO, prepare_training, run_dir_for, train


def test_losses_fall_in_process(tiny_cfg_factory, capsys):
    # 8 training images in batches of 4: every step revisits them, so the fall is not noise.
    cfg = tiny_cfg_factory(
        ["train.max_iter=40", "train.checkpoint_period=20", "train.lr=0.02", "dataset.shapes.train_images=8", "train.batch_size=4"]
    )
    storage = cfg.work_path("inproc")
    prepared = prepare_training(cfg, storage)
    session = LocalSession(storage)
    summary = run_loop(LoopArgs(cfg=cfg.model_dump(mode="json"), text_path=str(prepared.text_path)), session)

    assert summary.start_step == 0 and summary.end_step == 40
    assert len(summary.losses) == 40
    first, last = statistics.mean(summary.losses[:8]), statistics.mean(summary.losses[-8:])
    assert last < 0.6 * first, (first, last)
    assert [r["step"] for r in session.reports] == [20, 40]
    final = session.reports[-1]
    assert 0.0 <= final["ap50_novel"] <= 100.0 and 0.0 <= final["ap50_base"] <= 100.0
    assert "ap50_novel" not in session.reports[0]  # a checkpoint without evaluation carries no AP
    assert 0.0 <= summary.data_fraction < 1.0 and summary.steps_per_second > 0

    latest = session.latest()
    assert latest is not None and latest.name.endswith("40")
    assert load_trainer_state(latest)["step"] == 40
    ckpt = load_model_checkpoint(latest)
    assert ckpt.meta["step"] == 40
    assert ckpt.meta["train_classes"] == prepared.train_classes
    assert len(ckpt.meta["eval_classes"]) == 20 and ckpt.cfg.work_dir == str(cfg.work_path())

    # A second run over the same storage resumes from step 40: nothing left to do, and says so
    # (a rerun after a kill that landed behind the last checkpoint is still a resume).
    capsys.readouterr()
    again = run_loop(LoopArgs(cfg=cfg.model_dump(mode="json"), text_path=str(prepared.text_path)), session)
    assert again.start_step == 40 and again.losses == []
    assert "resuming at step 40/40: nothing left to train" in capsys.readouterr().out


def test_mixed_precision_only_where_the_device_computes_it_natively(tiny_cfg_factory, monkeypatch):
    import torch

    cfg, off = tiny_cfg_factory([]), tiny_cfg_factory(["train.amp=false"])
    assert autocast_dtype(cfg, torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert autocast_dtype(cfg, torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype(off, torch.device("cpu")) is None and autocast_dtype(off, torch.device("cuda")) is None
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)  # emulated bf16 would be slower
    assert autocast_dtype(cfg, torch.device("cpu")) is None


def test_batch_must_divide_over_workers(tiny_cfg_factory):
    cfg = tiny_cfg_factory(["train.batch_size=3"])
    prepared = prepare_training(cfg, cfg.work_path("p"))

    class TwoRanks(LocalSession):
        world_size = 2

    with pytest.raises(ValueError, match="not divisible by ray.num_workers=2"):
        run_loop(LoopArgs(cfg=cfg.model_dump(mode="json"), text_path=str(prepared.text_path)), TwoRanks(cfg.work_path("s")))


def test_two_gloo_workers_stop_and_resume_into_one_mlflow_run(tiny_cfg_factory, ray_local):
    cfg = tiny_cfg_factory(
        ["train.max_iter=8", "train.checkpoint_period=4", "ray.num_workers=2", "tracking.run_name=resume-test"]
    )
    first = train(cfg, stop_at=4, max_failures=0)
    assert not first.completed and first.step == 4 and first.metrics is None
    assert (run_dir_for(cfg) / RUN_INFO).is_file()

    second = train(cfg, max_failures=0)
    assert second.completed and second.step == 8
    assert second.mlflow_run_id == first.mlflow_run_id
    assert second.checkpoint is not None and load_trainer_state(second.checkpoint)["step"] == 8  # the last one
    assert second.metrics is not None and second.results_path is not None and second.results_path.is_file()

    # Rerun after the last checkpoint (a driver killed between it and the stage's record):
    # nothing is trained again and the run still completes with its metrics.
    third = train(cfg, max_failures=0)
    assert third.completed and third.step == 8 and third.metrics.as_dict() == second.metrics.as_dict()

    client = MlflowClient(second.tracking_uri)
    exp = client.get_experiment_by_name(second.experiment)
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'resume-test'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/total_loss")]
    assert sorted(steps) == list(range(1, 9))  # the step counter continued, nothing logged twice
    for name in ("ap50_novel", "ap50_base", "ap50_all", "val/ap50_novel"):
        assert name in run.data.metrics
    assert run.data.params["train.max_iter"] == "8"
    assert run.data.tags["reported_checkpoint"] == "last" and run.data.tags["checkpoint"] == str(second.checkpoint)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/per_class_ap.png", "eval/pr_curves.png", "eval/detections.png", "eval/per_class_ap.csv"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")} >= {"checkpoint/model.pt"}


def test_changed_config_does_not_resume_an_old_run(tiny_cfg_factory):
    cfg = tiny_cfg_factory(["tracking.run_name=fixed"])
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True)
    (run_dir / RUN_INFO).write_text('{"config_hash": "0123456789ab", "mlflow_run_id": null}')
    with pytest.raises(ValueError, match="resuming would mix two configs"):
        train(cfg)


class _Flaky:
    """Items 0..n-1; the indices in ``bad`` fail to decode."""

    def __init__(self, n: int, bad: set[int]) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> tuple[int, dict]:
        if idx in self.bad:
            raise ImageDecodeError(f"/data/{idx}.png", "truncated file")
        return idx, {}


def test_undecodable_training_images_are_skipped_and_counted(caplog):
    data = _SkipUndecodable(_Flaky(5, {1, 4}))
    items = [data[i] for i in range(5)]
    assert [image for image, _, _ in items] == [0, 2, 2, 3, 0]
    assert [len(errors) for _, _, errors in items] == [0, 1, 0, 0, 1]
    assert "/data/1.png: truncated file" in caplog.text
    images, targets, skipped = _collate_with_skips(items)
    assert images == [0, 2, 2, 3, 0] and len(targets) == 5
    assert skipped == ["/data/1.png: truncated file", "/data/4.png: truncated file"]
    broken = _SkipUndecodable(_Flaky(MAX_BAD_IMAGES_IN_A_ROW + 1, set(range(MAX_BAD_IMAGES_IN_A_ROW + 1))))
    with pytest.raises(RuntimeError, match="undecodable training images in a row; last: /data/"):
        broken[0]


def test_a_training_set_smaller_than_a_batch_repeats_to_fill_it(caplog):
    """LP-OVOD's probe may see one pseudo-labelled image with a batch of 2: it trains on it twice."""
    from ovdlab.platform.train.loop import _filled_to_one_batch

    one = _SkipUndecodable(_Flaky(1, set()), _filled_to_one_batch(1, 2, "/d/train.json"))
    assert len(one) == 2 and [one[i][0] for i in range(2)] == [0, 0]
    assert "fewer than one batch of 2" in caplog.text
    assert _filled_to_one_batch(5, 2, "/d/train.json") == 5
    with pytest.raises(ValueError, match="/d/train.json has no training images"):
        _filled_to_one_batch(0, 2, "/d/train.json")


def test_train_cli_prints_the_outcome(monkeypatch, tmp_path, capsys):
    import ovdlab.platform.train.trainer as trainer
    from ovdlab.platform.cli import main

    seen = {}

    def fake_train(cfg, stop_at=None):
        seen.update(cfg=cfg, stop_at=stop_at)
        return trainer.TrainResult("r", tmp_path, "abc", "sqlite:///x.db", "shapes", False, 3, None, None, None)

    monkeypatch.setattr(trainer, "train", fake_train)
    assert main(["train", "experiments/vild_text_shapes", "train.max_iter=9", f"work_dir={tmp_path}", "--stop-at", "3"]) == 0
    assert seen["cfg"].train.max_iter == 9 and seen["stop_at"] == 3
    out = capsys.readouterr().out
    assert "stopped at step 3/9" in out and "run abc" in out
    assert main(["train", "experiments/vild_text_shapes", "train.optimizer=rmsprop"]) == 2
    assert "train.optimizer" in capsys.readouterr().err


def test_evaluation_skips_are_logged_with_how_they_were_scored(tmp_path):
    """An undecodable validation image keeps its ground truth: its boxes count as missed."""
    from ovdlab.platform.evaluation.coco_eval import SplitMetrics
    from ovdlab.platform.tracking import Tracker
    from ovdlab.platform.train.evaluate import EvalOutput
    from ovdlab.platform.train.loop import EVAL_SKIP_SCORING, _log_eval

    metrics = SplitMetrics(ap50_novel=10.0, ap50_base=20.0, ap50_all=18.0, ap=9.0, per_class=[])
    out = EvalOutput(metrics=metrics, results=[], skipped=[{"image_id": "7", "error": "/v/7.png: truncated file"}])
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "skips", artifact_location=(tmp_path / "a").as_uri())
    with tracker.start_run("r") as run_id:
        _log_eval(tracker, out, step=30)
    client = MlflowClient(tracker.uri)
    assert client.get_run(run_id).data.metrics["problems/eval_skipped_images"] == 1
    table = json.loads(Path(client.download_artifacts(run_id, "problems/eval_skipped_images_step30.json", str(tmp_path))).read_text())
    assert table == {"scored_as": EVAL_SKIP_SCORING, "images": out.skipped}
    assert "count as missed" in EVAL_SKIP_SCORING


def test_distillation_regions_per_image_reach_the_training_data(tiny_cfg_factory):
    from ovdlab.platform.data.catalog import ensure_dataset, load_dataset
    from ovdlab.platform.train.loop import _train_loader

    for cap in (None, 16):
        cfg = tiny_cfg_factory([] if cap is None else [f"train.distill_per_image={cap}"])
        ensure_dataset(cfg)
        loader, _ = _train_loader(cfg, load_dataset(cfg, "train"), [1, 2], None, LocalSession(cfg.work_path("s")))
        assert loader.dataset.inner.max_distill == cap


def test_preparation_calibrates_the_method_to_its_teacher(tiny_cfg_factory):
    """The temperature left to the teacher (None in every shipped config) is 1 / the loaded
    teacher's logit scale in the config the workers get and the run logs; the text-bank
    file carries the scale for the loop; a number the user set is kept."""
    from ovdlab.platform.config import dump_yaml
    from ovdlab.platform.train.loop import load_text_banks
    from ovdlab.platform.train.trainer import load_training_teacher

    cfg = tiny_cfg_factory()
    assert cfg.method.temperature is None
    prepared = prepare_training(cfg, cfg.work_path("calibrated"))
    scale = load_training_teacher(cfg)[0].logit_scale
    assert load_text_banks(prepared.text_path)["teacher_logit_scale"] == pytest.approx(scale)
    assert prepared.cfg.method.temperature == pytest.approx(1 / scale)
    assert f"temperature: {prepared.cfg.method.temperature}" in dump_yaml(prepared.cfg)
    fixed = tiny_cfg_factory(["method.temperature=0.05"])
    assert prepare_training(fixed, fixed.work_path("fixed")).cfg.method.temperature == 0.05
