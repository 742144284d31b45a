"""Prefect flow `retrain`: run the DVC pipeline one stage per task, in dependency order.

DVC decides what is up to date (a stage it finds unchanged is skipped in about a second);
Prefect adds retries (fetch only), logs and a summary artifact.

Stopping: each `dvc` command runs in its own process group. SIGTERM to the flow process (or a cancel
from Prefect, which the worker delivers as SIGTERM) ends that whole group within STOP_GRACE_S seconds
(then SIGKILL), and the flow run ends Cancelled; the next run re-runs the interrupted stage. The flow
run carries the label PROCESS_LABEL (host:pid:start of its process), by which `pipelines.deploy` marks
Crashed the runs whose process is gone (a worker that died), freeing the deployment's slot.

    python -m pipelines.retrain [--repo DIR] [--target STAGE] [--push] [--only-if-changed]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import graphlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

# Offline-safe defaults. Prefect reads its settings when it is imported, so set them first.
for _key, _value in {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",  # the 20 s default is too short on 2 cores
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",  # Prefect's client-side analytics
    "DVC_NO_ANALYTICS": "1",
}.items():
    os.environ.setdefault(_key, _value)

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.exceptions import TerminationSignal  # noqa: E402
from prefect.states import Cancelled, Completed, Failed  # noqa: E402

from imagegen.data.folder import folder_name_problem  # noqa: E402
from imagegen.errors import redact  # noqa: E402
from imagegen.tracking import flatten, process_tag  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCK = Path(".dvc/tmp/retrain.lock")  # held by the running retrain of a checkout (DVC's own tmp folder, git-ignored)
ARTIFACT_KEY = "retrain-summary"
RETRIED_STAGES = {"fetch"}  # the only stage that talks to the outside world
SKIPPED = re.compile(r"Stage '.+' didn't change, skipping")
RESTORED = re.compile(r"Stage '.+' is cached - skipping run")
PROCESS_LABEL = "imagegen.process"  # the flow run's process, host:pid:start (see imagegen.tracking.process_tag)
STOP_GRACE_S = 5  # SIGTERM to a stage's process group, then SIGKILL after this many seconds
DOT_LINE = re.compile(r'^\s*"(?P<node>[^"]+)"(?:\s*->\s*"(?P<child>[^"]+)")?;\s*$')
STAGE_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,99}")  # a dvc.yaml stage name; never an option such as -R
MAX_FETCH_RETRIES, MAX_RETRY_DELAY_S = 10, 3600.0


class DvcError(RuntimeError):
    """A DVC command exited non-zero; the message is its one-line error."""


def _env() -> dict[str, str]:
    """The environment for DVC: this interpreter's bin first (dvc, imagegen), unbuffered output,
    and the flow run's id, which the stages' MLflow runs carry as their `pipeline_run` tag."""
    from prefect.runtime import flow_run

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if flow_run.id:  # the first stage that logs to MLflow creates the parent run of this key and name
        env["IMAGEGEN_PIPELINE_RUN"] = f"prefect-{flow_run.id}"
        env["IMAGEGEN_PIPELINE_NAME"] = f"retrain {flow_run.name}"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def dvc(repo: Path, *args: str) -> str:
    """Run a short DVC command and return its stdout; raise DvcError with its error line."""
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=_env(),
                          capture_output=True, text=True, errors="replace")
    if done.returncode:
        lines = (done.stdout + done.stderr).splitlines()
        raise DvcError(f"dvc {' '.join(args)} failed: {error_line(lines)}")
    return done.stdout


def stream(repo: Path, args: list[str], logger) -> tuple[int, list[str]]:
    """Run `dvc ARGS` in its own process group, logging each output line as it arrives; return (exit code,
    lines). Interrupted (SIGTERM, cancel), the whole group is stopped before the interruption goes on."""
    lines: list[str] = []
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=repo, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                            start_new_session=True)
    try:
        for raw in proc.stdout:
            if line := redact(raw.rstrip()):  # never a password in a flow log
                lines.append(line)
                logger.info("%s", line)
        return proc.wait(), lines
    except BaseException:
        stop_group(proc)
        raise
    finally:
        proc.stdout.close()


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of `proc` (dvc and the stage it runs), SIGKILL it after STOP_GRACE_S."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # anyone left in the group (the stage outlives dvc for a moment)?
            except ProcessLookupError:
                proc.poll()
                return
            proc.poll()
            time.sleep(0.1)


def error_line(lines: list[str]) -> str:
    """The most telling line of a failed command: the stage's own error, else DVC's."""
    for marker in (": error: ", "ERROR: "):
        found = [line.strip() for line in lines if marker in line]
        if found:
            return found[-1]
    return lines[0].strip() if lines else "no output"  # e.g. "'dvc.yaml' validation failed: ..."


def discover_stages(repo: Path, target: str | None = None) -> list[str]:
    """The stages in dependency order, from DVC's own graph: all, or `target` and its upstream."""
    parents: dict[str, set[str]] = {}
    for line in dvc(repo, "dag", "--dot", *([target] if target else [])).splitlines():
        if match := DOT_LINE.match(line):
            parents.setdefault(match["node"], set())
            if match["child"]:
                parents.setdefault(match["child"], set()).add(match["node"])
    return list(graphlib.TopologicalSorter(parents).static_order())


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: str, repo: str):
    """`dvc repro --single-item STAGE`: exactly this stage (the flow runs its upstream first)."""
    logger = get_run_logger()
    started = time.perf_counter()
    code, lines = stream(Path(repo), ["repro", "--single-item", stage], logger)
    if code:  # a returned Failed state: retried like an exception, but logged without a traceback
        return Failed(message=f"stage '{stage}' failed: {error_line(lines)}")
    status = ("skipped" if any(SKIPPED.search(line) for line in lines)
              else "restored" if any(RESTORED.search(line) for line in lines) else "ran")
    seconds = round(time.perf_counter() - started, 1)
    logger.info("stage '%s' %s in %.1f s", stage, status, seconds)
    return {"stage": stage, "status": status, "seconds": seconds}


