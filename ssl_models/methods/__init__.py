"""SSL methods: each is a small `SSLMethod` subclass plus a pure loss in `ssl_models.losses`.

A method registers itself with `@register_method` in its own module of this package; every
module here is imported on first use of the package, so a new method is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil

from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext, embedding_std

METHODS: dict[str, type[SSLMethod]] = {}


def register_method(cls: type[SSLMethod]) -> type[SSLMethod]:
    """Class decorator: make `cls` selectable as `pretrain.method: <cls.name>`."""
    for attr in ("name", "family", "Config"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} must define the class attribute {attr!r}")
    METHODS[cls.name] = cls
    return cls


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()

__all__ = ["METHODS", "Batch", "SSLMethod", "StepOutput", "TrainContext", "embedding_std", "register_method"]
