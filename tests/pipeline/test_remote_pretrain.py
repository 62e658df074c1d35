"""Pretraining on a (GPU) work pool: a real `prefect server start`, a real process worker on the
pool that executes the deployed `pretrain` flow, and the `train` flow sending its pretraining there
(`pretrain_deployment`) while it validates, evaluates, registers and promotes in its own process.

On this CPU machine the deployment is the one `sslflow deploy --gpu` builds (`pretrain/gpu`) with
`device=cpu` as its host override, deployed as `pretrain/cpu`; `pretrain/broken` carries a bad host
override so that only the remote side fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from helpers import BIN, FAST, REPO, TINY_DEMO, prefect_server, stop_process_group

DATA = TINY_DEMO
FLOW_SET = [*FAST, *DATA, "pretrain.epochs=2", "eval.knn_k=5", "eval.protocols=[knn]",
            "promotion.metric=knn_top1", "tracking.embedding_map=false", "tracking.augment_grid_images=0",
            "pipeline.retries=0"]

DEPLOY = """
import json, sys
from sslflow.core.settings import load_settings
from sslflow.flows.deployments import apply_deployments, pretrain_gpu_deployment

pool = sys.argv[1]
settings = load_settings([], [f"pipeline.gpu_work_pool={pool}", "pipeline.gpu_limit=test-gpu"])
built = {}
for name, host_overrides in (("cpu", ["device=cpu"]), ("broken", ["pretrain.methd=simclr"])):
    p, d = pretrain_gpu_deployment(settings)
    built.setdefault("gpu", {"pool": p, "parameters": dict(d.parameters), "job_variables": d.job_variables})
    d.name, d.parameters["host_overrides"] = name, host_overrides
    d.job_variables = {"env": {"CUDA_VISIBLE_DEVICES": ""}}
    apply_deployments([(p, d)], gpu_limit="test-gpu")
print("RESULT " + json.dumps(built))
"""

TRAIN = """
import json, sys
from sslflow.flows.train import train_flow

