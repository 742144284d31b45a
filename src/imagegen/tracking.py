"""MLflow set-up: the embedded default store, runs with lineage tags, per-epoch logging.

With MLFLOW_TRACKING_URI unset, runs go to sqlite:///mlruns.db with artifacts in ./mlartifacts
(both beside params.yaml); set the variable to use a tracking server instead.

Run lifecycle: a stage checks the store first (`check_store`: a server that is down fails the
stage in seconds, not after minutes of HTTP retries). Each stage run is tagged with the process
and folder that own it; a RUNNING run whose process is gone (killed) is marked KILLED by the next
stage run in that folder, unless it is being resumed (`stage_run(resume_run_id=...)`), and a stage
that fails ends its run FAILED (KILLED when interrupted).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

from imagegen.errors import ImagegenError

PIPELINE_RUN_ENV = "IMAGEGEN_PIPELINE_RUN"  # set by an orchestrator to group one pipeline run's stages
PARENT_RUN_ENV = "IMAGEGEN_PARENT_RUN_ID"  # an MLflow run id to nest stage runs under
PROCESS_TAG = "imagegen.process"  # host:pid:start-time of the process that owns a RUNNING run
WORKDIR_TAG = "imagegen.workdir"  # the project folder it runs in
DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}

log = logging.getLogger(__name__)


def embedded_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlruns.db').resolve()}"


def configure(root: Path) -> str:
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(embedded_uri(root))  # note: this also sets the variable
    return mlflow.get_tracking_uri()


def experiment_id(name: str, root: Path) -> str:
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    embedded = mlflow.get_tracking_uri() == embedded_uri(root)
    location = (root / "mlartifacts").resolve().as_uri() if embedded else None
    return mlflow.create_experiment(name, artifact_location=location)


def lineage_tags(root: Path, params: dict, device: str) -> dict[str, str]:
    commit = git_commit(root)
    params_hash = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {
        "git_commit": commit,
        "params_hash": params_hash,
        "dvc_data_md5": dvc_out_md5(root, "prepare", "data/prepared"),
        "device": device,
        "pipeline_run": os.environ.get(PIPELINE_RUN_ENV) or f"{commit[:10]}-{params_hash[:8]}",
    }


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def dvc_out_md5(root: Path, stage: str, path: str) -> str:
    """The md5 DVC recorded in dvc.lock for a stage output ('untracked' outside a DVC run)."""
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
        outs = lock["stages"][stage]["outs"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "untracked"
    return next((o.get("md5", "untracked") for o in outs if o.get("path") == path), "untracked")


def check_store(root: Path) -> str:
    """The tracking URI (configured for this project), once its store answers; see check_uri."""
    return check_uri(configure(root))


def check_uri(uri: str, timeout: float = 5.0) -> str:
    """Fail in seconds, naming the URI, when the tracking store does not answer (rather than after
    minutes of MLflow's HTTP retries). http(s): GET /health (any answer below 500 counts: the server
    is up); a database URI: a TCP connection to its host and port; a local SQLite file needs no check."""
    parsed = urllib.parse.urlparse(uri)
    hint = "start it, or unset MLFLOW_TRACKING_URI to use the embedded store"
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise ImagegenError(f"MLflow tracking server {uri} answers HTTP {exc.code} on /health; "
                                    f"expected a healthy server ({hint})") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ImagegenError(f"MLflow tracking server {uri} is not reachable ({reason}); {hint}") from None
        return uri
    port = DB_PORTS.get(parsed.scheme.split("+")[0])
    if port and parsed.hostname:
        try:
            socket.create_connection((parsed.hostname, parsed.port or port), timeout=timeout).close()
        except OSError as exc:
            shown = parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else "")).geturl()
            raise ImagegenError(f"MLflow tracking store {shown} is not reachable ({exc}); {hint}") from None
    return uri


def process_tag(pid: int | None = None) -> str:
    """host:pid:start-time (the start time tells a reused pid from the original process; Linux only)."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{process_start(pid)}"


def process_start(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the command name


def process_gone(tag: str) -> bool:
    """Whether the process a PROCESS_TAG names has ended; a process on another host is never judged gone."""
    try:
        host, pid_text, start = tag.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, under another user
    return bool(start) and process_start(pid) != start


def end_abandoned_runs(client, experiment_id: str, root: Path, keep: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of this folder whose process is gone (killed runs can no longer finish)."""
    workdir = str(root.resolve())
    ended = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if run.info.run_id != keep and tags.get(WORKDIR_TAG) == workdir and process_gone(tags.get(PROCESS_TAG, "")):
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
            log.info("MLflow run %s (%s) was left RUNNING by a process that is gone: marked KILLED",
                     run.info.run_id, run.info.run_name)
    return ended


def resumable_run(client, run_id: str | None, experiment_id: str) -> str | None:
    """run_id when that run can be continued: it exists in this store's experiment and has not finished."""
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    ok = (run.info.experiment_id == experiment_id and run.info.status != "FINISHED"
          and run.info.lifecycle_stage == "active")
    return run_id if ok else None


@contextlib.contextmanager
def stage_run(root: Path, experiment: str, run_name: str, params: dict, tags: dict,
              resume_run_id: str | None = None) -> Iterator[object]:
    """An active MLflow run for one stage, nested under IMAGEGEN_PARENT_RUN_ID when set.

    resume_run_id: continue that run (a resumed training run) if it exists here and has not finished.
    The run ends FINISHED, FAILED on an error, KILLED when interrupted."""
    import mlflow
    from mlflow import MlflowClient

    uri = check_store(root)
    owner = {PROCESS_TAG: process_tag(), WORKDIR_TAG: str(root.resolve())}
    try:
        exp_id = experiment_id(experiment, root)
        client = MlflowClient()
        run_id = resumable_run(client, resume_run_id, exp_id)
        end_abandoned_runs(client, exp_id, root, keep=run_id)
        if run_id:
            run = mlflow.start_run(run_id=run_id)
            mlflow.set_tags({**tags, **owner})
            log.info("continuing MLflow run %s (%s)", run_id, run_name)
        else:
            run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags={**tags, **owner},
                                   parent_run_id=os.environ.get(PARENT_RUN_ENV) or None)
            mlflow.log_params(params)
    except Exception as exc:  # MLflow raises many kinds for an unreachable or broken store
        raise ImagegenError(f"MLflow tracking at {uri} is not usable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    try:
        yield run
    except BaseException as exc:
        end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    end_run("FINISHED")


def end_run(status: str) -> None:
    """End the active run; a store that fails now is not worth hiding the stage's own error for."""
    import mlflow

    try:
        mlflow.end_run(status)
    except Exception as exc:
        log.warning("could not mark the MLflow run %s: %s: %s", status, type(exc).__name__, str(exc).splitlines()[:1])


def flatten(tree: dict, sep: str = ".", prefix: str = "") -> dict[str, object]:
    """{"gan": {"fid": 1}} -> {"gan.fid": 1} (sep "/" suits MLflow, which groups charts by it)."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, sep, name + sep) if isinstance(value, dict) else {name: value})
    return flat
