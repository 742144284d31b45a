"""What a user sees, checked in a real browser: the MLflow UI over a store written by the tiny pipeline
(`dvc repro`, then `dvc exp run`), the offline `dvc plots` page and `imagegen report`.

Headless Chromium from the Debian package `chromium`, driven by Playwright (no browser download).
Every request to an address other than 127.0.0.1 is blocked and recorded; the tests assert none was
attempted. Set IMAGEGEN_SCREENSHOTS=DIR to keep the screenshots (docs/screenshots/ come from here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_project, set_params
from tests.helpers import free_port, missing_debian, needs_fashion_mnist, start, stop

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    needs_fashion_mnist,
]
TINY = {
    "train": {"limit": 256, "mlflow": True, "threads": 1},
    "features": {"epochs": 2, "width": 4, "feature_dim": 16},
    "gan": {"epochs": 2, "width": 4, "latent_dim": 8, "batch_size": 32},
    "vae": {"epochs": 2, "width": 4, "latent_dim": 4, "batch_size": 32},
    "eval": {"n_samples": 1000, "kid_subsets": 5, "iwae_k": 4, "iwae_images": 200},
}
STAGE_RUNS = {"train-features", "train-gan", "train-vae", "evaluate", "register"}
EXPERIMENT = "imagegen-fashion-mnist"
ML_VIEW = "workflowType=machine_learning"  # the README's link: MLflow 3.17 opens the runs table with it
HEADLINE_VIEW = "viewStateShareKey=headline"  # ... and the saved view with the headline columns
HEADLINES = {"gan_fid", "vae_fid", "vae_nll"}
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def run(root: Path, *cmd: str) -> str:
    env = {**os.environ, **GIT_ENV}
    env.pop("MLFLOW_TRACKING_URI", None)  # the embedded store, as `make run` uses it
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """The tiny pipeline twice: `dvc repro`, then `dvc exp run -S vae.beta=0.5` (a second VAE version)."""
    # .gitignore: the MLflow store stays out of git
    root = copy_project(tmp_path_factory.mktemp("ui") / "project", (".gitignore",))
    run(root, "git", "init", "-q")
    run(root, "dvc", "config", "--local", "core.site_cache_dir", str(root.parent / "dvc-site"))
    set_params(root, **TINY)
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "tiny")
    run(root, "dvc", "repro")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "baseline")
    run(root, "dvc", "exp", "run", "-S", "vae.beta=0.5")
    return root


@pytest.fixture(scope="module")
def client(pipeline):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{pipeline / 'mlflow.db'}")


@pytest.fixture(scope="module")
def runs(client) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], max_results=100)


def parents(runs) -> list:
    return sorted((r for r in runs if r.data.tags.get("run_kind") == "pipeline"), key=lambda r: r.info.start_time)


def children(runs, parent) -> list:
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def stage(run) -> str | None:
    return run.data.tags.get("stage")


def stage_runs(runs, name: str) -> list:
    return sorted((r for r in runs if stage(r) == name), key=lambda r: r.info.start_time)


# --- the store, through MLflow's client

def test_one_parent_run_per_pipeline_run_with_the_stage_runs_nested(pipeline, runs, client):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    repro, exp = parents(runs)
    assert {stage(r) for r in children(runs, repro)} == STAGE_RUNS
    assert {stage(r) for r in children(runs, exp)} == {"train-vae", "evaluate", "register"}
    assert {r.info.run_name for r in children(runs, repro)} == {f"{repro.info.run_name} · {s}" for s in STAGE_RUNS}
    assert len(runs) == 2 + 5 + 3  # nothing else: no stray, un-nested stage runs
    for parent in (repro, exp):
        stages = children(runs, parent)
        assert parent.info.status == "FINISHED"
        assert all(s.data.tags["pipeline_run"] == parent.data.tags["pipeline_run"] for s in stages)
        assert parent.info.start_time <= min(s.info.start_time for s in stages)
        assert parent.info.end_time >= max(s.info.end_time for s in stages)  # it spans its stages
    assert repro.data.tags["pipeline_run"] != exp.data.tags["pipeline_run"]
    assert repro.info.run_name.startswith("dvc repro ") and repro.data.params["gan.epochs"] == "2"
    # the pipeline's row: the headline metrics and the variant's few params (all params stay on the stage runs)
    evaluation = json.loads((pipeline / "metrics/evaluate.json").read_text())  # the workspace: the experiment's
    assert set(repro.data.metrics) == set(exp.data.metrics) == HEADLINES
    assert exp.data.metrics["vae_fid"] == pytest.approx(evaluation["vae"]["fid"])
    assert exp.data.metrics["gan_fid"] == repro.data.metrics["gan_fid"]  # GAN up to date: its current FID
    assert exp.data.params["vae.beta"] == "0.5" and len(repro.data.params) < 12
    assert all(r.data.params["gan.batch_size"] == "32" for r in stage_runs(runs, "train-gan"))
    # what ran and what DVC skipped as up to date
    assert exp.data.tags["stages_ran"] == "train-vae, evaluate, register"
    assert exp.data.tags["stages_skipped"] == "train-features, train-gan"
    assert "didn't change" in exp.data.tags["mlflow.note.content"]


def test_dvc_exp_runs_carry_the_experiment_name_and_baseline(pipeline, runs, client):
    shown = json.loads(run(pipeline, "dvc", "exp", "show", "--json"))
    names = [e["name"] for baseline in shown for e in (baseline.get("experiments") or [])]
    assert len(names) == 1, shown
    head = run(pipeline, "git", "rev-parse", "HEAD").strip()
    _, exp = parents(runs)
    assert exp.info.run_name == f"dvc exp {names[0]}"
    assert {r.info.run_name for r in children(runs, exp)} == {f"{names[0]} · {s}" for s in ("train-vae", "evaluate",
                                                                                           "register")}
    # the search filter of docs/compare.md finds the experiment's pipeline run and its three stage runs
    found = client.search_runs([exp.info.experiment_id], f"tags.dvc_exp_name = '{names[0]}'")
    assert len(found) == 4 and all(r.data.tags["dvc_exp_baseline_rev"] == head for r in found)
    repro, _ = parents(runs)
    assert not any("dvc_exp_name" in r.data.tags for r in [repro, *children(runs, repro)])


def test_stages_that_read_data_log_it_as_a_dataset_with_the_dvc_hash(pipeline, runs):
    lock = yaml.safe_load((pipeline / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
    readers = [r for r in runs if stage(r) in {"train-features", "train-gan", "train-vae", "evaluate"}]
    assert len(readers) == 6
    for r in readers:
        (dataset,) = [d.dataset for d in r.inputs.dataset_inputs]
        assert dataset.name == "fashion-mnist-prepared" + ("" if stage(r) == "evaluate" else "-first256")
        assert dataset.digest == md5[:36]
        assert json.loads(dataset.source)["uri"].endswith("data/prepared")
        profile = json.loads(dataset.profile)
        if stage(r) == "evaluate":
            assert profile["images"] == {"train": 60000, "test": 10000}
            assert profile["images_per_class"]["train"]["Ankle boot"] == 6000
        else:  # train.limit: 256 images trained on, and the run says so
            assert profile["images"] == {"train": 256, "test": 10000} and r.data.tags["data_images"] == "256"
    contexts = {stage(r): r.inputs.dataset_inputs[0].tags[0].value for r in readers}
    assert contexts["evaluate"] == "evaluation" and contexts["train-gan"] == "training"


def test_train_features_logs_its_run_and_evaluate_spans_its_work(pipeline, runs, client):
    (features,) = stage_runs(runs, "train-features")
    assert features.data.params["features.epochs"] == "2"
    assert [m.step for m in client.get_metric_history(features.info.run_id, "test_accuracy")] == [1, 2]
    accuracy = json.loads((pipeline / "metrics/features.json").read_text())["test_accuracy"]
    assert features.data.metrics["test_accuracy"] == pytest.approx(accuracy)
    assert features.data.metrics["summary/epochs"] == 2 and not any(k.startswith("final_") for k in features.data.metrics)
    evaluate = stage_runs(runs, "evaluate")[-1]
    scoring_s = json.loads((pipeline / "metrics/evaluate.json").read_text())["seconds"]
    assert (evaluate.info.end_time - evaluate.info.start_time) / 1000 >= scoring_s


def test_sample_grids_are_readable_and_the_evaluate_run_shows_both_models(pipeline, runs, client):
    from PIL import Image

    assert Image.open(pipeline / "reports/gan/samples-epoch-002.png").size == (8 * 86 + 2, 8 * 86 + 2)
    evaluate = stage_runs(runs, "evaluate")[0]
    logged = {a.path for a in client.list_artifacts(evaluate.info.run_id, "evaluate")}
    assert "evaluate/gan-vs-vae.png" in logged


def test_each_registered_version_has_a_model_card(runs, client):
    version = client.get_model_version("fashion-mnist-vae", "2")
    card = version.description
    for part in ("# fashion-mnist-vae version 2", "| metric | better | this version | champion before (v1) | this version is |",
                 "prepared data DVC md5", "## Runs", "Intended use", "Known limits", "get-artifact?path="):
        assert part in card, part
    assert f"runs/{version.tags['training_run_id']})" in card
    assert version.run_id == version.tags["training_run_id"] == stage_runs(runs, "train-vae")[-1].info.run_id
    assert "| vae.beta | `0.05` | `0.5` |" in card  # the param that differs from the champion's (v1)
    assert "| fid | lower ↓ |" in card and "DVC experiment `" in card
    register_run, path = version.tags["model_card"].removeprefix("runs:/").split("/", 1)
    assert client.download_artifacts(register_run, path).endswith("model_card.md")
    assert {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(register_run, path.rsplit("/", 1)[0])} == {
        "model_card.md", "vae-samples.png"}


# --- the browser

@pytest.fixture(scope="module")
def ui(pipeline):
    """`mlflow ui` as the README starts it, on a free loopback port."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "ui",  # no store flag: MLflow finds ./mlflow.db itself
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = start(cmd, pipeline.parent / "ui.log", f"http://127.0.0.1:{port}/health", cwd=pipeline)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(missing_debian("chromium"))
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, tmp_path):
    """A fresh page whose requests may only go to 127.0.0.1 or local files; `page.attempted` lists the others."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    attempted: list[str] = []

    def route(request_route):
        url = request_route.request.url
        if url.startswith(("http://127.0.0.1:", "file://", "data:", "blob:")):
            request_route.continue_()
        else:
            attempted.append(url)
            request_route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.attempted = attempted
    page.set_default_timeout(60_000)
    yield page
    context.close()
    assert attempted == [], f"requests to non-loopback addresses: {attempted}"


def screenshot(page, name: str, tmp_path: Path, **options) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), **options)
    if folder := os.environ.get("IMAGEGEN_SCREENSHOTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(folder) / name)
    return path


def close_assistant(page) -> None:
    """MLflow 3.17 opens an 'MLflow Assistant' side panel; close it so the screenshots show the page."""
    button = page.get_by_role("button", name="Close")
    if button.count() and button.first.is_visible():
        button.first.click()


def open_runs_table(page, ui: str, client, view: str = HEADLINE_VIEW) -> None:
    """The runs table as the README's link opens it: the saved view with the headline columns."""
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    page.goto(f"{ui}/#/experiments/{experiment}/runs?{view}&{ML_VIEW}")
    page.get_by_text("matching runs").wait_for()


