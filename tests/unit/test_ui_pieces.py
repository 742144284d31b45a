"""Pure pieces behind what a user sees: pipeline keys, DVC experiment tags, readable grids, report charts."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from imagegen import lineage, tracking


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("IMAGEGEN_PIPELINE_RUN", "IMAGEGEN_PARENT_RUN_ID", "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_pipeline_key_orchestrator_first_then_dvc_then_standalone(clean_env, tmp_path):
    assert lineage.pipeline_key(tmp_path) is None  # `imagegen train-gan` on its own
    clean_env.setenv("DVC_STAGE", "train-gan")
    under_dvc = lineage.pipeline_key(tmp_path)
    assert under_dvc.startswith("dvc-")
    clean_env.setenv("IMAGEGEN_PIPELINE_RUN", "prefect-123")
    assert lineage.pipeline_key(tmp_path) == "prefect-123"


def test_stages_of_one_dvc_process_share_a_key_and_another_process_differs(tmp_path):
    """Two `imagegen`-like children of one `dvc` process get the same key; a second `dvc` process another."""
    probe = ("import os, sys; from pathlib import Path; sys.path[:0] = os.environ['PROBE_PATH'].split(':');"
             "from imagegen.lineage import pipeline_key; print(pipeline_key(Path('.')))")
    fake_dvc = tmp_path / "dvc"  # a process whose argv names dvc, running two stages one after the other
    fake_dvc.write_text(f"#!{sys.executable}\nimport subprocess, sys\n"
                        f"for _ in range(2): subprocess.run([sys.executable, '-c', {probe!r}], check=True)\n")
    fake_dvc.chmod(0o755)
    env = {**os.environ, "DVC_STAGE": "x", "PROBE_PATH": ":".join(sys.path)}
    env.pop("IMAGEGEN_PIPELINE_RUN", None)
    first = subprocess.run([str(fake_dvc)], env=env, capture_output=True, text=True, check=True).stdout.split()
    second = subprocess.run([str(fake_dvc)], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert len(first) == 2 and first[0] == first[1] and first[0].startswith("dvc-")
    assert second[0] == second[1] and second[0] != first[0]


def test_dvc_exp_tags_come_from_the_stage_environment(clean_env):
    assert lineage.dvc_exp_tags() == {}
    clean_env.setenv("DVC_EXP_NAME", "hefty-moth")
    clean_env.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    assert lineage.dvc_exp_tags() == {"dvc_exp_name": "hefty-moth", "dvc_exp_baseline_rev": "a" * 40}


def test_png_grid_scales_tiles_with_nearest_neighbour():
    from PIL import Image

    from imagegen.evaluation.sampling import png_grid

    images = np.zeros((64, 28, 28), np.uint8)
    images[0, 0, 0] = 255
    small = Image.open(io.BytesIO(png_grid(images, nrow=8)))
    big = Image.open(io.BytesIO(png_grid(images, nrow=8, scale=3)))
    assert small.size == (8 * 30 + 2, 8 * 30 + 2)  # torchvision's grid: 2-pixel padding
    assert big.size == (8 * 86 + 2, 8 * 86 + 2)
    block = np.asarray(big.convert("L"))[2:5, 2:5]
    assert (block == 255).all() and np.asarray(big.convert("L"))[5, 5] == 0  # one pixel -> a sharp 3 x 3 block


@pytest.mark.parametrize("count,channels,nrow", [(37, 1, None), (10, 3, 4), (5, 1, 10), (1, 3, None)])
def test_png_grid_lays_tiles_out_as_torchvision_does(count, channels, nrow):
    import math

    import torch
    from PIL import Image
    from torchvision.utils import make_grid

    from imagegen.evaluation.sampling import png_grid

    images = np.random.default_rng(count).integers(0, 256, (count, channels, 28, 28), dtype=np.uint8)
    expected = make_grid(torch.from_numpy(images), nrow=nrow or math.ceil(math.sqrt(count)), padding=2)
    ours = Image.open(io.BytesIO(png_grid(images, nrow)))
    assert ours.mode == ("L" if channels == 1 else "RGB")
    assert np.array_equal(np.asarray(ours.convert("RGB")), expected.permute(1, 2, 0).numpy())


def test_png_grid_does_not_import_torchvision():
    """Importing torchvision (and torch._dynamo with it) adds about 2 s to every stage that draws a grid."""
    fresh = ("import sys, numpy; from imagegen.evaluation.sampling import png_grid; "
             "png_grid(numpy.zeros((4, 28, 28), numpy.uint8)); print('torchvision' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", fresh], capture_output=True, text=True, check=True).stdout == "False\n"


def test_side_by_side_puts_both_grids_in_one_picture(tmp_path):
    from PIL import Image

    from imagegen.evaluation.pictures import side_by_side

    side_by_side(tmp_path / "both.png", {"GAN": np.zeros((64, 28, 28), np.uint8),
                                         "VAE": np.full((64, 28, 28), 255, np.uint8)})
    picture = np.asarray(Image.open(tmp_path / "both.png").convert("L"))
    assert picture.shape[1] > 2 * 8 * 84
    left, right = picture[100, : picture.shape[1] // 2], picture[100, picture.shape[1] // 2:]
    assert (left == 0).sum() > 400 and (right == 255).sum() > 400


def test_report_chart_is_a_vega_lite_line_per_column(tmp_path):
    from imagegen.report import chart

    (tmp_path / "p.csv").write_text("epoch,d_loss,g_loss,fid_probe\n1,1.5,0.5,30\n2,1.2,0.7,\n")
    spec = chart(tmp_path, "GAN", "p.csv", ("d_loss", "g_loss", "fid_probe"))
    assert spec["mark"]["type"] == "line"
    assert {(v["epoch"], v["series"]) for v in spec["data"]["values"]} == {
        (1, "d_loss"), (1, "g_loss"), (1, "fid_probe"), (2, "d_loss"), (2, "g_loss")}  # empty cells skipped
    assert chart(tmp_path, "absent", "missing.csv", ("x",)) is None


def test_report_refuses_a_template_without_the_inlined_libraries(tmp_path):
    from imagegen.errors import ImagegenError
    from imagegen.report import read_template

    with pytest.raises(ImagegenError, match="plots/template.html: missing"):
        read_template(tmp_path)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots/template.html").write_text("<html>{plot_divs}<script src=https://cdn/vega></script></html>")
    with pytest.raises(ImagegenError, match="not the offline plots page"):
        read_template(tmp_path)


def test_report_without_evaluation_is_a_one_line_error_and_writes_nothing(tmp_path):
    import shutil

    from imagegen.config import Config
    from imagegen.errors import ImagegenError
    from imagegen.report import OUTPUT, TEMPLATE, run_report
    from tests.conftest import REPO_ROOT

    (tmp_path / "plots").mkdir()
    shutil.copy(REPO_ROOT / TEMPLATE, tmp_path / TEMPLATE)
    with pytest.raises(ImagegenError, match=r"metrics/evaluate.json: missing; run the pipeline"):
        run_report(Config(), tmp_path)
    assert not (tmp_path / OUTPUT).exists()


# --- the pipeline run's row: headline metrics, stage names, what ran and what DVC skipped

def test_headline_metrics_come_from_the_evaluation_file(tmp_path):
    assert tracking.headline_metrics(tmp_path) == {}  # before evaluate has run
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/evaluate.json").write_text(
        '{"gan": {"fid": 4.8, "recall": 0.4}, "vae": {"fid": NaN, "nll_iwae": 274.4}, "seconds": 3}')
    assert tracking.headline_metrics(tmp_path) == {"gan_fid": 4.8, "vae_nll": 274.4}  # NaN left out


def test_the_saved_view_shows_the_headline_columns_as_mlflows_ui_reads_it():
    import json

    view = json.loads(tracking.saved_view())
    assert view["name"] == "Headline metrics" and isinstance(view["createdAt"], int)
    state = json.loads(view["state"])  # the UI expects the state as JSON text inside the envelope
    assert state["selectedColumns"][:3] == ["metrics.`gan_fid`", "metrics.`vae_fid`", "metrics.`vae_nll`"]
    assert "params.`vae.beta`" in state["selectedColumns"]
    assert tracking.view_tag() == "mlflow.sharedViewState.headline"


def test_stage_runs_are_named_after_their_pipeline_run(clean_env, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e", artifact_location=tmp_path.as_uri())
    parent = client.create_run(experiment, run_name="dvc repro 2026-12-03 09:00").info.run_id
    assert tracking.stage_run_name(client, None, "train-gan") == "train-gan"  # a stage on its own
    assert tracking.stage_run_name(client, parent, "train-gan") == "dvc repro 2026-12-03 09:00 · train-gan"
    clean_env.setenv("DVC_EXP_NAME", "hefty-moth")
    assert tracking.stage_run_name(client, parent, "train-gan") == "hefty-moth · train-gan"


def test_the_pipeline_note_lists_what_ran_what_dvc_skipped_and_what_is_still_to_run():
    status = {"report": [{"changed deps": {"metrics/train-gan.json": "modified"}}],
              "train-gan": [{"changed deps": {"params.yaml": {"gan.epochs": "modified"}}}]}
    summary = lineage.stage_summary({"train-gan", None}, status)
    assert summary == {"ran": ["train-gan"], "skipped": ["train-features", "train-vae", "evaluate", "register"],
                       "pending": ["report (changed deps: metrics/train-gan.json modified)"], "unknown": []}
    note = lineage.pipeline_note(summary)
    assert "**Ran:** train-gan" in note
    assert "didn't change" in note and "train-features, train-vae, evaluate, register" in note
    assert lineage.change_reason(status["train-gan"]) == "changed deps: params.yaml gan.epochs modified"
    unknown = lineage.stage_summary({"evaluate"}, None)  # not under DVC: no reason known
    assert unknown["skipped"] == [] and "train-gan" in unknown["unknown"]


# --- the model card's pieces

@pytest.mark.parametrize("metric, direction", [("fid", "lower ↓"), ("fid_inception", "lower ↓"), ("kid_mean", "lower ↓"),
                                               ("nll_iwae_per_dim", "lower ↓"), ("recall", "higher ↑"),
                                               ("class_entropy", "higher ↑"), ("kid_std", ""), ("n_samples", "")])
def test_each_card_metric_has_its_better_direction(metric, direction):
    from imagegen.registry import better

    assert better(metric) == direction


def test_card_numbers_have_one_format():
    from imagegen.registry import number

    assert [number(v) for v in (4.80088, "4.80088", 0.05633, 274.41882, 10000, "30.0", None, float("nan"))] == [
        "4.801", "4.801", "0.05633", "274.4", "10000", "30", "—", "nan"]


def test_params_diff_lists_only_what_changed():
    from imagegen.registry import params_diff

    champion = {"vae.beta": "0.05", "vae.epochs": "16", "train.limit": "None"}
    mine = {"vae.beta": "0.5", "vae.epochs": "16", "vae.prior": "mixture"}
    assert params_diff(mine, champion) == [("train.limit", "None", "—"), ("vae.beta", "0.05", "0.5"),
                                           ("vae.prior", "—", "mixture")]


def test_the_card_says_whether_each_metric_is_better_than_the_champions():
    from imagegen.registry import verdict

    assert [verdict("fid", 4.0, "5.0"), verdict("fid", 6.0, 5.0), verdict("recall", 0.6, 0.5),
            verdict("recall", 0.5, "0.5"), verdict("kid_std", 1, 2), verdict("fid", 4.0, None)] == [
        "**better**", "worse", "**better**", "equal", "", ""]
