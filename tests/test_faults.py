"""Fault injection: what an operator's bad day and an attacker's files do to sslflow.

Every test drives real `sslflow` processes (or the engine in a real child process) and injects
the fault for real: two writers at once, a deleted shard, a crafted pickle, hostile file names,
`kill -9` of a slot holder, a training or an ingest, a full tmpfs, a decode worker that dies,
bad parameters. The expected outcome is the one in docs/reliability.md: one line, the right exit
code (2 bad input, 4 skipped), nothing lost, nothing half-published, nothing left running.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import BIN, FAST, REPO, saturated_cpu

SSLFLOW = str(BIN / "sslflow")
#: A 1-epoch pretraining of a width-8 ResNet on 16 px images: seconds on one core.
QUICK = [f"--set={s}" for s in (*FAST, "pretrain.epochs=1")]


def sslflow(*args: str, project: Path, timeout: float = 300, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "SSLFLOW_PROJECT": str(project), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([SSLFLOW, *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd or project)


def one_line_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The process failed with `code` and said why in exactly one line, without a traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def image_folder(root: Path, n: int, seed: int, size: int = 16, classes: int = 2) -> Path:
    """`n` random PNGs of `size` px under `root/<class>/`."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{seed}-{i}.png")
    return root


def store_size(split_dir: Path) -> int:
    from sslflow.ssl_models.store import ImageStore

    return len(ImageStore.open(split_dir))


def in_process(capsys, *argv: str) -> tuple[int, str, str]:
    """`sslflow ARGV` in this process (where no process boundary is part of the fault)."""
    from sslflow.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def ingest(project: Path, source: Path, store: Path, *more: str, split: str = "train", **kw):
    return sslflow("ingest", "--source", str(source), "--store", str(store), "--split", split, "--no-dvc", *more,
                   project=project, **kw)


