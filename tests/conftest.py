"""Shared fixtures: small generated image stores and fast parameters for a 2-core CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import CIFAR10_ARCHIVE
from services import native_stack, postgres_service, postgres_url, stack  # noqa: F401 (fixtures for all tests)


@pytest.fixture(scope="session", autouse=True)
def empty_project(tmp_path_factory) -> Path:
    """Every test, and every sslflow process it starts, works in an empty project directory
    (`SSLFLOW_PROJECT`): built-in defaults plus what the test sets, nothing written into the
    checkout. A test that needs another project passes `--project` / `project=`."""
    import importlib
    import os

    # Prefect's console log handler binds to sys.stderr when prefect is first imported: import it
    # here, before any test, so it writes to the session's capture and not to the capsys stream of
    # the first test that runs a flow in-process (closed after it: every later flow's logging failed).
    importlib.import_module("sslflow")  # first: its environment defaults for Prefect
    importlib.import_module("prefect")
    project = tmp_path_factory.mktemp("project")
    old = os.environ.get("SSLFLOW_PROJECT")
    os.environ["SSLFLOW_PROJECT"] = str(project)
    yield project
    if old is None:
        os.environ.pop("SSLFLOW_PROJECT", None)
    else:
        os.environ["SSLFLOW_PROJECT"] = old


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors on 2 shared cores: intra-op threads only add contention (several times
    slower). Per module, with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_stores(tmp_path_factory) -> dict[str, Path]:
    """Labeled demo train (16/class) and test (8/class) stores of 16x16 images."""
    from sslflow.ssl_models.store import ImageStore
    from sslflow.tasks.data.demo import CLASSES, generate_demo

    root = tmp_path_factory.mktemp("stores")
    out = {}
    for split, n, seed in (("train", 16, 0), ("test", 8, 1)):
        images, labels = generate_demo(n, size=16, seed=seed)
        store = ImageStore.create(root / split, 16, 16)
        store.add(images, [CLASSES[i] for i in labels])
        out[split] = root / split
    return out


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> Path:
    """The shared CIFAR-10 JPEGs, extracted once per session (skipped when absent)."""
    if not CIFAR10_ARCHIVE.is_file():
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR10_ARCHIVE}")
    import tarfile

    root = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(CIFAR10_ARCHIVE) as tar:
        tar.extractall(root, filter="data")
    return root / "cifar10"


@pytest.fixture(autouse=True)
def _log_handlers_on_live_streams():
    """After each test, point log handlers left on a closed stream (a capsys stream that a
    handler created during that test bound to, e.g. by Prefect's logging setup inside a server
    harness) back to the session's stderr, so later tests' flow logging still works."""
    import logging
    import sys

    yield
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            stream = getattr(handler, "stream", None)
            if stream is not None and getattr(stream, "closed", False):
                handler.stream = sys.stderr  # not setStream: it flushes the closed stream first
                console = getattr(handler, "console", None)  # Prefect's rich console writes to its own file
                if console is not None:
                    console.file = sys.stderr


#: modules whose tests use the one native service stack a test session starts (tests/services.py:
#: `stack`, `native_stack`, `postgres_url`, ...): they run on one pytest-xdist worker, first, so
#: the stack starts once and its longest chain of tests starts at once
STACK_MODULES = ("tests/stack/", "tests/tuning/test_tune.py")
#: modules whose tests are independent and long: spread over the workers one test at a time
#: (every other module stays on one worker, so its module-scoped fixtures are built once)
SPREAD_MODULES = {"test_every_method.py", "test_faults.py", "test_methods_modern_a.py", "test_methods.py"}


def worker_scope(nodeid: str) -> str:
    """The unit `make test` hands to one xdist worker: "stack", one test, or its module."""
    path = nodeid.split("::")[0]
    if path.startswith(STACK_MODULES):
        return "stack"
    return nodeid if Path(path).name in SPREAD_MODULES else path


def pytest_xdist_make_scheduler(config, log):
    """`pytest -n N --dist loadscope` (`make test`) with the scopes of `worker_scope`. (Not
    `xdist_group` marks: pytest-xdist 3.8's loadgroup cannot rename pytest 9's node ids, so it
    silently schedules test by test.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkerScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_scope(nodeid)

    return ByWorkerScope(config, log)


def pytest_collection_modifyitems(config, items):
    """The stack's tests first (the longest chain of the suite); the rest keep their order."""
    items.sort(key=lambda item: worker_scope(item.nodeid) != "stack")
