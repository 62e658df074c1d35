"""The MLflow backend: which URI, is it usable, and what an artifact-store outage looks like.

The tracking URI is, in order: `MLFLOW_TRACKING_URI`, `tracking.uri`, then the embedded
default `sqlite:///<project>/mlflow.db` with artifacts in `<project>/mlartifacts`.
`check_tracking_server` runs before anything is trained: an unreachable server is a one-line
`UserError` naming the URI after at most `tracking.preflight_timeout_s` seconds. During a run,
`retry_budget` bounds MLflow's own HTTP retries (`tracking.retry_budget_s` in total) and
`mlflow_outage` turns what is left of an outage into one `ServiceUnavailable` line (exit 3).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sslflow.core.errors import ServiceUnavailable, UserError
from sslflow.core.project import default_tracking_uri
from sslflow.core.secrets import http_credentials_in_uri, redact_uri
from sslflow.core.settings import Settings

__all__ = ["artifact_location", "artifact_store_error", "artifact_store_errors", "check_tracking_server",
           "default_tracking_uri", "get_or_create_experiment", "mlflow_outage", "resolve_tracking_uri",
           "retry_budget", "retry_plan", "scoped_tracking_uri", "sqlite_path"]


def resolve_tracking_uri(settings: Settings) -> str:
    """`MLFLOW_TRACKING_URI` (env) > `tracking.uri` (settings) > `<project>/mlflow.db` (SQLite).
    An http(s) URI with a user or password in it is refused (one line, password redacted);
    every message shows URIs through `redact_uri`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip() or settings.tracking.uri.strip()
    if not uri:
        return default_tracking_uri(settings.project)
    if http_credentials_in_uri(uri):  # MLflow would send them nowhere useful, and print them
        raise UserError(f"MLflow tracking URI {redact_uri(uri)} carries credentials: put them in "
                        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
    return uri


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:"):
        return None
    path = urllib.parse.urlparse(uri).path
    # sqlite:///rel.db -> "/rel.db" means relative; sqlite:////abs.db -> "//abs.db"
    if uri.startswith("sqlite:////"):
        return Path(path[1:]) if path.startswith("//") else Path(path)
    return Path(path.lstrip("/")) if path else None


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside the SQLite file (`mlartifacts/`);
    None = the server's default (an `mlflow server` proxies or names its own store)."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.resolve().parent / "mlartifacts").as_uri()


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (before any training) when the tracking backend cannot be used.

    http(s): GET `<uri>/health` with `timeout`; no answer, a refused connection, a 5xx or an
    authentication failure is a `UserError` naming the URI. sqlite: the directory of the
    database file must exist and be writable. Other schemes (databricks, postgresql, ...) are
    checked by one real query. The message is one line.
    """
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                status = resp.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServiceUnavailable(f"MLflow tracking server {redact_uri(uri)} is unreachable ({reason}); "
                            "start it or set MLFLOW_TRACKING_URI / tracking.uri") from None
        if status in (401, 403):
            raise UserError(f"MLflow tracking server {redact_uri(uri)} refused the credentials (HTTP {status}); "
                            "set MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN")
        if status >= 500:
            raise ServiceUnavailable(f"MLflow tracking server {redact_uri(uri)} is not healthy (HTTP {status})")
        return
    db = sqlite_path(uri)
    if db is not None:
        parent = db.resolve().parent
        if not parent.is_dir():
            raise UserError(f"MLflow tracking URI {redact_uri(uri)}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UserError(f"MLflow tracking URI {redact_uri(uri)}: directory {parent} is not writable")
        if db.exists():
            _check_sqlite_file(db.resolve())
        return
    if scheme in ("file", ""):
        return  # refused by MLflow itself unless MLFLOW_ALLOW_FILE_STORE=true
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ServiceUnavailable(f"MLflow tracking URI {redact_uri(uri)} is unusable: {msg}") from None


def _check_sqlite_file(db: Path) -> None:
    """A read-only or damaged database file: one line, before MLflow prints a page of SQL."""
    import sqlite3

    if not os.access(db, os.R_OK | os.W_OK):
        raise UserError(f"MLflow database {db} is not readable and writable by this user: fix its permissions")
    try:
        with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30) as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as e:
        raise UserError(f"MLflow database {db} is not a usable SQLite database ({e}): restore it from a backup, "
                        "or move it away to start an empty registry") from None


# ------------------------------------------------------------------------------------ artifact store outages
S3_ENDPOINT_VARS = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def _refuses_connections(url: str, timeout: float = 2.0) -> bool:
    import socket

    parts = urllib.parse.urlparse(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError:
        return True
    return False


def _server_answers(uri: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, TimeoutError, OSError):
        return False


def artifact_store_error(uri: str, error: BaseException, what: str) -> ServiceUnavailable | None:
    """A one-line `ServiceUnavailable` when `error` is a failed artifact transfer, else None (anything
    else is a bug or another outage and keeps its traceback).

    With proxied artifacts (`mlflow server --artifacts-destination s3://...`) the client talks
    only to `<server>/api/2.0/mlflow-artifacts/...`; when the server's object store is down the
    server answers HTTP 500 (no reason in the body) or drops the connection, and MLflow's
    message names neither the store nor what to do. So: a server that still answers
    `/health` could not reach its artifact store; one that does not is itself down. When an
    S3 endpoint is configured in this process (`MLFLOW_S3_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`,
    `AWS_ENDPOINT_URL`), the message names it too, and whether it refuses connections. This runs after
    MLflow's own HTTP retries (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`): the outage is not a blip.
    """
    text = str(error)
    proxied = "/mlflow-artifacts/" in text
    direct = type(error).__name__ in ("EndpointConnectionError", "ConnectTimeoutError")  # botocore, S3 direct
    if not (proxied or direct):
        return None
    endpoint = next((os.environ[v] for v in S3_ENDPOINT_VARS if os.environ.get(v)), None)
    down = ""
    if endpoint:  # SeaweedFS, MinIO... keep the port open while their backends are gone: name it either way
        down = f"; S3 endpoint {endpoint} " + ("refuses connections" if _refuses_connections(endpoint)
                                              else "accepts connections but fails requests")
    if direct:
        where = f"the artifact store of {redact_uri(uri)} is unreachable ({text.splitlines()[0][:200]})"
    elif _server_answers(uri):
        where = f"the MLflow server {redact_uri(uri)} could not reach its artifact store"
    else:
        where = f"the MLflow server {redact_uri(uri)} stopped answering"
    return ServiceUnavailable(f"{what} failed: {where}{down}. The run is marked FAILED; registered versions, "
                     "aliases and the data store are unchanged: rerun when the service is back")


@contextmanager
def artifact_store_errors(uri: str, what: str) -> Iterator[None]:
    """Turn an artifact-store outage inside the block into `artifact_store_error`'s one line."""
    try:
        yield
    except Exception as e:
        err = artifact_store_error(uri, e, what)
        if err is None:
            raise
        raise err from e


def get_or_create_experiment(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise UserError(f"MLflow experiment {name!r} is deleted on {redact_uri(uri)}; restore it or set "
                            "tracking.experiment")
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextmanager
def scoped_tracking_uri(uri: str) -> Iterator[None]:
    """`mlflow.set_tracking_uri(uri)` for the block, then the previous global URI and
    `MLFLOW_TRACKING_URI` value back (set_tracking_uri also writes the variable)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_global = getattr(tracking_utils, "_tracking_uri", None)
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_global)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


# ------------------------------------------------------------------------------------ outages during a run
RETRY_VARS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
              "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def retry_plan(budget_s: float) -> dict[str, str]:
    """MLflow's HTTP retry settings for a total budget: back-off 1, 2, 4, ... s (+ up to 1 s of
    jitter each) while the sum stays within `budget_s`, and a request timeout of a quarter of the
    budget (10-120 s). MLflow's defaults (7 retries, factor 2) wait about 4.5 minutes per call."""
    retries = 0
    while retries < 10 and (2 ** (retries + 1) - 1) + (retries + 1) <= budget_s:
        retries += 1
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(min(120.0, max(10.0, budget_s / 4))))}