@task(name="dvc-push", task_run_name="dvc-push", cache_policy=NO_CACHE, persist_result=False)
def push_outputs(repo: str):
    """`dvc push`: send the data and model caches to the default DVC remote."""
    code, lines = stream(Path(repo), ["push"], get_run_logger())
    return Failed(message=f"dvc push failed: {error_line(lines)}") if code else None


def stage_task(stage: str, retries: int, delay_s: float):
    """The stage task; fetch gets retries with exponential backoff (delay, 2×delay, 4×delay…)."""
    if stage not in RETRIED_STAGES or retries <= 0:
        return run_stage
    return run_stage.with_options(retries=retries,
                                  retry_delay_seconds=[delay_s * 2**n for n in range(retries)])


def run_stages(stages: list[str], repo: Path, retries: int, delay_s: float) -> tuple[list[dict], str | None]:
    """Run the stages in order; stop at the first failure and return its message."""
    results: list[dict] = []
    for stage in stages:
        state = stage_task(stage, retries, delay_s)(stage, str(repo), return_state=True)
        if not state.is_completed():
            results.append({"stage": stage, "status": "failed", "seconds": None})
            return results, state.message
        results.append(state.result())
    return results, None


def metrics_snapshot(repo: Path) -> dict[tuple[str, str], object]:
    """Every metric DVC shows for the workspace, keyed (file, dotted name); {} when none yet."""
    try:
        shown = json.loads(dvc(repo, "metrics", "show", "--json") or "{}")
    except (DvcError, ValueError):
        return {}
    snapshot: dict[tuple[str, str], object] = {}
    for path, entry in shown.get("", {}).get("data", {}).items():
        for name, value in flatten(entry.get("data") or {}).items():
            snapshot[(path, name)] = value
    return snapshot


def champion_section(repo: Path) -> str:
    """The register stage's decision (metrics/register.json), or a note that there is none."""
    path = repo / "metrics" / "register.json"
    if not path.exists():
        return "no register stage yet"
    try:
        decision = flatten(json.loads(path.read_text()))
    except ValueError as exc:
        return f"metrics/register.json is unreadable: {exc}"
    return "\n".join(f"- {name}: `{value}`" for name, value in decision.items())


