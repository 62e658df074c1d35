"""The in-process Prefect server and tiny project the flow tests share."""

from __future__ import annotations

import os

import pytest

from helpers import TINY_DEMO, fast_params


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One temporary Prefect server for the whole session (15-50 s to start on 2 cores): every
    module's flows talk to this one, never to a second harness started next to it."""
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def held_slots() -> dict[str, int]:
    """Global concurrency limits of the current Prefect server with a slot taken."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {lim.name: lim.active_slots for lim in client.read_global_concurrency_limits(limit=200)
                if lim.active_slots}


@pytest.fixture
def project(tmp_path, monkeypatch, prefect_server):
    """A project directory with a tiny ingested demo store (40 train / 20 test, 16 px) and
    its own MLflow database. A test that leaves a concurrency slot taken fails: the next
    retrain on this server would be Skipped for no reason of its own."""
    from sslflow.tasks.data.ingest import ingest

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSLFLOW_PROJECT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    settings = fast_params(*TINY_DEMO)
    for split in ("train", "test"):
        ingest("demo", tmp_path / "data" / "store", split, settings=settings, reports_dir=tmp_path / "reports",
               log=lambda msg: None)
    before = held_slots()
    yield tmp_path
    assert held_slots() == before, f"the test left a concurrency slot taken: {held_slots()} (before: {before})"
