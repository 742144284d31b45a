"""The `retrain` schedule: a cron deployment on a process work pool, and the worker it needs.

    python -m pipelines.deploy apply    # create the pool if missing, register/update the deployment
    python -m pipelines.deploy status   # deployment, schedule, next runs, is a worker polling?
    python -m pipelines.deploy serve    # apply, then run a worker in the foreground (Ctrl-C stops)

A schedule with no worker polling its pool leaves runs Late, silently: `status` exits 1 then (a worker
counts as polling only with a heartbeat younger than HEARTBEAT_FRESH_S). `apply` (and so `serve` and
the stack's `up`) first marks Crashed the runs whose flow process is gone (a worker or machine that
died mid-run): such a run would otherwise stay Running and hold the deployment's only slot.
Talks to the Prefect API at PREFECT_API_URL (a `prefect server start`; see pipelines/README.md).
Defaults come from IMAGEGEN_SCHEDULE_CRON, IMAGEGEN_SCHEDULE_TIMEZONE, IMAGEGEN_WORK_POOL,
IMAGEGEN_DEPLOYMENT.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone

from imagegen.errors import redact
from pipelines.retrain import PROCESS_LABEL, REPO_ROOT  # also sets the offline Prefect defaults before prefect loads

FLOW_NAME = "retrain"
ENTRYPOINT = "pipelines/retrain.py:retrain"
HEARTBEAT_FRESH_S = 90  # a worker heartbeats every 30 s (Prefect's default): three missed, it is gone


def locked_job_template() -> dict:
    """The process pool's base job template with nothing a flow run can change but its name and labels:
    the command (the worker's own `prefect flow-run execute`), environment and working folder are fixed,
    and job variables outside the schema are refused by the server (a run's job_variables
    {"command": ...} would otherwise run that command as the worker)."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()  # local: no registry look-up
    template["job_configuration"] = {"name": "{{ name }}", "labels": "{{ labels }}", "stream_output": True}
    variables = template["variables"]
    variables["properties"] = {key: variables["properties"][key] for key in ("name", "labels")}
    variables["additionalProperties"] = False
    return template


def ensure_pool(client, pool: str, concurrency_limit: int | None = 1) -> bool:
    """Create the process work pool when missing, with at most `concurrency_limit` runs at a time and the
    locked job template (both set on an existing pool too); True when it was created."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    template = locked_job_template()
    try:
        existing = client.read_work_pool(pool)
    except ObjectNotFound:
        existing = None
    if existing is not None:
        if existing.concurrency_limit != concurrency_limit or existing.base_job_template != template:
            client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=concurrency_limit,
                                                         base_job_template=template))
        return False
    try:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template,
                                               concurrency_limit=concurrency_limit))
    except ObjectAlreadyExists:  # created meanwhile by another `apply`: set its limit
        ensure_pool(client, pool, concurrency_limit)
        return False
    return True


def apply(args) -> int:
    """Register (or update) the deployment of `retrain` from this checkout with its cron schedule."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.schedules import Cron

    with get_client(sync_client=True) as client:
        limit = args.pool_concurrency or None  # 0: no limit
        if ensure_pool(client, args.pool, limit):
            print(f"created process work pool '{args.pool}'")
        for run in reconcile(client, args.pool):
            print(f"flow run {run.name} ({run.id}) was {run.state_name} but its process is gone: marked Crashed")
    parameters = {"target": args.target, "only_if_changed": args.only_if_changed, "push": args.push}
    deployment_id = flow.from_source(str(args.repo), ENTRYPOINT).deploy(
        args.name, work_pool_name=args.pool, schedules=[Cron(args.cron, timezone=args.timezone)],
        parameters=parameters, build=False, push=False, print_next_steps=False, ignore_warnings=True,
        concurrency_limit=1)  # one run at a time: DVC locks the repo, a second `dvc repro` would fail
    refuse_unknown_parameters(deployment_id)
    print(f"deployment {FLOW_NAME}/{args.name} ({deployment_id}): cron '{args.cron}' {args.timezone}, "
          f"pool '{args.pool}' (concurrency limit {args.pool_concurrency or 'none'}), source {args.repo}")
    return 0


def reconcile(client, pool: str) -> list:
    """Mark Crashed the pool's Running / Cancelling runs whose flow process (label PROCESS_LABEL) is gone;
    return them. Only this host's processes can be judged: a run on another machine is left alone."""
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                WorkPoolFilter, WorkPoolFilterName)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    from imagegen.tracking import process_gone

    runs = client.read_flow_runs(
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.CANCELLING]))))
    gone = [run for run in runs if process_gone(str(run.labels.get(PROCESS_LABEL, "")))]
    for run in gone:
        client.set_flow_run_state(run.id, Crashed(message=f"its process ({run.labels[PROCESS_LABEL]}) is gone: "
                                                          "the worker or machine running it stopped"))
    return gone


def refuse_unknown_parameters(deployment_id) -> None:
    """The server refuses a flow run whose parameters the flow does not have (409 naming the key),
    rather than a worker's run crashing on them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    with get_client(sync_client=True) as client:
        schema = client.read_deployment(deployment_id).parameter_openapi_schema
        if schema.get("additionalProperties") is not False:
            client.update_deployment(deployment_id, DeploymentUpdate(
                parameter_openapi_schema={**schema, "additionalProperties": False}))


def scheduled_runs(client, deployment_id, limit: int) -> list:
    """The deployment's next runs still waiting to start (state type SCHEDULED: Scheduled or Late)."""
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=limit)


