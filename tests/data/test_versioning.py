"""DVC versioning: data_version = DVC's hash, push to a local remote, restore with git + dvc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslflow.core.errors import UserError
from sslflow.core.settings import load_settings
from sslflow.ssl_models.store import ImageStore
from sslflow.tasks.data.ingest import ingest
from sslflow.tasks.data.versioning import dir_hash

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="DVC tests need git")


def sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"
    return done.stdout


def dvc(cwd: Path, *args: str) -> str:
    return sh(cwd, sys.executable, "-m", "dvc", *args)


def write_images(folder: Path, names: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / name)


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    sh(root, "git", "init", "-q")
    dvc(root, "init", "-q")
    (root / ".gitignore").write_text("/reports/\n/incoming/\n")
    return root


def params(tmp_path: Path, *overrides: str):
    return load_settings([], ["ingest.size=16", "ingest.min_side=8", "ingest.demo_train_per_class=3",
                                  f"versioning.remote_dir={tmp_path / 'remote'}", *overrides])


def run(repo: Path, source: str, p) -> object:
    return ingest(source, repo / "data" / "store", "train", settings=p, reports_dir=repo / "reports",
                  log=lambda m: None)


def test_versions_are_dvc_hashes_pushed_and_restorable(repo, tmp_path):
    p = params(tmp_path, "validate.class_balance_tolerance=10")
    v1 = run(repo, "demo", p)
    dvc_file = repo / "data" / "store.dvc"
    assert v1.versioning["hashed_by"] == "dvc" and v1.versioning["pushed"] and v1.versioning["error"] is None
    assert v1.data_version == dir_hash(repo / "data" / "store")  # our fallback = DVC's hash
    assert v1.data_version in dvc_file.read_text()
    assert "sslflow-local" in (repo / ".dvc" / "config.local").read_text()
    assert any((tmp_path / "remote").rglob("*.dir"))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "data v1")

    write_images(repo / "incoming", [f"{c}/{i}.png" for c in ("disc", "ring") for i in range(3)], seed=1)
    v2 = run(repo, str(repo / "incoming"), p)
    assert v2.accepted == 6 and v2.data_version != v1.data_version
    assert v2.previous_data_version == v1.data_version and v2.versioning["pushed"]
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "data v2")
    again = run(repo, "demo", p)
    assert again.status == "unchanged" and again.data_version == v2.data_version

    # restore v1 from the cache, then (cache gone) from the remote
    sh(repo, "git", "checkout", "HEAD~1", "--", "data/store.dvc")
    dvc(repo, "checkout", "data/store.dvc")
    assert len(ImageStore.open(repo / "data" / "store" / "train")) == 30
    assert dir_hash(repo / "data" / "store") == v1.data_version
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "store")
    sh(repo, "git", "checkout", "HEAD", "--", "data/store.dvc")
    dvc(repo, "pull", "data/store.dvc")
    assert len(ImageStore.open(repo / "data" / "store" / "train")) == 36
    assert dir_hash(repo / "data" / "store") == v2.data_version


def test_outside_a_dvc_repo_the_same_hash_is_computed(tmp_path):
    s = ingest("demo", tmp_path / "store", "train", settings=params(tmp_path), reports_dir=tmp_path / "r",
               log=lambda m: None)
    assert s.versioning["hashed_by"] == "sslflow" and s.data_version == dir_hash(tmp_path / "store")
    with pytest.raises(UserError, match="not inside a DVC repo"):
        ingest("demo", tmp_path / "store2", "train", settings=params(tmp_path, "versioning.dvc=on"),
               reports_dir=tmp_path / "r", log=lambda m: None)


def test_a_git_ignored_dvc_file_fails_before_anything_is_written(repo, tmp_path):
    (repo / ".gitignore").write_text("/data/\n")
    with pytest.raises(UserError, match="git-ignored"):
        run(repo, "demo", params(tmp_path))
    assert not (repo / "data").exists()


def test_a_configured_remote_wins_over_the_local_default(repo, tmp_path):
    team = tmp_path / "team-remote"
    dvc(repo, "remote", "add", "-d", "team", str(team))
    held = ingest("demo", repo / "data" / "store", "train", settings=params(tmp_path), push=False,
                  reports_dir=repo / "reports", log=lambda m: None)
    assert held.versioning["pushed"] is False and not team.exists()
    s = run(repo, "demo", params(tmp_path))  # nothing new, but the push catches up
    assert s.status == "unchanged" and s.versioning["pushed"] and s.versioning["remote"] == "team"
    assert any(team.rglob("*.dir"))
    assert not (repo / ".dvc" / "config.local").exists() and not (tmp_path / "remote").exists()
