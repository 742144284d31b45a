"""Real servers on 127.0.0.1: one `mlflow server` for the whole session (registry and serving tests),
and a `prefect server start` per test that needs one."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port, mlflow_server, start, stop


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    proc, url = mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield url
    stop(proc)


@pytest.fixture
def prefect_server(tmp_path: Path):
    """A real `prefect server start` on loopback (own PREFECT_HOME, fast scheduler); yields (url, client env)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    server_env = dict(base, PREFECT_HOME=str(tmp_path / "server-home"), PREFECT_UI_ENABLED="false",
                      PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5")
    server = start([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                    "--port", str(port)], tmp_path / "server.log", f"{url}/health", env=server_env)
    yield url, dict(base, PREFECT_HOME=str(tmp_path / "client-home"), PREFECT_API_URL=url)
    drain_prefect_workers()
    stop(server)


def drain_prefect_workers() -> None:
    """Stop this process's Prefect event and log workers: they are singletons that keep the API URL they
    started with, so a test that talked to this server in-process (a concurrency slot emits events) would
    otherwise leave a later test's events going to a server that is gone, and its task runs unrecorded."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=30)
    APILogWorker.drain_all(timeout=30)
