"""Deployments of the flows on a process work pool (`sslflow deploy`; `prefect.yaml` is the same set).

- `retrain/nightly`: `pipeline.cron` in `pipeline.timezone` (default 03:00 UTC every day);
- `train/on-demand`: no schedule;
- with `gpu=True`, `train/gpu` on `pipeline.gpu_work_pool` with `device=cuda`,
  `CUDA_VISIBLE_DEVICES=0` as a job variable and `pipeline.gpu_limit` (default `gpu`) held
  by each pretraining: one worker per GPU host, one limit slot per GPU.
- `tune`: pending (issue 5).

The flows run from this checkout (`set_working_directory` pull step): start a worker in it
with `prefect worker start --pool sslflow-process`.
"""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import Any

import flows  # noqa: F401

PROJECT_DIR = Path(__file__).resolve().parent.parent


def ensure_work_pool(name: str, pool_type: str = "process") -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):
                client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))


def build_deployments(pp: Any, project_dir: Path = PROJECT_DIR, gpu: bool = False) -> list[tuple[str, Any]]:
    """(work pool, RunnerDeployment) pairs, not yet applied."""
    from prefect import Flow
    from prefect.schedules import Cron

    src = str(project_dir)
    retrain = Flow.from_source(src, "flows/retrain.py:retrain_flow")
    train = Flow.from_source(src, "flows/train.py:train_flow")
    out = [
        (pp.work_pool, retrain.to_deployment(
            name="nightly", schedules=[Cron(pp.cron, timezone=pp.timezone)], tags=["sslflow"],
            description="ingest data/incoming, validate, retrain when enough is new")),
        (pp.work_pool, train.to_deployment(name="on-demand", tags=["sslflow"],
                                           description="validate the store, pretrain, evaluate, register")),
    ]
    if gpu:
        limit = pp.gpu_limit or "gpu"
        out.append((pp.gpu_work_pool, train.to_deployment(
            name="gpu", tags=["sslflow", "gpu"], job_variables={"env": {"CUDA_VISIBLE_DEVICES": "0"}},
            parameters={"overrides": ["device=cuda", f"pipeline.gpu_limit={limit}"]},
            description="train on a GPU host (one slot of the gpu concurrency limit per run)")))
    return out


def deploy_all(pp: Any, project_dir: Path = PROJECT_DIR, gpu: bool = False) -> dict[str, str]:
    """Create (or update) the work pools, the GPU limit and the deployments; {name: id}."""
    from prefect.deployments.runner import deploy

    from flows.retrain import ensure_limit

    ids: dict[str, str] = {}
    pairs = build_deployments(pp, project_dir, gpu)
    for pool in {p for p, _ in pairs}:
        ensure_work_pool(pool)
    if gpu:
        ensure_limit(pp.gpu_limit or "gpu", 1)
    for pool, d in pairs:
        [dep_id] = deploy(d, work_pool_name=pool, build=False, push=False, print_next_steps_message=False,
                          ignore_warnings=True)
        ids[f"{d.flow_name}/{d.name}"] = str(dep_id)
    return ids
