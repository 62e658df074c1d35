"""Parameters: params/*.yaml defaults, overlays, --set overrides and their validation."""

from __future__ import annotations

import pytest

from sslflow.core.errors import UserError
from sslflow.core.settings import PARAMS_DIR, load_params, parse_set
from sslflow.ssl_models.config import as_dict, flatten


def test_defaults_load_and_every_profile_is_valid():
    p = load_params()
    assert p.pretrain.method == "simclr" and p.pretrain.backbone == "resnet18"
    assert p.augment.crop_scale == (0.08, 1.0) and isinstance(p.augment.crop_scale[0], float)
    for profile in sorted((PARAMS_DIR / "profiles").glob("*.yaml")):
        load_params(profile)


def test_set_overrides_use_dvc_style_dotted_keys():
    p = load_params(overrides=["pretrain.lr=0.3", "seed=7", "augment.crop_scale=[0.2, 1]",
                               "pretrain.compile=false", "device=cpu", "eval.protocols=[knn]"])
    assert p.pretrain.lr == 0.3 and p.seed == 7 and p.device == "cpu"
    assert p.augment.crop_scale == (0.2, 1.0)
    assert p.pretrain.compile is False and p.eval.protocols == ("knn",)


def test_int_given_for_float_is_accepted_but_float_for_int_is_not():
    assert load_params(overrides=["pretrain.lr=1"]).pretrain.lr == 1.0
    assert load_params(overrides=["pretrain.weight_decay=1e-5"]).pretrain.weight_decay == 1e-5  # YAML 1.1 string
    with pytest.raises(UserError, match=r"pretrain.epochs must be int, got 1.5"):
        load_params(overrides=["pretrain.epochs=1.5"])


@pytest.mark.parametrize("override, message", [
    ("pretrain.temprature=0.1", r"unknown parameter pretrain.temprature \(did you mean pretrain.temperature\?\)"),
    ("nosuchsection.x=1", r"unknown parameter nosuchsection"),
    ("pretrain.method=swav2", r"pretrain.method must be one of byol, dino, moco, simclr; got 'swav2'"),
    ("pretrain.batch_size=0", r"pretrain.epochs|pretrain.batch_size"),
    ("pretrain.optimizer=adam", r"pretrain.optimizer must be one of lars, sgd"),
    ("device=tpu", r"device must be auto, cpu, cuda or cuda:N"),
    ("augment.crop_scale=[0.5, 0.2]", r"augment.crop_scale must satisfy"),
    ("augment.crop_scale=0.5", r"augment.crop_scale must be a list"),
    ("augment.flip_prob=1.5", r"augment.flip_prob must be a probability"),
    ("pretrain.ema_momentum=1.0", r"pretrain.ema_momentum must be in \[0, 1\)"),
    ("eval.protocols=[knn, svm]", r"eval.protocols: unknown protocol 'svm'"),
    ("pretrain.compile=yes please", r"pretrain.compile must be bool"),
    ("pretrain", r"--set expects key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_params(overrides=[override])


def test_params_file_overlay_and_its_errors(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("pretrain:\n  epochs: 3\n")
    assert load_params(f).pretrain.epochs == 3
    assert load_params(f, ["pretrain.epochs=4"]).pretrain.epochs == 4  # --set wins
    with pytest.raises(UserError, match=r"does not exist"):
        load_params(tmp_path / "missing.yaml")
    f.write_text("pretrain: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(f)
    f.write_text("- a list\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_params(f)


def test_missing_key_in_base_files_is_an_error(tmp_path):
    (tmp_path / "pretrain.yaml").write_text((PARAMS_DIR / "pretrain.yaml").read_text().replace("  lr: 0.4", ""))
    (tmp_path / "evaluate.yaml").write_text((PARAMS_DIR / "evaluate.yaml").read_text())
    with pytest.raises(UserError, match=r"missing parameter pretrain\.lr"):
        load_params(params_dir=tmp_path)


def test_parse_set_nests_and_flatten_round_trips():
    assert parse_set(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
    flat = flatten(as_dict(load_params()))
    assert flat["pretrain.lr"] == 0.4 and flat["augment.crop_scale"] == [0.08, 1.0]
