"""Deployments against a real `prefect server start`: the retrain schedule creates scheduled runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_prefect_yaml_matches_pipeline_params():
    from tasks.pipeline import load_pipeline_params

    pp = load_pipeline_params().pipeline
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert deps["nightly"]["schedules"] == [{"cron": pp.cron, "timezone": pp.timezone}]
    assert deps["nightly"]["entrypoint"] == "flows/retrain.py:retrain_flow"
    assert {d["work_pool"]["name"] for d in deps.values()} == {pp.work_pool}


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real `prefect server start` (scheduler on, 1 s loop) on a free port, stopped afterwards."""
    home = tmp_path_factory.mktemp("prefect-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield {"api": api, "env": {**env, "PREFECT_API_URL": api}}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


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
                                   "scheduled": len(runs), "pull": d.pull_steps}
    print(json.dumps(out, default=str))
"""


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
    out = subprocess.run([sys.executable, "-m", "sslflow.cli", "deploy"], cwd=REPO, env=prefect_api["env"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    deps = _wait_scheduled(prefect_api["env"], "retrain/nightly")
    assert deps["retrain/nightly"]["crons"] == [pp.cron] and deps["retrain/nightly"]["scheduled"] > 0, deps
    assert deps["retrain/nightly"]["pool"] == pp.work_pool
    assert deps["train/on-demand"]["crons"] == [] and deps["train/on-demand"]["scheduled"] == 0
    assert str(REPO) in json.dumps(deps["retrain/nightly"]["pull"])  # the worker runs in this checkout


def test_prefect_deploy_all_with_prefect_yaml(prefect_api):
    out = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=REPO,
                         env={**prefect_api["env"], "PWD": str(REPO)}, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    deps = _wait_scheduled(prefect_api["env"], "retrain/nightly")
    assert deps["retrain/nightly"]["scheduled"] > 0, deps
    assert str(REPO) in json.dumps(deps["retrain/nightly"]["pull"])
