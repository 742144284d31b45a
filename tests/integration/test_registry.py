"""Registration, promotion and loading by alias against real MLflow stores (embedded SQLite and a server)."""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import http.server
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from imagegen import tracking
from imagegen.config import load_config
from imagegen.errors import ImagegenError
from imagegen.evaluation.sampling import generate
from imagegen.models.io import load_model
from imagegen.registry_reader import load_registered
from imagegen.registry import lock_path, run_register
from tests.helpers import cli_env, free_port, make_project

pytestmark = pytest.mark.slow

GAN, VAE = "fashion-mnist-gan", "fashion-mnist-vae"


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """A migrated, empty MLflow SQLite database: copying it skips the ~8 s of migrations per test."""
    path = tmp_path_factory.mktemp("template") / tracking.EMBEDDED_DB
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def server_store(tracking_server) -> str:
    """The shared tracking server, with this module's registered models removed."""
    client = MlflowClient(tracking_uri=tracking_server)
    for name in (GAN, VAE):
        if client.search_model_versions(f"name = '{name}'"):
            client.delete_registered_model(name)
    mlflow.set_tracking_uri(tracking_server)
    yield tracking_server
    mlflow.set_tracking_uri(None)


@pytest.fixture(params=["sqlite", "server"])
def store(request, tmp_path, sqlite_template) -> str:
    """The tracking URI the tests' projects use: the embedded default of tmp_path/a, or the shared server.

    Projects live in tmp_path/a, tmp_path/b, ...; with the embedded store they share tmp_path/a's database."""
    if request.param == "server":
        yield request.getfixturevalue("server_store")
        return
    (tmp_path / "a").mkdir()
    shutil.copy(sqlite_template, tmp_path / "a" / tracking.EMBEDDED_DB)
    uri = tracking.embedded_uri(tmp_path / "a")
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def register(root: Path) -> dict:
    return run_register(load_config(root / "params.yaml"), root).decisions


def aliases(name: str) -> dict[str, int]:
    model = MlflowClient().get_registered_model(name)
    return {alias: int(version) for alias, version in model.aliases.items()}


def versions(name: str) -> dict[int, object]:
    return {int(v.version): v for v in MlflowClient().search_model_versions(f"name = '{name}'")}


def run_cli(root: Path, uri: str | None, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["imagegen", *args], cwd=root, env=cli_env(uri, **env), capture_output=True, text=True,
                          timeout=180)


