"""The pipeline against the native service stack (`infra/local-stack.sh`, via tests/services.py):
PostgreSQL, SeaweedFS's S3 gateway, `mlflow server` (PostgreSQL backend, artifacts proxied to
S3, basic auth), `prefect server` on PostgreSQL. Nothing is mocked.

One project (a git + DVC repo with an S3 remote on the stack) is shared by the module:
`retrain` end to end, the store restored from S3 in a fresh clone, the champion loaded back
through the server, then S3 stopped during a run: one clear error line, nothing committed
lost, and a rerun after restarting S3 succeeds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

from helpers import FAST, TINY_DEMO, saturated_cpu
from services import Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent
DATA = [a for a in TINY_DEMO if a != "versioning.dvc=off"]  # the stack versions with DVC
SET = [*FAST, *DATA, "eval.knn_k=5", "tracking.embedding_map=false", "tracking.augment_grid_images=0",
       "pipeline.retries=1", "pipeline.retry_delay_s=0.1", "pipeline.min_new_images=1"]
MODEL = "ssl-encoder"
GIT_ID = {"GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.invalid", "GIT_COMMITTER_NAME": "ci",
          "GIT_COMMITTER_EMAIL": "ci@example.invalid"}


@dataclass
class Project:
    """A checkout of a data project: git + DVC, the store pushed to the stack's S3 remote."""

    root: Path
    stack: Stack
    env: dict[str, str]  # sslflow/DVC subprocesses: the stack's client settings
    results: dict[str, Any] = field(default_factory=dict)

    def run(self, *cmd: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(list(cmd), cwd=cwd or self.root, env=env or self.env, capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-4000:]}",
                        pytrace=False)
        return out

    def retrain(self, run_name: str, *extra: str) -> list[str]:
        return [str(BIN / "sslflow"), "retrain", "--force", "--run-name", run_name,
                *[a for s in [*SET, *extra] for a in ("--set", s)]]


def _dvc_remote_config(root: Path, stack: Stack) -> None:
    """The documented way: `infra/local-stack.sh dvc-remote DIR` writes the S3 remote as a team
    commits it (.dvc/config) and the keys of the dvc-only S3 identity that stay local
    (.dvc/config.local, git-ignored by DVC, mode 0600)."""
    stack.run("dvc-remote", str(root))


@contextmanager
def mlflow_client(project: Project) -> Iterator[Any]:
    """An MlflowClient of the stack's server, with the basic-auth credentials."""
    from mlflow import MlflowClient

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    with mock.patch.dict(os.environ, {k: project.env[k] for k in keys}):
        yield MlflowClient(tracking_uri=project.env["MLFLOW_TRACKING_URI"])


def _s3_keys(stack: Stack, bucket: str, prefix: str = "") -> list[str]:
    import boto3

    c = stack.config
    s3 = boto3.client("s3", endpoint_url=f"http://{c['STACK_HOST']}:{c['S3_PORT']}", region_name=c["S3_REGION"],
                      aws_access_key_id=c["S3_ACCESS_KEY"], aws_secret_access_key=c["S3_SECRET_KEY"])
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _sql(stack: Stack, database: str, query: str) -> list[tuple]:
    conn = stack.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall()
    finally:
        conn.close()


def _drop_images(folder: Path, n: int, seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"new_{seed}_{i}.png")


def _dvc_md5(root: Path) -> str:
    import yaml

    return yaml.safe_load((root / "data" / "store.dvc").read_text())["outs"][0]["md5"]


