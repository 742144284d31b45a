"""MLflow set-up: the embedded default store, runs with lineage tags (from imagegen.lineage), per-epoch logging.

With MLFLOW_TRACKING_URI unset, runs go to MLflow's own default store, sqlite:///mlflow.db with
artifacts in ./mlruns (both beside params.yaml), so plain `mlflow ui`, `mlflow server` and
`mlflow models serve` run there find them; set the variable to use a tracking server instead.

Run lifecycle: a stage checks the store first (`check_store`: a server that is down fails the
stage in seconds, not after minutes of HTTP retries). Each stage run is tagged with the process
and folder that own it; a RUNNING run whose process is gone (killed) is marked KILLED by the next
stage run in that folder, unless it is being resumed (`stage_run(resume_run_id=...)`), and a stage
that fails ends its run FAILED (KILLED when interrupted).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

from imagegen import lineage
from imagegen.errors import ImagegenError
from imagegen.layout import data_version

PIPELINE_NAME_ENV = "IMAGEGEN_PIPELINE_NAME"  # the parent run's name (optional)
PARENT_RUN_ENV = "IMAGEGEN_PARENT_RUN_ID"  # an MLflow run id to nest stage runs under
SYSTEM_METRICS_INTERVAL_S = 5  # MLflow's default, 10 s, leaves a one-minute GPU run with five points


EMBEDDED_DB = "mlflow.db"  # MLflow's default store (sqlite:///mlflow.db in the working folder)
EMBEDDED_ARTIFACTS = "mlruns"  # and where MLflow puts artifacts by default
OLD_EMBEDDED_DB = "mlruns.db"  # this project's store before it used MLflow's default
# An experiment's kind: earlier MLflow 3 UIs open a custom_model_development experiment on its runs table;
# 3.17 decides by its GenAI / Model training switch (URL ?workflowType=machine_learning), see README.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
PROCESS_TAG = "imagegen.process"  # host:pid:start-time of the process that owns a RUNNING run
WORKDIR_TAG = "imagegen.workdir"  # the project folder it runs in
DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
STAGE_TAG = "stage"  # the bare stage name of a stage run (its run name also names the pipeline run)
# The pipeline (parent) run's row in the runs table: a few headline metrics, read from the evaluate stage's
# output (metrics/evaluate.json) whenever one of its stages ends, and the params that tell variants apart.
# Every other param stays on the stage runs.
HEADLINE_METRICS = {"gan_fid": ("gan", "fid"), "vae_fid": ("vae", "fid"), "vae_nll": ("vae", "nll_iwae")}
VARIANT_PARAMS = ("train.limit", "gan.images", "gan.epochs", "gan.lr_g", "gan.augment", "vae.images", "vae.epochs", "vae.beta",
                  "vae.prior")
# A saved view of the runs table with the headline columns (MLflow >= 3.15 keeps saved views as experiment tags
# mlflow.sharedViewState.<key>); the README's link opens it: #/experiments/<id>/runs?viewStateShareKey=headline
VIEW_KEY, VIEW_NAME = "headline", "Headline metrics"

log = logging.getLogger(__name__)


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
    """The experiment's id, created if missing; either way marked as a model-training experiment."""
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        client = mlflow.MlflowClient()
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made by an older version, or by hand
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        view = found.tags.get(view_tag())
        if view is None or json.loads(view).get("state") != view_state():  # missing, or from an older version
            client.set_experiment_tag(found.experiment_id, view_tag(), saved_view())
        return found.experiment_id
    embedded = mlflow.get_tracking_uri() == embedded_uri(root)
    location = (root / EMBEDDED_ARTIFACTS).resolve().as_uri() if embedded else None
    return mlflow.create_experiment(name, artifact_location=location,
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, view_tag(): saved_view()})


def view_tag() -> str:
    return f"mlflow.sharedViewState.{VIEW_KEY}"


def view_state() -> str:
    """The saved view's runs-table state, as MLflow's UI stores it (JSON text): the headline metrics and the
    variant params as columns (not the wide Dataset column: the table scrolls only so far in a laptop's width)."""
    columns = [*(f"metrics.`{m}`" for m in HEADLINE_METRICS), *(f"params.`{p}`" for p in VARIANT_PARAMS)]
    return json.dumps({"selectedColumns": columns, "orderByKey": "attributes.start_time", "orderByAsc": False})


