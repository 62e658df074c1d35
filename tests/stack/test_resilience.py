"""Operations of the native stack (`infra/local-stack.sh`), each with a real kill or stop:

- supervision: `kill -9` of the worker, MLflow, the Prefect server and PostgreSQL's postmaster;
  each supervisor starts its service again and the stack is healthy again;
- health checks: with PostgreSQL stopped, MLflow's `/health` still says 200, but `status`
  (an authenticated MLflow call, Prefect's `/api/ready`) reports both unhealthy, exit 3;
- flow runs: `kill -9` of the worker takes its running flow run with it (no orphan keeps
  training); retrying the named run resumes from its checkpoint; other settings are refused in
  one line;
- outages: the MLflow server stopped during pretraining ends `sslflow retrain` after the retry
  budget with one error line and exit 3 (a service is unavailable, not bad input), no traceback.

The flows run through the stack's worker (its unprivileged account) from deployments made with
`sslflow deploy` in a project directory that is not a checkout.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import FAST, TINY_DEMO
from services import Stack, is_root

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent
DATA = TINY_DEMO
FLOW_SET = [*FAST, *DATA, "eval.knn_k=5", "eval.protocols=[knn]", "promotion.metric=knn_top1",
            "tracking.embedding_map=false", "tracking.augment_grid_images=0", "pipeline.retries=0",
            "pretrain.eval_every=0", "pretrain.export=false",
            # its own experiment and model: the other stack modules count theirs
            "tracking.experiment=resilience", "tracking.model_name=resilience-encoder"]
TIMES: dict[str, float] = {}


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    t0 = time.time()
    while True:
        got = check()
        if got:
            TIMES[what] = round(time.time() - t0, 1)
            print(f"  {what}: {TIMES[what]} s", flush=True)
            return got
        if time.time() - t0 > timeout:
            pytest.fail(f"{what}: not within {timeout:g} s", pytrace=False)
        time.sleep(every)


def _client_env(st: Stack, home: Path, prefect: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_", "SSLFLOW_"))}
    env.update(st.client_env(), PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", GX_ANALYTICS_ENABLED="false")
    if not prefect:  # a temporary local Prefect server: only MLflow (and its PostgreSQL) are the stack's
        env.pop("PREFECT_API_URL")
        env.pop("PREFECT_API_AUTH_STRING")
    return env


@pytest.fixture(scope="module", autouse=True)
def _timings() -> Iterator[None]:
    """The measured recovery times, printed at the end of the module (pytest -s shows them)."""
    yield
    print("\nstack recovery times (s):", json.dumps(TIMES))


def _healthy(st: Stack, *services: str) -> bool:
    return st.run("status", *services, check=False).returncode == 0


def _prefect(st: Stack, method: str, path: str, body: dict | None = None) -> Any:
    """The stack's Prefect REST API with the client's auth string (None for 404)."""
    import base64
    import urllib.error
    import urllib.request

    auth = base64.b64encode(st.client_env()["PREFECT_API_AUTH_STRING"].encode()).decode()
    req = urllib.request.Request(f"http://{st.config['STACK_HOST']}:{st.config['PREFECT_PORT']}/api{path}",
                                 data=None if body is None else json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise
    return json.loads(text) if text else None


def _owned_by_worker(st: Stack, root: Path) -> None:
    if is_root():
        account = pwd.getpwnam(st.config["WORKER_OS_USER"])
        for p in [root, *root.rglob("*")]:
            os.chown(p, account.pw_uid, account.pw_gid)


@pytest.fixture(scope="module")
def worker_project(native_stack: Stack) -> Iterator[Path]:
    """A project directory the stack's worker account owns (not a checkout), with the demo store."""
    from sslflow.core.settings import load_settings
    from sslflow.tasks.data.ingest import ingest

    project = Path(tempfile.mkdtemp(prefix="sslflow-worker-project-"))
    project.chmod(0o755)
    settings = load_settings([], DATA, project=project)
    for split in ("train", "test"):
        ingest("demo", project / "data" / "store", split, settings=settings, reports_dir=project / "reports")
    _owned_by_worker(native_stack, project)
    try:
        yield project
    finally:
        shutil.rmtree(project, ignore_errors=True)


# ------------------------------------------------------------------------------------ 7: supervision
HOLD_SLOT = """
import sys, time
from sslflow.tasks.pipeline.slot import retrain_slot
with retrain_slot(sys.argv[1], timeout_s=60, lease_s=60):
    print("HELD", flush=True)
    time.sleep(3600)
"""


