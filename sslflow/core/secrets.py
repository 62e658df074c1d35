"""Secrets never reach a message, a log line or a tracked param: URIs are shown redacted.

    redact_uri("postgresql://mlflow:s3cret@db:5432/mlflow")  -> "postgresql://mlflow:***@db:5432/mlflow"
    http_credentials_in_uri("http://u:p@host:5000")          -> True (refused: use the environment)
"""

from __future__ import annotations

import re
import urllib.parse

_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/]*)(?::(?P<pw>[^@/]*))?@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pwd|token|secret|access_key|secret_key|api_key)=)[^&#]*")


def redact_uri(uri: str) -> str:
    """`uri` with the password of its user info and secret-looking query values replaced by ***."""
    shown = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}{':***' if m['pw'] is not None else ''}@", uri)
    return _SECRET_QUERY.sub(r"\1***", shown)


def http_credentials_in_uri(uri: str) -> bool:
    """An http(s) URI that carries a user name or password (MLflow takes them from
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, never from the URI)."""
    parsed = urllib.parse.urlsplit(uri.strip())
    return parsed.scheme.lower() in ("http", "https") and "@" in parsed.netloc