def children_of(pid: int) -> set[int]:
    """Every descendant of `pid`, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


# ----------------------------------------------------------------------------- 1. data loss


def test_two_ingests_into_one_store_at_once_lose_no_image(tmp_path):
    """Different TMPDIRs (as two services with PrivateTmp): the lock lives in the store."""
    a, b = image_folder(tmp_path / "a", 60, seed=1), image_folder(tmp_path / "b", 60, seed=2)
    store = tmp_path / "store"
    procs = []
    for source, tmp in ((a, tmp_path / "tmp-a"), (b, tmp_path / "tmp-b")):
        tmp.mkdir()
        env = {**os.environ, "SSLFLOW_PROJECT": str(tmp_path), "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([SSLFLOW, "ingest", "--source", str(source), "--store", str(store),
                                       "--no-dvc", "--workers", "1"], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert store_size(store / "train") == 120
    assert sslflow("validate", "--store", str(store), project=tmp_path).returncode == 0


def test_a_lost_shard_fails_validate_and_repair_lets_a_reingest_restore_it(tmp_path, capsys):
    first, second = image_folder(tmp_path / "first", 30, seed=3), image_folder(tmp_path / "second", 30, seed=4)
    store = str(tmp_path / "store")
    assert in_process(capsys, "ingest", "--source", str(first), "--store", store, "--no-dvc")[0] == 0
    assert in_process(capsys, "ingest", "--source", str(second), "--store", store, "--no-dvc")[0] == 0
    index = json.loads((tmp_path / "store" / "train" / "store.json").read_text())
    lost = tmp_path / "store" / "train" / "shards" / f"{index['shards'][0]['id']}.images.npy"
    lost.unlink()

    code, _, err = in_process(capsys, "validate", "--store", store)
    assert code == 2 and len(err.strip().splitlines()) == 1 and lost.name in err and "--repair" in err, err
    assert in_process(capsys, "validate", "--store", store, "--repair")[0] == 0
    assert in_process(capsys, "validate", "--store", store)[0] == 0
    assert store_size(tmp_path / "store" / "train") == 30
    # the manifest forgot the lost images' hashes: a re-ingest of their source brings them back
    assert in_process(capsys, "ingest", "--source", str(first), "--store", store, "--no-dvc")[0] == 0
    assert store_size(tmp_path / "store" / "train") == 60


# ------------------------------------------------------------------- 2. untrusted files


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> dict[str, Path]:
    """A finished 1-epoch run (checkpoint, encoder, metrics) on a small labeled store."""
    root = tmp_path_factory.mktemp("finished")
    source = image_folder(root / "images", 64, seed=5)
    store = root / "store"
    assert ingest(root, source, store).returncode == 0
    result = sslflow("pretrain", "--data", str(store / "train"), "--out", str(root / "run"), *QUICK, project=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "store": store / "train", "run": root / "run"}


def test_a_crafted_checkpoint_runs_no_code_and_a_truncated_one_is_one_line(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run["run"], run)
    last = run / "checkpoints" / "last.pt"
    assert last.is_file()
    marker = tmp_path / "pwned"
    last.write_bytes(pickle.dumps({"model": _Exploit(marker)}))
    args = ("pretrain", "--data", str(finished_run["store"]), "--out", str(run), "--resume", *QUICK,
            "--set=pretrain.epochs=2")
    line = one_line_error(sslflow(*args, project=tmp_path))
    assert not marker.exists(), "the crafted checkpoint ran code"
    assert "last.pt" in line

    last.write_bytes(b"PK\x03\x04 truncated")
    assert "last.pt" in one_line_error(sslflow(*args, project=tmp_path))
    last.write_bytes(b"")
    assert "last.pt" in one_line_error(sslflow(*args, project=tmp_path))


def test_an_encoder_whose_metadata_does_not_match_its_weights_is_one_line(finished_run, tmp_path):
    import torch

    run = tmp_path / "run"
    shutil.copytree(finished_run["run"], run)
    saved = torch.load(run / "encoder.pt", weights_only=True)
    saved["meta"]["config"]["width"] *= 2  # the metadata now describes another network
    torch.save(saved, run / "encoder.pt")
    store = str(finished_run["store"])
    line = one_line_error(sslflow("evaluate", "--encoder", str(run), "--train", store, "--test", store,
                                  "--protocol", "knn", project=tmp_path))
    assert "encoder.pt" in line


def test_hostile_file_names_are_escaped_in_every_html_report(tmp_path):
    source = image_folder(tmp_path / "images", 20, seed=6)
    hostile = source / "class0" / "<img src=x onerror=alert(1)>.jpg"
    hostile.write_bytes(b"not a jpeg")
    result = ingest(tmp_path, source, tmp_path / "store", "--reports", str(tmp_path / "reports"))
    assert result.returncode == 0, result.stderr[-2000:]
    pages = [p.read_text(errors="replace") for p in (tmp_path / "reports").rglob("*.html")]
    assert pages, "the ingest wrote no data docs"
    assert any("onerror" in page for page in pages), "the quarantined name is not in the report at all"
    assert not any("<img src=x onerror" in page for page in pages)


def test_a_run_name_is_one_path_component(tmp_path):
    result = sslflow("run", "--source", "demo", "--run-name", "../../escaped", project=tmp_path)
    assert "run name" in one_line_error(result)
    assert not (tmp_path.parent.parent / "escaped").exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------- 3. stuck after a crash

HOLD_THE_SLOT = """
import sys, time
from sslflow.cli.temporary_server import prefect_api
from sslflow.tasks.pipeline.slot import retrain_slot
with prefect_api() as api:
    with retrain_slot("sslflow-retrain", timeout_s=30, lease_s=60):
        print("holding", flush=True)
        time.sleep(3600)
"""


def test_a_retrain_killed_holding_the_slot_frees_it_within_the_lease(tmp_path):
    """While a live run holds the slot, a retrain is Skipped with exit 4 (visible to a
    scheduler); after `kill -9` of the holder, its temporary Prefect server dies with it and
    the next retrain gets the slot once the lease expires."""
    env = {**os.environ, "SSLFLOW_PROJECT": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_SLOT], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding", holder.stderr.read()[-3000:]
        servers = children_of(holder.pid)
        assert servers, "the holder started no temporary server"
        retrain = ("retrain", "--incoming", str(tmp_path / "incoming"), "--store", str(tmp_path / "store"))
        (tmp_path / "incoming").mkdir()
        skipped = sslflow(*retrain, "--set=pipeline.lock_timeout_s=1", project=tmp_path, env=env)
        assert skipped.returncode == 4, (skipped.stdout[-2000:], skipped.stderr[-3000:])
        assert "Skipped" in skipped.stdout + skipped.stderr

        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        wait_until(lambda: not any(alive(pid) for pid in servers), 30, "the holder's server to exit")

        t0 = time.monotonic()
        after = sslflow(*retrain, "--set=pipeline.lock_timeout_s=150", project=tmp_path, env=env)
        waited = time.monotonic() - t0
        assert after.returncode == 0, (after.stdout[-2000:], after.stderr[-3000:])
        assert "freed the 'sslflow-retrain' slot" in after.stdout + after.stderr
        assert waited < 150
    finally:
        holder.kill()
        holder.wait()


OPEN_A_RUN_AND_HANG = """
import time
from sslflow.core.settings import load_settings
from sslflow.tasks.tracking.run import tracking_run
settings = load_settings([], ["tracking.heartbeat_s=1", "tracking.orphan_after_s=10"])
with tracking_run(settings, run_name="doomed", check=False) as run:
    print(run.run_id, flush=True)
    time.sleep(3600)
