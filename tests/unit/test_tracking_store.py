"""The embedded MLflow store is MLflow's own default (./mlflow.db); an older ./mlruns.db is moved or named."""

import logging

import pytest

from imagegen import tracking


@pytest.fixture(autouse=True)
def no_global_uri():
    """configure() sets MLflow's process-wide URI, which wins over the variable: reset it around each test."""
    import mlflow

    mlflow.set_tracking_uri(None)
    yield
    mlflow.set_tracking_uri(None)


def test_embedded_store_is_mlflows_default(tmp_path, monkeypatch):
    from mlflow.store.tracking import DEFAULT_TRACKING_URI

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert DEFAULT_TRACKING_URI == f"sqlite:///{tracking.EMBEDDED_DB}"
    assert tracking.configure(tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"


def test_an_old_store_is_moved_once_and_then_named(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlruns.db").write_bytes(b"old runs")
    with caplog.at_level(logging.WARNING):
        tracking.configure(tmp_path)
    assert (tmp_path / "mlflow.db").read_bytes() == b"old runs" and not (tmp_path / "mlruns.db").exists()
    assert [r.getMessage() for r in caplog.records] == [
        f"moved the MLflow store {tmp_path}/mlruns.db to {tmp_path}/mlflow.db, where MLflow looks by default"]
    caplog.clear()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlruns.db").write_bytes(b"older runs")
    with caplog.at_level(logging.WARNING):
        tracking.configure(tmp_path)
    assert (tmp_path / "mlflow.db").read_bytes() == b"old runs" and (tmp_path / "mlruns.db").exists()
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}/mlruns.db is no longer used (the store is {tmp_path}/mlflow.db); to see its runs: "
        f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlruns.db"]


def test_a_tracking_server_leaves_local_files_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    (tmp_path / "mlruns.db").write_bytes(b"old runs")
    assert tracking.configure(tmp_path) == "http://127.0.0.1:9"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlruns.db"]
