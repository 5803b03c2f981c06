"""Typed config: composition, overrides, strict validation, stable hash."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ovdlab.platform.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    build_config,
    dump_yaml,
    flatten,
    load_config,
    resolve_paths,
)


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.dataset.kind == "shapes"


def test_defaults_composition_and_file_wins(tmp_path):
    write(tmp_path / "base" / "ds.yaml", {"dataset": {"kind": "coco", "root": "/data/coco"}, "train": {"lr": 0.1}})
    write(tmp_path / "base" / "m.yaml", {"train": {"lr": 0.2, "max_iter": 7}})
    top = write(
        tmp_path / "exp.yaml",
        {"defaults": [str(tmp_path / "base" / "ds"), str(tmp_path / "base" / "m")], "train": {"max_iter": 9}},
    )
    cfg = load_config(top)
    assert cfg.dataset.kind == "coco"
    assert cfg.dataset.root == "/data/coco"
    assert cfg.train.lr == 0.2
    assert cfg.train.max_iter == 9


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.max_iter=300", "train.steps=[10, 20]", "tracking.uri=http://127.0.0.1:5000",
                             "train.grad_clip=null", "ray.use_gpu=true"])
    assert cfg.train.max_iter == 300
    assert cfg.train.steps == [10, 20]
    assert cfg.tracking.uri == "http://127.0.0.1:5000"
    assert cfg.train.grad_clip is None
    assert cfg.ray.use_gpu is True


def test_unknown_key_names_the_field():
    with pytest.raises(ConfigError, match=r"train\.max_iters: unknown field"):
        load_config(None, ["train.max_iters=3"])


def test_bad_choice_names_field_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.optimizer=adam"])
    msg = str(err.value)
    assert "train.optimizer" in msg and "'sgd'" in msg and "'adamw'" in msg


def test_bad_type_and_range():
    with pytest.raises(ConfigError, match=r"train\.max_iter"):
        load_config(None, ["train.max_iter=0"])
    with pytest.raises(ConfigError, match=r"eval\.nms_thresh"):
        load_config(None, ["eval.nms_thresh=abc"])


def test_override_malformed():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides({}, ["train.max_iter"])


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    write(a, {"defaults": [str(b)]})
    write(b, {"defaults": [str(a)]})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)


def test_hash_stable_and_sensitive():
    a = load_config(None, ["train.lr=0.01"])
    b = load_config(None, ["train.lr=0.01"])
    c = load_config(None, ["train.lr=0.02"])
    assert a.content_hash() == b.content_hash()
    assert a.content_hash() != c.content_hash()
    assert len(a.content_hash()) == 12


def test_dump_round_trip():
    cfg = load_config(None, ["method.distill_weight=0.5", "dataset.shapes.novel=[red circle]"])
    again = build_config(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    assert again.content_hash() == cfg.content_hash()


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}


def test_every_shipped_config_validates(repo_root):
    files = sorted(p for p in (repo_root / "configs").rglob("*.yaml") if p.parent.name != "sweeps")
    assert files, "configs/ ships YAML files"  # the sweeps: tests/platform/tune/test_tune_config.py
    for path in files:
        load_config(path)


def test_load_config_makes_every_path_absolute(tmp_path, monkeypatch):
    """The quick-start failure: Ray Train workers run in their own folder, so the driver
    hands them absolute paths only (a relative ``work_dir`` resolved elsewhere there)."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config("experiments/vild_text_shapes", [
        "teacher.weights=weights/clip.bin",
        "proposals.source=file", "proposals.file=props.json", "proposals.checkpoint=runs/x",
        "model.backbone_weights=~/r18.pth",
        "tracking.uri=db/mlflow.db",
    ])
    work = tmp_path / "work"
    assert cfg.work_dir == str(work)
    assert cfg.dataset.root == str(work / "data" / "shapes")
    assert cfg.dataset.train_json == str(work / "data" / "shapes" / "annotations" / "train.json")
    assert cfg.dataset.val_images == str(work / "data" / "shapes" / "images" / "val")
    assert cfg.teacher.weights == str(tmp_path / "weights" / "clip.bin")
    assert (cfg.proposals.file, cfg.proposals.checkpoint) == (str(tmp_path / "props.json"), str(tmp_path / "runs" / "x"))
    assert cfg.model.backbone_weights == str(Path("~/r18.pth").expanduser())
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"

    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a worker rebuilding the driver's config in another folder
    again = build_config(cfg.model_dump(mode="json"))
    assert again == cfg and again.work_path() == work and again.dataset_root() == work / "data" / "shapes"
    assert resolve_paths(cfg) == cfg