@contextmanager
def retry_budget(budget_s: float) -> Iterator[Any]:
    """MLflow requests inside the block give up after about `budget_s` seconds of retries
    (`retry_plan`; a variable already set in the environment wins). Yields `give_up()`: once a
    request failed for the whole budget the service is known to be down, and the calls that
    record the failure (flush, error tag, end of the run) get one attempt each instead of
    another budget each. The variables are restored afterwards."""
    saved = {k: os.environ.get(k) for k in RETRY_VARS}
    for key, value in retry_plan(budget_s).items():
        if saved[key] is None:
            os.environ[key] = value

    def give_up() -> None:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"

    try:
        yield give_up
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


OUTAGE_MARKERS = ("Max retries exceeded", "Connection refused", "ConnectionError", "ConnectTimeout",
                  "Read timed out", "RemoteDisconnected", "error responses", "503", "502", "504",
                  "TEMPORARILY_UNAVAILABLE", "Failed to establish a new connection")


def mlflow_outage(uri: str, error: BaseException, what: str) -> ServiceUnavailable | None:
    """A one-line `ServiceUnavailable` when `error` is the MLflow server (or its database) being
    unavailable after the retries, else None. The retries already ran: this is not a blip."""
    if isinstance(error, ServiceUnavailable):
        return error
    text = str(error)
    name = type(error).__name__
    if not (name in ("MlflowException", "RestException", "ConnectionError", "RetryError", "MaxRetryError")
            and any(m in text for m in OUTAGE_MARKERS)):
        return None
    reason = next((m for m in OUTAGE_MARKERS if m in text), "no answer")
    if "error responses" in text:
        code = text.split("too many ", 1)[-1].split(" error responses", 1)[0]
        reason = f"HTTP {code} (its database or artifact store is down?)"
    elif reason in ("503", "502", "504"):
        reason = f"HTTP {reason}"
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    return ServiceUnavailable(f"{what} failed: the MLflow server {redact_uri(uri)} is unavailable ({reason}; "
                              f"gave up after {retries} retries). Registered versions and aliases are unchanged: "
                              "rerun when the service is back (a named run resumes from its checkpoint)")
