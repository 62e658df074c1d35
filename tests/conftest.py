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


#: fixtures of the one native service stack a test session starts (tests/services.py): every
#: test that uses one runs on the same pytest-xdist worker, so the stack is started once
STACK_FIXTURES = {"stack", "native_stack", "postgres_service", "postgres_url", "os_user"}
#: modules whose tests are independent and long: spread over the workers one test at a time
#: (every other module stays on one worker, so its module-scoped fixtures are built once)
SPREAD_MODULES = {"test_every_method.py", "test_faults.py", "test_methods_modern_a.py", "test_methods.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the group marks into node ids
def pytest_collection_modifyitems(config, items):
    """Under `pytest -n N --dist loadgroup` (`make test`): the stack's tests form one group and
    run first (the longest chain), each other module is one group unless it is in SPREAD_MODULES.
    Without xdist the marks do nothing."""
    for item in items:
        module = item.path.name
        if STACK_FIXTURES & set(item.fixturenames) and module != "test_remote_pretrain.py":  # its own `stack`
            item.add_marker(pytest.mark.xdist_group("stack"))
        elif module not in SPREAD_MODULES:
            item.add_marker(pytest.mark.xdist_group(module))
    items.sort(key=lambda item: not any(m.args == ("stack",) for m in item.iter_markers("xdist_group")))