def test_absolute_paths_and_server_uris_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["work_dir=/shared/ovdlab", "dataset.root=/data/coco", "tracking.uri=http://mlflow:5000"])
    assert (cfg.work_dir, cfg.dataset.root, cfg.tracking.uri) == ("/shared/ovdlab", "/data/coco", "http://mlflow:5000")
    assert load_config(None, ["tracking.uri=sqlite:////abs/m.db"]).tracking.uri == "sqlite:////abs/m.db"
    assert load_config(None, ["tracking.uri=sqlite:///rel/m.db"]).tracking.uri == f"sqlite:///{tmp_path / 'rel' / 'm.db'}"


def test_defaults_must_be_a_list_of_names(tmp_path):
    """A string was iterated by character (``d``, ``a``, ...) before."""
    bad = write(tmp_path / "exp.yaml", {"defaults": "datasets/shapes"})
    with pytest.raises(ConfigError, match="defaults must be a list of config names"):
        load_config(bad)
    with pytest.raises(ConfigError, match="defaults must be a list"):
        load_config(write(tmp_path / "exp2.yaml", {"defaults": [{"datasets": "shapes"}]}))


def test_method_name_must_be_implemented_before_any_work():
    """The config's method names are the registry's: an unknown name fails at load, naming
    the field and the implemented methods (``lp-ovod`` was once accepted and failed after
    the data work)."""
    from ovdlab.methods.registry import available_methods
    from ovdlab.platform.config import method_names

    assert sorted(method_names()) == available_methods()
    with pytest.raises(ConfigError, match=r"method\.name: 'detic' is not implemented; implemented methods: "
                                          + ", ".join(method_names())):
        load_config(None, ["method.name=detic"])
    for name in available_methods():
        assert load_config(None, [f"method.name={name}"]).method.name == name


def test_each_method_has_its_own_config_class():
    """A method's knobs exist only on its own config: LP-OVOD's retrieval K is an unknown
    field of ViLD's, and each method gets its defaults."""
    from ovdlab.platform.config import LPOVODConfig, ViLDConfig

    lp = load_config(None, ["method.name=lp-ovod", "method.retrieval_k=7"])
    assert isinstance(lp.method, LPOVODConfig) and lp.method.retrieval_k == 7 and lp.method.distill_weight == 256.0
    assert isinstance(load_config(None).method, ViLDConfig)
    with pytest.raises(ConfigError, match=r"method\.retrieval_k: unknown field"):
        load_config(None, ["method.retrieval_k=7"])
    with pytest.raises(ConfigError, match=r"method\.objectness_floor: "):
        load_config(None, ["method.name=lp-ovod", "method.objectness_floor=2"])
    round_trip = build_config(lp.model_dump(mode="json"))
    assert round_trip.method == lp.method and round_trip.content_hash() == lp.content_hash()


@pytest.mark.parametrize("uri", ["ftp://host/mlflow", "file:///tmp/mlruns", "postgresql://db/mlflow", "http://"])
def test_unusable_tracking_uri_fails_at_load_naming_the_field(uri):
    """Checked with the config, before any Ray work (it failed inside MLflow before)."""
    with pytest.raises(ConfigError, match=r"tracking\.uri: .*use a filesystem path"):
        load_config(None, [f"tracking.uri={uri}"])


def test_a_layer_naming_another_method_replaces_the_method_section():
    """CLIFF's shapes experiment builds on ViLD-text's (its schedule) without inheriting
    ViLD's knobs; a layer of the same method still merges key by key."""
    from ovdlab.platform.config import merge_layer

    vild = {"method": {"name": "vild-text", "temperature": 0.01}, "train": {"max_iter": 350}}
    assert merge_layer(vild, {"method": {"name": "cliff"}}) == {"method": {"name": "cliff"}, "train": {"max_iter": 350}}
    assert merge_layer(vild, {"method": {"temperature": 0.02}})["method"] == {"name": "vild-text", "temperature": 0.02}
    cfg, vild_text = load_config("experiments/cliff_shapes"), load_config("experiments/vild_text_shapes")
    assert cfg.method.name == "cliff" and cfg.train == vild_text.train.model_copy(
        update={"distill_per_image": 5, "distill_order": "first", "grad_clip": 2.0})


