"""bench/timed_repro.py (`make run`): dvc repro's output, then each stage's wall time and the total."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DVC_YAML = """\
stages:
  slow:
    cmd: python -c "import time; time.sleep(2.2); open('a.txt', 'w').write('a')"
    outs: [a.txt]
  quick:
    cmd: python -c "open('b.txt', 'w').write(open('a.txt').read())"
    deps: [a.txt]
    outs: [b.txt]
"""


def timed_repro(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "timed_repro.py"), *args], cwd=root,
                          capture_output=True, text=True, timeout=300)


def summary(stdout: str) -> list[str]:
    return stdout[stdout.index("stage  "):].splitlines()


def test_stage_times_and_total(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "config", "--local", "core.site_cache_dir", str(tmp_path / "site")], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    done = timed_repro(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Running stage 'slow'" in done.stdout  # dvc's own output passes through
    lines = summary(done.stdout)
    assert lines[0] == "stage  wall time (m:ss)"
    assert lines[1].startswith("slow   0:0") and int(lines[1][-1]) >= 2
    assert lines[2].startswith("quick  0:0")
    assert lines[3].startswith("total  0:") and lines[3].endswith("CPU cores")

    again = timed_repro(tmp_path)
    assert summary(again.stdout)[1:3] == ["slow   unchanged", "quick  unchanged"]

    (tmp_path / "dvc.yaml").write_text(DVC_YAML.replace("time.sleep(2.2); ", "time.sleep(0.1); 1/0; "))
    failed = timed_repro(tmp_path)
    assert failed.returncode != 0
    assert summary(failed.stdout)[1].endswith(" (failed)")