for kw in json.loads(sys.argv[1]):  # one process for several runs: the imports are paid once
    state = train_flow(**kw, return_state=True)
    out = {"flow_run_id": str(state.state_details.flow_run_id), "state": state.type.value}
    try:
        out["result"] = state.result()
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    print("RESULT " + json.dumps(out, default=str), flush=True)
"""


class Parent:
    """A process running `train` flows one after the other; `result(i)` waits for the i-th."""

    def __init__(self, stack: Stack, name: str, runs: list[tuple[str, str]]) -> None:
        self.stack, self.log = stack, stack.root / f"{name}.log"
        kws = [{"store": str(stack.root / "data" / "store"), "overrides": FLOW_SET, "run_name": run_name,
                "runs_dir": str(stack.root / "runs"), "reports_dir": str(stack.root / "reports"),
                "pretrain_deployment": deployment} for run_name, deployment in runs]
        env = {**stack.api["env"], "MLFLOW_TRACKING_URI": stack.mlflow_uri}
        self._out = open(self.log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-c", TRAIN, json.dumps(kws)], cwd=stack.root, env=env,
                                     stdout=self._out, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def result(self, i: int, timeout: float = 240) -> dict:
        deadline = time.time() + timeout
        while True:
            lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.startswith("RESULT ")]
            if len(lines) > i:
                return json.loads(lines[i][len("RESULT "):])
            if self.proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"train flow process gave no result {i} (exit code {self.proc.poll()})"
                                     f"{self.stack.logs(self.log)}")
            time.sleep(0.5)

    def stop(self) -> None:
        stop_process_group(self.proc)
        self._out.close()


class Stack:
    """Server, worker, store and MLflow database of this module; `logs()` for failure messages."""

    def __init__(self, api: dict, root: Path, pool: str) -> None:
        self.api, self.root, self.pool = api, root, pool
        self.worker_log = root / "worker.log"
        self.mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.built: dict = {}

    def logs(self, *more: Path) -> str:
        parts = [(p.name, p) for p in more] + [("worker", self.worker_log), ("server", Path(self.api["log"]))]
        return "".join(f"\n--- {name} ---\n{p.read_text(errors='replace')[-5000:] if p.exists() else ''}"
                       for name, p in parts)

    def script(self, script: str, *args: str, timeout: float = 120) -> dict:
        out = subprocess.run([sys.executable, "-c", script, *args], cwd=self.root, env=self.api["env"],
                             capture_output=True, text=True, timeout=timeout)
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-5000:] + self.logs()
        return json.loads(lines[-1][len("RESULT "):])

    def api_call(self, path: str, body: dict | None = None) -> Any:
        req = urllib.request.Request(self.api["api"] + path, method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def task_states(self, flow_run_id: str) -> dict[str, str]:
        trs = self.api_call("/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}})
        return {t["name"]: t["state"]["type"] for t in trs}

    def children(self, flow_run_id: str) -> list[dict]:
        """Subflow runs of `flow_run_id` with their deployment as flow/name and their task states."""
        out = []
        for fr in self.api_call("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}}):
            dep = self.api_call(f"/deployments/{fr['deployment_id']}") if fr["deployment_id"] else None
            flow = self.api_call(f"/flows/{fr['flow_id']}")["name"]
            out.append({**fr, "deployment": f"{flow}/{dep['name']}" if dep else None,
                        "tasks": self.task_states(fr["id"])})
        return out

    def kill_unfinished_runs(self) -> None:
        """Flow-run processes the worker started in their own session and that are still running
        (only after a failure): killed by the pid the worker recorded ("host:pid")."""
        runs = self.api_call("/flow_runs/filter", {"work_pools": {"name": {"any_": [self.pool]}}})
        for fr in runs:
            pid = (fr.get("infrastructure_pid") or "").rpartition(":")[2]
            if pid.isdigit() and fr["state"]["type"] not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                _kill(int(pid))

    def mlflow(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_uri)


def _kill(pid: int) -> None:
    """SIGKILL `pid`, with its process group when it leads one."""
    with suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


def _prepare(root: Path, mlflow_uri: str) -> None:
    """While the server boots: the demo store, and the MLflow database (its migrations take seconds)."""
    from mlflow import MlflowClient

    from sslflow.core.settings import load_settings
    from sslflow.tasks.data.ingest import ingest

    settings = load_settings([], DATA)
    for split in ("train", "test"):
        ingest("demo", root / "data" / "store", split, settings=settings, reports_dir=root / "reports")
    MlflowClient(tracking_uri=mlflow_uri).search_experiments()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Server + deployments + a process worker on a fresh pool (run from this checkout), and two
    train flow processes started at once: `ok` (pretrain/cpu) and `bad` (pretrain/broken, then a
    deployment that does not exist). The tests read their results."""
    root = tmp_path_factory.mktemp("remote-pretrain")
    pool = f"test-gpu-{uuid.uuid4().hex[:8]}"
    (root / "home").mkdir()
    mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"
    with prefect_server(root / "home", before_ready=lambda: _prepare(root, mlflow_uri)) as api:
        st = Stack(api, root, pool)
        st.built = st.script(DEPLOY, pool)
        env = {k: v for k, v in api["env"].items() if not k.startswith("MLFLOW_TRACKING")}  # the URI is a parameter
        env.update(PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5",
                   PREFECT_HOME=str(root / "worker-home"))
        log = open(st.worker_log, "wb")  # noqa: SIM115 (closed in finally)
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
                                   "--name", "test-gpu-host"], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        parents = []
        try:
            parents = [Parent(st, "ok", [("remote", "pretrain/cpu")]),
                       Parent(st, "bad", [("broken", "pretrain/broken"), ("nowhere", "pretrain/nowhere")])]
            st.ok, st.bad = parents
            yield st
        finally:
            for p in parents:
                p.stop()
            with suppress(Exception):
                st.kill_unfinished_runs()
            stop_process_group(worker)
            log.close()