def test_a_layer_naming_a_method_of_the_same_family_keeps_its_knobs():
    """ViLD-ensemble's experiment is ViLD's under another name: replacing the method section
    there trained its image branch with distillation weight 0 (the family's default)."""
    from ovdlab.platform.config import merge_layer

    vild = {"method": {"name": "vild", "temperature": 0.06, "distill_weight": 0.5}}
    merged = merge_layer(vild, {"method": {"name": "vild-ensemble"}})
    assert merged["method"] == {"name": "vild-ensemble", "temperature": 0.06, "distill_weight": 0.5}
    ensemble, vild_cfg = load_config("experiments/vild_ensemble_shapes"), load_config("experiments/vild_shapes")
    assert ensemble.method.name == "vild-ensemble"
    assert ensemble.method.model_dump(exclude={"name"}) == vild_cfg.method.model_dump(exclude={"name"})
    assert ensemble.method.distill_weight == 0.5


@pytest.mark.parametrize("experiment", ["vild_text_shapes", "vild_shapes", "vild_ensemble_shapes", "lp_ovod_shapes",
                                        "ezsd_shapes", "oracle_shapes", "vild_text_coco", "ezsd_coco", "lp_ovod_lvis"])
def test_every_temperature_is_left_to_the_teacher_and_calibrated_from_it(experiment):
    """No experiment ships CLIP's 0.01: the temperature is 1 / the teacher's logit scale."""
    from ovdlab.platform.config import calibrate, uncalibrated

    cfg = load_config(experiment)
    assert cfg.method.temperature is None and uncalibrated(cfg.method) == ["temperature"]
    assert calibrate(cfg, 100.0).method.temperature == pytest.approx(0.01)
    assert calibrate(cfg, 16.8).method.temperature == pytest.approx(1 / 16.8)
    explicit = load_config(experiment, ["method.temperature=0.05"])
    assert calibrate(explicit, 16.8).method.temperature == 0.05


def test_cliff_logit_scale_is_the_reference_ratio_of_the_teachers():
    """CLIFF's 50 is half of CLIP's 100 (NORM_TEMP 50.0 in the reference's ovd/config.py)."""
    from ovdlab.platform.config import calibrate

    cfg = load_config("cliff_shapes")
    assert cfg.method.logit_scale is None
    assert calibrate(cfg, 100.0).method.logit_scale == pytest.approx(50.0)
    assert calibrate(cfg, 16.8).method.logit_scale == pytest.approx(8.4)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bad_teacher_scale_is_refused(scale):
    from ovdlab.platform.config import calibrate

    with pytest.raises(ConfigError, match="logit scale"):
        calibrate(load_config("vild_text_shapes"), scale)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_layer_never_drops_a_method_setting_the_user_wrote(tmp_path, monkeypatch):
    """A base experiment that sets a ViLD knob, built on by a layer switching to EZSD: the
    composition refuses, naming the key, its file and the switching layer, instead of
    silently training EZSD without it; writing it again after the switch is accepted."""
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "base.yaml", "defaults: [experiments/vild_text_shapes]\nmethod:\n  temperature: 0.06\n")
    _write(tmp_path / "ezsd.yaml", "defaults: [base, methods/ezsd]\nname: x\n")
    with pytest.raises(ConfigError, match=r"method\.temperature=0\.06 \(written in .*base\.yaml\) is dropped by configs/methods/ezsd\.yaml"):
        load_config(tmp_path / "ezsd.yaml")
    _write(tmp_path / "ezsd_again.yaml", "defaults: [base, methods/ezsd]\nmethod:\n  temperature: 0.05\n")
    assert load_config(tmp_path / "ezsd_again.yaml").method.temperature == 0.05


def test_family_defaults_are_replaced_silently_and_origins_are_recorded():
    """Keys from configs/methods/ are a family's defaults: switching family replaces them."""
    from ovdlab.platform.config import load_layered

    layered = load_layered("experiments/cliff_shapes")
    assert layered.data["method"]["name"] == "cliff" and "distill_weight" not in layered.data["method"]
    assert layered.origins["method.name"] == "configs/methods/cliff.yaml"
    assert layered.origins["train.max_iter"] == "configs/experiments/vild_text_shapes.yaml"
    assert layered.origins["train.distill_per_image"] == "configs/methods/cliff.yaml"
    assert layered.origins["model.neck"] == "configs/experiments/cliff_shapes.yaml"