@pytest.fixture(scope="module")
def project(native_stack: Stack, tmp_path_factory) -> Project:
    """git init + dvc init + the S3 remote; the demo train/test splits ingested (dvc add, dvc
    push to S3) and committed."""
    from sslflow.core.settings import load_settings
    from sslflow.tasks.data.ingest import ingest

    root = tmp_path_factory.mktemp("stack-project")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_"))}
    env.update(native_stack.client_env())
    env.update(GIT_ID, PREFECT_HOME=str(root.parent / "prefect-client"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", GX_ANALYTICS_ENABLED="false",
               # an outage must surface within seconds here, not after MLflow's default 7 retries
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
               SSLFLOW_PROJECT=str(root))
    proj = Project(root, native_stack, env)
    proj.run("git", "init", "-q", "-b", "main")
    proj.run(str(BIN / "dvc"), "init", "-q")
    _dvc_remote_config(root, native_stack)
    data_params = load_settings([], DATA, project=root)
    for split in ("train", "test"):
        summary = ingest("demo", root / "data" / "store", split, settings=data_params, reports_dir=root / "reports")
        assert summary.versioning.get("pushed") is True, summary.versioning
        assert summary.versioning.get("remote") == "storage", summary.versioning
    proj.run("git", "add", "-A")
    proj.run("git", "commit", "-q", "-m", "data: demo store")
    return proj


@pytest.fixture(scope="module")
def first_retrain(project: Project) -> Project:
    """`sslflow retrain --force` with 12 new images in data/incoming: ingest (dvc add + push to
    S3), validate, pretrain, evaluate, log to the MLflow server, register, promote."""
    _drop_images(project.root / "data" / "incoming", 12, seed=1)
    t0 = time.time()
    out = project.run(*project.retrain("first"))
    project.results["first_retrain_s"] = time.time() - t0
    assert "retrain: trained" in out.stdout, out.stdout
    assert f"registry: {MODEL} version 1: promoted" in out.stdout, out.stdout
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "data: incoming")
    return project


def test_retrain_end_to_end_on_postgres_s3_and_the_servers(first_retrain: Project):
    proj, st = first_retrain, first_retrain.stack
    with mlflow_client(proj) as client:
        champ = client.get_model_version_by_alias(MODEL, "champion")
        assert champ.version == "1" and champ.tags["data.train_images"] == "52", champ.tags
        run = client.get_run(champ.run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == "first"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri  # proxied
        assert {"eval/knn_top1", "eval/linear_top1"} <= set(run.data.metrics)
    # MLflow's backend is the stack's PostgreSQL ...
    assert _sql(st, "mlflow", f"SELECT name, version FROM model_versions WHERE name = '{MODEL}'") == [(MODEL, 1)]
    assert ("first", "FINISHED") in _sql(st, "mlflow", "SELECT name, status FROM runs")
    # ... its artifacts (metrics files, plots, the logged model) are objects in the S3 bucket ...
    keys = _s3_keys(st, st.config["MLFLOW_BUCKET"], "artifacts/")
    assert any(k.endswith(f"{champ.run_id}/artifacts/run/metrics.json") for k in keys), keys[:20]
    assert any(k.endswith("MLmodel") for k in keys), keys[:20]
    # ... the flows ran on the stack's Prefect server, whose database is PostgreSQL ...
    flows = _sql(st, "prefect", "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id")
    assert ("retrain", "COMPLETED") in flows and ("train", "COMPLETED") in flows, flows
    # ... and DVC pushed every version of the store to the S3 remote
    md5 = _dvc_md5(proj.root).removesuffix(".dir")
    assert f"sslflow/files/md5/{md5[:2]}/{md5[2:]}.dir" in _s3_keys(st, st.config["DVC_BUCKET"], "sslflow/")


def test_store_restores_from_s3_in_a_fresh_clone(first_retrain: Project, tmp_path):
    from sslflow.tasks.data.versioning import dir_hash

    proj = first_retrain
    clone = tmp_path / "clone"
    proj.run("git", "clone", "-q", str(proj.root), str(clone))
    assert not (clone / "data" / "store").exists()
    _dvc_remote_config(clone, proj.stack)  # the clone has .dvc/config from git; credentials are local
    proj.run(str(BIN / "dvc"), "pull", "-q", cwd=clone)
    assert dir_hash(clone / "data" / "store") == _dvc_md5(proj.root) == _dvc_md5(clone)
    assert dir_hash(clone / "data" / "store") == dir_hash(proj.root / "data" / "store")


LOAD_CHAMPION = """
import json, sys, mlflow, numpy as np, torch
model = mlflow.pytorch.load_model("models:/ssl-encoder@champion")
x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype("float32"))
with torch.no_grad():
    y = model(x)
print(json.dumps({"shape": list(y.shape), "finite": bool(torch.isfinite(y).all())}))
"""


def _load_champion(proj: Project) -> dict[str, Any]:
    """Load `models:/ssl-encoder@champion` in a fresh process that has the server's URL and
    credentials but no S3 settings at all: the artifacts come through the server's proxy."""
    env = {k: v for k, v in proj.env.items() if not k.startswith("AWS_")}
    out = proj.run(sys.executable, "-c", LOAD_CHAMPION, env=env, timeout=180)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _champion_digest(proj: Project, dst: Path) -> dict[str, str]:
    """sha256 of every file of the champion's model, downloaded through the server's proxy."""
    import hashlib

    import mlflow

    with mlflow_client(proj):
        uri = proj.env["MLFLOW_TRACKING_URI"]  # explicit: another test may have set a global URI
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL}@champion", dst_path=str(dst),
                                                         tracking_uri=uri, registry_uri=uri))
    return {p.relative_to(local).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(local.rglob("*")) if p.is_file()}


