"""MLflow set-up: the embedded default store, runs with lineage tags, per-epoch logging.

With MLFLOW_TRACKING_URI unset, runs go to MLflow's own default store, sqlite:///mlflow.db with
artifacts in ./mlruns (both beside params.yaml), so plain `mlflow ui`, `mlflow server` and
`mlflow models serve` run there find them; set the variable to use a tracking server instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import yaml

from imagegen.errors import ImagegenError

PIPELINE_RUN_ENV = "IMAGEGEN_PIPELINE_RUN"  # set by an orchestrator to group one pipeline run's stages
PARENT_RUN_ENV = "IMAGEGEN_PARENT_RUN_ID"  # an MLflow run id to nest stage runs under
SYSTEM_METRICS_INTERVAL_S = 5  # MLflow's default, 10 s, leaves a one-minute GPU run with five points


EMBEDDED_DB = "mlflow.db"  # MLflow's default store (sqlite:///mlflow.db in the working folder)
EMBEDDED_ARTIFACTS = "mlruns"  # and where MLflow puts artifacts by default
OLD_EMBEDDED_DB = "mlruns.db"  # this project's store before it used MLflow's default


def embedded_uri(root: Path) -> str:
    return f"sqlite:///{(root / EMBEDDED_DB).resolve()}"


def configure(root: Path) -> str:
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        migrate_old_store(root)
        mlflow.set_tracking_uri(embedded_uri(root))  # note: this also sets the variable
    return mlflow.get_tracking_uri()


def migrate_old_store(root: Path) -> None:
    """Move an earlier embedded store (mlruns.db) to MLflow's default name; its artifacts stay put."""
    import logging

    old, new = root / OLD_EMBEDDED_DB, root / EMBEDDED_DB
    if not old.exists():
        return
    log = logging.getLogger(__name__)
    if new.exists():
        log.warning("%s is no longer used (the store is %s); to see its runs: "
                    "mlflow ui --backend-store-uri sqlite:///%s", old, new, old)
    else:
        os.replace(old, new)
        log.warning("moved the MLflow store %s to %s, where MLflow looks by default", old, new)


def experiment_id(name: str, root: Path) -> str:
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    embedded = mlflow.get_tracking_uri() == embedded_uri(root)
    location = (root / EMBEDDED_ARTIFACTS).resolve().as_uri() if embedded else None
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


@contextlib.contextmanager
def stage_run(root: Path, experiment: str, run_name: str, params: dict, tags: dict,
              system_metrics: bool | None = None) -> Iterator[object]:
    """An active MLflow run for one stage, nested under IMAGEGEN_PARENT_RUN_ID when set. With
    `system_metrics`, MLflow samples CPU, memory, disk, network and (with nvidia-ml-py and a GPU) GPU
    utilisation and memory every SYSTEM_METRICS_INTERVAL_S seconds as system/* metrics (None: MLflow's
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING decides)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = configure(root)
    try:
        exp_id = experiment_id(experiment, root)
        if system_metrics and not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
            mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
        run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags,
                               parent_run_id=os.environ.get(PARENT_RUN_ENV) or None,
                               log_system_metrics=system_metrics)
    except Exception as exc:  # MLflow raises many kinds for an unreachable or broken store
        raise ImagegenError(f"MLflow tracking at {uri} is not usable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    with run:
        mlflow.log_params(params)
        try:
            yield run
        except MlflowException as exc:  # e.g. the server cannot store artifacts: one line, run marked FAILED
            raise ImagegenError(f"MLflow tracking at {uri} failed: {str(exc).strip().splitlines()[0][:300]}"
                                f"{object_store_hint()}") from None


def object_store_hint() -> str:
    """'; the object store at URL is not reachable (...)' when the environment names an S3 endpoint
    (AWS_ENDPOINT_URL_S3, MLFLOW_S3_ENDPOINT_URL: the team stack's) that does not answer; else ''.
    A tracking server only answers HTTP 500 when its artifact store is down: this names the culprit."""
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    if not endpoint:
        return ""
    try:
        urllib.request.urlopen(endpoint, timeout=5).close()
    except urllib.error.HTTPError:  # it answers (403 without credentials): reachable
        return ""
    except (urllib.error.URLError, OSError) as exc:
        return f"; the object store at {endpoint} is not reachable ({getattr(exc, 'reason', exc)})"
    return ""


def flatten(tree: dict, sep: str = ".", prefix: str = "") -> dict[str, object]:
    """{"gan": {"fid": 1}} -> {"gan.fid": 1} (sep "/" suits MLflow, which groups charts by it)."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, sep, name + sep) if isinstance(value, dict) else {name: value})
    return flat
