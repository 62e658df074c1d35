"""Settings: one typed tree, one loader; defaults, files, --set overrides and their domains."""

from __future__ import annotations

import dataclasses

import pytest

from sslflow.core.errors import UserError
from sslflow.core.settings import MOVED_KEYS, Settings, load_settings, parse_set
from sslflow.ssl_models.config import EngineSettings, engine_flat, resumable
from sslflow.ssl_models.errors import ConfigError
from sslflow.ssl_models.methods import METHODS
from sslflow.ssl_models.schema import as_dict, describe, flatten, resumable_keys


def test_defaults_load_and_every_profile_is_valid(tmp_path):
    from helpers import REPO

    s = load_settings([], project=tmp_path)
    assert s.pretrain.method == "simclr" and s.backbone.name == "resnet18" and s.backbone.family == "resnet"
    assert s.augment.crop_scale == (0.08, 1.0) and isinstance(s.augment.crop_scale[0], float)
    assert s.project == tmp_path.resolve()
    for profile in sorted((REPO / "params" / "profiles").glob("*.yaml")):
        load_settings(profile)
    demo = load_settings(REPO / "params.yaml")  # the repository's project settings: the CPU demo
    assert demo.device == "cpu" and demo.backbone.resnet.width == 8
    # the quickstart runs exactly the SimCLR demo profile (the README's figures are its figures)
    assert demo.flat() == load_settings(REPO / "params" / "profiles" / "demo-simclr.yaml").flat()


