"""The benchmark log: the tables the bench scripts measured, rendered into docs/benchmarks.md.

Run: python bench/benchlog.py   (re-renders the page from bench/log/*.json)

A bench script ends with `record(script, columns, rows, note)`: the run (date, commit, machine, command
and its table) is appended to bench/log/<script>.json and the page is written again. The page is never
edited by hand (tests/unit/test_benchlog.py checks it equals what this module renders); a section's
heading and text are the first paragraph of the script's docstring, so they live next to the code.
"""

from __future__ import annotations

import ast
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from imagegen.fsutil import atomic_file

REPO = Path(__file__).resolve().parents[1]
LOG = REPO / "bench" / "log"
PAGE = REPO / "docs" / "benchmarks.md"
ORDER = ("timed_repro", "venv_setup", "small_data", "vae_priors", "warm_start",
         "drift_batch", "folder_prepare", "evaluate_speed", "train_throughput", "flow_overhead",
         "registry_latency")  # the page's order; a script not listed comes after, by name
HEADER = """# Benchmarks

<!-- Written by bench/benchlog.py from bench/log/*.json; do not edit: run a bench script, or
`python bench/benchlog.py` to re-render. -->

Every table below was printed by the bench script named in its section and recorded by it, newest run
first. Figures come from shared machines whose speed drifts by about ±15 % over minutes: compare rows
of one run, and read single wall times as rough. Raw outputs of the GPU sessions are in `bench/results/`.
"""


def machine() -> str:
    """The CPU model and core count, and the GPU when torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    described = f"{cpu}, {os.cpu_count()} cores"
    torch = sys.modules.get("torch")  # only when the script already uses it: no import for a bare run
    if torch is not None and torch.cuda.is_available():
        described += f", {torch.cuda.get_device_name()}"
    return described


def commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def record(script: str, columns: list[str], rows: list[list], note: str = "", command: str | None = None) -> Path:
    """Print the table, append the run of bench/<script>.py to its log and re-render the page; returns the log."""
    if any(len(row) != len(columns) for row in rows):
        raise ValueError(f"{script}: every row needs {len(columns)} cells ({', '.join(columns)})")
    run = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "commit": commit(), "machine": machine(),
           "command": command or shlex.join(["python", f"bench/{script}.py", *sys.argv[1:]]),
           "columns": list(columns), "rows": [["" if cell is None else str(cell) for cell in row] for row in rows],
           "note": note}
    print(table(run["columns"], run["rows"]))
    path = LOG / f"{script}.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    write_atomic(path, json.dumps([run, *runs], indent=1, ensure_ascii=False) + "\n")
    write_atomic(PAGE, render())
    print(f"recorded in {path}; {PAGE} re-rendered", file=sys.stderr)
    return path


def write_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as partial:
        partial.write_text(text)


def about(script: str) -> tuple[str, str]:
    """The heading and the text of a section: the first line and the rest of the first paragraph of the
    script's docstring."""
    source = REPO / "bench" / f"{script}.py"
    doc = ast.get_docstring(ast.parse(source.read_text())) if source.exists() else None
    if not doc:
        raise ValueError(f"bench/log/{script}.json: bench/{script}.py is missing or has no docstring")
    first, *rest = doc.split("\n\n", 1)[0].splitlines()
    return first.strip().rstrip("."), " ".join(line.strip() for line in rest)


def table(columns: list[str], rows: list[list[str]]) -> str:
    cells = [columns, ["---"] * len(columns), *rows]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in cells)


def render() -> str:
    scripts = sorted((path.stem for path in LOG.glob("*.json")),
                     key=lambda name: (ORDER.index(name) if name in ORDER else len(ORDER), name))
    parts = [HEADER]
    for script in scripts:
        title, text = about(script)
        parts.append(f"## {title}\n\n`bench/{script}.py`. {text}\n")
        parts.extend(render_group(group) for group in groups(json.loads((LOG / f"{script}.json").read_text())))
    return "\n".join(parts)


def groups(runs: list[dict]) -> list[list[dict]]:
    """Consecutive one-row runs with the same columns share a table (a row per run); other runs stand alone."""
    grouped: list[list[dict]] = []
    for run in runs:
        last = grouped[-1] if grouped else None
        if last and len(run["rows"]) == 1 == len(last[-1]["rows"]) and run["columns"] == last[-1]["columns"]:
            last.append(run)
        else:
            grouped.append([run])
    return grouped


def render_group(runs: list[dict]) -> str:
    if len(runs) == 1:
        run = runs[0]
        return (f"**{run['date']}**, commit `{run['commit']}`, {run['machine']}: `{run['command']}`\n\n"
                + table(run["columns"], run["rows"]) + "\n" + (f"\n{run['note']}\n" if run["note"] else ""))
    rows = [[f"{run['date']}, `{run['commit']}`", *run["rows"][0], run["note"]] for run in runs]
    machines = sorted({run["machine"] for run in runs})
    commands = sorted({f"`{run['command']}`" for run in runs})
    return (f"{', '.join(commands)} on {'; '.join(machines)}:\n\n"
            + table(["run", *runs[0]["columns"], "note"], rows) + "\n")

if __name__ == "__main__":
    write_atomic(PAGE, render())
