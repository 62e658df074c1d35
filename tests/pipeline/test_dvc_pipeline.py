"""`dvc.yaml` end to end with real DVC, in a fresh clone of the working tree.

The clone (every tracked and untracked-not-ignored file, `.dvc/config` included, then `git init`,
as a user's `git clone` + `make`) gets a tiny `params.yaml` (width 8, 2 epochs, 10 + 5 demo images per class
at 16 px, CPU), so the whole module takes about 1.5 minutes on 2 cores. The venv is not
activated and not on the PATH, and SSLFLOW_PYTHON is unset: the stages find the interpreter
through `bin/sslflow` alone (the clone's `.venv`, a link to the test's own venv, as `make`
would create it). Checks: the images `sslflow ingest` put into the live store `data/store`
before `dvc repro` are still there afterwards and restorable from the DVC cache; `dvc repro`
runs every stage and a second one nothing; metrics and plots render; deleting the pretraining
outputs and reproducing them gives byte-identical metrics and curves; a changed pretraining
setting reruns only pretrain and evaluate; `dvc exp run -S pretrain.simclr.temperature=0.2`
works and `dvc exp show` lists it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
STAGES = ("ingest", "validate", "pretrain", "evaluate")
RESULTS = ("metrics/pretrain.json", "metrics/evaluation.json", "plots/loss.csv", "plots/knn.csv")
TINY = {
    "seed": 0,
    "device": "cpu",
    "augment": {"local_crops": 2, "local_size": 8},
    "backbone": {"resnet": {"width": 8}},
    "pretrain": {"epochs": 2, "batch_size": 32, "warmup_epochs": 0, "log_every": 1, "eval_every": 1,
                 "simclr": {"temperature": 0.5, "proj_hidden_dim": 64, "proj_dim": 32}},
    "eval": {"knn_k": 5, "linear_epochs": 2, "batch_size": 64},
    "ingest": {"size": 16, "demo_train_per_class": 10, "demo_test_per_class": 5},
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("git") is None, reason="needs git"),
    pytest.mark.skipif(not (Path(sys.executable).parent / "dvc").exists() and shutil.which("dvc") is None,
                       reason="needs dvc"),
]


def deep_update(base: dict, overlay: dict) -> dict:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


class Repo:
    def __init__(self, root: Path) -> None:
        self.root = root
        venv_bin = str(Path(sys.executable).parent)
        path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
        # no venv on the PATH, none activated: the stages find the interpreter through bin/sslflow alone
        self.env = {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1",
                    "GX_ANALYTICS_ENABLED": "false", "PYTHONDONTWRITEBYTECODE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
        for var in ("PYTHONPATH", "SSLFLOW_PROJECT", "VIRTUAL_ENV", "SSLFLOW_PYTHON"):
            self.env.pop(var, None)
        if sys.prefix != sys.base_prefix:  # the clone's .venv, as `make` creates it: this venv
            (root / ".venv").symlink_to(sys.prefix, target_is_directory=True)
        else:  # no venv to link: name the interpreter
            self.env["SSLFLOW_PYTHON"] = sys.executable
        self.dvc_bin = str(Path(venv_bin) / "dvc") if (Path(venv_bin) / "dvc").exists() else shutil.which("dvc")

    def run(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=900)
        out = proc.stdout + proc.stderr
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}")
        return out

    def dvc(self, *args: str) -> str:
        return self.run(self.dvc_bin, *args)

    def git(self, *args: str) -> str:
        return self.run("git", *args)


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def fresh_clone(root: Path) -> None:
    """The working tree as `git clone` would give it (tracked + untracked-not-ignored files),
    without committing anything here."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file() and "__pycache__" not in src.parts:  # a tracked file deleted in the tree: skipped
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)


def store_files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and not p.name.startswith(".sslflow-")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Repo:
    """A committed experiment: the clone after one `sslflow ingest` into the live store and one
    full `dvc repro`, lock file, metrics and the store's .dvc file in git."""
    root = tmp_path_factory.mktemp("dvc-pipeline")
    fresh_clone(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(deep_update(params, TINY), sort_keys=False))
    r = Repo(root)
    r.git("init", "-q")
    (root / ".git" / "info" / "exclude").write_text(".venv\n")  # the link: not a directory for .gitignore
    r.git("config", "user.email", "test@example.com")
    r.git("config", "user.name", "test")
    if not (root / ".dvc").is_dir():  # the repository tracks .dvc/config: a clone is a DVC repo
        r.dvc("init", "-q")
    r.git("add", "-A")
    r.git("commit", "-qm", "code and pipeline")
    # what `sslflow ingest` / `retrain` grow: the live store, versioned by the ingest itself
    r.run("bin/sslflow", "ingest", "--project", ".", "--source", "demo", "--store", "data/store", "--split", "train",
          "--no-push", "--reports", "reports/live")
    r.live_store = store_files(root / "data" / "store")
    r.first_repro = r.dvc("repro")
    r.git("add", "-A")
    r.git("commit", "-qm", "experiment: dvc.lock, metrics, plots, data/store.dvc")
    return r


