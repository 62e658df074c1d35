"""`retrain` with `pipeline.retrain_policy=drift` on a tiny demo store (the issue's "done when"):
no training on an unshifted batch, training on a colour-shifted one, the evidence in Prefect and
MLflow, and never twice on the same data even when the training ended as challenger."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from test_flows import FLOW_SET, _versions


def _write(folder: Path, images: np.ndarray, labels: np.ndarray, tag: str) -> None:
    from PIL import Image

    from sslflow.tasks.data.demo import CLASSES

    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        (folder / CLASSES[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / CLASSES[y] / f"{tag}_{i}.png")


def test_drift_policy_trains_on_a_shifted_batch_only_and_never_twice(project):
    from mlflow import MlflowClient
    from prefect.artifacts import Artifact

    from sslflow.flows.retrain import retrain_flow
    from sslflow.flows.train import train_flow
    from sslflow.tasks.data.demo import generate_demo

    assert train_flow(store="data/store", overrides=FLOW_SET, run_name="first")["decision"] == "promoted"
    policy = [*FLOW_SET, "pipeline.retrain_policy=drift", "pipeline.drift_permutations=200",
              "pipeline.min_new_images=1", "ingest.near_duplicate_threshold=0"]
    incoming = project / "data" / "incoming"

    # the same distribution (demo classes, another seed): many new images, no drift -> nothing to do
    images, labels = generate_demo(4, size=16, seed=7)
    _write(incoming, images, labels, "same")
    state = retrain_flow(overrides=policy, return_state=True)
    assert state.name == "NothingToDo" and "nothing to do: no drift: MMD^2" in state.message, state.message
    out = state.result()
    assert out["new_images"] == 40 and out["drift"]["p_value"] >= 0.01 and out["policy"] == "drift"
    art = Artifact.get("retrain-report")
    assert art is not None and "**drift**: MMD^2" in art.data and "p-value" in art.data, art.data

    # colour-shifted images (warm, dim light): drift -> trains; a high bar makes it a challenger
    images, labels = generate_demo(4, size=16, seed=8)
    tinted = (images * 0.5 + np.array([110, 50, 0])).clip(0, 255).astype(np.uint8)
    _write(incoming, tinted, labels, "tinted")
    res = retrain_flow(overrides=[*policy, "promotion.min_delta=1000"], run_name="second")
    assert res["trained"] and res["drift"]["drifted"] and res["drift"]["p_value"] < 0.01, res["reason"]
    assert res["train"]["decision"] == "challenger" and res["train"]["train_images"] == 120

    # again on the same data (count policy, any new image would do): the challenger's data is not new
    state = retrain_flow(overrides=[*FLOW_SET, "pipeline.min_new_images=1"], return_state=True)
    assert state.name == "NothingToDo" and state.result()["new_images"] == 0, state.message
    assert "last training: v2 (120 images)" in state.message
    assert len(_versions()) == 2

    # MLflow: one run per decision, with the evidence and the drift report of the tested ones
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("sslflow").experiment_id],
                              "tags.`sslflow.kind` = 'retrain-decision'", order_by=["attributes.start_time ASC"])
    assert [r.data.tags["retrain.decision"] for r in runs] == ["nothing_to_do", "train", "nothing_to_do"]
    assert runs[1].data.tags["drift.drifted"] == "true" and float(runs[1].data.tags["drift.p_value"]) < 0.01
    assert {a.path for a in client.list_artifacts(runs[1].info.run_id, "drift")} >= {"drift/map.png",
                                                                                     "drift/history.png"}
