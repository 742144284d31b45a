"""How long the pipeline takes: `dvc repro` stage by stage
`dvc repro` with a wall-clock summary: the time of each stage it ran (m:ss), and the total. The runs logged
here are `make run` in a fresh clone of main with the venv already built and nothing else running.

Run: python bench/timed_repro.py [dvc repro arguments]   (`make run` runs it; with BENCH_RECORD="a note"
set, the run is also logged to docs/benchmarks.md)

DVC's own output passes through unchanged (stdout is read to see where each stage starts; the
stages' logs and progress bars go to stderr as usual). A stage's time runs from DVC's
"Running stage" line to the next stage's start or the end, so it includes DVC's hashing and
caching of the stage's outputs. Exits with dvc's exit status; first, a name in the image folder that DVC
cannot hash (not valid UTF-8) stops it with one line naming the file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

RUNNING = re.compile(r"^Running stage '([^']+)'")
UNCHANGED = re.compile(r"^Stage '([^']+)' didn't change, skipping")


def clock(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}:{rest:02d}"


def main(argv: list[str]) -> int:
    from imagegen.data.folder import folder_name_problem

    if problem := folder_name_problem(Path.cwd()):  # DVC would fail on it naming no file
        print(f"make run: {problem}", file=sys.stderr)
        return 1
    started = time.monotonic()
    rows: list[list] = []  # [stage, seconds or None (unchanged)]
    current_start = None
    proc = subprocess.Popen(["dvc", "repro", *argv], stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            now = time.monotonic()
            running, unchanged = RUNNING.match(line), UNCHANGED.match(line)
            if (running or unchanged) and current_start is not None:
                rows[-1][1], current_start = now - current_start, None
            if running:
                rows.append([running[1], None])
                current_start = now
            elif unchanged:
                rows.append([unchanged[1], None])
        code = proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        code = 130
    end = time.monotonic()
    if current_start is not None:
        rows[-1][1] = end - current_start
    width = max([len("total"), *(len(stage) for stage, _ in rows)])
    print(f"\n{'stage':<{width}}  wall time (m:ss)")
    for i, (stage, seconds) in enumerate(rows):
        failed = " (failed)" if code and i == len(rows) - 1 and seconds is not None else ""
        print(f"{stage:<{width}}  {'unchanged' if seconds is None else clock(seconds)}{failed}")
    print(f"{'total':<{width}}  {clock(end - started)} on {os.cpu_count()} CPU cores")
    if "BENCH_RECORD" in os.environ and code == 0:
        from benchlog import record

        record("timed_repro", [stage for stage, _ in rows] + ["total"],
               [[clock(seconds) if seconds is not None else "unchanged" for _, seconds in rows] + [clock(end - started)]],
               note=os.environ["BENCH_RECORD"], command="make run")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
