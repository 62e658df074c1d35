"""Helpers of infra/local-stack.sh (and of the compose/Kubernetes health checks): provisioning,
health checks that touch the databases, credential changes.

Every secret comes from the environment, never from the command line (`ps` shows arguments
to every local user). Exit codes: 0 ok, 2 bad configuration, 3 a service is unavailable.

    stackctl.py check-secrets [--insecure-dev] NAME...   placeholder / development / short values refused
    stackctl.py scram                                     SCRAM-SHA-256 verifier of $PASSWORD (for ALTER ROLE)
    stackctl.py pg-setup                                  roles + databases ($SSLFLOW_PG_SERVICES), as superuser
    stackctl.py pg-check [DB]                             a real query (libpq's PG* variables)
    stackctl.py pg-set-password ROLE                      ALTER ROLE ... PASSWORD <verifier of $NEW_PASSWORD>
    stackctl.py s3-check | s3-buckets BUCKET...           an authenticated ListBuckets | create + write/delete
    stackctl.py mlflow-check                              an authenticated API call that reads the database
    stackctl.py mlflow-ensure-user                        create $MLFLOW_NEW_USER (or set its password), as admin
    stackctl.py mlflow-set-password                       $MLFLOW_USER's password $MLFLOW_PASSWORD -> $NEW_PASSWORD
    stackctl.py prefect-check                             /api/ready (database) + an authenticated call
    stackctl.py prefect-worker POOL                       a worker of POOL heartbeats (ONLINE)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import sys
import urllib.error
import urllib.request

PLACEHOLDERS = ("change-me", "changeme", "sslflow-dev")  # anywhere in the value
WELL_KNOWN = {"password", "password1234", "admin", "secret", "minioadmin", "postgres", "sslflow"}  # the whole value
MIN_LENGTH = {"S3_ACCESS_KEY": 8}
DEFAULT_MIN_LENGTH = 12


def fail(code: int, msg: str) -> int:
    print(msg, file=sys.stderr)
    return code


# ------------------------------------------------------------------------------------ secrets
def check_secrets(names: list[str], insecure_dev: bool) -> int:
    problems = []
    for name in names:
        value = os.environ.get(name, "")
        low = value.lower()
        if not value:
            problems.append(f"{name} is empty")
        elif any(p in low for p in PLACEHOLDERS) or low in WELL_KNOWN:
            problems.append(f"{name} is a placeholder or development value")
        elif len(value) < MIN_LENGTH.get(name, DEFAULT_MIN_LENGTH):
            problems.append(f"{name} is shorter than {MIN_LENGTH.get(name, DEFAULT_MIN_LENGTH)} characters")
    if not problems:
        return 0
    if insecure_dev:
        print(f"warning: insecure development secrets accepted (--insecure-dev): {'; '.join(problems)}",
              file=sys.stderr)
        return 0
    return fail(2, "refusing placeholder or development secrets: " + "; ".join(problems)
                + " (set real values in the env file, e.g. `openssl rand -hex 24`; for a throw-away local "
                "stack pass --insecure-dev)")


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier: what `ALTER ROLE ... PASSWORD` stores. Sending it
    instead of the password keeps the password out of the server's logs."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


# ------------------------------------------------------------------------------------ PostgreSQL
def pg_connect(dbname: str):
    import psycopg2

    return psycopg2.connect(dbname=dbname, connect_timeout=5)  # host, port, user, password: PG* variables


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


OWNERSHIP_SQL = """
DO $$
DECLARE r record; target oid := (SELECT oid FROM pg_roles WHERE rolname = %(role)s);
BEGIN
  FOR r IN SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
           ORDER BY c.relkind = 'S'
  LOOP
    IF (SELECT relowner FROM pg_class WHERE oid = r.oid) <> target
       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = r.oid AND d.deptype IN ('a', 'i')
                       AND d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass) THEN
      EXECUTE format('ALTER %%s %%s OWNER TO %%I',
                     CASE r.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                    WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END,
                     r.oid::regclass, %(role)s);
    END IF;
  END LOOP;
  FOR r IN SELECT t.oid FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
           WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd', 'r') AND t.typowner <> target
  LOOP
    EXECUTE format('ALTER TYPE %%s OWNER TO %%I', r.oid::regtype, %(role)s);
  END LOOP;