"""

OPEN_THE_NEXT_RUN = """
from sslflow.core.settings import load_settings
from sslflow.tasks.tracking.run import tracking_run
settings = load_settings([], ["tracking.heartbeat_s=1", "tracking.orphan_after_s=10"])
with tracking_run(settings, run_name="next", check=False) as run:
    pass
"""


def test_the_mlflow_run_of_a_killed_process_is_ended_as_killed_by_the_next_run(tmp_path):
    from mlflow import MlflowClient

    env = {**os.environ, "SSLFLOW_PROJECT": str(tmp_path)}
    doomed = subprocess.Popen([sys.executable, "-c", OPEN_A_RUN_AND_HANG], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_id = doomed.stdout.readline().strip()
        assert run_id, doomed.stderr.read()[-3000:]
    finally:
        doomed.kill()
        doomed.wait()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "RUNNING"
    time.sleep(11)
    nxt = subprocess.run([sys.executable, "-c", OPEN_THE_NEXT_RUN], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert nxt.returncode == 0, nxt.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert "no heartbeat" in run.data.tags["sslflow.orphaned"]


def test_a_killed_ingest_leaves_no_decode_worker(tmp_path):
    source = image_folder(tmp_path / "images", 1200, seed=7, size=64)
    proc = subprocess.Popen([SSLFLOW, "ingest", "--source", str(source), "--store", str(tmp_path / "store"),
                             "--no-dvc", "--workers", "2"], env={**os.environ, "SSLFLOW_PROJECT": str(tmp_path)},
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len(children_of(proc.pid)) >= 2 or proc.poll() is not None, 120, "decode workers")
        workers = children_of(proc.pid)
        assert proc.poll() is None, "the ingest finished before it could be killed"
    finally:
        proc.kill()
        proc.wait()
    wait_until(lambda: not any(alive(pid) for pid in workers), 30, "the decode workers to exit")


def test_state_lives_in_the_project_directory_for_every_command(tmp_path):
    """Outside the checkout, with no SSLFLOW_PROJECT: the current directory is the project."""
    probe = textwrap.dedent("""
        from sslflow.core.project import project_root, default_tracking_uri, default_optuna_storage
        from sslflow.core.settings import load_settings
        from sslflow.tasks.tracking.backend import resolve_tracking_uri
        from sslflow.tasks.tuning.storage import resolve_storage
        settings = load_settings([], [])
        print(project_root()); print(resolve_tracking_uri(settings)); print(resolve_storage(settings))
    """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("SSLFLOW_PROJECT", "MLFLOW_TRACKING_URI")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=elsewhere, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    root, tracking, storage = out.stdout.split()
    assert Path(root) == elsewhere.resolve() and str(REPO) not in tracking + storage
    assert tracking == f"sqlite:///{elsewhere.resolve() / 'mlflow.db'}"
    assert storage == f"sqlite:///{elsewhere.resolve() / 'optuna.db'}"


# --------------------------------------------------------------------- 5. resource faults


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real tmpfs mount (root and a kernel that allows it), unmounted afterwards."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()

    def mount_with(size: int) -> Path:
        options = f"size={size}" + (",remount" if os.path.ismount(mount) else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        return mount

    yield mount_with
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_during_export_is_one_line_publishes_nothing_and_resume_finishes(finished_run, small_tmpfs):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = finished_run["run"]
    checkpoint = (done / "checkpoints" / "last.pt").stat().st_size
    # room for the run's checkpoint but not for the encoder files next to it
    mount = small_tmpfs(checkpoint + 256 * 1024)
    run = mount / "run"
    args = ("pretrain", "--data", str(finished_run["store"]), "--out", str(run), *QUICK)
    line = one_line_error(sslflow(*args, project=finished_run["root"]))
    assert "no space left on device" in line.lower() and str(mount) in line
    published = {p.name for p in run.iterdir() if p.is_file()}
    assert not published & {"encoder.pt", "encoder.pt2", "metrics.json"}, published
    assert not [p for p in run.rglob("*") if ".tmp" in p.name], "a temporary file was left behind"
    assert (run / "checkpoints" / "last.pt").is_file()

    small_tmpfs(64 * 2**20)
    resumed = sslflow(*args, "--resume", project=finished_run["root"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {"encoder.pt", "encoder.pt2", "metrics.json"} <= {p.name for p in run.iterdir()}


CRASH_ONE_FILE_IN_WORKERS = """
import multiprocessing, os, signal
import sslflow.tasks.data.decode as decode
_decode_file = decode.decode_file
def decode_file(task, *args, **kwargs):
    if multiprocessing.parent_process() is not None and "kills-the-worker" in str(task.rel):
        os.kill(os.getpid(), signal.SIGKILL)
    return _decode_file(task, *args, **kwargs)