def _hold_and_die(st: Stack, slot: str, home: Path) -> float:
    """A retrain that takes its concurrency slot (a 60 s lease) and is killed with `kill -9`
    while holding it; returns when it took the slot."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SLOT, slot], env=_client_env(st, home),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline() if holder.stdout else ""
        assert line.strip() == "HELD", (line, holder.stderr.read() if holder.poll() is not None else "")
        taken = time.time()
    finally:
        holder.kill()
        holder.wait()
    return taken


def test_killed_servers_worker_and_postgres_are_restarted_by_their_supervisors(native_stack: Stack, tmp_path):
    """kill -9 of each service: its supervisor starts it again. The Prefect server keeps the
    retrain slot's leases on disk (PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=...filesystem): the
    slot a retrain held when it died is freed by the restarted server once its lease expires
    (with leases in memory the restart forgot it, and every later retrain was skipped)."""
    import uuid

    st = native_stack
    slot = f"resilience-slot-{uuid.uuid4().hex[:6]}"
    taken = _hold_and_die(st, slot, tmp_path / "prefect-home")
    assert _prefect(st, "GET", f"/v2/concurrency_limits/{slot}")["active_slots"] == 1
    leases = st.state_dir / "prefect" / "home" / "concurrency_leases"
    assert [p for p in leases.glob("*.json") if p.name != "expirations.json"], "no lease on the server's disk"

    before = {s: st.pids(s) for s in ("worker", "mlflow", "prefect")}
    for _, child in before.values():
        os.kill(child, signal.SIGKILL)

    def restarted() -> bool:
        for s, (sup, child) in before.items():
            now = st.pids(s)
            if now[0] != sup or now[1] == child or not Path(f"/proc/{now[1]}").exists():
                return False
        return _healthy(st, "mlflow", "prefect", "worker")

    wait_for("worker, mlflow, prefect back after kill -9", restarted, timeout=240, every=2)
    assert all(st.supervisor_state(s)["starts"] >= 2 for s in before)
    assert all(st.supervisor_state(s)["last_exit"] == -9 for s in before)

    # PostgreSQL: the postmaster killed; its supervisor starts it again (crash recovery), and the
    # servers and the worker, which lost their connections, are healthy again
    _, postmaster = st.pids("postgres")
    os.kill(postmaster, signal.SIGKILL)
    wait_for("postgres back after kill -9", lambda: st.pids("postgres")[1] != postmaster and _healthy(st),
             timeout=240, every=2)
    assert st.supervisor_state("postgres")["last_exit"] == -9

    # the dead holder's slot: freed by the restarted server's repossessor (lease 60 s, checks every 15 s)
    wait_for("slot of a killed retrain freed after the server's restart",
             lambda: _prefect(st, "GET", f"/v2/concurrency_limits/{slot}")["active_slots"] == 0,
             timeout=max(30.0, taken + 60 + 15 + 60 - time.time()), every=3)
    _prefect(st, "DELETE", f"/v2/concurrency_limits/{slot}")


# ------------------------------------------------------------------------------------ 8: health checks, schedules
def _runs_of(st: Stack, deployment_id: str) -> list[dict]:
    return _prefect(st, "POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}},
                                                      "sort": "EXPECTED_START_TIME_ASC", "limit": 50})


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_a_postgres_outage_is_seen_by_status_and_does_not_end_scheduled_retraining(
        native_stack: Stack, worker_project: Path, tmp_path):
    """`retrain/nightly` on a schedule of every minute (the scheduler of the stack's Prefect server
    makes the runs, the stack's worker runs them). PostgreSQL goes down across the time of one
    scheduled run: MLflow's /health still answers 200, `status` reports MLflow and Prefect
    unhealthy (exit 3); once PostgreSQL is back that run is executed late and completes, by a
    worker that is healthy (it used to give up for good: "Service exceeded error threshold")."""
    import urllib.request

    import yaml

    st = native_stack
    c = st.config
    project = Path(tempfile.mkdtemp(prefix="sslflow-scheduled-"))
    try:
        project.chmod(0o755)
        shutil.copytree(worker_project / "data", project / "data")
        # a retrain that decides without training (fewer new images than min_new_images): the
        # schedule, the worker, MLflow's registry and the retrain slot are what is exercised
        (project / "params.yaml").write_text(yaml.safe_dump({
            "ingest": {"size": 16, "min_side": 8}, "validate": {"class_balance_tolerance": 1.0},
            "versioning": {"dvc": "off"}, "pipeline": {"min_new_images": 100000, "retries": 0},
            "tracking": {"experiment": "resilience", "model_name": "resilience-encoder"}}))
        _owned_by_worker(st, project)
        env = _client_env(st, tmp_path / "prefect-home")
        deploy = subprocess.run([str(BIN / "sslflow"), "deploy", "--set", "pipeline.cron=* * * * *"], cwd=project,
                                env=env, capture_output=True, text=True, timeout=240)
        assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-3000:]
        dep = _prefect(st, "GET", "/deployments/name/retrain/nightly")
        try:
            # a run the scheduler made, due at least 30 s from now: PostgreSQL goes down 20 s before it
            # is due (the worker takes runs up to PREFECT_WORKER_PREFETCH_SECONDS = 10 s early)
            def target() -> dict | None:
                runs = [r for r in _runs_of(st, dep["id"]) if r["state"]["type"] == "SCHEDULED"
                        and _epoch(r["expected_start_time"]) >= time.time() + 30]
                return runs[0] if runs else None

            run = wait_for("a scheduled retrain run", target, timeout=90, every=2)
            due = _epoch(run["expected_start_time"])
            time.sleep(max(0.0, due - 20 - time.time()))
            st.run("down", "postgres")
            try:
                with urllib.request.urlopen(f"http://{c['STACK_HOST']}:{c['MLFLOW_PORT']}/health", timeout=10) as r:
                    assert r.status == 200  # what compose and Kubernetes used to ask
                out = st.run("status", "mlflow", "prefect", "postgres", check=False)
                lines = {ln.split()[0]: ln for ln in out.stdout.splitlines()}
                assert out.returncode == 3, out.stdout
                assert lines["postgres"].split()[1] == "stopped"
                assert lines["mlflow"].split()[1] == "unhealthy" and "database" in lines["mlflow"], lines["mlflow"]
                assert lines["prefect"].split()[1] == "unhealthy" and "/api/ready" in lines["prefect"], lines["prefect"]
                time.sleep(max(0.0, due + 8 - time.time()))  # the run is due while the database is down
            finally:
                st.run("up", "postgres")
            wait_for("healthy after postgres is back", lambda: _healthy(st), timeout=180, every=2)

            def finished() -> dict | None:
                now = _prefect(st, "GET", f"/flow_runs/{run['id']}")
                return now if now["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

            done = wait_for("the scheduled run due during the outage completed", finished, timeout=300, every=2)
            assert done["state"]["type"] == "COMPLETED" and done["state"]["name"] == "NothingToDo", done["state"]
            assert _epoch(done["start_time"]) > due  # it ran late, after the outage
        finally:
            _prefect(st, "DELETE", f"/deployments/{dep['id']}")  # and its scheduled runs
    finally:
        shutil.rmtree(project, ignore_errors=True)


# ------------------------------------------------------------------------------------ 9: flow runs and their worker
RUN_DEPLOYMENT = """
import json, sys
from prefect.deployments import run_deployment
params, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
run = run_deployment("train/on-demand", parameters=params, timeout=timeout)
print("RESULT " + json.dumps({"id": str(run.id), "state": run.state.type.value, "message": run.state.message or ""}))
"""

LOGS = """
import json, sys
from uuid import UUID
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
with get_client(sync_client=True) as c:
    logs = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(sys.argv[1])])), limit=200)
