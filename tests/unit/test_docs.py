"""The README fits a screen and leads to the code; the manual in docs/ builds with no broken link; the
benchmark page is what the bench scripts recorded, not hand-edited."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import benchlog  # noqa: E402

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def readme() -> str:
    return (REPO / "README.md").read_text()


def test_readme_fits_a_screen_and_its_links_resolve():
    assert len(readme().splitlines()) <= 200
    local = [target for target in LINK.findall(readme()) if "://" not in target]
    assert local, "the README links into the repository"
    missing = [target for target in local if not (REPO / target).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_readme_leads_to_every_stage_code_and_every_user_task():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    rows = [line for line in readme().splitlines() if line.startswith("| ")]
    for stage in stages:
        row = next((line for line in rows if re.search(rf"^\| [^|]*\b{re.escape(stage)}\b", line)), None)
        assert row is not None, f"stage {stage} has no row in the README's stage table"
        assert any(target.endswith(".py") and (REPO / target).is_file() for target in LINK.findall(row)), stage
    for page in ("pipeline.md", "own-images.md", "retraining.md", "compare.md", "serving.md"):
        assert f"](docs/{page})" in readme(), page


@pytest.fixture
def mkdocs() -> str:
    found = Path(sys.executable).parent / "mkdocs"
    if not found.exists():
        pytest.skip("mkdocs is not installed in this venv (pip install -e '.[dev]')")
    return str(found)


def test_docs_site_builds_strict(mkdocs, tmp_path):
    """mkdocs --strict fails on a broken link or anchor between pages and on a page missing from the nav."""
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "benchmarks" / "index.html").exists()


def test_broken_link_fails_the_strict_build(mkdocs, tmp_path):
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path)
    page = tmp_path / "docs" / "tests.md"
    page.write_text(page.read_text() + "\nSee [the pipeline](pipline.md).\n")
    result = subprocess.run([mkdocs, "build", "--strict"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "pipline.md" in result.stderr


def test_benchmark_page_is_rendered_from_the_logs():
    assert (REPO / "docs" / "benchmarks.md").read_text() == benchlog.render(), \
        "docs/benchmarks.md differs from bench/log: run `python bench/benchlog.py` (never edit the page)"


def test_every_log_belongs_to_a_script_that_records_it():
    logs = sorted(benchlog.LOG.glob("*.json"))
    assert logs
    for log in logs:
        source = (REPO / "bench" / f"{log.stem}.py").read_text()
        assert f'record("{log.stem}"' in source, f"bench/{log.stem}.py does not record its log"
        for run in json.loads(log.read_text()):
            assert all(len(row) == len(run["columns"]) for row in run["rows"]), log.name


def test_record_appends_a_run_and_rerenders_the_page(tmp_path, monkeypatch):
    monkeypatch.setattr(benchlog, "LOG", tmp_path / "log")
    monkeypatch.setattr(benchlog, "PAGE", tmp_path / "benchmarks.md")
    monkeypatch.setattr(benchlog, "REPO", REPO)  # the scripts' docstrings
    benchlog.record("drift_batch", ["a", "b"], [[1, None]], note="older run", command="python x")
    benchlog.record("drift_batch", ["a", "b"], [[2, 3]], note="newer run", command="python x")
    runs = json.loads((tmp_path / "log" / "drift_batch.json").read_text())
    assert [run["rows"] for run in runs] == [[["2", "3"]], [["1", ""]]]  # newest first, None as empty
    page = (tmp_path / "benchmarks.md").read_text()
    assert "## The drift gate's two views" in page and page.index("newer run") < page.index("older run")
    assert "| run | a | b | note |" in page  # one-row runs of the same columns share a table
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["benchmarks.md", "drift_batch.json", "log"]
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        benchlog.record("drift_batch", ["a", "b"], [[1]])
