"""The encoder as an MLflow model, registration and the promotion gate, on a real SQLite registry."""

from __future__ import annotations

import dataclasses
import math

import pytest

from helpers import fast_params
from sslflow.core.errors import UserError
from sslflow.core.sections import PromotionConfig
from sslflow.core.settings import load_settings
from sslflow.ssl_models.errors import ConfigError
from sslflow.tasks.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    current_alias,
    decide,
    promote,
    promote_by_hand,
    register_and_promote,
    register_encoder,
)
from sslflow.tasks.tracking.run import tracking_run

GATE = PromotionConfig(metric="linear_top1", min_delta=0.5)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, demo_stores):
    """A tiny pretrained encoder, evaluated, logged + registered once as `ssl-encoder-test` v1."""
    from mlflow import MlflowClient

    from sslflow.tasks.training.evaluate import evaluate
    from sslflow.tasks.training.pretrain import pretrain

    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    params = tp = fast_params("eval.protocols=[knn,linear]", "pretrain.epochs=1",
                              "tracking.model_name=ssl-encoder-test", "tracking.experiment=registry",
                              "promotion.min_delta=0.5")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        pretrain(demo_stores["train"], tmp / "run", params, progress_bar=False)
        report = evaluate(tmp / "run", demo_stores["train"], demo_stores["test"], params)
        with tracking_run(tp, data_version="v1") as run:
            first = register_and_promote(run, tmp / "run", report, tp, test_store=demo_stores["test"])
        client = MlflowClient(tracking_uri=uri)
        source = client.get_model_version(tp.tracking.model_name, first.version).source
        yield {"client": client, "uri": uri, "tp": tp, "params": params, "report": report, "first": first,
               "run_id": run.run_id, "run_dir": tmp / "run", "source": source, "tmp": tmp}


def _versions(reg, name: str, *scores: float) -> list[str]:
    """Cheap new versions of `name` (the already-logged model registered again)."""
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", reg["uri"])
        mlflow.set_tracking_uri(reg["uri"])
        try:
            return [str(register_encoder(reg["source"], name, eval_metrics={"linear_top1": s}).version) for s in scores]
        finally:
            mlflow.set_tracking_uri(None)


def _alias(reg, name, alias):
    mv = current_alias(name, alias, reg["client"])
    return None if mv is None else str(mv.version)


