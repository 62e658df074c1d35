"""SSL methods: each is a small `SSLMethod` subclass plus a pure loss in `ssl_models.losses`.

Register a new method with `@register_method` in its own module and import it below.
"""

from __future__ import annotations

from sslflow.ssl_models.methods.base import SSLMethod, ViewSpec

METHODS: dict[str, type[SSLMethod]] = {}


def register_method(cls: type[SSLMethod]) -> type[SSLMethod]:
    METHODS[cls.name] = cls
    return cls


from sslflow.ssl_models.methods import byol, dino, moco, simclr  # noqa: E402,F401  (registration)

__all__ = ["METHODS", "SSLMethod", "ViewSpec", "register_method"]
