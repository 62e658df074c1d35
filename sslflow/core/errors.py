"""Errors meant for the person running sslflow: the CLI prints them as one line, no traceback.

Exit codes (docs/reliability.md): 2 = bad input (`UserError`, and the engine's `ConfigError`,
`RunStateError`, `StoreError`, `EvaluationError`); 3 = a service is unavailable
(`ServiceUnavailable`: MLflow, its artifact store, Optuna's database, the Prefect server; rerun
when it is back, nothing was lost); 1 = the run itself failed (a diverged training, a failed
remote pretraining).
"""


class UserError(Exception):
    """Bad input from the person running sslflow (settings, paths, data): exit code 2."""


class ServiceUnavailable(UserError):
    """A service sslflow needs does not answer (or fails) after the bounded retries: exit code 3.

    A subclass of `UserError` so that code which only knows "not a bug" still treats it so
    (no retry of bad input, one line), while the CLI and schedulers can tell it apart.
    """


class RemotePretrainFailed(RuntimeError):
    """Pretraining sent to a work pool did not complete, or its outputs are not visible here: exit code 1."""
