"""The engine's error types: each says whose problem it is, so callers never guess from `ValueError`.

- `ConfigError`: a setting is unknown, of the wrong type, outside its domain, or does not fit
  the data (a patch size that does not divide the image size); the message is one line naming
  the key. Raised before any data is loaded wherever the data is not needed to tell.
- `RunStateError`: the run directory cannot be used as asked (it already holds a run, or its
  checkpoint belongs to other settings or data, or is unreadable).
- `StoreError` (`ssl_models.store`) and `EvaluationError` (`ssl_models.evaluate`): unusable data.
- `TrainingDiverged`: the loss became NaN/inf; the last good checkpoint is kept.
- `DiskFull`: a write ran out of space (or quota); nothing was half-published.

Everything else that escapes the engine is a bug and keeps its traceback.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of the errors the engine raises on purpose."""


class ConfigError(EngineError, ValueError):
    """A setting is unknown, of the wrong type or outside its domain; one line naming the key."""


class RunStateError(EngineError, ValueError):
    """A run directory or checkpoint cannot be used as asked; one line saying what to do."""


class TrainingDiverged(EngineError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class DiskFull(EngineError, OSError):
    """No space left on the device (or the quota) while writing `path`; what was being written
    was not published, and its temporaries are gone."""

    def __init__(self, path: object, errno_: int | None = None) -> None:
        super().__init__(f"no space left on device writing {path}: free some space and run again "
                         "(nothing was half-written)")
        self.path, self.errno = path, errno_


__all__ = ["ConfigError", "DiskFull", "EngineError", "RunStateError", "TrainingDiverged"]
