import subprocess
import sys

import pytest

HEAVY = ("torch", "great_expectations", "pandas", "numpy", "mlflow", "prefect", "dvc")


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "imagegen.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_help_imports_nothing_heavy():
    code = ("import sys, imagegen.cli as c; c.build_parser().format_help(); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    help_text = run_cli("--help").stdout
    for stage in ("fetch", "prepare", "validate"):
        assert stage in help_text


def test_bad_params_is_one_line_and_non_zero(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  retries: lots\n")
    result = run_cli("fetch", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "imagegen fetch: error: params.yaml: data.retries: Input should be a valid integer (got 'lots')"
    ]
    assert not (tmp_path / "data").exists()


def test_stage_failure_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(f"data:\n  sources: [{tmp_path / 'none'}]\n")
    result = run_cli("fetch", cwd=tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "no such folder" in errors[0]
    assert "Traceback" not in result.stderr
    assert list((tmp_path / "data").iterdir()) == []


def test_unavailable_device_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "params.yaml").write_text("train:\n  device: cuda\n")
    result = run_cli("train-gan", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "imagegen train-gan: error: params.yaml train.device: 'cuda' is not available on this machine; use auto or cpu"
    ]


def test_a_password_in_a_tracking_uri_is_never_printed(tmp_path):
    import os
    import socket

    with socket.socket() as sock:  # a port nothing listens on: the server "is down"
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://team:s3cret-pw@127.0.0.1:{port}"}
    result = subprocess.run([sys.executable, "-m", "imagegen.cli", "sample", "--model", "models:/m@champion",
                             "--out", "x.npy"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert f"http://team:***@127.0.0.1:{port}" in result.stderr.strip().splitlines()[-1]
