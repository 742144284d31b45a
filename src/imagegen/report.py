"""`imagegen report`: one self-contained HTML page of the last pipeline run, readable offline.

Data validation summary, training curves (Vega-Lite, the libraries inlined from plots/template.html,
the same page `dvc plots show` uses), sample grids of both models (PNG as data: URIs), the evaluation
metrics with the champion's values beside them, and the register decision. Everything is read from
the stage outputs (metrics/, plots/, reports/); the champion's metrics come from the MLflow registry
when it is reachable, else only register.json's value of the chosen metric is shown.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from imagegen.config import Config
from imagegen.errors import ImagegenError
from imagegen.fsutil import atomic_file
from imagegen.layout import MODEL_KINDS, experiment_name, registered_model_name

log = logging.getLogger(__name__)

OUTPUT = Path("reports/report.html")
TEMPLATE = Path("plots/template.html")
CURVES = (  # (title, csv, columns)
    ("GAN losses", "plots/train-gan.csv", ("d_loss", "g_loss")),
    ("GAN FID probe per epoch (lower is better)", "plots/train-gan.csv", ("fid_probe",)),
    ("VAE loss and reconstruction (nats per image)", "plots/train-vae.csv", ("loss", "recon")),
    ("VAE KL term (nats per image)", "plots/train-vae.csv", ("kl",)),
    ("Feature net: test accuracy and loss", "plots/train-features.csv", ("test_accuracy", "loss")),
)
PICTURES = (  # (caption, path relative to root)
    ("GAN and VAE samples side by side (evaluation samples, tiles x3)", "reports/evaluate/gan-vs-vae.png"),
    ("GAN latent interpolations", "reports/evaluate/gan-interpolations.png"),
    ("VAE latent interpolations", "reports/evaluate/vae-interpolations.png"),
    ("VAE reconstructions (rows: test images, then their reconstructions)", "reports/evaluate/vae-reconstructions.png"),
)
STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1240px; color: #222 }
table { border-collapse: collapse; margin: 8px 0 16px } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right }
th { background: #f3f3f3 } td:first-child, th:first-child { text-align: left }
.ok { color: #17803d } .bad { color: #b42318 } figure { display: inline-block; margin: 8px 16px 8px 0 }
img { image-rendering: pixelated; max-width: 100% } .charts > div { display: inline-block; margin: 0 12px 12px 0 }
</style>"""


@dataclass(frozen=True)
class ReportResult:
    path: Path
    charts: int
    pictures: int


def run_report(cfg: Config, root: Path = Path(".")) -> ReportResult:
    template = read_template(root)
    evaluation = read_json(root, "metrics/evaluate.json")
    registered = read_json(root, "metrics/register.json", required=False)
    champions = champion_metrics(cfg, root, registered)
    charts = [chart(root, *curve) for curve in CURVES]
    charts = [c for c in charts if c]
    pictures = [(caption, root / path) for caption, path in PICTURES if (root / path).is_file()]
    pictures += [(f"{kind.upper()} training samples, last epoch (fixed latents)", last)
                 for kind in MODEL_KINDS if (last := last_grid(root, kind))]
    body = "\n".join([
        STYLE,
        f"<h1>imagegen report: {html.escape(cfg.data.dataset)}</h1>",
        f"<p>Written {time.strftime('%Y-%m-%d %H:%M %Z')} from the stage outputs in this folder.</p>",
        validation_section(read_json(root, "metrics/validate.json", required=False)),
        "<h2>Metrics (test split)</h2>", metrics_table(evaluation, champions, registered),
        register_section(registered),
        "<h2>Training curves</h2>", '<div class="charts">',
        *(f'<div id="chart{i}"></div>' for i in range(len(charts))), "</div>",
        "<h2>Samples</h2>",
        *(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
          f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(caption)}</figcaption></figure>'
          for caption, path in pictures),
        "<script>", *(f"vegaEmbed('#chart{i}', {json.dumps(spec)}, {{actions: false}});"
                      for i, spec in enumerate(charts)), "</script>",
    ])
    page = (template.replace("{plot_divs}", body).replace("{refresh_tag}", "")
            .replace("<title>DVC plots (offline)</title>", "<title>imagegen report</title>"))
    with atomic_file(root / OUTPUT) as tmp:
        tmp.write_text(page, encoding="utf8")
    if cfg.train.mlflow:
        from imagegen import tracking

        tracking.finish_pipeline(root, experiment_name(cfg.data.dataset))
    return ReportResult(root / OUTPUT, len(charts), len(pictures))


def read_template(root: Path) -> str:
    path = root / TEMPLATE
    try:
        text = path.read_text(encoding="utf8")
    except FileNotFoundError:
        raise ImagegenError(f"{path}: missing; expected the offline plots page (build it with "
                            "plots/build_template.py)") from None
    if "{plot_divs}" not in text or "vegaEmbed" not in text:
        raise ImagegenError(f"{path}: not the offline plots page (no {{plot_divs}} or no inlined vega-embed)")
    return text


def read_json(root: Path, name: str, required: bool = True) -> dict:
    path = root / name
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise ImagegenError(f"{path}: missing; run the pipeline (dvc repro) first") from None
        return {}
    except ValueError as exc:
        raise ImagegenError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ImagegenError(f"{path}: expected a JSON object")
    return data