def data_section(repo: Path, results: list[dict]) -> list[str]:
    """The data version's lineage and drift results (metrics/drift.json, see imagegen.data.drift);
    "no new data" when validate did not run again (its data did not change)."""
    try:
        drift = json.loads((repo / "metrics" / "drift.json").read_text())
    except (OSError, ValueError):
        return ["no drift record yet (validate has not run)"]
    lineage = drift.get("lineage") or {}
    validate = next((r["status"] for r in results if r["stage"] == "validate"), None)
    if validate in ("skipped", "restored"):
        return [f"no new data: data version `{lineage.get('data_version', '?')}` unchanged since the last run "
                f"({lineage.get('images', '?')} images)"]
    if not lineage:
        return ["the validation record has no lineage (validated before the drift gate existed)"]
    lines = [f"Data version `{lineage['data_version']}` ({lineage['images']} images, "
             f"{lineage['images_added']:+d} since `{lineage.get('previous_data_version')}`)", "",
             "| class | images | added |", "| --- | --- | --- |"]
    lines += [f"| {name} | {n} | {lineage['added_per_class'].get(name, 0):+d} |"
              for name, n in lineage["images_per_class"].items()]
    lines += ["", "### Drift against the last accepted version", ""]
    if drift.get("baseline"):
        lines.append(drift["baseline"])
    checks = drift.get("checks") or {}
    if checks:
        lines += ["| check | value | status |", "| --- | --- | --- |"]
        lines += [f"| {name} | {c['value']} | {c['status']} |" for name, c in checks.items()]
    lines += ["", f"Drift gate: {'passed' if drift.get('passed', True) else '**FAILED**'} "
              "(old vs new: reports/validation/drift.html)"]
    return lines


def summary_markdown(stages: list[str], results: list[dict], before: dict, after: dict,
                     repo: Path, failure: str | None) -> str:
    """The run summary: stage results, data (lineage, drift), metrics table, what changed, champion decision."""
    by_stage = {result["stage"]: result for result in results}
    lines = [f"# retrain: {'FAILED' if failure else 'completed'}", ""]
    if failure:
        lines += [f"**{failure}**", ""]
    lines += ["## Data", "", *data_section(repo, results), ""]
    lines += ["## Stages", "", "| stage | result | seconds |", "| --- | --- | --- |"]
    for stage in stages:
        result = by_stage.get(stage, {"status": "not run", "seconds": None})
        seconds = "" if result["seconds"] is None else result["seconds"]
        lines.append(f"| {stage} | {result['status']} | {seconds} |")
    lines += ["", "## Metrics", "", "| file | metric | value | previous run |", "| --- | --- | --- | --- |"]
    for (path, name), value in sorted(after.items()):
        lines.append(f"| {path} | {name} | {value} | {before.get((path, name), '—')} |")
    changed = [f"- {path} `{name}`: {before.get((path, name), '—')} → {value}"
               for (path, name), value in sorted(after.items()) if before.get((path, name)) != value]
    lines += ["", "## Changed since the previous run", ""]
    lines += changed or ["no metric changed"]
    lines += ["", "## Champion", "", champion_section(repo), ""]
    return "\n".join(lines)


@contextlib.contextmanager
def checkout_lock(root: Path, holder: str):
    """Yield None while this process holds the checkout's retrain lock (an flock on .dvc/tmp/retrain.lock,
    released when the process ends, even killed), or the holder's description when another run holds it."""
    path = root / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            yield f.read().strip() or "another process"
            return
        try:
            f.truncate(0)
            f.write(holder)
            f.flush()
            yield None
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def rejected_parameter(repo: str | None, target: str | None, fetch_retries: int, fetch_retry_delay_s: float,
                       deployed: bool) -> str | None:
    """Why a flow-run parameter is refused (naming it), or None. Flow-run parameters come from whoever can
    reach the Prefect API: a deployment's run works only in the checkout it was deployed from (this one)."""
    if deployed and repo is not None and Path(repo).resolve() != REPO_ROOT:
        return f"parameter 'repo': {repo!r} is not this deployment's checkout {REPO_ROOT}; refused"
    if target is not None and not STAGE_NAME.fullmatch(target):
        return f"parameter 'target': {target[:60]!r} is not a stage name (letters, digits, '_', '.', '-')"
    if isinstance(fetch_retries, bool) or not 0 <= fetch_retries <= MAX_FETCH_RETRIES:
        return f"parameter 'fetch_retries': {fetch_retries!r}; expected an integer 0..{MAX_FETCH_RETRIES}"
    if isinstance(fetch_retry_delay_s, bool) or not 0 <= fetch_retry_delay_s <= MAX_RETRY_DELAY_S:
        return f"parameter 'fetch_retry_delay_s': {fetch_retry_delay_s!r}; expected seconds 0..{MAX_RETRY_DELAY_S:g}"
    return None