def test_dvc_repro_keeps_the_ingested_images(repo: Repo) -> None:
    """The README's loop: images ingested into data/store survive `dvc repro` (run without an
    activated venv) and are in the DVC cache, so they can always be restored."""
    store = repo.root / "data" / "store"
    assert len(repo.live_store) > 3 and store_files(store) == repo.live_store
    assert (repo.root / "data" / "store.dvc").is_file()
    shutil.rmtree(store)
    repo.dvc("checkout", "data/store.dvc")
    assert store_files(store) == repo.live_store


def test_repro_runs_every_stage_then_is_a_noop(repo: Repo) -> None:
    assert stages_run(repo.first_repro) == set(STAGES)
    second = repo.dvc("repro")
    assert stages_run(second) == set(), second
    assert "up to date" in repo.dvc("status")
    lock = yaml.safe_load((repo.root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    # what the stages record: the keys each one reads
    pretrain = lock["stages"]["pretrain"]["params"]["params.yaml"]
    assert pretrain["pretrain"]["simclr"]["temperature"] == 0.5 and pretrain["eval.knn_k"] == 5
    assert "eval.linear_epochs" not in pretrain  # the linear probe is evaluate's
    assert store_files(repo.root / "data" / "store") == repo.live_store  # the live store: untouched


def test_metrics_and_plots(repo: Repo, tmp_path: Path) -> None:
    shown = json.loads(repo.dvc("metrics", "show", "--json"))
    data = next(iter(shown.values()))["data"]
    pretrain = data["metrics/pretrain.json"]["data"]
    evaluation = data["metrics/evaluation.json"]["data"]
    assert {"final_loss", "knn_top1", "knn_top5", "knn_top1_at_init", "steps"} <= set(pretrain)
    assert not {"train_seconds", "images_per_s"} & set(pretrain)  # wall clock is no metric
    assert {"knn_top1", "linear_top1"} <= set(evaluation)
    assert json.loads(repo.dvc("metrics", "diff", "--json")) == {}
    loss = (repo.root / "plots/loss.csv").read_text().splitlines()
    knn = (repo.root / "plots/knn.csv").read_text().splitlines()
    assert loss[0] == "epoch,loss,lr" and [row.split(",")[0] for row in loss[1:]] == ["1", "2"]
    assert knn[0] == "epoch,knn_top1,knn_top5" and [row.split(",")[0] for row in knn[1:]] == ["0", "1", "2"]
    repo.dvc("plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "plots_loss_csv" in html and "plots_knn_csv" in html  # one rendered plot per file
    repo.dvc("plots", "diff", "HEAD", "-o", str(tmp_path / "plots-diff"))


def test_reproduced_metrics_equal_the_recorded_ones(repo: Repo) -> None:
    for name in ("runs/dvc", "metrics", "plots"):
        shutil.rmtree(repo.root / name)
    # A plain `dvc repro` would restore the deleted outputs from the DVC cache (the lock file
    # still names them): --force recomputes, --single-item keeps ingest and validate as they are.
    out = repo.dvc("repro", "--force", "--single-item", "pretrain", "evaluate")
    assert stages_run(out) == {"pretrain", "evaluate"}, out
    for name in RESULTS:
        recorded = repo.git("show", f"HEAD:{name}")
        assert (repo.root / name).read_text() == recorded, name
    assert repo.git("status", "--porcelain", "--", "metrics", "plots") == ""


def test_changed_pretrain_param_reruns_pretrain_and_evaluate(repo: Repo) -> None:
    repo.git("checkout", "-q", "--", "dvc.lock")
    repo.dvc("checkout", "-q")
    path = repo.root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["pretrain"]["simclr"]["temperature"] = 0.3
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(repo.dvc("status", "--json"))
    assert set(status) == {"pretrain"}, status  # evaluate follows from pretrain's new outputs
    repo.git("checkout", "-q", "--", "params.yaml")

    # `-S` without a file edits params.yaml, which holds pretrain.simclr.temperature
    out = repo.dvc("exp", "run", "-S", "pretrain.simclr.temperature=0.2")
    assert stages_run(out) == {"pretrain", "evaluate"}, out
    assert "Stage 'ingest' didn't change" in out and "Stage 'validate' didn't change" in out
    assert yaml.safe_load(path.read_text())["pretrain"]["simclr"]["temperature"] == 0.2
    shown = json.loads(repo.dvc("exp", "show", "--json"))
    temperatures = []
    for rev in shown:
        for exp in rev.get("experiments") or []:
            for run in exp.get("revs") or []:
                params_data = run["data"]["params"]["params.yaml"]["data"]
                temperatures.append(params_data["pretrain"]["simclr"]["temperature"])
                assert "knn_top1" in run["data"]["metrics"]["metrics/evaluation.json"]["data"]
    assert 0.2 in temperatures, shown
