"""What produced a run, as git and DVC tell it: the lineage tags of a stage run (commit, params hash, data
version, `dvc exp run` experiment, the data lineage validate recorded), the key that groups one pipeline
run's stages (the orchestrator's, else the `dvc repro` process's), and which stages DVC ran or skipped.

Plain facts from git, DVC, the environment and the stage outputs: no MLflow here (imagegen.tracking puts
them on runs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from imagegen.layout import data_version

PIPELINE_RUN_ENV = "IMAGEGEN_PIPELINE_RUN"  # set by an orchestrator to group one pipeline run's stages
# Set by DVC in a stage's environment: every stage (DVC_STAGE), `dvc exp run` (the other two).
DVC_STAGE_ENV, DVC_EXP_NAME_ENV, DVC_EXP_BASELINE_ENV = "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"
STANDALONE = "standalone"  # the pipeline_run tag of a stage run outside any pipeline
# The stages that log a run; the pipeline run lists which of them ran and which DVC skipped.
RUN_STAGES = ("train-features", "train-gan", "train-vae", "evaluate", "register")

log = logging.getLogger(__name__)


def lineage_tags(root: Path, params: dict, device: str) -> dict[str, str]:
    commit = git_commit(root)
    params_hash = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {
        "git_commit": commit,
        "params_hash": params_hash,
        "dvc_data_md5": data_version(root),
        "device": device,
        "pipeline_run": pipeline_key(root) or STANDALONE,
        **dvc_exp_tags(),
        **data_lineage_tags(root),
    }


LINEAGE_TAGS = {"images": "data_images", "images_per_class": "data_images_per_class",
                "images_added": "data_images_added", "added_per_class": "data_added_per_class",
                "previous_data_version": "data_previous_version"}


def data_lineage_tags(root: Path) -> dict[str, str]:
    """The data version's lineage as the validate stage recorded it (metrics/drift.json `lineage`,
    see data/drift.py): images in all, per class, and added since the previous accepted version
    (per-class values as JSON); {} before validate has run."""
    try:
        lineage = json.loads((root / "metrics" / "drift.json").read_text()).get("lineage")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(lineage, dict):
        return {}
    return {tag: (json.dumps(lineage[key], sort_keys=True) if isinstance(lineage[key], dict)
                  else str(lineage[key]))[:4000]
            for key, tag in LINEAGE_TAGS.items() if key in lineage}


def dvc_exp_tags() -> dict[str, str]:
    """`dvc exp run` puts the experiment's name and baseline commit in each stage's environment."""
    return {tag: os.environ[env] for tag, env in (("dvc_exp_name", DVC_EXP_NAME_ENV),
                                                  ("dvc_exp_baseline_rev", DVC_EXP_BASELINE_ENV))
            if os.environ.get(env)}


def pipeline_key(root: Path) -> str | None:
    """What the stage runs of one pipeline run share, or None for a stage run on its own.

    An orchestrator says it (IMAGEGEN_PIPELINE_RUN; the Prefect flow sets `prefect-<flow run id>`).
    Under DVC (DVC_STAGE is set) it is the `dvc repro` / `dvc exp run` process that runs the stages:
    its pid and start time, found by walking up the process tree (Linux /proc). Where that is not
    possible, the git commit and a hash of params.yaml, which groups the stages of one configuration.
    """
    if key := os.environ.get(PIPELINE_RUN_ENV):
        return key.replace("'", "_")  # it goes into MLflow search filters
    if not os.environ.get(DVC_STAGE_ENV):
        return None
    if found := dvc_process():
        return f"dvc-{found}"
    try:
        params = hashlib.sha256((root / "params.yaml").read_bytes()).hexdigest()[:8]
    except OSError:
        params = "none"
    return f"dvc-{git_commit(root)[:10]}-{params}"


def dvc_process() -> str | None:
    """'<pid>-<start time>' of the nearest ancestor process running DVC, from /proc; None if not found."""
    pid = os.getppid()
    for _ in range(8):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        fields = proc_stat(pid)
        if fields is None:
            return None
        words = [Path(a.decode(errors="replace")).name for a in argv[:3]]
        if "dvc" in words:
            return f"{pid}-{fields[19]}"  # field 22 of stat: start time in clock ticks since boot
        pid = int(fields[1])
        if pid <= 1:
            return None
    return None


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after "pid (comm)": [1] the parent pid, [19] the start time (field 22,
    clock ticks since boot); None when the process is gone or there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def dvc_changes(root: Path, stages: list[str]) -> dict[str, list] | None:
    """`dvc status --json STAGES`: those of `stages` that are not up to date and why ({} for none), or None
    outside a DVC stage or when it fails. (DVC unlocks the repository while a stage's command runs.)"""
    if not os.environ.get(DVC_STAGE_ENV):
        return None
    if not stages:
        return {}
    try:
        done = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", *stages], cwd=root,
                              capture_output=True, text=True, timeout=120)
        changes = json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    if changes is None:
        log.warning("dvc status failed, the pipeline run does not say which stages DVC skipped: %s",
                    (done.stdout + done.stderr).strip().splitlines()[:1])
    return changes if isinstance(changes, dict) else None


def stage_summary(ran: set, changes: dict | None) -> dict[str, list[str]]:
    """Which RUN_STAGES ran in this pipeline run (they have a run under it), which DVC skipped as unchanged,
    and which are still to run with DVC's reason (the stages `dvc status` lists); unknown without `changes`."""
    ran_now = [s for s in RUN_STAGES if s in ran]
    if changes is None:
        return {"ran": ran_now, "skipped": [], "pending": [], "unknown": [s for s in RUN_STAGES if s not in ran]}
    pending = [f"{stage} ({change_reason(why)})" for stage, why in changes.items() if stage not in ran]
    skipped = [s for s in RUN_STAGES if s not in ran and s not in changes]
    return {"ran": ran_now, "skipped": skipped, "pending": pending, "unknown": []}


def change_reason(entries) -> str:
    """DVC's status entries of a stage, e.g. [{"changed deps": {"params.yaml": {"gan.epochs": "modified"}}}],
    as one phrase: "changed deps: params.yaml gan.epochs modified"."""
    def words(value) -> str:
        if isinstance(value, dict):
            return ", ".join(f"{key} {words(inner)}" for key, inner in value.items())
        return str(value)

    entries = entries if isinstance(entries, list) else [entries]
    parts = [f"{what}: {words(items)}" for entry in entries if isinstance(entry, dict) for what, items in entry.items()]
    parts += [str(entry) for entry in entries if not isinstance(entry, dict)]  # e.g. "always changed"
    return "; ".join(parts)[:300] or "changed"


def pipeline_note(summary: dict[str, list[str]]) -> str:
    """The parent run's description: what ran and what DVC skipped, so a row with few stages explains itself."""
    lines = ["One pipeline run: its stages are the nested runs below.", "",
             f"- **Ran:** {', '.join(summary['ran']) or 'none'}"]
    if summary["skipped"]:
        lines.append(f"- **Skipped by DVC, up to date** (\"didn't change\": deps, params and outputs match "
                     f"dvc.lock): {', '.join(summary['skipped'])}")
    if summary["pending"]:
        lines.append(f"- **Still to run** (DVC status): {'; '.join(summary['pending'])}")
    if summary["unknown"]:
        lines.append(f"- **No run (yet):** {', '.join(summary['unknown'])} (the report stage, last in the pipeline, "
                     "asks DVC which of them it skipped)")
    lines += ["", "The headline metrics are those of the current outputs (metrics/evaluate.json), also when "
              "evaluate was up to date."]
    return "\n".join(lines)
