"""Deployments of the flows on work pools (`sslflow deploy`; `prefect.yaml` is the same set).

Process pool `pipeline.work_pool`:
- `retrain/nightly`: `pipeline.cron` in `pipeline.timezone` (default 03:00 UTC every day);
- `train/on-demand`: no schedule;
- `tune/on-demand`: a hyperparameter search (`flows/tune.py`), no schedule;
- `embed/on-demand`: embeddings of new images with the champion (`flows/embed.py`), no schedule.

With `gpu=True` (`sslflow deploy --gpu`), on `pipeline.gpu_work_pool`, each with
`CUDA_VISIBLE_DEVICES=0` as a job variable, `device=cuda` and one slot of `pipeline.gpu_limit`
(default `gpu`) held by each pretraining: one worker per GPU host, one limit slot per GPU.
- `pretrain/gpu`: pretraining only; the `train` flow sends it there with
  `pipeline.pretrain_deployment=pretrain/gpu` and keeps the rest (docs/scaling-gpu-pool.md);
- `train/gpu`: the whole train flow on a GPU host;
- `tune/gpu`: a search whose trials train on a GPU host (several runs share one study).

Every deployment points at the project directory it was created for (`settings.project`: the
directory `sslflow deploy` runs in, or --project / SSLFLOW_PROJECT): it is the flow runs'
working directory (the pull step) and their `project` parameter, so a worker reads that
project's params.yaml, store and runs. The flows' code (`code_source`): when the project is an
sslflow checkout (flows/ and sslflow/ in it), that checkout's files (`flows/train.py:train_flow`,
as prefect.yaml deploys them); otherwise the sslflow installed where the worker runs (module
entrypoints `sslflow.flows.train.train_flow`: a wheel install, no checkout needed). Start a
worker with `prefect worker start --pool sslflow-process`.
"""

from __future__ import annotations

import importlib
from contextlib import suppress
from pathlib import Path
from typing import Any

#: What `embed/on-demand` embeds unless the run says otherwise (paths relative to the project).
EMBED_DEFAULTS = {"source": "data/incoming", "out": "data/embeddings/incoming.parquet"}


def code_source(project: Path) -> Path | None:
    """The checkout whose flow files the deployments run: the project itself when it is an
    sslflow checkout, else None (the worker's installed sslflow, by module path)."""
    p = Path(project)
    return p if (p / "flows" / "train.py").is_file() and (p / "sslflow" / "__init__.py").is_file() else None


def flow_deployment(project: Path, module: str, func: str, code_dir: Path | None = None, **kwargs: Any) -> Any:
    """A RunnerDeployment of `sslflow.flows.<module>.<func>` whose working directory is `project`;
    the code from `code_dir` (default: `code_source(project)`) or the installed package."""
    from prefect import Flow
    from prefect.runner.storage import LocalStorage
    from prefect.types.entrypoint import EntrypointType

    src = code_dir if code_dir is not None else code_source(project)
    if src is not None:
        return Flow.from_source(str(src), f"flows/{module}.py:{func}").to_deployment(**kwargs)
    flow = getattr(importlib.import_module(f"sslflow.flows.{module}"), func)
    deployment = flow.to_deployment(entrypoint_type=EntrypointType.MODULE_PATH, **kwargs)
    deployment.storage = LocalStorage(str(Path(project).resolve()))  # pull step: cd into the project
    return deployment


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


def gpu_settings(pp: Any) -> tuple[str, dict[str, Any]]:
    """The GPU concurrency limit and the job variables of every GPU deployment."""
    return pp.gpu_limit or "gpu", {"env": {"CUDA_VISIBLE_DEVICES": "0"}}


def build_deployments(settings: Any, gpu: bool = False, code_dir: Path | None = None) -> list[tuple[str, Any]]:
    """(work pool, RunnerDeployment) pairs, not yet applied; `code_dir` None = `code_source`."""
    from prefect.schedules import Cron

    pp = settings.pipeline
    project = {"project": str(settings.project)}

    def dep(module: str, func: str, **kwargs: Any) -> Any:
        return flow_deployment(settings.project, module, func, code_dir, **kwargs)

    out = [
        (pp.work_pool, dep("retrain", "retrain_flow",
                           name="nightly", schedules=[Cron(pp.cron, timezone=pp.timezone)], tags=["sslflow"],
                           parameters=project,
                           description="ingest data/incoming, validate, retrain when enough is new")),
        (pp.work_pool, dep("train", "train_flow", name="on-demand", tags=["sslflow"], parameters=project,
                           description="validate the store, pretrain, evaluate, register")),
        (pp.work_pool, dep("tune", "tune_flow", name="on-demand", tags=["sslflow"], parameters=project,
                           description="hyperparameter search, then train the best trial")),
        (pp.work_pool, dep("embed", "embed_flow", name="on-demand", tags=["sslflow"],
                           parameters={**project, **EMBED_DEFAULTS},
                           description="embed new images with the champion encoder into a Parquet table")),
    ]
    if gpu:
        limit, job_variables = gpu_settings(pp)
        on_gpu = ["device=cuda", f"pipeline.gpu_limit={limit}"]
        out += [
            pretrain_gpu_deployment(settings, code_dir),
            (pp.gpu_work_pool, dep(
                "train", "train_flow", name="gpu", tags=["sslflow", "gpu"], job_variables=job_variables,
                parameters={**project, "overrides": on_gpu},
                description="train on a GPU host (one slot of the gpu concurrency limit per run)")),
            (pp.gpu_work_pool, dep(
                "tune", "tune_flow", name="gpu", tags=["sslflow", "gpu"], job_variables=job_variables,
                parameters={**project, "overrides": on_gpu},
                description="hyperparameter search on a GPU host; several runs can share one study")),
        ]
    return out


def pretrain_gpu_deployment(settings: Any, code_dir: Path | None = None) -> tuple[str, Any]:
    """`pretrain/gpu`: the train flow's pretraining on a GPU host. `host_overrides` and
    `gpu_limit` are deployment parameters the train flow never sends, so they stay."""
    pp = settings.pipeline
    limit, job_variables = gpu_settings(pp)
    return (pp.gpu_work_pool, flow_deployment(
        settings.project, "pretrain", "pretrain_flow", code_dir,
        name="gpu", tags=["sslflow", "gpu"], job_variables=job_variables,
        parameters={"project": str(settings.project), "host_overrides": ["device=cuda"], "gpu_limit": limit},
        description="pretraining only, for the train flow (pipeline.pretrain_deployment=pretrain/gpu)"))


def apply_deployments(pairs: list[tuple[str, Any]], gpu_limit: str | None = None) -> dict[str, str]:
    """Create (or update) the work pools, the GPU limit (1 slot if new) and the deployments;
    {flow/name: id}."""
    from prefect.deployments.runner import deploy

    from sslflow.tasks.pipeline.slot import ensure_limit

    for pool in {p for p, _ in pairs}:
        ensure_work_pool(pool)
    if gpu_limit:
        ensure_limit(gpu_limit, 1)
    ids: dict[str, str] = {}
    for pool, d in pairs:
        [dep_id] = deploy(d, work_pool_name=pool, build=False, push=False, print_next_steps_message=False,
                          ignore_warnings=True)
        ids[f"{d.flow_name}/{d.name}"] = str(dep_id)
    return ids


def deploy_all(settings: Any, gpu: bool = False, code_dir: Path | None = None) -> dict[str, str]:
    """`build_deployments` applied: the pools, the GPU limit and the deployments; {name: id}."""
    return apply_deployments(build_deployments(settings, gpu, code_dir),
                             gpu_settings(settings.pipeline)[0] if gpu else None)