def test_the_project_params_yaml_applies_unless_files_are_named(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("pretrain:\n  epochs: 3\n")
    monkeypatch.setenv("SSLFLOW_PROJECT", str(tmp_path))
    assert load_settings().pretrain.epochs == 3  # the project's file
    assert load_settings([]).pretrain.epochs == 100  # no file: the defaults
    other = tmp_path / "other.yaml"
    other.write_text("pretrain:\n  lr: 0.3\n")
    s = load_settings([other])  # a named file replaces the project's
    assert s.pretrain.epochs == 100 and s.pretrain.lr == 0.3
    assert load_settings(project=tmp_path / "elsewhere").pretrain.epochs == 100  # --project wins over the env


def test_set_overrides_use_dvc_style_dotted_keys():
    s = load_settings([], ["pretrain.lr=0.3", "seed=7", "augment.crop_scale=[0.2, 1]", "pretrain.compile=false",
                           "device=cpu", "eval.protocols=[knn]", "promotion.metric=knn_top1",
                           "pretrain.moco.queue_size=8192", "backbone.resnet.width=16"])
    assert s.pretrain.lr == 0.3 and s.seed == 7 and s.device == "cpu"
    assert s.augment.crop_scale == (0.2, 1.0)
    assert s.pretrain.compile is False and s.eval.protocols == ("knn",)
    assert s.pretrain.moco.queue_size == 8192 and s.pretrain.sections["moco"].queue_size == 8192
    assert s.backbone.resnet.width == 16
    assert s.updated(["pretrain.lr=0.5"]).pretrain.lr == 0.5 and s.pretrain.lr == 0.3  # immutable


def test_int_given_for_float_is_accepted_but_float_for_int_is_not():
    assert load_settings([], ["pretrain.lr=1"]).pretrain.lr == 1.0
    assert load_settings([], ["pretrain.weight_decay=1e-5"]).pretrain.weight_decay == 1e-5  # YAML 1.1 string
    with pytest.raises(ConfigError, match=r"pretrain.epochs must be an int, got 1.5"):
        load_settings([], ["pretrain.epochs=1.5"])


@pytest.mark.parametrize("override, message", [
    ("pretrain.temprature=0.1", r"unknown setting pretrain.temprature \(did you mean pretrain.simclr.temperature\?\)"),
    ("pretrain.width=8", r"unknown setting pretrain.width: it moved to backbone.resnet.width"),
    ("nosuchsection.x=1", r"unknown setting nosuchsection"),
    ("pretrain.method=swav2", r"pretrain.method must be one of .*simclr.*; got 'swav2'"),
    ("pretrain.batch_size=0", r"pretrain.batch_size must be >= 2"),
    ("pretrain.optimizer=adam", r"pretrain.optimizer must be one of sgd, lars, adamw \(did you mean adamw\?\)"),
    ("device=tpu", r"device must be auto, cpu, cuda, cuda:N or mps"),
    ("device=cuda:abc", r"device must be auto, cpu, cuda, cuda:N or mps"),
    ("augment.crop_scale=[0.5, 0.2]", r"augment.crop_scale must satisfy min <= max"),
    ("augment.crop_scale=0.5", r"augment.crop_scale must be a list"),
    ("augment.flip_prob=1.5", r"augment.flip_prob must be <= 1"),
    ("augment.blur_sigma=[2, 1]", r"augment.blur_sigma must satisfy min <= max"),
    ("augment.std=[0, 0, 0]", r"augment.std values must be >= 0.001"),
    ("augment.strength=nan", r"augment.strength must be a finite number"),
    ("pretrain.lr=inf", r"pretrain.lr must be a finite number"),
    ("pretrain.warmup_epochs=-1", r"pretrain.warmup_epochs must be >= 0"),
    ("pretrain.checkpoint_every=-1", r"pretrain.checkpoint_every must be >= 0"),
    ("augment.local_crops=-1", r"augment.local_crops must be >= 0"),
    ("augment.local_size=100000", r"augment.local_size must be <= 1024"),
    ("pretrain.byol.momentum=1.0", r"pretrain.byol.momentum must be < 1"),
    ("pretrain.simclr.proj_dim=0", r"pretrain.simclr.proj_dim must be >= 1"),
    ("pretrain.dino.out_dim=0", r"pretrain.dino.out_dim must be >= 1"),
    ("pretrain.dino.teacher_temperature=0", r"pretrain.dino.teacher_temperature must be > 0"),
    ("eval.linear_epochs=0", r"eval.linear_epochs must be >= 1"),
    ("eval.protocols=[knn, svm]", r"eval.protocols values must be one of knn, linear, finetune"),
    ("eval.finetune_batch_size=0", r"eval.finetune_batch_size must be >= 2"),
    ("pretrain.compile=yes please", r"pretrain.compile must be a bool"),
    ("seed=99999999999999999999", r"seed must fit in 64 bits"),
    ("seed=-1", r"seed must be >= 0"),
    ("backbone.resnet.width=12", r"backbone.resnet.width must be a multiple of 8"),
    ("promotion.metric=knn_top3", r"promotion.metric must be <protocol>_top1"),
    ("pipeline.cron=daily", r"pipeline.cron must be a 5-field cron expression"),
    ("pretrain", r"--set expects key=value"),
])
def test_bad_values_name_the_key_in_one_line(override, message):
    with pytest.raises((ConfigError, UserError), match=message) as e:
        load_settings([], [override])
    assert "\n" not in str(e.value)


def test_cross_section_rules_of_a_method():
    with pytest.raises(ConfigError, match=r"pretrain.moco.queue_size \(100\) must be at least 2 x pretrain.batch_size"):
        load_settings([], ["pretrain.method=moco", "pretrain.batch_size=64", "pretrain.moco.queue_size=100"])
    load_settings([], ["pretrain.method=simclr", "pretrain.batch_size=64", "pretrain.moco.queue_size=100"])


def test_settings_file_overlay_and_its_errors(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("pretrain:\n  epochs: 3\n")
    assert load_settings(f).pretrain.epochs == 3
    assert load_settings(f, ["pretrain.epochs=4"]).pretrain.epochs == 4  # --set wins
    second = tmp_path / "q.yaml"
    second.write_text("pretrain:\n  lr: 0.2\n")
    both = load_settings([f, second])  # later files win, earlier keys stay
    assert (both.pretrain.epochs, both.pretrain.lr) == (3, 0.2)
    for content, message in (("pretrain: [unclosed\n", "not valid YAML"), ("- a list\n", "must hold a mapping"),
                             ("\x00\x01binary", "not a text|not valid YAML")):
        f.write_text(content)
        with pytest.raises(UserError, match=message):
            load_settings(f)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="not a text"):
        load_settings(tmp_path / "bin.yaml")
    with pytest.raises(UserError, match=r"does not exist"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match=r"is a directory"):
        load_settings(tmp_path)


def test_parse_set_nests_and_flatten_round_trips():
    assert parse_set(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
    flat = load_settings([]).flat()
    assert flat["pretrain.lr"] == 0.4 and flat["augment.crop_scale"] == [0.08, 1.0]
    assert "pretrain.simclr.temperature" in flat and "pretrain.moco.queue_size" not in flat  # the active method
    assert flatten(as_dict(load_settings([])))["pretrain.moco.queue_size"] == 4096  # all sections in the tree


def test_every_field_declares_its_domain_or_is_free_text():
    """A field without a domain must be a bool, a free string or a list of names, never a number:
    every number has its range next to its definition."""
    free = {"tracking.uri", "tune.storage", "ingest.classes", "tune.space"}
    for key, default, domain, _ in describe(Settings):
        if key == "project" or key.startswith("tune.space"):
            continue
        if isinstance(default, bool) or key in free:
            continue
        assert domain, f"{key} has no domain"


def test_resume_rules_are_declared_next_to_the_fields():
    keys = resumable_keys(EngineSettings)
    assert {"device", "pretrain.compile", "pretrain.log_every", "pretrain.checkpoint_every",
            "pretrain.eval_every", "eval"} <= keys
    assert resumable("eval.knn_k") and resumable("device") and not resumable("pretrain.lr")
    assert not resumable("pretrain.simclr.temperature")


def test_every_method_and_backbone_brings_its_own_section():
    s = load_settings([])
    assert set(s.pretrain.sections) == set(METHODS)
    for name, method in METHODS.items():
        assert type(s.pretrain.sections[name]) is method.Config
        assert dataclasses.is_dataclass(method.Config)
    assert {"resnet", "vit"} <= set(s.backbone.sections)
    flat = engine_flat(s.updated(["pretrain.method=byol", "backbone.name=vit_tiny"]))
    assert any(k.startswith("pretrain.byol.") for k in flat) and not any(k.startswith("pretrain.simclr.") for k in flat)
    assert any(k.startswith("backbone.vit.") for k in flat) and not any(k.startswith("backbone.resnet.") for k in flat)


def test_moved_keys_point_to_existing_settings():
    known = set(flatten(as_dict(load_settings([]))))
    for old, new in MOVED_KEYS.items():
        assert old not in known
        assert any(k == new or (("<method>" in new) and k.endswith(new.split("<method>.")[1])) for k in known), new


def test_the_settings_reference_is_generated_and_current():
    from helpers import REPO
    from sslflow.cli.commands.settings import reference_markdown

    doc = REPO / "docs" / "settings.md"
    assert doc.read_text() == reference_markdown(), "regenerate: sslflow settings --reference > docs/settings.md"


def test_every_method_is_selectable_by_name_everywhere():
    """Settings, `dvc exp run -S pretrain.method=...`, the flows' overrides and Optuna's method
    entry all go through the same registry: a registered method is a valid name in each."""
    from helpers import REPO

    space = load_settings([]).tune.space["method"]
    assert set(space.choices) == set(METHODS)
    for name in METHODS:
        vit = ["backbone.name=vit_tiny"] if name == "mae" else []  # MAE refuses a ResNet, in one line
        assert load_settings([], [f"pretrain.method={name}", *vit]).pretrain.method == name
        profile = REPO / "params" / "profiles" / f"demo-{name}.yaml"
        assert profile.is_file(), f"{name} has no demo profile"
        assert load_settings(profile).pretrain.method == name