def test_champion_loads_from_the_registry_through_the_server(first_retrain: Project, tmp_path):
    got = _load_champion(first_retrain)
    assert got["shape"][0] == 3 and len(got["shape"]) == 2 and got["shape"][1] > 0 and got["finite"], got
    digest = _champion_digest(first_retrain, tmp_path)
    assert "MLmodel" in digest and len(digest) > 2, digest
    first_retrain.results["champion_digest"] = digest


def _wait_for_run(proj: Project, name: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until the MLflow run `name` exists (the flow is past its preflight and validation)."""
    deadline = time.time() + timeout
    with mlflow_client(proj) as client:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"retrain ended before its MLflow run started: {proc.communicate()}", pytrace=False)
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      filter_string=f"attributes.run_name = '{name}'")
            if runs:
                return
            time.sleep(0.3)
    pytest.fail(f"MLflow run {name!r} did not start within {timeout} s", pytrace=False)


def _check_outage(proj: Project, returncode: int, stdout: str, stderr: str, store_before: str,
                  md5_before: str) -> None:
    """The run failed with one clear line, and nothing committed before it was lost."""
    from sslflow.tasks.data.versioning import dir_hash

    st = proj.stack
    s3_url = f"http://{st.config['STACK_HOST']}:{st.config['S3_PORT']}"
    last = stderr.strip().splitlines()[-1]
    assert returncode == 3, stdout[-2000:] + stderr[-4000:]  # a service is down: exit 3
    assert last.startswith("sslflow retrain: error: logging "), last
    assert "Traceback" not in stderr, stderr[-4000:]  # one line per failure, not pages of tracebacks
    assert proj.env["MLFLOW_TRACKING_URI"] in last and "artifact store" in last and s3_url in last, last

    # nothing already committed is lost: registry, aliases, the failed run recorded, the store
    with mlflow_client(proj) as client:
        assert [v.version for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
        assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
        [failed] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      filter_string="attributes.run_name = 'outage'")
        assert failed.info.status == "FAILED" and "artifact store" in failed.data.tags.get("error", "")
    assert dir_hash(proj.root / "data" / "store") == store_before and _dvc_md5(proj.root) == md5_before


def test_s3_outage_during_a_run_fails_clearly_loses_nothing_and_a_rerun_succeeds(first_retrain: Project, tmp_path):
    from sslflow.tasks.data.versioning import dir_hash

    proj, st = first_retrain, first_retrain.stack
    store_before, md5_before = dir_hash(proj.root / "data" / "store"), _dvc_md5(proj.root)
    artifacts_before = set(_s3_keys(st, st.config["MLFLOW_BUCKET"]))
    # more epochs than the first run: the run is still pretraining when S3 goes away
    proc = subprocess.Popen(proj.retrain("outage", "pretrain.epochs=8"), cwd=proj.root, env=proj.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_run(proj, "outage", proc)
        st.run("stop", "S3")
        assert st.run("status", "s3", check=False).returncode == 3
        stdout, stderr = proc.communicate(timeout=300)
        _check_outage(proj, proc.returncode, stdout, stderr, store_before, md5_before)
    finally:
        if proc.poll() is None:
            proc.kill()
        st.run("start", "S3")  # also when a check failed: the tests after this one need S3

    assert artifacts_before <= set(_s3_keys(st, st.config["MLFLOW_BUCKET"]))  # S3 kept every object
    assert proj.run(str(BIN / "dvc"), "status", "--cloud", "--json").stdout.strip() in ("{}", "")
    if "champion_digest" in proj.results:  # the same champion files, bit for bit, through the proxy
        assert _champion_digest(proj, tmp_path) == proj.results["champion_digest"]

    out = proj.run(*proj.retrain("after-outage"))
    assert "retrain: trained" in out.stdout and f"registry: {MODEL} version 2:" in out.stdout, out.stdout
    with mlflow_client(proj) as client:
        v2 = client.get_model_version(MODEL, "2")
        assert client.get_run(v2.run_id).info.status == "FINISHED"
    assert any(v2.run_id in k for k in _s3_keys(st, st.config["MLFLOW_BUCKET"], "artifacts/"))
    shutil.rmtree(proj.root / "runs", ignore_errors=True)


def test_two_tune_workers_share_one_optuna_study_on_the_stack(first_retrain: Project, tmp_path):
    """Two `sslflow tune --no-train` processes, one study in the stack's `optuna` PostgreSQL
    database, trials logged to the MLflow server: every trial ran exactly once and finished,
    both workers took part, one MLflow parent run holds all trial runs."""
    import optuna
    from optuna.trial import TrialState

    proj, st = first_retrain, first_retrain.stack
    # the documented way: the storage URL (the optuna role, no password) from SSLFLOW_TUNE_STORAGE,
    # its password from PGPASSWORD: nothing secret on the command line
    assert proj.env["PGPASSWORD"] not in proj.env["SSLFLOW_TUNE_STORAGE"]
    storage = proj.env["SSLFLOW_TUNE_STORAGE"].replace("optuna@", f"optuna:{proj.env['PGPASSWORD']}@")
    workers = []
    # under load (a busy loop on one of the 2 cores) one worker starts seconds after the other:
    # the race for the study, its MLflow parent run and the trial numbers must still come out right
    with saturated_cpu(1):
        for i in range(2):
            work = tmp_path / f"worker{i}"
            work.mkdir()
            cmd = [str(BIN / "sslflow"), "tune", "--no-train", "--no-progress", "--trials", "4", "--study", "stack",
                   "--store", str(proj.root / "data" / "store"), "--output", str(work / "best.yaml")]
            for o in [*FAST, "eval.knn_k=5", "tune.budget_epochs=1", "tune.pruner=none", "tune.startup_trials=2"]:
                cmd += ["--set", o]
            workers.append(subprocess.Popen(cmd, cwd=work, env={**proj.env, "SSLFLOW_PROJECT": str(work)},
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        try:
            outs = [w.communicate(timeout=400)[0] for w in workers]
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-3000:] for o in outs)

    study = optuna.load_study(study_name="stack", storage=storage)
    trials = study.trials
    assert [t.number for t in trials] == list(range(len(trials)))  # no gaps, no duplicates
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    assert 4 <= len(trials) <= 5  # each worker stops at the target; one may finish the trial it had started
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    [(n,)] = _sql(st, st.config["OPTUNA_DB"], "SELECT count(*) FROM trials t JOIN studies s ON s.study_id = "
                                             "t.study_id WHERE s.study_name = 'stack'")
    assert n == len(trials)  # the study lives in the stack's PostgreSQL
    with mlflow_client(proj) as client:
        exp = client.get_experiment_by_name("sslflow")
        runs = client.search_runs([exp.experiment_id], "tags.`sslflow.kind` = 'tune-trial'")
        assert len(runs) == len(trials)
        assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {study.user_attrs["mlflow_parent_run_id"]}
