"""Deployments against a real `prefect server start`: the retrain schedule creates scheduled runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _yaml_deployments() -> dict[tuple[str, str], dict]:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return {(d["entrypoint"], d["name"]): d for d in spec["deployments"]}


def test_prefect_yaml_matches_pipeline_params():
    from tasks.pipeline import load_pipeline_params

    pp = load_pipeline_params().pipeline
    deps = _yaml_deployments()
    nightly = deps[("flows/retrain.py:retrain_flow", "nightly")]
    assert nightly["schedules"] == [{"cron": pp.cron, "timezone": pp.timezone}]
    pools = {d["work_pool"]["name"] for d in deps.values()}
    assert pools == {pp.work_pool, pp.gpu_work_pool}
    assert {k for k, d in deps.items() if d["work_pool"]["name"] == pp.gpu_work_pool} == {
        ("flows/pretrain.py:pretrain_flow", "gpu"), ("flows/train.py:train_flow", "gpu"),
        ("flows/tune.py:tune_flow", "gpu")}


def test_prefect_yaml_is_the_set_sslflow_deploy_builds():
    """prefect.yaml and `build_deployments(gpu=True)` (what `sslflow deploy --gpu` applies) agree on
    every deployment: entrypoint, name, pool, parameters, job variables, tags, schedules."""
    from flows.deployments import build_deployments
    from tasks.pipeline import load_pipeline_params

    built = {}
    for pool, d in build_deployments(load_pipeline_params().pipeline, gpu=True):
        built[(d.entrypoint, d.name)] = {
            "pool": pool, "parameters": d.parameters, "job_variables": d.job_variables or {}, "tags": d.tags,
            "schedules": [{"cron": s.schedule.cron, "timezone": s.schedule.timezone} for s in d.schedules or []]}
    in_yaml = {k: {"pool": d["work_pool"]["name"], "parameters": d.get("parameters") or {},
                   "job_variables": d["work_pool"].get("job_variables") or {}, "tags": d.get("tags") or [],
                   "schedules": d.get("schedules") or []} for k, d in _yaml_deployments().items()}
    assert set(in_yaml) == set(built)
    for key in built:
        assert in_yaml[key] == built[key], key
    assert built[("flows/pretrain.py:pretrain_flow", "gpu")]["parameters"]["host_overrides"] == ["device=cuda"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prefect_server(home: Path, timeout: float = 90.0, before_ready: Callable[[], None] | None = None
                   ) -> Iterator[dict]:
    """A real `prefect server start` (scheduler on, 1 s loop) in PREFECT_HOME `home` on a free
    port; yields {"api", "env" (with PREFECT_API_URL), "log"}; stopped (its process group) afterwards.
    `before_ready` runs while the server boots (work that does not need it)."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log_path = home / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        if before_ready is not None:
            before_ready()
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"prefect server did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield {"api": api, "env": {**env, "PREFECT_API_URL": api}, "log": log_path}
    finally:
        stop_process_group(proc)
        log.close()


def stop_process_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session), SIGKILL if it lingers."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as api:
        yield api


QUERY = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (DeploymentFilter, FlowRunFilter, FlowRunFilterState,
    FlowRunFilterStateType)
from prefect.client.schemas.objects import StateType
with get_client(sync_client=True) as c:
    out = {}
    for d in c.read_deployments():
        runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [d.id]}),
                                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
        flow = c.read_flow(d.flow_id).name
        out[f"{flow}/{d.name}"] = {"pool": d.work_pool_name, "crons": [s.schedule.cron for s in d.schedules],
                                   "scheduled": len(runs), "pull": d.pull_steps, "parameters": d.parameters,
                                   "job_variables": d.job_variables, "entrypoint": d.entrypoint,
                                   "updated": d.updated.timestamp()}
    print(json.dumps(out, default=str))
"""

GPU_DEPLOYMENTS = {"pretrain/gpu", "train/gpu", "tune/gpu"}
ALL_DEPLOYMENTS = {"retrain/nightly", "train/on-demand", "tune/on-demand"} | GPU_DEPLOYMENTS


def _deployments(env) -> dict:
    out = subprocess.run([sys.executable, "-c", QUERY], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _wait_scheduled(env, name, timeout=30.0) -> dict:
    deadline = time.time() + timeout
    while True:
        deps = _deployments(env)
        if deps.get(name, {}).get("scheduled", 0) > 0 or time.time() > deadline:
            return deps
        time.sleep(1)


def test_sslflow_deploy_creates_a_scheduled_retrain_run(prefect_api):
    from tasks.pipeline import load_pipeline_params

    pp = load_pipeline_params().pipeline
    out = subprocess.run([sys.executable, "-m", "sslflow.cli", "deploy", "--gpu"], cwd=REPO, env=prefect_api["env"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "prefect worker start --pool sslflow-gpu" in out.stdout
    deps = _wait_scheduled(prefect_api["env"], "retrain/nightly")
    assert set(deps) == ALL_DEPLOYMENTS, deps
    assert deps["retrain/nightly"]["crons"] == [pp.cron] and deps["retrain/nightly"]["scheduled"] > 0, deps
    assert deps["retrain/nightly"]["pool"] == pp.work_pool
    assert deps["train/on-demand"]["crons"] == [] and deps["train/on-demand"]["scheduled"] == 0
    assert deps["tune/on-demand"]["pool"] == pp.work_pool and deps["tune/on-demand"]["crons"] == []
    assert deps["tune/on-demand"]["entrypoint"] == "flows/tune.py:tune_flow"
    assert str(REPO) in json.dumps(deps["retrain/nightly"]["pull"])  # the worker runs in this checkout
    for name in GPU_DEPLOYMENTS:
        assert deps[name]["pool"] == pp.gpu_work_pool, (name, deps[name])
        assert deps[name]["job_variables"] == {"env": {"CUDA_VISIBLE_DEVICES": "0"}}, (name, deps[name])
    assert deps["pretrain/gpu"]["parameters"] == {"host_overrides": ["device=cuda"], "gpu_limit": "gpu"}
    assert deps["tune/gpu"]["parameters"]["overrides"][0] == "device=cuda"


def test_prefect_deploy_all_with_prefect_yaml(prefect_api):
    env = prefect_api["env"]
    for pool in ("sslflow-process", "sslflow-gpu"):  # `prefect deploy` refuses pools that do not exist
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"], env=env,
                       capture_output=True, timeout=60)
    t0 = time.time()
    out = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=REPO,
                         env={**env, "PWD": str(REPO)}, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    deps = _wait_scheduled(env, "retrain/nightly")
    assert set(deps) == ALL_DEPLOYMENTS, deps
    assert all(d["updated"] >= t0 - 1 for d in deps.values()), deps  # written by this `prefect deploy`
    assert deps["retrain/nightly"]["scheduled"] > 0, deps
    assert str(REPO) in json.dumps(deps["retrain/nightly"]["pull"])
    assert deps["pretrain/gpu"]["parameters"] == {"host_overrides": ["device=cuda"], "gpu_limit": "gpu"}
    assert deps["pretrain/gpu"]["job_variables"] == {"env": {"CUDA_VISIBLE_DEVICES": "0"}}
