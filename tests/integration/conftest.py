"""One real `mlflow server` on 127.0.0.1 for the whole session (registry and serving tests)."""

from __future__ import annotations

import pytest

from tests.helpers import mlflow_server, stop


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    proc, url = mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield url
    stop(proc)
