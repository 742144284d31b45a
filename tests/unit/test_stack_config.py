"""The team stack's state without servers: generated credentials, the env file, one-line errors."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from pipelines.stack import Stack, StackError, write_env_file
from tests.conftest import REPO_ROOT


@pytest.fixture
def stack_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEGEN_STACK_DIR", str(tmp_path / ".stack"))
    return tmp_path / ".stack"


def test_first_load_generates_private_credentials_once(stack_dir, monkeypatch):
    monkeypatch.setenv("IMAGEGEN_STACK_PORT_MLFLOW", "5123")
    first = Stack.load(create=True)
    assert (stack_dir / "config.json").stat().st_mode & 0o777 == 0o600
    assert first.port("mlflow") == 5123 and first.url("prefect").endswith("/api")
    assert len({first.config[k] for k in ("postgres_password", "s3_secret_key", "mlflow_password")}) == 3
    monkeypatch.setenv("IMAGEGEN_STACK_PORT_MLFLOW", "5999")  # kept from the first start, not re-read
    again = Stack.load()
    assert again.config == first.config and again.port("mlflow") == 5123

    path = write_env_file(again)
    assert path.stat().st_mode & 0o777 == 0o600
    exported = dict(shlex.split(line[len("export "):])[0].split("=", 1)
                    for line in path.read_text().splitlines() if line.startswith("export "))
    assert exported["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5123"
    assert exported["MLFLOW_TRACKING_PASSWORD"] == first.config["mlflow_password"]
    assert exported["AWS_SECRET_ACCESS_KEY"] == first.config["s3_secret_key"]


def test_bad_port_and_missing_stack_are_one_line_errors(stack_dir, monkeypatch):
    monkeypatch.setenv("IMAGEGEN_STACK_PORT_S3", "http")
    with pytest.raises(StackError, match=r"IMAGEGEN_STACK_PORT_S3='http': expected a port number"):
        Stack.load(create=True)
    assert not (stack_dir / "config.json").exists()
    done = subprocess.run([sys.executable, "-m", "pipelines.stack", "status"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == f"stack status: error: no stack at {stack_dir} (run: python -m pipelines.stack up)"