decode.decode_file = decode_file
"""


def test_decode_limits_truncated_files_and_a_dying_worker_are_quarantined_with_their_reason(tmp_path):
    source = image_folder(tmp_path / "images", 530, seed=8)  # > 2 chunks: decoded by workers
    big = Image.new("I;16", (9400, 9400))
    big.save(source / "class0" / "huge-16-bit.png")
    buffer = source / "class1" / "whole.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buffer, quality=90)
    (source / "class1" / "truncated.jpg").write_bytes(buffer.read_bytes()[:400])
    buffer.unlink()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(source / "class0" / "kills-the-worker.png")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH_ONE_FILE_IN_WORKERS)

    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    result = ingest(tmp_path, source, tmp_path / "store", "--workers", "2", "--reports", str(tmp_path / "reports"),
                    env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "reports" / "ingest" / "train.json").read_text())
    reasons = {Path(q["path"]).name: q["reason"] for q in report["quarantined"]}
    assert reasons == {"huge-16-bit.png": "too_large_decoded", "truncated.jpg": "truncated",
                       "kills-the-worker.png": "worker_crashed"}
    assert store_size(tmp_path / "store" / "train") == 530


# ---------------------------------------------------------------- 6. + 7. one line, exit 2

BAD_VALUES = [
    ("pretrain.simclr.proj_hidden_dim=-1", "pretrain.simclr.proj_hidden_dim"),
    ("device=cuda:abc", "device"),
    ("pretrain.dino.out_dim=0", "pretrain.dino.out_dim"),
    ("augment.local_size=2000000", "augment.local_size"),
    ("pretrain.warmup_epochs=-1", "pretrain.warmup_epochs"),
    ("pretrain.simclr.proj_dim=0", "pretrain.simclr.proj_dim"),
    ("pretrain.checkpoint_every=-1", "pretrain.checkpoint_every"),
    ("augment.local_crops=-1", "augment.local_crops"),
    ("augment.blur_sigma=[2.0, 0.1]", "augment.blur_sigma"),
    ("eval.linear_epochs=0", "eval.linear_epochs"),
    ("pretrain.batch_size=0", "pretrain.batch_size"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("pretrain.lr=nan", "pretrain.lr"),
    ("pretrain.lr=inf", "pretrain.lr"),
    ("augment.strength=nan", "augment.strength"),
    ("augment.std=[0, 0, 0]", "augment.std"),
    ("pretrain.dino.teacher_temperature=0", "pretrain.dino.teacher_temperature"),
    ("seed=99999999999999999999", "seed"),
    ("promotion.metric=finetune_top1", "promotion.metric"),
    ("tracking.uri=http://alice:s3cret-pass@mlflow.example:5000", "tracking.uri"),
]


@pytest.mark.parametrize(("override", "key"), BAD_VALUES, ids=[b[0].split("=")[0] for b in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_its_key_before_any_data_is_read(override, key, tmp_path, capsys):
    from sslflow.cli import main

    code = main(["pretrain", "--data", str(tmp_path / "not-read"), "--out", str(tmp_path / "run"),
                 "--set", "eval.protocols=[knn, linear]", "--set", override])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert key in lines[0] and "not-read" not in lines[0]
    assert "s3cret" not in err


def test_settings_files_that_are_not_yaml_mappings_are_one_line(tmp_path, capsys):
    from sslflow.cli import main

    binary = tmp_path / "params.bin"
    binary.write_bytes(os.urandom(256))
    for bad in (tmp_path, binary):
        code = main(["settings", "--params", str(bad)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and str(bad) in err, err


def test_a_corrupt_tracking_database_is_one_line(tmp_path):
    (tmp_path / "mlflow.db").write_bytes(b"this is not sqlite" * 100)
    result = sslflow("promote", "--version", "1", project=tmp_path)
    assert "mlflow.db" in one_line_error(result)


# ----------------------------------------------------------------------- 8. semantics


def test_splits_of_one_store_keep_one_image_size(tmp_path, capsys):
    from sslflow.ssl_models.store import ImageStore

    source, other = image_folder(tmp_path / "images", 20, seed=9), image_folder(tmp_path / "other", 10, seed=10)
    store = str(tmp_path / "store")
    assert in_process(capsys, "ingest", "--source", str(source), "--store", store, "--size", "16", "--no-dvc")[0] == 0
    code, _, err = in_process(capsys, "ingest", "--source", str(other), "--store", store, "--split", "test",
                              "--size", "24", "--no-dvc")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "16" in err, err
    code, _, err = in_process(capsys, "ingest", "--source", str(other), "--store", store, "--split", "test",
                              "--no-dvc")
    assert code == 0, err
    assert ImageStore.open(tmp_path / "store" / "test").height == 16


# --------------------------------------------------------------------------- 9. races

PARENT_RUN = """
import sys
import optuna
from sslflow.core.settings import load_settings
from sslflow.tasks.tuning.tracking import StudyTracker
storage_url, uri, name = sys.argv[1:4]
settings = load_settings([], [])
storage = optuna.storages.RDBStorage(storage_url)
study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="maximize")
print(StudyTracker(settings, uri).parent_run(study, storage, config={}, storage_label="sqlite"))
"""


def test_tune_workers_that_start_together_share_one_parent_run_under_load(tmp_path):
    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "SSLFLOW_PROJECT": str(tmp_path)}
    # the databases exist first: concurrent schema creation is SQLite's problem, not the race here
    first = subprocess.run([sys.executable, "-c", PARENT_RUN, storage, uri, "warm-up"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    with saturated_cpu(1):
        workers = [subprocess.Popen([sys.executable, "-c", PARENT_RUN, storage, uri, "race"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0] * 3, [o[1][-2000:] for o in outputs]
    assert len({o[0].strip() for o in outputs}) == 1, outputs


def test_user_strings_in_markdown_artifacts_are_inert():
    from sslflow.tasks.pipeline.decisions import markdown_report

    hostile = "<img src=x onerror=alert(1)>](javascript:alert(2)) | *x*\nnext"
    report = markdown_report(hostile, {hostile: 0.5}, extra={"data": hostile})
    assert "<img" not in report and "\nnext" not in report
    assert not re.search(r"(?<!\\)\]\(javascript", report) and "&lt;img" in report


def test_splits_of_two_sizes_are_refused_and_an_encoder_at_another_size_warns(caplog):
    from types import SimpleNamespace

    from sslflow.core.errors import UserError
    from sslflow.tasks.training.evaluate import check_sizes

    at = lambda side: SimpleNamespace(height=side, width=side)  # noqa: E731
    with pytest.raises(UserError, match="ingest both splits at one size"):
        check_sizes({"image_size": 32}, at(32), at(16))
    with caplog.at_level("WARNING", logger="sslflow"):
        check_sizes({"image_size": 32}, at(16), at(16))
    assert "trained on 32 px images and is evaluated on 16 px" in caplog.text


def test_a_prefect_api_answering_5xx_is_a_service_outage_in_one_line():
    import httpx

    from sslflow.cli import _prefect_server_error

    request = httpx.Request("GET", "http://alice:s3cret@127.0.0.1:4200/api/flow_runs/filter")
    outage = httpx.HTTPStatusError("down", request=request, response=httpx.Response(503, request=request))
    line = _prefect_server_error(outage)
    assert line is not None and "503" in line and "s3cret" not in line
    not_found = httpx.HTTPStatusError("404", request=request, response=httpx.Response(404, request=request))
    assert _prefect_server_error(not_found) is None and _prefect_server_error(ValueError("x")) is None
