"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the person running sslflow (params, paths, data): no traceback."""


class RemotePretrainFailed(RuntimeError):
    """Pretraining sent to a work pool did not complete, or its outputs are not visible here."""