def test_experiment_opens_on_the_runs_table_and_a_pipeline_row_expands(page, ui, client, runs, tmp_path):
    _, exp = parents(runs)
    open_runs_table(page, ui, client, view="")  # MLflow's default columns: the Dataset column names the data
    digest = client.get_run(exp.info.run_id).inputs.dataset_inputs[0].dataset.digest
    page.get_by_text(f"({digest[:8]}").first.wait_for()
    open_runs_table(page, ui, client)
    close_assistant(page)
    rows = page.get_by_role("row")
    page.get_by_text(exp.info.run_name).wait_for()  # the newest pipeline run's row
    assert not page.get_by_text("train-gan", exact=True).count()  # collapsed: one row per pipeline run
    expand = page.locator('button[data-component-id*="runnamecellrenderer"]')
    assert expand.count() == 2
    for column in (*HEADLINES, "train.limit"):  # the headline columns, shown by the saved view
        page.get_by_role("columnheader", name=column).first.wait_for()
    expand.last.click()  # the older pipeline run: `dvc repro`
    repro, _ = parents(runs)
    page.get_by_text(f"{repro.info.run_name} · train-gan", exact=True).wait_for()
    texts = " ".join(rows.all_inner_texts())
    assert all(name in texts for name in STAGE_RUNS)
    screenshot(page, "mlflow-runs-table.png", tmp_path)


