"""The architecture holds: imports only go downward (import-linter on the installed layout), no
generic top-level import names, and every DVC stage depends on all the code it can run."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import BIN, REPO
from sslflow import FOLDERS

# package name -> folder of the repository (setup.py installs the folders under sslflow)
LAYOUT = {"sslflow": REPO / "sslflow", **{f"sslflow.{f}": REPO / f for f in FOLDERS}}


def stage_installed_layout(dest: Path) -> Path:
    """The package as pip installs it (ssl_models/, tasks/, flows/ inside sslflow/), for import-linter."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "sslflow", dest / "sslflow", ignore=ignore)
    for folder in FOLDERS:
        shutil.copytree(REPO / folder, dest / "sslflow" / folder, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_import_contract_is_kept(tmp_path):
    out = lint_imports(stage_installed_layout(tmp_path))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_import_contract_catches_an_upward_import(tmp_path):
    root = stage_installed_layout(tmp_path)
    train = root / "sslflow" / "ssl_models" / "train.py"
    train.write_text(train.read_text() + "\nfrom sslflow.tasks.data import splits  # noqa\n")
    out = lint_imports(root)
    assert out.returncode != 0 and "BROKEN" in out.stdout, out.stdout[-3000:]


# ------------------------------------------------------------------------------------ static imports
def module_files() -> dict[str, Path]:
    """Every project module by its installed dotted name."""
    out: dict[str, Path] = {}
    for package, folder in LAYOUT.items():
        for path in folder.rglob("*.py"):
            if package == "sslflow" and any(part in FOLDERS for part in path.relative_to(folder).parts):
                continue
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imported_names(path: Path, module_level: bool = False) -> set[str]:
    """Every absolute module name imported in the file: anywhere (also inside functions, what
    running its code can import), or only at module level (what importing it imports)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level else ast.walk(tree)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def closure(start: str, modules: dict[str, Path], module_level: bool = False) -> set[str]:
    """Project modules reachable from `start` by imports (and the packages they sit in);
    `module_level`: only through imports that importing `start` runs."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in modules:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b
        todo += [m for m in imported_names(modules[name], module_level) if m in modules]
    return seen


def test_no_generic_top_level_import_names():
    """`tasks`, `flows`, `ssl_models` are repository folders, imported only as sslflow.* (a shared
    environment may hold other packages with those names)."""
    bad = []
    for path in module_files().values():
        for imported in imported_names(path):
            if imported.split(".")[0] in FOLDERS:
                bad.append(f"{path.relative_to(REPO)}: {imported}")
    for path in [*REPO.glob("tests/**/*.py"), *REPO.glob("benchmarks/*.py")]:
        bad += [f"{path.relative_to(REPO)}: {m}" for m in imported_names(path) if m.split(".")[0] in FOLDERS]
    assert not bad, bad


STAGE_COMMANDS = {"ingest": "ingest", "validate": "validate", "pretrain": "pretrain", "evaluate": "evaluate"}


@pytest.mark.parametrize("stage", sorted(STAGE_COMMANDS))
def test_every_dvc_stage_depends_on_the_code_it_runs(stage):
    """A change to any module a stage's command can import must make `dvc repro` rerun it."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    modules = module_files()
    commands = [m for m in modules if m.startswith("sslflow.cli.commands.")]  # build_parser imports each one
    needed = closure(f"sslflow.cli.commands.{STAGE_COMMANDS[stage]}", modules) | closure("sslflow.cli", modules)
    for m in commands:
        needed |= closure(m, modules, module_level=True)
    deps = [REPO / d for d in spec["deps"]]
    uncovered = sorted(str(modules[m].relative_to(REPO)) for m in needed
                       if not any(modules[m] == d or d in modules[m].parents for d in deps))
    assert not uncovered, f"dvc.yaml stage {stage!r} misses deps: {uncovered}"
    assert "bin/sslflow" in spec["deps"]


@pytest.mark.parametrize("stage", sorted(STAGE_COMMANDS))
def test_every_dvc_stage_param_is_a_setting_in_params_yaml(stage):
    from sslflow.core.settings import load_settings
    from sslflow.ssl_models.schema import flatten

    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    project = yaml.safe_load((REPO / "params.yaml").read_text())
    in_file = set(flatten(project)) | set(project) | {k.rsplit(".", 1)[0] for k in flatten(project)}
    settings = flatten(load_settings(REPO / "params.yaml").nested())
    known = set(settings) | {k.split(".")[0] for k in settings} | {k.rsplit(".", 1)[0] for k in settings}
    for key in spec["params"]:
        assert key in known, f"{stage}: {key} is not a setting"
        assert key in in_file, f"{stage}: {key} is not in params.yaml (DVC refuses missing keys)"


def test_the_checkout_finder_keeps_two_checkouts_apart(tmp_path):
    """Code imported from a copy of the repository (a DVC experiment workspace) is the copy's,
    never the editable install's."""
    copy = tmp_path / "copy"
    for name in ("sslflow", *FOLDERS):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "setup.py", copy / "setup.py")
    out = subprocess.run([sys.executable, "-c", "import sslflow.tasks.data.ingest as m, sslflow.flows as f; "
                          "print(m.__file__); print(f.__file__)"], cwd=copy, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert all(line.startswith(str(copy)) for line in out.stdout.split()), out.stdout