print("RESULT " + json.dumps([log.message for log in logs]))
"""


def _python(env: dict[str, str], code: str, *args: str, timeout: float = 600) -> Any:
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-2000:] + out.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def _flow_run_processes(flow_run_id: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_flow_runs_stop_with_their_worker_and_a_retried_run_resumes(native_stack: Stack, worker_project: Path,
                                                                    tmp_path):
    st = native_stack
    env = _client_env(st, tmp_path / "prefect-home")
    deploy = subprocess.run([str(BIN / "sslflow"), "deploy"], cwd=worker_project, env=env, capture_output=True,
                            text=True, timeout=240)
    assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-3000:]
    assert f"project: {worker_project}" in deploy.stdout and "installed where the worker runs" in deploy.stdout

    params = {"project": str(worker_project), "run_name": "resilience-crash",
              "overrides": [*FLOW_SET, "pretrain.epochs=20"], "protocols": ["knn"]}
    first = _python(env, RUN_DEPLOYMENT, json.dumps(params), "0")
    checkpoint = worker_project / "runs" / "resilience-crash" / "checkpoints" / "last.pt"
    wait_for("first checkpoint of the flow run", checkpoint.is_file, timeout=400, every=0.3)
    runs = _flow_run_processes(first["id"])
    assert runs, "the flow run's process was not found"
    if is_root():  # the flow runs as the worker's unprivileged account
        assert all(Path(f"/proc/{p}").owner() == st.config["WORKER_OS_USER"] for p in runs)

    _, worker = st.pids("worker")
    os.kill(worker, signal.SIGKILL)
    wait_for("flow run gone with its worker",
             lambda: not [p for p in runs if Path(f"/proc/{p}").exists() and "Z" not in
                          Path(f"/proc/{p}/stat").read_text().split(")")[-1][:3]], timeout=30, every=0.5)
    assert not (worker_project / "runs" / "resilience-crash" / "metrics.json").exists()  # it did not finish
    wait_for("worker back", lambda: st.pids("worker")[1] != worker and _healthy(st, "worker"), timeout=120, every=2)

    # the retry of the named run continues its checkpoint (it used to fail: "already holds a run")
    t0 = time.time()
    retry = _python(env, RUN_DEPLOYMENT, json.dumps(params), "600")
    TIMES["retried run"] = round(time.time() - t0, 1)
    assert retry["state"] == "COMPLETED", retry
    logs = _python(env, LOGS, retry["id"])
    assert any("resuming" in m and "resilience-crash" in m for m in logs), logs[-20:]
    assert (worker_project / "runs" / "resilience-crash" / "metrics.json").is_file()

    # other settings for that run directory: the engine refuses the checkpoint in one line
    from sslflow.core.settings import load_settings
    from sslflow.flows.train import resumable_run
    from sslflow.ssl_models.errors import RunStateError
    from sslflow.tasks.training.pretrain import pretrain

    assert resumable_run(worker_project / "runs" / "resilience-crash")
    other = load_settings([], [*params["overrides"], "pretrain.lr=0.05"], project=worker_project)
    with pytest.raises(RunStateError, match="cannot resume: settings differ") as refused:
        pretrain(worker_project / "data" / "store" / "train", worker_project / "runs" / "resilience-crash", other,
                 resume=True, progress_bar=False)
    assert "\n" not in str(refused.value)


# ------------------------------------------------------------------------------------ 10: bounded outages
def test_an_mlflow_outage_during_pretraining_ends_the_run_in_one_line_with_exit_3(native_stack: Stack,
                                                                                    worker_project: Path, tmp_path):
    """The MLflow server stops while `sslflow retrain` pretrains: the run ends after the retry
    budget (tracking.retry_budget_s, 15 s here; the default is 120 s) with one error line, no
    traceback, exit 3. (A PostgreSQL outage behind MLflow takes the same path: HTTP 503.)"""
    st = native_stack
    env = {**_client_env(st, tmp_path / "prefect-home"), "SSLFLOW_PROJECT": str(worker_project)}
    budget = 15
    cmd = [str(BIN / "sslflow"), "retrain", "--force", "--run-name", "resilience-outage",
           *[a for s in [*FLOW_SET, "pipeline.min_new_images=0", "pretrain.epochs=400",
                         f"tracking.retry_budget_s={budget}"] for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, cwd=worker_project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        params_file = worker_project / "runs" / "resilience-outage" / "params.json"
        wait_for("pretraining started", lambda: params_file.is_file() or proc.poll() is not None, timeout=400,
                 every=0.3)
        assert proc.poll() is None, proc.communicate()
        time.sleep(2)  # a few epochs logged
        st.run("down", "mlflow")
        stopped = time.time()
        stdout, stderr = proc.communicate(timeout=300)
        TIMES["outage to exit"] = round(time.time() - stopped, 1)
    finally:
        if proc.poll() is None:
            proc.kill()
        st.run("up", "mlflow")
    errors = [ln for ln in stderr.splitlines() if ln.startswith("sslflow retrain: error:")]
    assert proc.returncode == 3, stdout[-2000:] + stderr[-4000:]
    assert len(errors) == 1 and errors[0].startswith("sslflow retrain: error: logging metrics to MLflow run"), errors
    assert env["MLFLOW_TRACKING_URI"] in errors[0] and "unavailable" in errors[0], errors[0]
    assert "Traceback" not in stderr, stderr[-4000:]
    noisy = [ln for ln in stderr.splitlines() if "error" in ln.lower() or "retrying" in ln.lower()]
    assert len(noisy) <= 15, noisy  # a line per failed attempt at most, not hundreds
    assert TIMES["outage to exit"] < budget + 60, TIMES
