"""sslflow: self-supervised pretraining of image encoders as a reproducible pipeline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sslflow")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
