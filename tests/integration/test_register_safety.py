"""The register stage cannot leave the registry half-done or be raced, against real MLflow stores:
killed between any two of its steps, the next run leaves every alias on a version with a recorded
decision; two clones (two "machines": separate temp folders, different URI spellings) registering
against one server take turns through the Prefect API; an older-data candidate never becomes champion."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from imagegen import tracking
from imagegen.config import load_config
from imagegen.registry import DATA_NUMBER_TAG, DECISION_TAG, REGISTRATION_TAG, registry_lock, store_key
from imagegen.report import champion_metrics
from tests.helpers import cli_env, make_project
from tests.integration.test_registry import register

pytestmark = pytest.mark.slow

GAN, VAE = "fashion-mnist-gan", "fashion-mnist-vae"
STEPS = ("version", "card", "decision", "challenger", "champion")


@pytest.fixture
def sqlite_store(tmp_path) -> str:
    (tmp_path / "a").mkdir()
    uri = tracking.embedded_uri(tmp_path / "a")
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def with_data_number(root: Path, number: int) -> Path:
    (root / "metrics" / "drift.json").write_text(json.dumps({"lineage": {DATA_NUMBER_TAG: number}}))
    return root


def registry_state(name: str) -> tuple[dict[str, int], dict[int, dict]]:
    client = MlflowClient()
    aliases = {alias: int(v) for alias, v in client.get_registered_model(name).aliases.items()}
    return aliases, {int(v.version): v.tags for v in client.search_model_versions(f"name = '{name}'")}


def assert_consistent(name: str) -> None:
    """Every alias is on a version whose decision is recorded; champion only on a promoted one."""
    aliases, tags = registry_state(name)
    for alias, version in aliases.items():
        assert DECISION_TAG in tags[version], f"{name}@{alias} -> v{version} has no recorded decision: {tags[version]}"
    if "champion" in aliases:
        assert tags[aliases["champion"]][DECISION_TAG] == "promoted", tags[aliases["champion"]]


def running_runs(uri: str) -> list[str]:
    client = MlflowClient(tracking_uri=uri)
    return [run.info.run_name for exp in client.search_experiments()
            for run in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")]


@pytest.mark.parametrize("step", STEPS)
def test_a_register_killed_at_any_step_is_finished_by_the_next_run(tmp_path, sqlite_store, step):
    register(make_project(tmp_path / "a", seed=0, fid={"gan": 30.0, "vae": 40.0}))
    better = make_project(tmp_path / "b", seed=1, fid={"gan": 20.0, "vae": 30.0})
    killed = subprocess.run(["imagegen", "register"], cwd=better, capture_output=True, text=True, timeout=300,
                            env=cli_env(sqlite_store, IMAGEGEN_FAULT=f"register:{step}"))
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert f"register:{step}: killing this process" in killed.stderr
    assert_consistent(GAN)
    aliases, tags = registry_state(GAN)
    assert tags[2][REGISTRATION_TAG] == "pending"  # v2 exists, unfinished
    if step in ("version", "card", "decision"):
        assert aliases == {"champion": 1, "challenger": 1}
    assert "register" in running_runs(sqlite_store)  # the killed process could not end its run

    decisions = register(better)  # the next run finishes v2, and closes the dead process's run
    assert decisions["gan"]["version"] == 2 and decisions["gan"]["promoted"], decisions["gan"]
    for name in (GAN, VAE):
        assert_consistent(name)
        aliases, tags = registry_state(name)
        assert aliases == {"champion": 2, "challenger": 2} and sorted(tags) == [1, 2]
        assert all(t[REGISTRATION_TAG] == "complete" for t in tags.values() if REGISTRATION_TAG in t)
    assert registry_state(GAN)[1][2]["champion_before"] == "1"
    assert running_runs(sqlite_store) == []


def test_a_stale_recorded_decision_is_decided_again(tmp_path, sqlite_store):
    """Killed after deciding against v1; meanwhile v3 became champion: v2 is judged against v3, not v1."""
    register(make_project(tmp_path / "a", seed=0, fid={"gan": 30.0, "vae": 40.0}))
    second = make_project(tmp_path / "b", seed=1, fid={"gan": 20.0, "vae": 30.0})
    killed = subprocess.run(["imagegen", "register"], cwd=second, capture_output=True, text=True, timeout=300,
                            env=cli_env(sqlite_store, IMAGEGEN_FAULT="register:decision"))
    assert killed.returncode == -9 and registry_state(GAN)[1][2][DECISION_TAG] == "promoted"
    register(make_project(tmp_path / "c", seed=2, fid={"gan": 10.0, "vae": 20.0}))
    assert registry_state(GAN)[0]["champion"] == 3
    decisions = register(second)
    assert not decisions["gan"]["promoted"] and decisions["gan"]["champion_before"] == 3
    aliases, tags = registry_state(GAN)
    assert aliases == {"champion": 3, "challenger": 2} and tags[2][DECISION_TAG] == "kept"
    assert tags[2]["champion_before"] == "3"


def test_an_older_data_candidate_never_becomes_champion(tmp_path, sqlite_store):
    register(with_data_number(make_project(tmp_path / "a", seed=0, fid={"gan": 30.0, "vae": 40.0}), 5))
    older = with_data_number(make_project(tmp_path / "b", seed=1, fid={"gan": 1.0, "vae": 1.0}), 4)
    decisions = register(older)
    for kind, name in (("gan", GAN), ("vae", VAE)):
        assert not decisions[kind]["promoted"], decisions[kind]
        assert "data version 4, older than the champion's data version 5" in decisions[kind]["reason"]
        assert registry_state(name)[0] == {"champion": 1, "challenger": 2}
    written = json.loads((older / "metrics" / "register.json").read_text())
    assert "older than the champion's data version 5" in written["gan"]["reason"]
    card = MlflowClient().get_model_version(GAN, "2").description
    assert "older than the champion's data version 5" in card
    assert registry_state(GAN)[1][2][DATA_NUMBER_TAG] == "4"

    same = with_data_number(make_project(tmp_path / "c", seed=2, fid={"gan": 10.0, "vae": 10.0}), 5)
    assert register(same)["gan"]["promoted"]
    unnumbered = make_project(tmp_path / "d", seed=3, fid={"gan": 5.0, "vae": 5.0})  # no drift.json: as before
    assert register(unnumbered)["gan"]["promoted"]


def test_the_report_shows_every_metric_of_the_champion(tmp_path, sqlite_store):
    register(make_project(tmp_path / "a", seed=0, fid={"gan": 30.0, "vae": 40.0}))
    root = make_project(tmp_path / "b", seed=1, fid={"gan": 31.0, "vae": 41.0})
    register(root)
    registered = json.loads((root / "metrics" / "register.json").read_text())
    shown = champion_metrics(load_config(root / "params.yaml"), root, registered)
    assert shown["gan"]["metrics"]["fid"] == 30.0 and shown["gan"]["metrics"]["kid_mean"] == 0.03
    assert shown["vae"]["metrics"]["precision"] == 0.7


def gcl_name(uri: str) -> str:
    return f"imagegen-register-{hashlib.sha256(store_key(uri).encode()).hexdigest()[:16]}"


def test_two_clones_on_two_machines_register_one_at_a_time(tmp_path, tracking_server, prefect_server, monkeypatch):
    """Separate TMPDIRs (so the host-local file locks differ, as on two machines) and two spellings of the
    server's URI: only the Prefect global concurrency limit can serialise them."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    url, env = prefect_server
    monkeypatch.setenv("PREFECT_API_URL", url)
    client = MlflowClient(tracking_uri=tracking_server)
    for name in (GAN, VAE):
        if client.search_model_versions(f"name = '{name}'"):
            client.delete_registered_model(name)
    spellings = [tracking_server, tracking_server.replace("127.0.0.1", "localhost") + "/"]
    clones = [make_project(tmp_path / c, seed=s, fid={"gan": f, "vae": f}) for c, s, f in (("x", 0, 30.0), ("y", 1, 20.0))]
    logs = [tmp_path / "x.log", tmp_path / "y.log"]
    with temporary_settings({PREFECT_API_URL: url, PREFECT_HOME: str(tmp_path / "home")}):
        with registry_lock(tracking_server):  # create the limit, then hold its slot while both clones start
            procs = []
            for root, log, uri in zip(clones, logs, spellings):
                (root / "tmp").mkdir()
                with log.open("w") as out:
                    procs.append(subprocess.Popen(["imagegen", "register"], cwd=root, stdout=out,
                                                  stderr=subprocess.STDOUT,
                                                  env=cli_env(uri, **env, TMPDIR=str(root / "tmp"))))
            deadline = time.monotonic() + 120
            while not all(f"waiting for another registration to finish (Prefect global concurrency limit "
                          f"{gcl_name(tracking_server)}" in log.read_text() for log in logs):
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                    [log.read_text()[-2000:] for log in logs]
                time.sleep(0.5)
    assert [p.wait(300) for p in procs] == [0, 0], [log.read_text()[-3000:] for log in logs]
    runs = sorted((r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                   if r.info.run_name == "register"), key=lambda r: r.info.start_time)
    assert len(runs) == 2 and runs[0].info.end_time <= runs[1].info.start_time  # one after the other
    first, second = sorted((json.loads((root / "metrics" / "register.json").read_text())["gan"] for root in clones),
                           key=lambda d: d["version"])
    assert first["champion_before"] is None and second["champion_before"] == first["version"]
    assert int(client.get_registered_model(GAN).aliases["champion"]) in (first["version"], second["version"])