def saved_view() -> str:
    now = int(time.time() * 1000)
    return json.dumps({"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": view_state()})


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
    """The start time of a running process; "" once it has ended, zombies included (a killed flow process
    whose worker died too waits, unreaped, until init gets to it)."""
    fields = lineage.proc_stat(pid)
    return fields[19] if fields and fields[0] != "Z" else ""


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
              system_metrics: bool | None = None, resume_run_id: str | None = None) -> Iterator[object]:
    """An active MLflow run for one stage, nested under its pipeline's parent run (IMAGEGEN_PARENT_RUN_ID,
    else the parent run of the pipeline_run tag, created by the first stage that finds none).

    resume_run_id: continue that run (a resumed training run) if it exists here and has not finished.
    The run ends FINISHED, FAILED on an error, KILLED when interrupted. With `system_metrics`, MLflow
    samples CPU, memory, disk, network and (with nvidia-ml-py and a GPU) GPU utilisation and memory every
    SYSTEM_METRICS_INTERVAL_S seconds as system/* metrics (None: MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING decides)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = check_store(root)
    owner = {PROCESS_TAG: process_tag(), WORKDIR_TAG: str(root.resolve())}
    try:
        exp_id = experiment_id(experiment, root)
        if system_metrics and not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
            mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
        client = MlflowClient()
        run_id = resumable_run(client, resume_run_id, exp_id)
        end_abandoned_runs(client, exp_id, root, keep=run_id)
        if run_id:  # a resumed training run: the same run, under the parent it already has
            run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
            mlflow.set_tags({**tags, **owner})
            parent = run.data.tags.get("mlflow.parentRunId")
            log.info("continuing MLflow run %s (%s)", run_id, run_name)
        else:
            parent = os.environ.get(PARENT_RUN_ENV) or pipeline_parent(exp_id, tags.get("pipeline_run"), root)
            run = mlflow.start_run(experiment_id=exp_id, run_name=stage_run_name(client, parent, run_name),
                                   tags={**tags, **owner, "run_kind": "stage", STAGE_TAG: run_name},
                                   parent_run_id=parent, log_system_metrics=system_metrics)
            mlflow.log_params(params)
    except Exception as exc:  # MLflow raises many kinds for an unreachable or broken store
        raise ImagegenError(f"MLflow tracking at {uri} is not usable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except MlflowException as exc:  # e.g. the server cannot store artifacts: one line, run marked FAILED
        raise ImagegenError(f"MLflow tracking at {uri} failed: {str(exc).strip().splitlines()[0][:300]}"
                            f"{object_store_hint()}") from None
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        end_run(status)
        if parent and not os.environ.get(PARENT_RUN_ENV):
            update_pipeline(root, parent)
            end_pipeline_stage(parent, status)


def stage_run_name(client, parent: str | None, stage: str) -> str:
    """`<experiment or pipeline run> · <stage>`: what tells two pipelines' runs of a stage apart in
    compare views (the `dvc exp run` experiment's name, else the parent run's); the stage alone without one."""
    if not parent:
        return stage
    label = os.environ.get(lineage.DVC_EXP_NAME_ENV) or client.get_run(parent).info.run_name
    return f"{label} · {stage}"


def end_run(status: str) -> None:
    """End the active run; a store that fails now is not worth hiding the stage's own error for."""
    import mlflow

    try:
        mlflow.end_run(status)
    except Exception as exc:
        log.warning("could not mark the MLflow run %s: %s: %s", status, type(exc).__name__, str(exc).splitlines()[:1])


def object_store_hint() -> str:
    """'; the object store at URL is not reachable (...)' when the environment names an S3 endpoint
    (AWS_ENDPOINT_URL_S3, MLFLOW_S3_ENDPOINT_URL: the team stack's) that does not answer; else ''.
    A tracking server only answers HTTP 500 when its artifact store is down: this names the culprit."""
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