def status(args) -> int:
    """Print the deployment, its schedules, next runs and the pool's workers; 1 when something is missing."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        print(f"API: {redact(str(client.api_url))}")
        try:
            deployment = client.read_deployment_by_name(f"{FLOW_NAME}/{args.name}")
        except ObjectNotFound:
            print(f"deployment {FLOW_NAME}/{args.name}: not found (run: python -m pipelines.deploy apply)")
            return 1
        state = "PAUSED" if deployment.paused else "active"
        limit = client.read_work_pool(deployment.work_pool_name).concurrency_limit
        print(f"deployment {FLOW_NAME}/{args.name}: {state}, pool '{deployment.work_pool_name}' "
              f"(runs at a time: {limit or 'no limit'})")
        for item in deployment.schedules:
            print(f"  schedule: {describe(item.schedule)}{'' if item.active else ' (inactive)'}")
        runs = scheduled_runs(client, deployment.id, args.next)
        print("next runs:" if runs else "next runs: none scheduled yet")
        for run in runs:  # state Late: its start time has passed and no worker picked it up
            print(f"  {run.expected_start_time:%Y-%m-%d %H:%M %Z}  {run.state_name}  {run.name}")
        return report_workers(client, deployment.work_pool_name)


def describe(schedule) -> str:
    cron = getattr(schedule, "cron", None)
    return f"cron '{cron}' {schedule.timezone or 'UTC'}" if cron else str(schedule)


def report_workers(client, pool: str) -> int:
    """Print the workers polling the pool; 1 (with what to do) when none is online."""
    workers = client.read_workers_for_work_pool(pool)
    now = datetime.now(timezone.utc)
    ages = {worker.name: (now - worker.last_heartbeat_time).total_seconds() if worker.last_heartbeat_time else None
            for worker in workers}
    online = [worker for worker in workers if worker.status == "ONLINE"
              and ages[worker.name] is not None and ages[worker.name] < HEARTBEAT_FRESH_S]
    for worker in workers:
        age = ages[worker.name]
        print(f"  worker {worker.name}: {worker.status.value}"
              + (f", last heartbeat {age:.0f} s ago" if age is not None else "")
              + ("" if worker in online or worker.status != "ONLINE" else " (stale: not counted)"))
    if online:
        print(f"workers: {len(online)} online polling pool '{pool}'")
        return 0
    print(f"WARNING: no worker is polling pool '{pool}': scheduled runs will go Late. "
          f"Start one: python -m pipelines.deploy serve (or: prefect worker start --pool {pool})")
    return 1


def serve(args) -> int:
    """Apply the deployment, then replace this process with a worker polling its pool."""
    apply(args)
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", args.pool, "--type", "process"]
    print("starting worker:", " ".join(command[2:]), flush=True)
    os.execv(sys.executable, command)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default=os.environ.get("IMAGEGEN_DEPLOYMENT", "weekly"),
                        help="deployment name (default: weekly)")
    common.add_argument("--pool", default=os.environ.get("IMAGEGEN_WORK_POOL", "imagegen"),
                        help="process work pool (default: imagegen)")
    parser = argparse.ArgumentParser(prog="python -m pipelines.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("apply", "register the deployment"), ("serve", "apply, then run a worker")):
        sub = commands.add_parser(name, help=help_text, parents=[common])
        sub.add_argument("--cron", default=os.environ.get("IMAGEGEN_SCHEDULE_CRON", "0 3 * * 1"),
                         help="cron schedule (default: Mondays 03:00)")
        sub.add_argument("--timezone", default=os.environ.get("IMAGEGEN_SCHEDULE_TIMEZONE", "UTC"))
        sub.add_argument("--repo", default=str(REPO_ROOT), help="checkout the worker runs (default: this one)")
        sub.add_argument("--target", default=None, help="runs do only this stage and its upstream")
        sub.add_argument("--only-if-changed", action="store_true", help="runs skip when dvc status is clean")
        sub.add_argument("--push", action="store_true", help="runs end with `dvc push`")
        sub.add_argument("--pool-concurrency", type=int, default=1,
                         help="runs at a time across the pool's workers (default 1: one training at a time; 0: no limit)")
    sub = commands.add_parser("status", help="deployment, schedule, next runs, workers", parents=[common])
    sub.add_argument("--next", type=int, default=3, help="how many upcoming runs to list (default 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    import httpx
    from prefect.settings import PREFECT_API_URL

    args = build_parser().parse_args(argv)
    api_url = PREFECT_API_URL.value()
    if not api_url:  # an ephemeral API has no scheduler: the schedule would never fire
        print("deploy: error: PREFECT_API_URL is not set; start a server (prefect server start "
              "--host 127.0.0.1) and export PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2
    try:
        return {"apply": apply, "status": status, "serve": serve}[args.command](args)
    except httpx.TransportError as exc:
        print(f"deploy: error: cannot reach the Prefect API at {redact(api_url)}: {redact(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
