"""The registration lock: one key per tracking store whatever its spelling, and a timeout with a one-line error."""

from __future__ import annotations

import fcntl
import time

import pytest

from imagegen.errors import ImagegenError
from imagegen.registry import LOCK_TIMEOUT_ENV, lock_path, registry_lock, store_key


def test_one_store_one_key_whatever_the_spelling(tmp_path, monkeypatch):
    assert store_key("http://localhost:5000/") == store_key("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert store_key("HTTP://user:secret@LOCALHOST:5000") == "http://127.0.0.1:5000"  # no credentials in the key
    assert store_key("https://mlflow.example.com/") == "https://mlflow.example.com:443"
    assert store_key("postgresql+psycopg2://u:p@db/mlflow") == store_key("postgresql://db:5432/mlflow/")
    monkeypatch.chdir(tmp_path)
    assert store_key("sqlite:///mlflow.db") == store_key(f"sqlite:///{tmp_path}/./x/../mlflow.db")
    assert store_key("sqlite:///mlflow.db") == f"sqlite://{tmp_path}/mlflow.db"
    assert store_key("http://127.0.0.1:5000") != store_key("http://127.0.0.1:5001")
    assert lock_path("http://localhost:5000/") == lock_path("http://127.0.0.1:5000")


def test_a_held_lock_times_out_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "0.5")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with lock_path(uri).open("a") as other:
        fcntl.flock(other, fcntl.LOCK_EX)  # another registrar holds it
        started = time.monotonic()
        with pytest.raises(ImagegenError) as caught, registry_lock(uri):
            pass
        assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "\n" not in message and "more than 0.5 s" in message and str(lock_path(uri)) in message
    assert LOCK_TIMEOUT_ENV in message
    with registry_lock(uri):  # released: free again
        pass


@pytest.mark.parametrize("value", ["soon", "0", "-3", "inf"])
def test_a_bad_timeout_is_refused(value, monkeypatch):
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, value)
    with pytest.raises(ImagegenError, match=f"{LOCK_TIMEOUT_ENV}='{value}': expected a positive number"):
        with registry_lock("sqlite:///x.db"):
            pass