def test_a_runs_metric_charts_render(page, ui, client, runs, tmp_path):
    (gan,) = stage_runs(runs, "train-gan")
    page.goto(f"{ui}/#/experiments/{gan.info.experiment_id}/runs/{gan.info.run_id}/model-metrics?{ML_VIEW}")
    page.get_by_text("fid_probe").first.wait_for()
    charts = page.locator("svg.main-svg")
    charts.first.wait_for()
    assert charts.count() >= 4
    traces = page.locator("svg.main-svg g.trace path, svg.main-svg g.trace .point")
    assert traces.count() > 0  # lines/points drawn, not empty axes
    page.get_by_text("loss/d").first.wait_for()  # the losses in one section
    close_assistant(page)
    screenshot(page, "mlflow-run-charts.png", tmp_path)


def test_the_version_page_shows_the_champion_alias_and_the_model_card(page, ui, client):
    page.goto(f"{ui}/#/models/fashion-mnist-gan/versions/1?{ML_VIEW}")
    page.get_by_text("Intended use").wait_for()
    alias = r"Aliases\W+(@\s*challenger\s+)?@\s*champion"  # the alias, by the version (rendered after the card)
    page.wait_for_function(f"() => /{alias}/.test(document.body.innerText)")
    text = page.inner_text("body")
    assert re.search(alias, text), text[:600]
    assert "Decision: champion." in text
    assert page.get_by_role("cell", name="fid", exact=True).count() >= 1  # the card's metrics table, rendered
    grid = page.locator('img[src^="get-artifact?path=model_cards/"]')
    grid.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 600", arg=grid.element_handle())


