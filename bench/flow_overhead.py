"""Flow overhead: what the Prefect flow costs on top of DVC
A no-op `dvc repro` timed against the `retrain` flow. Both run on an up-to-date project, so every
stage is skipped and what is left is overhead.

    dvc repro                       one process checks every stage
    flow, cold (CLI)                python -m pipelines.retrain: interpreter + prefect import +
                                    ephemeral API server start + one `dvc repro --single-item` per stage
    flow, warm (in-process)         the flow called again in a process whose API is already up
                                    (what a worker-run deployment pays, less its process start)

    python bench/flow_overhead.py [--repo DIR] [--stages fetch,prepare,validate] [--repeat 3]

Without --repo it builds a throwaway copy of this checkout holding only --stages and runs
`dvc repro` there first (not timed). Prefect state goes to a temporary PREFECT_HOME.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlog import record

REPO_ROOT = Path(__file__).resolve().parents[1]
COPIED = ("dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config", "src", "pipelines")


def make_project(where: Path, stages: list[str]) -> Path:
    """A git + DVC copy of this checkout with only the given stages, brought up to date."""
    import yaml

    root = where / "project"
    for name in COPIED:
        src, dst = REPO_ROOT / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, dst)
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in stages}
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["dvc", "config", "--local", "core.site_cache_dir", str(where / "site")], cwd=root, check=True)
    print(f"bringing {root} up to date (dvc repro, not timed)...", flush=True)
    subprocess.run(["dvc", "repro", "-q"], cwd=root, check=True)
    return root


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - started


def median_of(repeat: int, measure) -> float:
    return statistics.median(measure() for _ in range(repeat))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="an up-to-date DVC project (default: a throwaway copy)")
    parser.add_argument("--stages", default="fetch,prepare,validate", help="stages of the copy (comma-separated)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is shown")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flow-overhead-"))
    os.environ.update(PREFECT_HOME=str(work / "prefect-home"), DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1",
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
                      PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    os.environ.pop("PREFECT_API_URL", None)
    try:
        repo = args.repo.resolve() if args.repo else make_project(work, args.stages.split(","))
        return report(repo, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(repo: Path, repeat: int) -> int:
    if subprocess.run(["dvc", "status", "-q"], cwd=repo).returncode:
        print(f"{repo} is not up to date: run `dvc repro` there first", file=sys.stderr)
        return 1
    sys.path.insert(0, str(REPO_ROOT))
    dvc_s = median_of(repeat, lambda: timed(["dvc", "repro"], repo))
    cli = [sys.executable, "-m", "pipelines.retrain", "--repo", str(repo)]
    cold_s = median_of(repeat, lambda: timed(cli, REPO_ROOT))
    from pipelines.retrain import discover_stages, retrain

    n = len(discover_stages(repo))
    retrain(repo=str(repo), return_state=True)  # starts the ephemeral API once

    def warm() -> float:
        started = time.perf_counter()
        assert retrain(repo=str(repo), return_state=True).is_completed()
        return time.perf_counter() - started

    warm_s = median_of(repeat, warm)
    print(f"\nup-to-date project, {n} stages, median of {repeat} runs:")
    print(f"  dvc repro                        {dvc_s:6.2f} s")
    print(f"  flow, cold (CLI, ephemeral API)  {cold_s:6.2f} s   overhead {cold_s - dvc_s:+6.2f} s")
    print(f"  flow, warm (API already up)      {warm_s:6.2f} s   overhead {warm_s - dvc_s:+6.2f} s"
          f"  ({(warm_s - dvc_s) / n:+.2f} s per stage)")
    record("flow_overhead", ["run", "seconds", "overhead s"],
           [["dvc repro", f"{dvc_s:.2f}", ""], ["flow, cold (CLI, ephemeral API)", f"{cold_s:.2f}", f"{cold_s - dvc_s:+.2f}"],
            ["flow, warm (API already up)", f"{warm_s:.2f}", f"{warm_s - dvc_s:+.2f}"]],
           note=f"An up-to-date project of {n} stages, median of {repeat} runs.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