@flow(name="retrain", description="Run the DVC pipeline stage by stage (fetch retried); publish a summary.")
def retrain(repo: str | None = None, target: str | None = None, push: bool = False,
            only_if_changed: bool = False, fetch_retries: int = 3, fetch_retry_delay_s: float = 10.0):
    """One task per DVC stage in dependency order; a failed stage fails the run with its error.
    One run at a time per checkout: a run that finds another one running ends Cancelled, having done nothing."""
    from prefect.runtime import deployment, flow_run

    refused = rejected_parameter(repo, target, fetch_retries, fetch_retry_delay_s, bool(deployment.id))
    if refused:
        return Failed(message=refused)
    root = Path(repo or REPO_ROOT).resolve()
    holder = f"flow run {flow_run.name or '?'} ({flow_run.id or 'no id'}), pid {os.getpid()}"
    with checkout_lock(root, holder) as other:
        if other:
            get_run_logger().warning("another retrain is running in %s (%s): not touching it", root, other)
            return Cancelled(message=f"another retrain is running in this checkout ({other}); this run did nothing")
        label_process(flow_run.id)
        try:
            return run_pipeline(root, target, push, only_if_changed, fetch_retries, fetch_retry_delay_s)
        except TerminationSignal as exc:  # SIGTERM or a cancel: the stage's processes are already stopped
            return Cancelled(message=f"stopped by {signal.Signals(exc.signal).name}: the running stage was ended; "
                                     "the next run starts it again")


def label_process(flow_run_id) -> None:
    """Label the flow run with its process (PROCESS_LABEL), for the worker start-up's reconciliation."""
    from prefect.client.orchestration import get_client

    if flow_run_id:
        with get_client(sync_client=True) as client:
            client.update_flow_run_labels(flow_run_id, {PROCESS_LABEL: process_tag()})


def run_pipeline(root: Path, target: str | None, push: bool, only_if_changed: bool, fetch_retries: int,
                 fetch_retry_delay_s: float):
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    if problem := folder_name_problem(root):  # DVC would fail on it naming no file
        return Failed(message=problem)
    try:
        stages = discover_stages(root, target)
        if only_if_changed and not json.loads(dvc(root, "status", "--json", *stages) or "{}"):
            message = f"no new data: nothing changed, all {len(stages)} stages up to date, none run"
            create_markdown_artifact(key=ARTIFACT_KEY, description="retrain: stages, metrics, champion",
                                     markdown=f"# retrain: no new data\n\n{message} (`dvc status` is clean).\n")
            return Completed(message=message)
    except DvcError as exc:  # e.g. an invalid dvc.yaml: one line, no traceback
        return Failed(message=str(exc))
    logger.info("stages in order: %s", ", ".join(stages))
    before = metrics_snapshot(root)
    results, failure = run_stages(stages, root, fetch_retries, fetch_retry_delay_s)
    if push and not failure:
        pushed = push_outputs(str(root), return_state=True)
        failure = None if pushed.is_completed() else pushed.message
    create_markdown_artifact(
        key=ARTIFACT_KEY, description="retrain: stages, metrics, champion",
        markdown=summary_markdown(stages, results, before, metrics_snapshot(root), root, failure))
    if failure:
        return Failed(message=failure)
    done = ", ".join(f"{r['stage']} {r['status']}" for r in results)
    return Completed(message=f"{len(results)} stages: {done}", data=results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.retrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=None, help="DVC project folder (default: this checkout)")
    parser.add_argument("--target", default=None, help="run only this stage and its upstream stages")
    parser.add_argument("--push", action="store_true", help="`dvc push` after the stages")
    parser.add_argument("--only-if-changed", action="store_true",
                        help="do nothing when `dvc status` finds every stage up to date")
    parser.add_argument("--fetch-retries", type=int, default=3, help="retries of the fetch stage (default 3)")
    parser.add_argument("--fetch-retry-delay", type=float, default=10.0,
                        help="first retry delay in seconds, doubling each retry (default 10)")
    args = parser.parse_args(argv)
    state = retrain(repo=args.repo, target=args.target, push=args.push,
                    only_if_changed=args.only_if_changed, fetch_retries=args.fetch_retries,
                    fetch_retry_delay_s=args.fetch_retry_delay, return_state=True)
    print(f"retrain: {state.name}: {state.message}",
          file=sys.stdout if state.is_completed() else sys.stderr)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