def rendered_vega_charts(page) -> int:
    """How many Vega views drew something: an SVG with paths, or a canvas with at least 200 inked pixels."""
    page.wait_for_function("document.querySelectorAll('.vega-embed').length > 0")
    page.wait_for_function("[...document.querySelectorAll('.vega-embed')].every("
                           "e => e.querySelector('svg path, canvas'))")
    return page.evaluate("""[...document.querySelectorAll('.vega-embed')].filter(e => {
        const c = e.querySelector('canvas');
        if (!c) return e.querySelectorAll('svg path').length > 0;
        const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let inked = 0;
        for (let i = 0; i < data.length; i += 4) {
            if (data[i + 3] > 0 && (data[i] < 200 || data[i + 1] < 200 || data[i + 2] < 200)) inked++;
        }
        return inked >= 200;
    }).length""")


def test_dvc_plots_render_offline(page, pipeline, tmp_path):
    page_html = run(pipeline, "dvc", "plots", "show", "-o", str(tmp_path / "dvc_plots"))
    index = tmp_path / "dvc_plots" / "index.html"
    assert "index.html" in page_html and "cdn.jsdelivr" not in index.read_text()
    page.goto(index.as_uri())
    assert rendered_vega_charts(page) == 5  # the five curves of dvc.yaml's plots section, once each
    assert "GAN FID probe per epoch" in index.read_text()
    run(pipeline, "dvc", "plots", "diff", "HEAD", "-o", str(tmp_path / "dvc_diff"))  # workspace (the exp) vs baseline
    diff = tmp_path / "dvc_diff" / "index.html"
    assert "cdn.jsdelivr" not in diff.read_text()
    page.goto(diff.as_uri())
    assert rendered_vega_charts(page) == 5


