"""Package layout: the repository keeps the design's top-level folders, installed under `sslflow`.

`ssl_models/`, `tasks/` and `flows/` become `sslflow.ssl_models`, `sslflow.tasks` and
`sslflow.flows`, so sslflow claims no generic top-level import name (`tasks`, `flows`) in a
shared environment. Everything else about the project is in pyproject.toml.
"""

from setuptools import find_packages, setup

FOLDERS = {"sslflow.ssl_models": "ssl_models", "sslflow.tasks": "tasks", "sslflow.flows": "flows"}

packages = find_packages(include=["sslflow", "sslflow.*"])
for name, folder in FOLDERS.items():
    packages += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]

setup(packages=packages, package_dir={"sslflow": "sslflow", **FOLDERS})