def pipeline_parent(exp_id: str, key: str | None, root: Path) -> str | None:
    """The id of the parent run of pipeline `key` (None: a stage on its own): found by its tags, else
    created with the pipeline's params. Marked RUNNING while a stage runs, owned by that stage's process;
    each stage's end sets its status and end time, so the parent spans the pipeline's stages."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    if not key or key == lineage.STANDALONE:
        return None
    client = MlflowClient()
    found = client.search_runs([exp_id], f"tags.pipeline_run = '{key}' and tags.run_kind = 'pipeline'",
                               max_results=1)
    owner = {PROCESS_TAG: process_tag(), WORKDIR_TAG: str(root.resolve())}  # a killed stage: closed by the next
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        for tag, value in owner.items():
            client.set_tag(found[0].info.run_id, tag, value)
        return found[0].info.run_id
    exp = lineage.dvc_exp_tags()
    name = (os.environ.get(PIPELINE_NAME_ENV) or (f"dvc exp {exp['dvc_exp_name']}" if exp else None)
            or f"dvc repro {time.strftime('%Y-%m-%d %H:%M')}")
    tags = {"pipeline_run": key, "run_kind": "pipeline", "git_commit": lineage.git_commit(root), **exp,
            "dvc_data_md5": data_version(root), **lineage.data_lineage_tags(root),
            "mlflow.note.content": "One pipeline run: its stages are the nested runs below.", **owner}
    run = client.create_run(exp_id, run_name=name, tags=tags)
    try:
        params = flatten(yaml.safe_load((root / "params.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError):
        params = {}
    client.log_batch(run.info.run_id, params=[Param(k, str(params[k])) for k in VARIANT_PARAMS if k in params])
    return run.info.run_id


def update_pipeline(root: Path, parent: str, final: bool = False) -> None:
    """After each stage run: the parent carries the current headline metrics (from metrics/evaluate.json, also
    when evaluate was up to date and did not run) and says which stages ran. `final` (the report stage, last in
    the pipeline): also which DVC skipped and why (best effort)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient()
    try:
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in headline_metrics(root).items()]
        ran = {r.data.tags.get(STAGE_TAG) for r in client.search_runs(
            [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=100)}
        changes = lineage.dvc_changes(root, [s for s in lineage.RUN_STAGES if s not in ran]) if final else None
        summary = lineage.stage_summary(ran, changes)
        tags = [RunTag("stages_ran", ", ".join(summary["ran"]) or "none"),
                RunTag("stages_skipped", ", ".join(summary["skipped"]) or "none"),
                RunTag("mlflow.note.content", lineage.pipeline_note(summary))]
        client.log_batch(parent, metrics=metrics, tags=tags)
    except Exception as exc:
        log.warning("could not update the pipeline run %s: %s: %s", parent, type(exc).__name__, str(exc)[:200])


def finish_pipeline(root: Path, experiment: str) -> None:
    """The last stage of a pipeline run (report, which logs no run of its own) completes the parent run's
    account: what ran, what DVC skipped and why. A stage's own run cannot ask DVC about the stages after it:
    DVC locks the running stage's outputs, and `dvc status` of a stage that reads them waits on that lock."""
    import mlflow

    key = lineage.pipeline_key(root)
    if not key or os.environ.get(PARENT_RUN_ENV):
        return
    try:
        check_uri(configure(root))
        found = mlflow.get_experiment_by_name(experiment)
        parents = found and mlflow.MlflowClient().search_runs(
            [found.experiment_id], f"tags.pipeline_run = '{key}' and tags.run_kind = 'pipeline'", max_results=1)
    except ImagegenError as exc:
        log.warning("the pipeline run's summary is not updated: %s", exc)
        return
    if parents:
        update_pipeline(root, parents[0].info.run_id, final=True)


def headline_metrics(root: Path) -> dict[str, float]:
    """HEADLINE_METRICS from metrics/evaluate.json: those present as finite numbers ({} before evaluate has run)."""
    try:
        evaluation = json.loads((root / "metrics" / "evaluate.json").read_text())
    except (OSError, ValueError):
        return {}
    found = {}
    for name, (kind, key) in HEADLINE_METRICS.items():
        value = evaluation.get(kind, {}).get(key) if isinstance(evaluation, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found[name] = float(value)
    return found


def end_pipeline_stage(parent: str, status: str) -> None:
    """A stage of the pipeline ended: the parent takes its status and end time (best effort)."""
    from mlflow import MlflowClient

    with contextlib.suppress(Exception):
        MlflowClient().set_terminated(parent, status)


def log_summary(metrics: dict, per_epoch) -> None:
    """A stage's end-of-run numbers as `summary/<name>` metrics (one chart section of their own), leaving out
    those logged per epoch (`per_epoch`: their last values are already the run's values) and non-numbers."""
    import mlflow

    mlflow.log_metrics({f"summary/{k}": float(v) for k, v in metrics.items()
                        if k not in per_epoch and isinstance(v, (int, float)) and not isinstance(v, bool)})


def flatten(tree: dict, sep: str = ".", prefix: str = "") -> dict[str, object]:
    """{"gan": {"fid": 1}} -> {"gan.fid": 1} (sep "/" suits MLflow, which groups charts by it)."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, sep, name + sep) if isinstance(value, dict) else {name: value})
    return flat