def chart(root: Path, title: str, name: str, columns: tuple[str, ...]) -> dict | None:
    """A Vega-Lite line chart of some columns of a per-epoch CSV (None if the file or columns are absent)."""
    path = root / name
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    values = [{"epoch": int(row["epoch"]), "series": column, "value": float(row[column])}
              for row in rows for column in columns if row.get(column) not in (None, "")]
    if not values:
        return None
    return {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "title": title, "width": 400,
            "height": 220, "data": {"values": values}, "mark": {"type": "line", "point": True, "tooltip": True},
            "encoding": {"x": {"field": "epoch", "type": "quantitative", "axis": {"tickMinStep": 1}},
                         "y": {"field": "value", "type": "quantitative", "scale": {"zero": False}, "title": None},
                         "color": {"field": "series", "type": "nominal", "title": None}}}


def last_grid(root: Path, kind: str) -> Path | None:
    grids = sorted((root / "reports" / kind).glob("samples-epoch-*.png"))
    return grids[-1] if grids else None


def validation_section(summary: dict) -> str:
    if not summary:
        return "<h2>Data validation</h2><p>metrics/validate.json is missing: the validate stage has not run.</p>"
    ok = summary.get("success")
    head = (f'<h2>Data validation: <span class="{"ok" if ok else "bad"}">{"passed" if ok else "FAILED"}</span></h2>'
            f"<p>{summary.get('evaluated_expectations', '?')} expectations evaluated, "
            f"{summary.get('failed_expectations', '?')} failed (details: reports/validation/data_docs/index.html).</p>")
    splits = [s for s in summary if isinstance(summary[s], dict)]
    fields = list(dict.fromkeys(k for s in splits for k in summary[s]))
    rows = "".join(f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{cell(summary[s].get(k))}</td>" for s in splits)
                   + "</tr>" for k in fields)
    return head + f"<table><tr><th></th>{''.join(f'<th>{html.escape(s)}</th>' for s in splits)}</tr>{rows}</table>"


def metrics_table(evaluation: dict, champions: dict[str, dict], registered: dict) -> str:
    """One table: a row per metric, for each model this run's value and its champion's beside it."""
    kinds = [kind for kind in MODEL_KINDS if isinstance(evaluation.get(kind), dict)]
    names = list(dict.fromkeys(k for kind in kinds for k, v in evaluation[kind].items() if not isinstance(v, dict)))
    head = "".join(f"<th>{kind.upper()}: this run</th><th>{kind.upper()}: "
                   f"{html.escape(champions.get(kind, {}).get('label', 'champion'))}</th>" for kind in kinds)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(
            f"<td>{cell(evaluation[kind].get(name))}</td><td>{cell(champions.get(kind, {}).get('metrics', {}).get(name))}</td>"
            for kind in kinds) + "</tr>"
        for name in names)
    parts = [f"<table><tr><th>metric</th>{head}</tr>{rows}</table>"]
    reference = evaluation.get("reference", {}).get("fid_train_vs_test")
    if reference is not None:
        parts.append(f"<p>Reference: FID of real train images vs the test split = {cell(reference)} "
                     "(what a perfect generator would score).</p>")
    return "\n".join(parts)


def register_section(registered: dict) -> str:
    if not registered:
        return "<h2>Registry decision</h2><p>metrics/register.json is missing: the register stage has not run.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(str(d.get('model')))}</td><td>{d.get('version')}</td>"
        f"<td>{'champion' if d.get('champion_after') == d.get('version') else 'challenger'}</td>"
        f"<td>{d.get('champion_after')}</td><td style=\"text-align:left\">{html.escape(str(d.get('reason')))}</td></tr>"
        for kind in MODEL_KINDS if isinstance(d := registered.get(kind), dict))
    return (f"<h2>Registry decision (metric {html.escape(str(registered.get('metric')))}, margin "
            f"{registered.get('margin')})</h2><table><tr><th>model</th><th>version</th><th>this version is</th>"
            f"<th>champion now</th><th>reason</th></tr>{rows}</table>")


def champion_metrics(cfg: Config, root: Path, registered: dict) -> dict[str, dict]:
    """Per kind: the metrics of the champion this run was compared with (the version itself when it was
    already registered), from the registry's version tags (metric.*); without a reachable registry,
    register.json's value of the chosen metric."""
    out: dict[str, dict] = {}
    for kind in MODEL_KINDS:
        d = registered.get(kind) if isinstance(registered.get(kind), dict) else {}
        before, version = d.get("champion_before"), d.get("version")
        if before is None:
            continue
        label = f"champion (v{before}: this version)" if before == version else f"champion before (v{before})"
        out[kind] = {"label": label, "version": before, "metrics": {registered.get("metric"): d.get("champion_value")}}
    if out:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        from imagegen.registry_reader import METRIC_TAG, describe, tracking_store

        try:
            tracking_store(root)
            client = MlflowClient()
            for kind, entry in out.items():
                version = client.get_model_version(registered_model_name(cfg.data.dataset, kind), str(entry["version"]))
                entry["metrics"] = {k[len(METRIC_TAG):]: float(v) for k, v in version.tags.items()
                                    if k.startswith(METRIC_TAG)}
        except (ImagegenError, MlflowException, ValueError) as exc:  # no store, no such version, a bad tag
            log.warning("report: champion metrics from metrics/register.json only (%s)", describe(exc))
    return out


def cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.5g}"
    return html.escape(str(value))