def test_train_flow_pretrains_on_the_gpu_pool(stack):
    gpu = stack.built["gpu"]  # what `sslflow deploy --gpu` creates (deployed tweaked to CPU for this machine)
    assert gpu["parameters"].pop("project")  # the project `sslflow deploy` ran for
    assert gpu["parameters"] == {"host_overrides": ["device=cuda"], "gpu_limit": "test-gpu"}
    assert gpu["job_variables"] == {"env": {"CUDA_VISIBLE_DEVICES": "0"}} and gpu["pool"] == stack.pool

    out = stack.ok.result(0)
    try:
        assert out["state"] == "COMPLETED" and "result" in out, out
        summary = out["result"]
        [child] = stack.children(out["flow_run_id"])
        # the pretraining ran in the worker's flow run, a subflow run of the train flow run
        assert child["deployment"] == "pretrain/cpu" and child["work_pool_name"] == stack.pool, child
        assert child["state"]["type"] == "COMPLETED" and child["infrastructure_pid"], child
        assert any(n.startswith("pretrain-") and st == "COMPLETED" for n, st in child["tasks"].items()), child
        assert child["parameters"]["run_dir"] == summary["run_dir"] and child["parameters"]["host_overrides"] == [
            "device=cpu"], child["parameters"]
        parent = stack.task_states(out["flow_run_id"])
        assert not any(n.startswith("pretrain-") for n in parent), parent  # not pretrained here
        link = stack.api_call(f"/task_runs/{child['parent_task_run_id']}")  # stands for the subflow run
        assert link["flow_run_id"] == out["flow_run_id"] and link["state"]["type"] == "COMPLETED", link
        for step in ("validate", "evaluate", "log", "register"):
            assert any(n.startswith(f"{step}-") and st == "COMPLETED" for n, st in parent.items()), (step, parent)

        # one MLflow run: per-step and per-epoch metrics from the worker, evaluation and registration from here
        client = stack.mlflow()
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["pretrain.flow_run_id"] == child["id"] and run.data.tags["pretrain.host"]
        assert run.data.tags["pretrain.deployment"] == "pretrain/cpu" and run.data.tags["device"] == "cpu"
        knn = client.get_metric_history(run.info.run_id, "epoch/knn_top1")
        assert sorted(m.step for m in knn) == [0, 1, 2], knn
        assert client.get_metric_history(run.info.run_id, "train/loss"), "no per-step metrics from the worker"
        assert {"eval/knn_top1", "pretrain/knn_top1"} <= set(run.data.metrics)
        assert summary["decision"] == "promoted" and summary["model_version"] == "1", summary
        [mv] = client.search_model_versions("name='ssl-encoder'")
        assert mv.tags["run_id"] == run.info.run_id
    except AssertionError as e:
        raise AssertionError(f"{e}{stack.logs(stack.ok.log)}") from None


def test_a_failed_remote_pretraining_fails_the_train_flow(stack):
    out = stack.bad.result(0)
    try:
        assert out["state"] == "FAILED", out
        err = out["error"]
        assert "RemotePretrainFailed" in err and "'pretrain/broken'" in err and "ended FAILED" in err, err
        assert "unknown setting pretrain.methd" in err, err  # the worker's own error, passed on
        [child] = stack.children(out["flow_run_id"])
        assert child["state"]["type"] == "FAILED" and child["name"] in err and child["id"] in err, (child, err)
        client = stack.mlflow()
        [run] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   "attributes.run_name = 'broken'")
        assert run.info.status == "FAILED" and "pretrain/broken" in run.data.tags["error"]
        assert not (stack.root / "runs" / "broken" / "encoder.pt").exists()
    except AssertionError as e:
        raise AssertionError(f"{e}{stack.logs(stack.bad.log)}") from None


def test_missing_deployment_is_a_clear_error(stack):
    out = stack.bad.result(1)
    assert out["state"] == "FAILED", out
    assert "'pretrain/nowhere' does not exist" in out["error"] and "sslflow deploy --gpu" in out["error"], out
    assert stack.children(out["flow_run_id"]) == []


