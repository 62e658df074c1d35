"""Deployments against a real `prefect server start`: the retrain schedule creates scheduled runs;
both documented ways to deploy (`sslflow deploy`, `prefect deploy` with prefect.yaml) work and
point the deployments at the project directory they run in."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from helpers import BIN, REPO, prefect_server


def _yaml_deployments() -> dict[tuple[str, str], dict]:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return {(d["entrypoint"], d["name"]): d for d in spec["deployments"]}


def test_prefect_yaml_matches_the_pipeline_settings():
    from helpers import fast_params

    pp = fast_params().pipeline
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
    from helpers import fast_params
    from sslflow.flows.deployments import build_deployments

    settings = fast_params()
    built = {}
    for pool, d in build_deployments(settings, gpu=True, code_dir=REPO):  # the code of a checkout, as prefect.yaml
        assert d.parameters.pop("project") == str(settings.project)  # prefect.yaml: the directory it runs in
        assert d.storage.to_pull_step()["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
        built[(d.entrypoint, d.name)] = {
            "pool": pool, "parameters": d.parameters, "job_variables": d.job_variables or {}, "tags": d.tags,
            "schedules": [{"cron": s.schedule.cron, "timezone": s.schedule.timezone} for s in d.schedules or []]}
    yaml_deps = _yaml_deployments()
    for d in yaml_deps.values():
        assert d["parameters"].pop("project") == "{{ $PWD }}"
    in_yaml = {k: {"pool": d["work_pool"]["name"], "parameters": d.get("parameters") or {},
                   "job_variables": d["work_pool"].get("job_variables") or {}, "tags": d.get("tags") or [],
                   "schedules": d.get("schedules") or []} for k, d in yaml_deps.items()}
    assert set(in_yaml) == set(built)
    for key in built:
        assert in_yaml[key] == built[key], key
    assert built[("flows/pretrain.py:pretrain_flow", "gpu")]["parameters"]["host_overrides"] == ["device=cuda"]


def test_deployments_point_at_the_project_and_take_its_code_only_from_a_checkout(tmp_path):
    """A project that is not a checkout: module entrypoints (the worker's installed sslflow), working
    directory = the project. A checkout: its own flow files, working directory = the checkout."""
    from sslflow.flows.deployments import build_deployments, code_source

    project = tmp_path / "project"
    project.mkdir()
    from sslflow.core.settings import load_settings

    settings = load_settings([], ["device=cpu"], project=project)
    assert code_source(project) is None and code_source(REPO) == REPO
    for _, d in build_deployments(settings, gpu=True):
        assert d.entrypoint.startswith("sslflow.flows.") and ":" not in d.entrypoint, d.entrypoint
        step = d.storage.to_pull_step()["prefect.deployments.steps.set_working_directory"]
        assert step["directory"] == str(project.resolve()) and d.parameters["project"] == str(project)


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
ALL_DEPLOYMENTS = {"retrain/nightly", "train/on-demand", "tune/on-demand", "embed/on-demand"} | GPU_DEPLOYMENTS


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


def test_sslflow_deploy_creates_a_scheduled_retrain_run(prefect_api, empty_project):
    """Run in a project directory that is not a checkout (no SSLFLOW_PROJECT: the directory the
    command runs in): every deployment works there, with the installed sslflow's flows."""
    from helpers import fast_params

    pp = fast_params().pipeline
    env = {k: v for k, v in prefect_api["env"].items() if k != "SSLFLOW_PROJECT"}
    out = subprocess.run([sys.executable, "-m", "sslflow.cli", "deploy", "--gpu"], cwd=empty_project, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "prefect worker start --pool sslflow-gpu" in out.stdout
    deps = _wait_scheduled(prefect_api["env"], "retrain/nightly")
    assert set(deps) == ALL_DEPLOYMENTS, deps
    assert deps["retrain/nightly"]["crons"] == [pp.cron] and deps["retrain/nightly"]["scheduled"] > 0, deps
    assert deps["retrain/nightly"]["pool"] == pp.work_pool
    assert deps["train/on-demand"]["crons"] == [] and deps["train/on-demand"]["scheduled"] == 0
    assert deps["tune/on-demand"]["pool"] == pp.work_pool and deps["tune/on-demand"]["crons"] == []
    assert deps["tune/on-demand"]["entrypoint"] == "sslflow.flows.tune.tune_flow"
    for d in deps.values():  # flow runs work in the project the command ran in
        assert d["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(empty_project)}}]
    for name in GPU_DEPLOYMENTS:
        assert deps[name]["pool"] == pp.gpu_work_pool, (name, deps[name])
        assert deps[name]["job_variables"] == {"env": {"CUDA_VISIBLE_DEVICES": "0"}}, (name, deps[name])
    assert deps["pretrain/gpu"]["parameters"] == {"project": str(empty_project), "host_overrides": ["device=cuda"],
                                                  "gpu_limit": "gpu"}
    assert deps["tune/gpu"]["parameters"]["overrides"][0] == "device=cuda"
    assert all(d["parameters"]["project"] == str(empty_project) for d in deps.values())  # the project it ran for


def test_sslflow_deploy_in_a_checkout_runs_the_checkouts_flow_files(prefect_api, tmp_path):
    """`sslflow deploy` run in a (second) checkout: its own flow files and directory, not the
    checkout the package was installed from."""
    clone = tmp_path / "checkout"
    for part in ("flows", "sslflow", "tasks", "ssl_models"):
        shutil.copytree(REPO / part, clone / part, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in prefect_api["env"].items() if k != "SSLFLOW_PROJECT"}
    out = subprocess.run([sys.executable, "-m", "sslflow.cli", "deploy"], cwd=clone, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"code: the checkout {clone}" in out.stdout, out.stdout
    deps = _deployments(prefect_api["env"])
    assert deps["train/on-demand"]["entrypoint"] == "flows/train.py:train_flow"
    assert deps["train/on-demand"]["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(clone)}}]
    assert deps["train/on-demand"]["parameters"]["project"] == str(clone)


def test_prefect_deploy_by_name_as_prefect_yaml_documents(prefect_api):
    """The command of prefect.yaml's comment: the process-pool deployments by name (no GPU pool needed)."""
    env = prefect_api["env"]
    yaml_text = (REPO / "prefect.yaml").read_text()
    [line] = [ln for ln in yaml_text.splitlines() if ln.lstrip("# ").startswith("prefect deploy -n")]
    args = line.lstrip("# ").split()[2:]
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", "sslflow-process", "--type", "process"], env=env,
                   capture_output=True, timeout=60)
    t0 = time.time()
    out = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", *args], cwd=REPO,
                         env={**env, "PWD": str(REPO)}, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    deps = {k: d for k, d in _deployments(env).items() if d["updated"] >= t0 - 1}
    assert set(deps) == {"retrain/nightly", "train/on-demand", "tune/on-demand"}, deps
    assert all(d["pool"] == "sslflow-process" for d in deps.values())


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
    assert deps["pretrain/gpu"]["parameters"] == {"project": str(REPO), "host_overrides": ["device=cuda"],
                                                  "gpu_limit": "gpu"}
    assert deps["pretrain/gpu"]["job_variables"] == {"env": {"CUDA_VISIBLE_DEVICES": "0"}}
