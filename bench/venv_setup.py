"""Set-up speed: `make venv` on a fresh machine, with and without constraints.txt
A new virtual environment and `pip install -e '.[dev]'` with pip's cache off, as on a machine that never
installed the project: once resolving pyproject.toml's ranges afresh, once at the versions in
constraints.txt (what `make venv` does). Times the resolution alone first (`pip install --dry-run`), then
the whole set-up; counts the wheels pip downloaded to resolve and whether it backtracked ("looking at
multiple versions").

    python bench/venv_setup.py [--variants fresh,constraints]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlog import REPO, record


def install(constraints: bool) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="venv-setup-") as scratch:
        venv = Path(scratch) / "venv"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "--no-cache-dir"]
        subprocess.run([*pip, "install", "-q", "--upgrade", "pip"], check=True)
        command = [*pip, "install", *(["-c", "constraints.txt"] if constraints else []), "-e", ".[dev]"]
        resolve_started = time.perf_counter()
        resolved = run(command + ["--dry-run"])
        resolve_seconds = time.perf_counter() - resolve_started
        run(command)
        seconds = time.perf_counter() - started
    downloads = re.findall(r"^\s*Downloading (\S+)", resolved.stdout, re.MULTILINE)
    backtracked = sorted(set(re.findall(r"pip is looking at multiple versions of (\S+)",
                                        resolved.stdout + resolved.stderr)))
    return ["constraints.txt" if constraints else "pyproject.toml ranges", clock(resolve_seconds), clock(seconds),
            str(len(downloads)), ", ".join(backtracked) or "none"]


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"venv_setup: {' '.join(command[2:])} failed:\n{result.stderr[-2000:]}")
    return result


def clock(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}:{rest:02d}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="fresh,constraints", help="fresh, constraints or both, comma-separated")
    parser.add_argument("--note", default="", help="what else the machine was doing, for the log")
    args = parser.parse_args()
    rows = []
    for variant in args.variants.split(","):
        print(f"installing ({variant}) ...", file=sys.stderr, flush=True)
        rows.append(install(variant == "constraints"))
    record("venv_setup", ["resolved from", "resolve only (m:ss)", "venv + pip install (m:ss)", "wheels downloaded to resolve",
                          "backtracked over"], rows,
           note=" ".join(["pip's cache off (`--no-cache-dir`); the package index is this machine's registry mirror.",
                          args.note]).strip())


if __name__ == "__main__":
    main()