END $$;
"""


def pg_setup() -> int:
    """One plain role per service database, owning only that database (and what is in it).

    $SSLFLOW_PG_SERVICES: "database:role:PASSWORD_VARIABLE ..."; each role: LOGIN, no superuser,
    no CREATEDB/CREATEROLE/replication, not in pg_execute_server_program; each database:
    CONNECT revoked from PUBLIC and granted to its role. Objects an older stack created as the
    superuser are handed to the role. Idempotent (every `up` runs it)."""
    from psycopg2 import sql

    services = [s.split(":") for s in os.environ["SSLFLOW_PG_SERVICES"].split()]
    try:
        conn = pg_connect("postgres")
    except Exception as e:
        return fail(3, f"PostgreSQL: cannot connect as the superuser: {first_line(e)}")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("REVOKE CONNECT ON DATABASE postgres FROM PUBLIC")
        for db, role, var in services:
            password = os.environ.get(var, "")
            if not password:
                return fail(2, f"{var} is empty")
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
            cur.execute(sql.SQL("ALTER ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                                "NOBYPASSRLS CONNECTION LIMIT 100 PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(scram_verifier(password))))
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(role)))
            cur.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(db), sql.Identifier(role)))
            cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(db)))
            cur.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(
                sql.Identifier(db), sql.Identifier(role)))
    conn.close()
    for db, role, _ in services:
        c = pg_connect(db)
        c.autocommit = True
        with c.cursor() as cur:
            cur.execute(OWNERSHIP_SQL, {"role": role})
        c.close()
    return 0


def pg_check(db: str) -> int:
    try:
        conn = pg_connect(db)
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()
        conn.close()
    except Exception as e:
        return fail(3, f"database unreachable: {first_line(e)}")
    print("database ok")
    return 0


def pg_set_password(role: str) -> int:
    from psycopg2 import sql

    new = os.environ.get("NEW_PASSWORD", "")
    if not new:
        return fail(2, "NEW_PASSWORD is empty")
    try:
        conn = pg_connect("postgres")
    except Exception as e:
        return fail(3, f"PostgreSQL: cannot connect with the current password: {first_line(e)}")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role),
                                                                sql.Literal(scram_verifier(new))))
    conn.close()
    return 0


# ------------------------------------------------------------------------------------ S3
def s3_client():
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT"], aws_access_key_id=os.environ["S3_ACCESS_KEY"],
                        aws_secret_access_key=os.environ["S3_SECRET_KEY"],
                        region_name=os.environ.get("S3_REGION", "us-east-1"),
                        config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}))


def s3_check() -> int:
    try:
        names = sorted(b["Name"] for b in s3_client().list_buckets().get("Buckets", []))
    except Exception as e:
        return fail(3, f"S3 unusable: {first_line(e)}")
    print("buckets " + " ".join(names))
    return 0


def s3_buckets(buckets: list[str]) -> int:
    s3 = s3_client()
    try:
        names = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for bucket in buckets:
            if bucket not in names:
                s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key=".sslflow-stack-check", Body=b"ok")
            s3.delete_object(Bucket=bucket, Key=".sslflow-stack-check")
    except Exception as e:
        return fail(3, f"S3 buckets: {first_line(e)}")
    return 0


# ------------------------------------------------------------------------------------ HTTP
def http(method: str, url: str, user: str | None = None, password: str | None = None, body: dict | None = None,
         timeout: float = 5.0) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return 0, first_line(e)


def mlflow_check() -> int:
    """An authenticated experiments search: reads the auth database (the user) and the tracking
    database; /health answers 200 with both down."""
    url = os.environ["MLFLOW_URL"].rstrip("/")
    status, body = http("GET", f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
                        os.environ["MLFLOW_USER"], os.environ["MLFLOW_PASSWORD"])
    if status == 200:
        print("database ok")
        return 0
    if status == 0:
        return fail(3, f"no answer ({body})")
    return fail(3, f"HTTP {status} from an API call that reads the database: {body.strip()[:200]}")


def mlflow_ensure_user() -> int:
    url = os.environ["MLFLOW_URL"].rstrip("/")
    admin = (os.environ["MLFLOW_ADMIN_USER"], os.environ["MLFLOW_ADMIN_PASSWORD"])
    user, password = os.environ["MLFLOW_NEW_USER"], os.environ["MLFLOW_NEW_PASSWORD"]
    status, _ = http("GET", f"{url}/api/2.0/mlflow/users/get?username={urllib.request.quote(user)}", *admin)
    if status == 200:
        status, body = http("PATCH", f"{url}/api/2.0/mlflow/users/update-password", *admin,
                            body={"username": user, "password": password})
    else:
        status, body = http("POST", f"{url}/api/2.0/mlflow/users/create", *admin,
                            body={"username": user, "password": password})
    if status != 200:
        return fail(3, f"MLflow user {user}: HTTP {status}: {body.strip()[:200]}")
    return 0


def mlflow_set_password() -> int:
    url = os.environ["MLFLOW_URL"].rstrip("/")
    user = os.environ["MLFLOW_USER"]
    status, body = http("PATCH", f"{url}/api/2.0/mlflow/users/update-password", user, os.environ["MLFLOW_PASSWORD"],
                        body={"username": user, "password": os.environ["NEW_PASSWORD"],
                              "current_password": os.environ["MLFLOW_PASSWORD"]})
    if status != 200:
        return fail(3, f"MLflow: changing the password of {user}: HTTP {status}: {body.strip()[:200]}")
    return 0


def _prefect_auth() -> tuple[str | None, str | None]:
    auth = os.environ.get("PREFECT_AUTH", "")
    if not auth:
        return None, None
    user, _, password = auth.partition(":")
    return user, password


def prefect_check() -> int:
    api = os.environ["PREFECT_API"].rstrip("/")
    status, body = http("GET", f"{api}/ready")  # unauthenticated by design; SELECT 1 on the database
    if status != 200:
        return fail(3, f"/api/ready: HTTP {status}: {body.strip()[:200]}" if status else f"no answer ({body})")
    status, body = http("POST", f"{api}/flows/filter", *_prefect_auth(), body={"limit": 1})
    if status != 200:
        return fail(3, f"HTTP {status} from an authenticated API call: {body.strip()[:200]}")
    print("database ok")
    return 0


def prefect_worker(pool: str) -> int:
    api = os.environ["PREFECT_API"].rstrip("/")
    status, body = http("POST", f"{api}/work_pools/{pool}/workers/filter", *_prefect_auth(), body={})
    if status != 200:
        return fail(3, f"HTTP {status}: {body.strip()[:200]}")
    online = [w for w in json.loads(body) if w.get("status") == "ONLINE"]
    if not online:
        return fail(3, f"no ONLINE worker in pool {pool}")
    print(f"online: {', '.join(w['name'] for w in online)}")
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "check-secrets":
        insecure = "--insecure-dev" in args
        return check_secrets([a for a in args if a != "--insecure-dev"], insecure)
    if cmd == "scram":
        print(scram_verifier(os.environ["PASSWORD"]))
        return 0
    simple = {"pg-setup": pg_setup, "s3-check": s3_check, "mlflow-check": mlflow_check,
              "mlflow-ensure-user": mlflow_ensure_user, "mlflow-set-password": mlflow_set_password,
              "prefect-check": prefect_check}
    if cmd in simple:
        return simple[cmd]()
    if cmd == "pg-check":
        return pg_check(args[0] if args else "postgres")
    if cmd == "pg-set-password":
        return pg_set_password(args[0])
    if cmd == "s3-buckets":
        return s3_buckets(args)
    if cmd == "prefect-worker":
        return prefect_worker(args[0])
    return fail(2, f"unknown command {cmd}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
