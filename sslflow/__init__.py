"""sslflow: self-supervised pretraining of image encoders as a reproducible pipeline.

Packages, bottom layer first (imports only go downward; `tests/test_architecture.py` checks it):

    sslflow.ssl_models   the engine: pure PyTorch (repository folder ssl_models/)
    sslflow.core         settings, errors, project paths, environment defaults
    sslflow.tasks        pipeline steps as plain functions: data, training, tracking, tuning, pipeline
    sslflow.flows        Prefect flows composing the tasks (repository folder flows/)
    sslflow.cli          the `sslflow` command line
"""

from importlib.metadata import PackageNotFoundError, version

from sslflow.core.env import apply_defaults

apply_defaults()

try:
    __version__ = version("sslflow")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