def error_line(stderr: str, command: str) -> str:
    """The CLI's one-line error: exactly one, and no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"imagegen {command}: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def same_weights(module: torch.nn.Module, folder: Path) -> bool:
    reference, _ = load_model(folder)
    a, b = module.state_dict(), reference.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_register_promote_refuse_rerun_and_load(tmp_path, store):
    first = make_project(tmp_path / "a", seed=0, fid={"gan": 30.0, "vae": 40.0})
    decisions = register(first)
    assert decisions["gan"]["promoted"] and decisions["gan"]["version"] == 1
    assert decisions["gan"]["champion_before"] is None and decisions["gan"]["champion_after"] == 1
    assert aliases(GAN) == {"champion": 1, "challenger": 1} and aliases(VAE) == {"champion": 1, "challenger": 1}
    tags = versions(GAN)[1].tags
    assert tags["metric.fid"] == "30.0" and float(tags["metric.kid_mean"]) == 0.03 and "metric.sampler" not in tags
    assert tags["decision"] == "promoted" and len(tags["weights_sha256"]) == 64
    assert {"git_commit", "params_hash", "dvc_data_md5", "training_run_id"} <= tags.keys()
    assert "register run" in tags["training_run_source"]  # nothing tagged these weights as a training run
    assert json.loads((first / "metrics" / "register.json").read_text())["gan"]["version"] == 1

    again = register(first)  # same weights: nothing new
    assert not again["gan"]["new_version"] and again["gan"]["version"] == 1 and "unchanged" in again["gan"]["reason"]
    assert list(versions(GAN)) == [1] and list(versions(VAE)) == [1]

    # Worse GAN, VAE better by less than the 1 % margin: both stay challengers.
    worse = make_project(tmp_path / "b", seed=1, fid={"gan": 31.0, "vae": 39.8})
    decisions = register(worse)
    assert not decisions["gan"]["promoted"] and not decisions["vae"]["promoted"]
    assert aliases(GAN) == {"champion": 1, "challenger": 2} and aliases(VAE) == {"champion": 1, "challenger": 2}
    assert versions(GAN)[2].tags["decision"] == "kept" and "does not beat" in versions(GAN)[2].description

    # Better GAN, trained by a run that tagged its weights: promoted, and linked to that run.
    better = make_project(tmp_path / "c", seed=2, fid={"gan": 20.0, "vae": 45.0})
    sha = hashlib.sha256((better / "models/gan/weights.pt").read_bytes()).hexdigest()
    experiment = tracking.experiment_id("imagegen-fashion-mnist", tmp_path / "a")
    with mlflow.start_run(experiment_id=experiment, run_name="train-gan", tags={"weights_sha256": sha}) as train_run:
        pass
    decisions = register(better)
    assert decisions["gan"]["promoted"] and decisions["gan"]["champion_before"] == 1
    assert aliases(GAN) == {"champion": 3, "challenger": 3} and aliases(VAE) == {"champion": 1, "challenger": 3}
    assert versions(GAN)[3].tags["training_run_id"] == train_run.info.run_id
    assert versions(GAN)[3].run_id == train_run.info.run_id  # the version page links to the training run
    card = versions(GAN)[3].description
    assert "| fid | lower ↓ | `20` | `30` | **better** |" in card
    assert "| precision | higher ↑ | `0.7` | `0.7` | equal |" in card
    assert "| kid_std |  | `0.001` | `0.001` |  |" in card  # a diagnostic: no direction
    assert "## Params that differ from the champion's" in card and "a register run outside a pipeline" in card
    assert "imagegen pipeline" in MlflowClient().get_registered_model(GAN).description

    module, meta = load_registered(f"models:/{GAN}@champion")
    assert meta.kind == "gan" and same_weights(module, better / "models" / "gan")
    module, _ = load_registered(f"models:/{GAN}/2")
    assert same_weights(module, worse / "models" / "gan")
    with pytest.raises(ImagegenError, match=f"models:/{GAN}@nobody.*{store}"):
        load_registered(f"models:/{GAN}@nobody")
    with pytest.raises(ImagegenError, match=f"no-such-model.*{store}"):
        load_registered("models:/no-such-model@champion")


def test_sample_cli_from_the_registry(tmp_path, store):
    root = make_project(tmp_path / "a", seed=0, fid={"gan": 30.0, "vae": 40.0})
    register(root)
    # The embedded store is the default: the subprocess gets no MLFLOW_TRACKING_URI for it.
    uri = store if store.startswith("http") else None
    done = run_cli(root, uri, "sample", "--model", f"models:/{GAN}@champion", "-n", "16", "--seed", "3",
                   "--out", "x.npy")
    assert done.returncode == 0, done.stderr
    images = np.load(root / "x.npy")
    assert images.shape == (16, 28, 28) and images.dtype == np.uint8
    module, meta = load_model(root / "models" / "gan")
    assert np.array_equal(images, generate(module, meta, 16, seed=3)[:, 0])

    missing = run_cli(root, uri, "sample", "--model", f"models:/{GAN}@nobody", "-n", "1", "--out", "y.npy")
    assert missing.returncode == 1 and not (root / "y.npy").exists()
    line = error_line(missing.stderr, "sample")
    assert f"models:/{GAN}@nobody" in line and store in line


class Planted:
    """A pickle that, when unpickled, leaves a file behind: proof that code from the store ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_replaced_artifact_in_the_store_is_refused_by_sample_and_serve(tmp_path, sqlite_template):
    import pickle

    from tests.helpers import start, stop

    (tmp_path / "a").mkdir()
    shutil.copy(sqlite_template, tmp_path / "a" / tracking.EMBEDDED_DB)
    mlflow.set_tracking_uri(tracking.embedded_uri(tmp_path / "a"))
    try:
        root = make_project(tmp_path / "a", seed=0, fid={"gan": 30.0, "vae": 40.0})
        register(root)
        version = MlflowClient().get_model_version_by_alias(GAN, "champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert len(version.tags["model_sha256"]) == 64
    port = free_port()  # untouched: served
    proc = start(["imagegen", "serve", "--model", f"models:/{GAN}@champion", "--port", str(port)], root / "serve.log",
                 f"http://127.0.0.1:{port}/ping", env=cli_env(None), cwd=root)
    stop(proc)

    stored = [p for p in (root / "mlruns").rglob("python_model.pkl")
              if version.source.rsplit("/", 1)[-1] in str(p) or f"/{version.run_id}/" in str(p)]
    assert len(stored) == 1, stored
    marker = tmp_path / "code-from-the-store-ran"
    stored[0].write_bytes(pickle.dumps(Planted(marker)))
    for args in (("sample", "-n", "4", "--out", "x.npy"), ("serve", "--port", str(free_port()))):
        done = run_cli(root, None, args[0], "--model", f"models:/{GAN}@champion", *args[1:])
        line = error_line(done.stderr, args[0])
        assert done.returncode == 1 and "do not match the model_sha256 recorded at registration" in line, line
    assert not marker.exists() and not (root / "x.npy").exists()

    weights = stored[0].parent / "artifacts" / "gan" / "weights.pt"
    assert weights.is_file(), sorted(stored[0].parent.rglob("*"))
    weights.write_bytes((root / "models" / "vae" / "weights.pt").read_bytes())  # other (valid) weights
    done = run_cli(root, None, "sample", "--model", f"models:/{GAN}@champion", "-n", "4", "--out", "x.npy")
    assert done.returncode == 1 and "refused, nothing loaded" in error_line(done.stderr, "sample")


def test_plain_mlflow_finds_the_embedded_store(tmp_path, sqlite_template, monkeypatch):
    """No tracking URI anywhere: MLflow's own default, as `mlflow models serve` / `mlflow ui` run in the
    project folder resolve it, finds the models the pipeline registered (an old mlruns.db is moved first)."""
    import sys

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = make_project(tmp_path / "p", seed=0, fid={"gan": 30.0, "vae": 40.0})
    shutil.copy(sqlite_template, root / tracking.OLD_EMBEDDED_DB)
    register(root)
    assert not (root / tracking.OLD_EMBEDDED_DB).exists() and (root / "mlflow.db").is_file()
    assert list((root / "mlruns").iterdir())  # artifacts where MLflow puts them by default
    code = ("import mlflow; print(mlflow.get_tracking_uri()); "
            f"print(len(mlflow.pyfunc.load_model('models:/{GAN}@champion').predict({{'n': 3}})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=cli_env(None), capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [f"sqlite:///{root}/mlflow.db", "3"]


def test_server_down_is_one_line_error_and_registers_nothing(tmp_path):
    root = make_project(tmp_path, seed=0, fid={"gan": 30.0, "vae": 40.0})
    uri = f"http://127.0.0.1:{free_port()}"
    done = run_cli(root, uri, "register")
    assert done.returncode == 1
    assert uri in error_line(done.stderr, "register")
    assert not (root / "metrics" / "register.json").exists()


class FailAfter(http.server.ThreadingHTTPServer):
    """A proxy in front of the tracking server that answers 503 to everything once a request
    matching `path_part` has gone through: the server 'dies' midway through a registration."""

    def __init__(self, upstream: str, path_part: str):
        self.upstream, self.path_part, self.broken = urlsplit(upstream).netloc, path_part, False
        super().__init__(("127.0.0.1", 0), ProxyHandler)


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        data = b""
        while size := int(self.rfile.readline().split(b";")[0], 16):
            data += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()
        return data

    def forward(self):
        body = self.body()
        if self.server.broken:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        conn = http.client.HTTPConnection(self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "transfer-encoding", "content-length")}
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if self.server.path_part in self.path and response.status == 200:
            self.server.broken = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward


def test_failure_after_version_created_leaves_no_champion_and_rerun_finishes(tmp_path, server_store):
    store = server_store
    register(make_project(tmp_path / "a", seed=0, fid={"gan": 30.0, "vae": 40.0}))
    proxy = FailAfter(store, "/model-versions/create")
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    proxy_uri = f"http://127.0.0.1:{proxy.server_address[1]}"
    better = make_project(tmp_path / "b", seed=1, fid={"gan": 20.0, "vae": 30.0})
    try:
        done = run_cli(better, proxy_uri, "register", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                       MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    finally:
        proxy.shutdown()
    assert proxy.broken, f"the proxy never saw the version being created: {done.stderr[-3000:]}"
    assert done.returncode == 1 and proxy_uri in error_line(done.stderr, "register")
    half = versions(GAN)[2]
    assert "decision" not in half.tags and half.tags["weights_sha256"]
    assert aliases(GAN) == {"champion": 1, "challenger": 1}, "an unfinished version holds an alias"

    decisions = register(better)  # the server is back: the interrupted version is finished, not duplicated
    assert sorted(versions(GAN)) == [1, 2] and decisions["gan"]["version"] == 2 and decisions["gan"]["promoted"]
    assert aliases(GAN) == {"champion": 2, "challenger": 2} and versions(GAN)[2].tags["decision"] == "promoted"
    assert aliases(VAE) == {"champion": 2, "challenger": 2}


def test_concurrent_registrations_are_serialized_and_the_better_wins(tmp_path, server_store):
    store = server_store
    worse = make_project(tmp_path / "a", seed=0, fid={"gan": 30.0, "vae": 40.0})
    better = make_project(tmp_path / "b", seed=1, fid={"gan": 20.0, "vae": 30.0})
    logs = [tmp_path / "worse.log", tmp_path / "better.log"]
    # Hold the registry lock until both processes wait on it, so that they really run at the same time.
    with lock_path(store).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = []
        for root, log in zip((worse, better), logs):
            with log.open("w") as out:
                procs.append(subprocess.Popen(["imagegen", "register"], cwd=root, env=cli_env(store),
                                              stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 90
        while not all("waiting for another registration" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [l.read_text() for l in logs]
            time.sleep(0.2)
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert [p.wait(120) for p in procs] == [0, 0], [log.read_text() for log in logs]
    for name in (GAN, VAE):
        assert aliases(name)["champion"] == int(versions_by_sha(name, better))
    first, second = sorted((json.loads((root / "metrics" / "register.json").read_text())["gan"]
                            for root in (worse, better)), key=lambda d: d["version"])
    # Serialized: the second saw the first as champion (racing, both would have seen none).
    assert first["champion_before"] is None and second["champion_before"] == first["version"]

def versions_by_sha(name: str, root: Path) -> str:
    kind = name.rsplit("-", 1)[1]
    sha = hashlib.sha256((root / "models" / kind / "weights.pt").read_bytes()).hexdigest()
    return next(v.version for v in versions(name).values() if v.tags["weights_sha256"] == sha)
