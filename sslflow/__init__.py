"""sslflow: self-supervised pretraining of image encoders as a reproducible pipeline.

Packages, bottom layer first (imports only go downward; `tests/test_architecture.py` checks it):

    sslflow.ssl_models   the engine: pure PyTorch (repository folder ssl_models/)
    sslflow.core         settings, errors, project paths, environment defaults
    sslflow.tasks        pipeline steps as plain functions: data, training, tracking, tuning, pipeline
    sslflow.flows        Prefect flows composing the tasks (repository folder flows/)
    sslflow.cli          the `sslflow` command line
"""

import importlib.abc
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

#: Repository folders installed as subpackages of `sslflow` (setup.py says the same).
FOLDERS = ("ssl_models", "tasks", "flows")


class _CheckoutFolders(importlib.abc.MetaPathFinder):
    """In a source checkout, `sslflow.tasks` (and the other FOLDERS) come from the folders beside
    the `sslflow/` that was imported, so a second checkout (a DVC experiment workspace, a git
    worktree) runs its own code, never a mix with the checkout pip installed in editable mode."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        parent, _, name = fullname.rpartition(".")
        if parent != __name__ or name not in FOLDERS:
            return None
        init = self.root / name / "__init__.py"
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


_root = Path(__file__).resolve().parent.parent
if (_root / "setup.py").is_file() and all((_root / f / "__init__.py").is_file() for f in FOLDERS):
    sys.meta_path.insert(0, _CheckoutFolders(_root))

from sslflow.core.env import apply_defaults  # noqa: E402  (after the finder: nothing here imports the folders)

apply_defaults()

try:
    __version__ = version("sslflow")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