# ------------------------------------------------------------------------------------ contract pieces, no server
def test_pretrain_deployment_setting_names_a_deployment():
    from sslflow.core.settings import load_settings
    from sslflow.ssl_models.errors import ConfigError

    assert load_settings([]).pipeline.pretrain_deployment == ""  # default: pretrain in-process
    pp = load_settings([], ["pipeline.pretrain_deployment=pretrain/gpu"]).pipeline
    assert pp.pretrain_deployment == "pretrain/gpu"
    with pytest.raises(ConfigError, match="flow/deployment"):
        load_settings([], ["pipeline.pretrain_deployment=gpu"])


def test_a_missing_store_is_pulled_with_dvc_at_the_version_asked_for(tmp_path, monkeypatch, demo_stores):
    import shutil

    from dvc.repo import Repo

    from sslflow.core.errors import UserError
    from sslflow.tasks.data.availability import ensure_store
    from sslflow.tasks.data.versioning import IGNORED, dir_hash, store_data_version

    root = tmp_path / "checkout"
    store = root / "data" / "store"
    for split in ("train", "test"):
        shutil.copytree(demo_stores[split], store / split)
    monkeypatch.chdir(root)
    repo = Repo.init(str(root), no_scm=True)
    with repo.config.edit() as conf:
        conf["remote"]["shared"] = {"url": str(tmp_path / "remote")}
        conf["core"]["remote"] = "shared"
    (root / ".dvcignore").write_text(IGNORED + "\n")  # what ingest writes: DVC hashes the store as dir_hash
    repo.add(str(store))
    repo.push()
    repo.close()
    version = store_data_version(store)
    assert version and version == dir_hash(store)

    assert ensure_store(store, ["train", "test"], version) == store  # present: used as it is
    with pytest.raises(UserError, match=r"records data version .* asked for 0+\.dir"):
        ensure_store(store, ["train"], "0" * 32 + ".dir")

    shutil.rmtree(store)  # the GPU host: checkout at the same path, store not pulled, empty cache
    shutil.rmtree(root / ".dvc" / "cache")
    ensure_store(store, ["train", "test"], version)
    assert dir_hash(store) == version

    with pytest.raises(UserError, match=f"{tmp_path / 'elsewhere' / 'train'} is not on .* no .*elsewhere.dvc"):
        ensure_store(tmp_path / "elsewhere", ["train"], None)


def test_a_run_directory_that_is_not_shared_is_a_clear_error(tmp_path):
    from types import SimpleNamespace

    from sslflow.core.errors import RemotePretrainFailed
    from sslflow.flows.remote import read_remote_run

    fr = SimpleNamespace(name="calm-otter", id="1234", infrastructure_pid="gpu-7:4242")
    with pytest.raises(RemotePretrainFailed, match=r"'calm-otter' \(1234\) of 'pretrain/gpu' completed on gpu-7:4242 "
                                                   r"but .*runs/x/metrics.json is not visible here"):
        read_remote_run(tmp_path / "runs" / "x", fr, "pretrain/gpu")


def test_the_remote_side_logs_only_into_a_running_mlflow_run(stack):
    """The train flow owns the run: a finished or unknown run is refused, never reopened."""
    from sslflow.core.errors import UserError
    from sslflow.tasks.tracking.run import attach_mlflow_run

    client = stack.mlflow()  # the module's database: already migrated
    run = client.create_run(client.create_experiment("attach"))
    cb = attach_mlflow_run(stack.mlflow_uri, run.info.run_id, 10, 5.0, {"pretrain.host": "gpu-7"})
    cb.on_epoch_end(1, {"epoch": 1, "knn_top1": 50.0})
    got = client.get_run(run.info.run_id)
    assert got.data.metrics["epoch/knn_top1"] == 50.0 and got.data.tags["pretrain.host"] == "gpu-7"
    assert got.info.status == "RUNNING"  # attaching did not end it
    client.set_terminated(run.info.run_id)
    with pytest.raises(UserError, match="is FINISHED"):
        attach_mlflow_run(stack.mlflow_uri, run.info.run_id, 10, 5.0, {})
    with pytest.raises(UserError, match="not found"):
        attach_mlflow_run(stack.mlflow_uri, "0" * 32, 10, 5.0, {})