# ------------------------------------------------------------------------------------ end to end
def test_first_model_promotes_and_loads_as_champion(registry, demo_stores):
    import mlflow
    import numpy as np
    import torch

    from sslflow.ssl_models.checkpoint import load_encoder
    from sslflow.ssl_models.evaluate import eval_view
    from sslflow.ssl_models.store import ImageStore

    first, client = registry["first"], registry["client"]
    assert first.decision == "promoted" and first.champion_version is None
    assert first.score == pytest.approx(registry["report"].metrics["linear_top1"])
    name = "ssl-encoder-test"
    assert _alias(registry, name, CHAMPION) == first.version
    mv = client.get_model_version(name, first.version)
    assert mv.tags["promotion.decision"] == "promoted"
    assert float(mv.tags["eval.linear_top1"]) == pytest.approx(first.score)
    run = client.get_run(registry["run_id"])
    assert run.data.tags["promotion.decision"] == "promoted" and run.data.metrics["promotion/promoted"] == 1.0

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", registry["uri"])
        model = mlflow.pytorch.load_model(f"models:/{name}@champion")
        info = mlflow.models.get_model_info(f"models:/{name}@champion")
        local = mlflow.artifacts.download_artifacts(f"models:/{name}@champion",
                                                    dst_path=str(registry["tmp"] / "champion"))
    encoder, meta = load_encoder(registry["run_dir"])
    encoder.eval()
    test = ImageStore.open(demo_stores["test"])
    x = eval_view(torch.from_numpy(test.images()[:5]), meta["mean"], meta["std"])  # batch 5 != example's 2
    with torch.no_grad():
        expected = encoder(x)
        got = model(x)
    assert got.shape == (5, meta["feature_dim"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # the served signature (image bytes or paths in, embeddings out), an input example of >= 2 images
    assert info.signature is not None
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image", "path"]
    assert info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] in ([-1, meta["feature_dim"]],
                                                                           (-1, meta["feature_dim"]))
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert list(example.columns) == ["image"] and len(example) >= 2
    with pytest.MonkeyPatch.context() as mp:  # the pyfunc flavor: the same features from image bytes
        mp.setenv("MLFLOW_TRACKING_URI", registry["uri"])
        served = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(example)
    assert served.shape == (len(example), meta["feature_dim"]) and np.isfinite(served).all()
    assert info.metadata["mean"] == list(meta["mean"]) and info.metadata["image_size"] == 16


def test_failed_evaluation_registers_but_never_promotes(registry):
    tp, client = registry["tp"], registry["client"]
    name = tp.tracking.model_name
    before = _alias(registry, name, CHAMPION)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", registry["uri"])
        with tracking_run(tp) as run:
            d = register_and_promote(run, registry["run_dir"], None, tp)
    assert d.decision == "rejected" and not d.promoted
    assert _alias(registry, name, CHAMPION) == before
    assert _alias(registry, name, CHALLENGER) != d.version
    tags = client.get_model_version(name, d.version).tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.evaluation_ok"] == "false"
    assert client.get_run(run.run_id).data.metrics["promotion/promoted"] == 0.0


# ------------------------------------------------------------------------------------ the gate
def test_better_promotes_and_old_champion_becomes_previous(registry):
    name, client = "gate-better", registry["client"]
    v1, v2 = _versions(registry, name, 50.0, 60.0)
    assert promote(name, v1, 50.0, GATE, client=client).decision == "promoted"  # the first model
    d = promote(name, v2, 60.0, GATE, client=client)
    assert d.decision == "promoted" and d.champion_version == v1 and d.champion_score == 50.0
    assert _alias(registry, name, CHAMPION) == v2 and _alias(registry, name, PREVIOUS) == v1
    tags = client.get_model_version(name, v2).tags
    assert tags["promotion.decision"] == "promoted"
    assert float(tags["promotion.score"]) == 60.0 and float(tags["promotion.champion_score"]) == 50.0
    assert tags["promotion.champion_version"] == v1 and tags["promotion.metric"] == "linear_top1"
    assert client.get_model_version(name, v1).tags["promotion.displaced_by"] == v2


def test_worse_and_within_min_delta_become_challenger(registry):
    name, client = "gate-worse", registry["client"]
    v1, v2, v3, v4 = _versions(registry, name, 50.0, 40.0, 50.4, 50.5)
    promote(name, v1, 50.0, GATE, client=client)
    d = promote(name, v2, 40.0, GATE, client=client)
    assert d.decision == "challenger" and d.champion_score == 50.0
    assert _alias(registry, name, CHAMPION) == v1 and _alias(registry, name, CHALLENGER) == v2
    assert promote(name, v3, 50.4, GATE, client=client).decision == "challenger"  # +0.4 < min_delta 0.5
    assert _alias(registry, name, CHAMPION) == v1 and _alias(registry, name, CHALLENGER) == v3
    tags = client.get_model_version(name, v3).tags
    assert tags["promotion.decision"] == "challenger" and float(tags["promotion.champion_score"]) == 50.0
    assert promote(name, v4, 50.5, GATE, client=client).decision == "promoted"  # exactly min_delta
    assert _alias(registry, name, CHAMPION) == v4 and _alias(registry, name, PREVIOUS) == v1


def test_failed_validation_or_evaluation_never_promotes(registry):
    name, client = "gate-failed", registry["client"]
    v1, v2, v3, v4 = _versions(registry, name, 90.0, 99.0, 99.0, 99.0)
    d = promote(name, v1, 90.0, GATE, evaluation_ok=False, client=client)  # even the first model
    assert d.decision == "rejected" and _alias(registry, name, CHAMPION) is None
    promote(name, v2, 50.0, GATE, client=client)
    assert promote(name, v3, 99.0, GATE, validation_ok=False, client=client).decision == "rejected"
    assert promote(name, v4, math.nan, GATE, client=client).decision == "rejected"
    assert _alias(registry, name, CHAMPION) == v2 and _alias(registry, name, CHALLENGER) is None
    tags = client.get_model_version(name, v3).tags
    assert tags["promotion.validation_ok"] == "false" and "validation" in tags["promotion.reason"]


def test_promote_by_hand_and_cli_rollback(registry, monkeypatch, capsys):
    from sslflow import cli

    name, client = "gate-manual", registry["client"]
    v1, v2 = _versions(registry, name, 50.0, 40.0)
    promote(name, v1, 50.0, GATE, client=client)
    promote(name, v2, 40.0, GATE, client=client)
    d = promote_by_hand(name, v2, client)
    assert d.decision == "manual" and d.champion_version == v1
    assert _alias(registry, name, CHAMPION) == v2 and _alias(registry, name, PREVIOUS) == v1
    assert _alias(registry, name, CHALLENGER) is None  # v2 no longer a challenger
    assert client.get_model_version(name, v2).tags["promotion.decision"] == "manual"
    with pytest.raises(UserError, match="no version 99"):
        promote_by_hand(name, 99, client)
    with pytest.raises(UserError, match="already the champion"):
        promote_by_hand(name, v2, client)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    assert cli.main(["promote", "--model", name, "--version", v1]) == 0  # roll back
    assert f"{name} version {v1} is now 'champion'" in capsys.readouterr().out
    assert _alias(registry, name, CHAMPION) == v1 and _alias(registry, name, PREVIOUS) == v2
    assert cli.main(["promote", "--model", name, "--version", "42"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no version 42" in err and "\n" not in err


@pytest.mark.parametrize(("score", "champ", "has", "ok", "expected"), [
    (10.0, None, False, True, "promoted"),  # first model
    (10.0, 9.0, True, True, "promoted"),
    (10.0, 9.6, True, True, "challenger"),  # +0.4 < 0.5
    (9.0, 10.0, True, True, "challenger"),
    (10.0, 10.0, True, True, "challenger"),
    (None, None, False, True, "rejected"),
    (10.0, None, False, False, "rejected"),
    (10.0, None, True, True, "challenger"),  # a champion without a score is never displaced automatically
])
def test_decide(score, champ, has, ok, expected):
    assert decide(score, champ, has, 0.5, evaluation_ok=ok)[0] == expected


def test_decide_min_delta_zero_still_needs_strictly_better():
    assert decide(10.0, 10.0, True, 0.0)[0] == "challenger"
    assert decide(10.01, 10.0, True, 0.0)[0] == "promoted"


def test_missing_promotion_metric_is_a_user_error(registry):
    with pytest.raises(ConfigError, match=r"promotion\.metric"):  # refused before pretraining ...
        load_settings([], ["promotion.metric=finetune_top1", "eval.protocols=[knn, linear]"])
    # ... and, should a report still lack it, at registration
    tp = load_settings([], ["promotion.metric=finetune_top1", "eval.protocols=[knn, linear, finetune]"])
    report = dataclasses.replace(registry["report"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", registry["uri"])
        with pytest.raises(UserError, match="finetune_top1"), \
                tracking_run(tp, check=False) as run:
            register_and_promote(run, registry["run_dir"], report, tp)