def test_the_report_renders_offline(page, pipeline, tmp_path):
    report = pipeline / "reports/report.html"
    page.goto(report.as_uri())
    assert rendered_vega_charts(page) == 5
    text = page.inner_text("body")
    for part in ("Data validation: passed", "Registry decision", "fashion-mnist-vae", "champion before (v1)",
                 "GAN and VAE samples side by side"):
        assert part in text, part
    assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 100)")
    assert "<td>champion</td>" in report.read_text()  # GAN: unchanged, still the champion
    page.set_viewport_size({"width": 1300, "height": 1250})
    screenshot(page, "report.png", tmp_path)


def test_two_runs_of_a_stage_have_distinct_names_in_the_compare_view(page, ui, runs):
    first, second = stage_runs(runs, "train-vae")
    assert first.info.run_name != second.info.run_name
    ids = ",".join(f'"{r.info.run_id}"' for r in (first, second))
    page.goto(f"{ui}/#/compare-runs?runs=[{ids}]&experiments=[\"{first.info.experiment_id}\"]&{ML_VIEW}")
    for r in (first, second):
        page.get_by_text(r.info.run_name).first.wait_for()


def test_the_second_versions_card_lists_the_changed_param_and_links_its_training_run(page, ui, runs):
    training = stage_runs(runs, "train-vae")[-1]
    page.goto(f"{ui}/#/models/fashion-mnist-vae/versions/2?{ML_VIEW}")
    page.get_by_text("Params that differ from the champion's").wait_for()
    row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="vae.beta", exact=True))
    assert row.first.inner_text().split() == ["vae.beta", "0.05", "0.5"]
    assert page.get_by_role("cell", name="lower ↓").count() >= 1
    link = page.locator(f'a[href*="/runs/{training.info.run_id}"]')
    assert link.count() >= 1  # the version's source run and the card's training link


def test_a_pipeline_run_says_which_stages_dvc_skipped(page, ui, runs):
    _, exp = parents(runs)
    page.goto(f"{ui}/#/experiments/{exp.info.experiment_id}/runs/{exp.info.run_id}?{ML_VIEW}")
    page.get_by_text("Skipped by DVC").first.wait_for()
    assert "train-features, train-gan" in page.inner_text("body")


@pytest.fixture(scope="module")
def noop_exp(pipeline, client) -> list:
    """A third pipeline run whose training stages re-run (a param they read changed) but produce the same
    weights, so that evaluate and register are up to date: the last tests of this module use it."""
    run(pipeline, "dvc", "exp", "run", "-S", "train.system_metrics=false")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], max_results=100)


def test_a_pipeline_run_whose_evaluation_was_up_to_date_still_has_the_headline_metrics(noop_exp, client):
    earlier, noop = parents(noop_exp)[1:]
    assert noop.data.tags["stages_ran"] == "train-gan, train-vae"
    assert noop.data.tags["stages_skipped"] == "train-features, evaluate, register"
    assert noop.data.metrics == earlier.data.metrics  # the current outputs' numbers: the row stays comparable
    assert len(client.search_model_versions("name = 'fashion-mnist-vae'")) == 2  # nothing new registered
