"""The drift gate of the validate stage: is this data version too different from the last accepted one?

Each accepted version leaves a reference profile in data/profile/ (a DVC output of validate with
`persist: true`, so DVC keeps it between runs and `dvc push` shares it):

- profile.json: data version (DVC md5 of data/prepared, content sha256), dataset, shape, classes,
  images per split and class, per-channel intensity histograms (32 bins over 0..255), the original
  size / mode mix when the manifest has such columns;
- feature_mean.npy, feature_cov.npy: mean and covariance of the embedding features of a sample of its images;
- embedding.pt: the weights of the network that made those features.

The embedding is a fixed, data-independent network (a small random convolutional net, seed 0)
created with the first profile and copied into every later profile, never retrained. validate runs
before train-features, so the domain net trained on *this* version does not exist yet, and declaring
models/features as a dep of validate would make a cycle; a domain net retrained every week would
also move the feature space under the profile, so last week's mean and covariance could not be
compared with this week's features. A fixed net keeps one space for every version (the distances
mean the same every week), exists on the very first run, and cannot be taught a bad batch.

A new version is compared with the profile: class-proportion shift (total variation distance),
intensity distribution (PSI, gated; KS, reported), the Fréchet distance between the two samples'
features relative to the old sample's total variance, and the size/mode mix (reported). Each gated
check has a warning and a failure level (validate.drift in params.yaml). Results and lineage (images
per class, images added since the previous version) go to metrics/drift.json; an HTML page of old
vs new to reports/validation/drift.html. The profile is replaced only when the whole stage passed.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imagegen.data import prepared
from imagegen.data.datasets import SPLITS
from imagegen.data.prepare import PREPARED_DIR
from imagegen.errors import ImagegenError
from imagegen.fsutil import atomic_dir

log = logging.getLogger(__name__)

PROFILE_DIR = Path("data/profile")
PROFILE, MEAN, COV, EMBEDDING = "profile.json", "feature_mean.npy", "feature_cov.npy", "embedding.pt"
# The checks and lineage of the last validation. Apart from metrics/validate.json, which the training stages
# depend on: re-validating the same data changes the comparison (now against itself), not the data.
RESULTS = Path("metrics/drift.json")
PAGE = "drift.html"
BINS = 32
EMBEDDING_SEED = 0
# Manifest columns describing the original files (folder datasets); their value mix is profiled when present.
MIX_COLUMNS = ("mode", "width", "height")  # the manifest's original mode and size of each image (data/prepare.py)


# --- the statistics (pure functions; tests/unit/test_drift.py checks them against closed forms)

def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of two histograms (counts or shares over the same bins):
    sum (a - e) ln(a / e) over bins, shares clipped at `eps` so an empty bin stays finite."""
    e = np.clip(_shares(expected), eps, None)
    a = np.clip(_shares(actual), eps, None)
    return float(((a - e) * np.log(a / e)).sum())


def ks(expected: np.ndarray, actual: np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic of two histograms over the same bins: the largest gap of their CDFs."""
    return float(np.abs(np.cumsum(_shares(expected)) - np.cumsum(_shares(actual))).max())


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Half the L1 distance of two distributions (counts or shares): 0 same, 1 disjoint."""
    return float(np.abs(_shares(p) - _shares(q)).sum() / 2)


def relative_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance of two Gaussians divided by the first one's total variance (trace):
    scale-free, so the thresholds do not depend on the embedding's output scale."""
    from imagegen.evaluation.metrics import frechet_distance

    return frechet_distance(mu1, sigma1, mu2, sigma2) / max(float(np.trace(sigma1)), 1e-12)


def _shares(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return counts / total if total > 0 else counts


def histograms(images: np.ndarray) -> np.ndarray:
    """Per-channel intensity histograms of uint8 N x C x H x W images: C x BINS counts."""
    step = 256 // BINS
    return np.stack([np.bincount(images[:, c].reshape(-1) // step, minlength=BINS) for c in range(images.shape[1])])


# --- the embedding

def embedding_net(channels: int):
    """The fixed random feature network: three 3x3 conv + ReLU blocks, average pooled to 2 x 2 (256 features)."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EMBEDDING_SEED)
        net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    return net.eval().requires_grad_(False)


def embed(net, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """float64 N x 256 features of uint8 N x C x H x W images (scaled to -1..1)."""
    import torch

    with torch.no_grad():
        chunks = [net(torch.from_numpy(images[start:start + batch_size]).float().div(127.5).sub(1)).double()
                  for start in range(0, len(images), batch_size)]
    return torch.cat(chunks).numpy()


# --- profiles

@dataclass
class Profile:
    info: dict  # what profile.json holds
    mean: np.ndarray
    cov: np.ndarray
    net_state: dict = field(repr=False)


def load_profile(folder: Path) -> Profile | None:
    """The last accepted version's profile, or None when there is none yet."""
    if not (folder / PROFILE).is_file():
        return None
    import torch

    try:
        info = json.loads((folder / PROFILE).read_text())
        mean, cov = np.load(folder / MEAN, allow_pickle=False), np.load(folder / COV, allow_pickle=False)
        state = torch.load(folder / EMBEDDING, map_location="cpu", weights_only=True)
    except Exception as exc:  # json, numpy and torch raise many kinds for a damaged file
        raise ImagegenError(f"{folder}: damaged drift profile ({type(exc).__name__}: {str(exc)[:120]}); "
                            f"expected {PROFILE}, {MEAN}, {COV} and {EMBEDDING} as validate writes them "
                            "(delete the folder to start a new baseline)") from None
    return Profile(info, mean, cov, state)


def build_profile(root: Path, dataset: str, splits: dict, sample: int, net_state: dict | None) -> Profile:
    """The profile of the data in root/data/prepared (`splits`: its arrays, split -> (images, labels), as
    validate loaded them), embedded with `net_state` (None: a fresh embedding)."""
    from imagegen import tracking
    from imagegen.data.validated import array_hash

    folder = root / PREPARED_DIR
    info = prepared.read_info(folder, dataset)
    splits = {split: (prepared.as_nchw(images), labels) for split, (images, labels) in splits.items()}
    images = np.concatenate([splits[s][0] for s in SPLITS])
    names = list(info.classes)
    counts = {split: {name: int((labels == i).sum()) for i, name in enumerate(names)}
              for split, (_, labels) in splits.items()}
    net = embedding_net(images.shape[1])
    if net_state is not None and tuple(net_state["0.weight"].shape[1:2]) == (images.shape[1],):
        net.load_state_dict(net_state)
    picked = np.sort(np.random.default_rng(EMBEDDING_SEED).permutation(len(images))[:sample])
    features = embed(net, images[picked])
    content = hashlib.sha256("".join(array_hash(*splits[s]) for s in SPLITS).encode()).hexdigest()
    profile_info = {
        "dataset": info.name, "shape": list(info.shape), "classes": names,
        "data_version": tracking.dvc_out_md5(root, "prepare", "data/prepared"), "content_sha256": content,
        "images": {split: len(splits[split][1]) for split in SPLITS}, "images_per_class": counts,
        "histograms": histograms(images).tolist(), "mix": manifest_mix(folder), "sample": len(picked),
    }
    return Profile(profile_info, features.mean(axis=0), np.cov(features, rowvar=False),
                   {k: v.clone() for k, v in net.state_dict().items()})


def manifest_mix(folder: Path) -> dict[str, dict[str, int]]:
    """Value counts of the manifest's original-size/mode columns (only those it has)."""
    import pandas as pd
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(folder / "manifest.parquet").names
        present = [c for c in MIX_COLUMNS if c in columns]
        if not present:
            return {}
        frame = pd.read_parquet(folder / "manifest.parquet", columns=present)
    except (OSError, ValueError):
        return {}
    return {c: {str(k): int(v) for k, v in frame[c].astype(str).value_counts().head(50).items()} for c in present}


def save_profile(folder: Path, profile: Profile) -> None:
    import torch

    with atomic_dir(folder) as tmp:
        (tmp / PROFILE).write_text(json.dumps(profile.info, indent=1) + "\n")
        np.save(tmp / MEAN, profile.mean, allow_pickle=False)  # .npy, not .npz: no zip timestamps, so the
        np.save(tmp / COV, profile.cov, allow_pickle=False)  # same data gives the same bytes (and DVC hash)
        torch.save(profile.net_state, tmp / EMBEDDING)


# --- the gate

@dataclass
class Gate:
    checks: list[dict]  # name, value, warn, fail, status (ok | warn | fail | info)
    lineage: dict
    new: Profile
    baseline: str | None  # why there is no comparison (first version, another dataset), else None

    @property
    def failures(self) -> list[str]:
        return [f"{c['name']} {c['value']:.4g} >= fail level {c['fail']:g} (validate.drift.{c['param']}_fail)"
                for c in self.checks if c["status"] == "fail"]

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> dict:
        return {"passed": self.passed, "baseline": self.baseline,
                "checks": {c["name"]: {"value": round(c["value"], 6), "status": c["status"]} for c in self.checks}}

    def raise_if_failed(self) -> None:
        if self.failures:
            raise ImagegenError(f"validate: drift gate failed against data version "
                                f"{self.lineage['previous_data_version']}: " + "; ".join(self.failures)
                                + f" (old vs new: reports/validation/{PAGE})")

    def accept(self, root: Path) -> None:
        """This version passed: its profile becomes the reference of the next one."""
        save_profile(root / PROFILE_DIR, self.new)


def run_gate(cfg, root: Path, report_dir: Path, splits: dict) -> Gate:
    """Profile the prepared data (`splits`: split -> (images, labels)), compare it with the last accepted
    profile, write the HTML page."""
    drift = cfg.validate_.drift
    old = load_profile(root / PROFILE_DIR)
    same_dataset = old is not None and old.info.get("dataset") == cfg.data.dataset
    new = build_profile(root, cfg.data.dataset, splits, drift.sample, old.net_state if same_dataset else None)
    comparable = same_dataset and all(old.info.get(k) == new.info[k] for k in ("shape", "classes"))
    baseline = None
    if old is None:
        baseline = "no accepted version before this one: it becomes the baseline"
    elif not comparable:
        baseline = (f"the last accepted profile is of {old.info.get('dataset')} {old.info.get('shape')}, "
                    f"not {new.info['dataset']} {new.info['shape']}: this version becomes the new baseline")
    checks = compare(old, new, drift) if comparable and drift.enabled else []
    gate = Gate(checks, lineage(old if comparable else None, new), new, baseline)
    for check in checks:
        log.info("validate: drift %s = %.4g (%s)", check["name"], check["value"], check["status"])
    (report_dir / PAGE).write_text(page(gate, old if comparable else None))
    return gate


def compare(old: Profile, new: Profile, drift) -> list[dict]:
    """The checks of `new` against `old`: gated ones with their levels, reported ones as info."""
    names = new.info["classes"]
    class_counts = [np.array([sum(p.info["images_per_class"][s][n] for s in SPLITS) for n in names])
                    for p in (old, new)]
    old_hist, new_hist = (np.asarray(p.info["histograms"], dtype=np.float64) for p in (old, new))
    channels = range(len(new_hist))
    gated = [
        ("class_proportion_shift", "class_shift", total_variation(*class_counts)),
        ("intensity_psi", "intensity_psi", max(psi(old_hist[c], new_hist[c]) for c in channels)),
        ("feature_frechet", "frechet", relative_frechet(old.mean, old.cov, new.mean, new.cov)),
    ]
    checks = []
    for name, param, value in gated:
        warn, fail = getattr(drift, f"{param}_warn"), getattr(drift, f"{param}_fail")
        status = "fail" if value >= fail else "warn" if value >= warn else "ok"
        checks.append({"name": name, "param": param, "value": value, "warn": warn, "fail": fail, "status": status})
    checks.append({"name": "intensity_ks", "param": None, "value": max(ks(old_hist[c], new_hist[c]) for c in channels),
                   "warn": None, "fail": None, "status": "info"})
    for column in sorted(set(old.info.get("mix", {})) & set(new.info.get("mix", {}))):
        keys = sorted(set(old.info["mix"][column]) | set(new.info["mix"][column]))
        value = total_variation(*(np.array([p.info["mix"][column].get(k, 0) for k in keys]) for p in (old, new)))
        checks.append({"name": f"{column}_mix_shift", "param": None, "value": value, "warn": None, "fail": None,
                       "status": "info"})
    return checks


def lineage(old: Profile | None, new: Profile) -> dict:
    """Data version, images per class, and images added per class since the previous accepted version."""
    names = new.info["classes"]
    now = {n: sum(new.info["images_per_class"][s][n] for s in SPLITS) for n in names}
    before = ({n: sum(old.info["images_per_class"][s].get(n, 0) for s in SPLITS) for n in names}
              if old is not None else {n: 0 for n in names})
    added = {n: now[n] - before[n] for n in names}
    return {"data_version": new.info["data_version"], "content_sha256": new.info["content_sha256"][:16],
            "previous_data_version": old.info["data_version"] if old else None,
            "images": sum(now.values()), "images_per_class": now,
            "images_added": sum(added.values()), "added_per_class": added}


# --- the HTML page: old vs new

def page(gate: Gate, old: Profile | None) -> str:
    new, lin = gate.new, gate.lineage
    verdict = ("FAILED: " + "; ".join(gate.failures)) if gate.failures else (gate.baseline or "passed")
    rows = "".join(f"<tr class='{c['status']}'><td>{c['name']}</td><td>{c['value']:.4g}</td>"
                   f"<td>{'' if c['warn'] is None else c['warn']}</td><td>{'' if c['fail'] is None else c['fail']}</td>"
                   f"<td>{c['status']}</td></tr>" for c in gate.checks)
    names = new.info["classes"]
    total_old = sum(old.info["images"].values()) if old else 0
    total_new = sum(new.info["images"].values())
    class_rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{lin['images_per_class'][n] - lin['added_per_class'][n]}</td>"
        f"<td>{_pct(lin['images_per_class'][n] - lin['added_per_class'][n], total_old)}</td>"
        f"<td>{lin['images_per_class'][n]}</td><td>{_pct(lin['images_per_class'][n], total_new)}</td>"
        f"<td>{lin['added_per_class'][n]:+d}</td></tr>" for n in names)
    charts = "".join(_histogram_svg(c, old.info["histograms"][c] if old else None, new.info["histograms"][c])
                     for c in range(len(new.info["histograms"])))
    mix = "".join(f"<h3>{html.escape(col)}</h3><p>old: {html.escape(json.dumps((old.info.get('mix') or {}).get(col, {}) if old else {}))}"
                  f"<br>new: {html.escape(json.dumps(values))}</p>" for col, values in new.info.get("mix", {}).items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Drift: old vs new data</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px}}
tr.fail{{background:#fdd}}tr.warn{{background:#ffd}}</style></head><body>
<h1>Drift gate: {html.escape(verdict)}</h1>
<p>Previous accepted version <code>{lin['previous_data_version']}</code> ({total_old} images) vs this version
<code>{lin['data_version']}</code> ({total_new} images, {lin['images_added']:+d}).</p>
<h2>Checks</h2><table><tr><th>check</th><th>value</th><th>warn at</th><th>fail at</th><th>status</th></tr>{rows}</table>
<h2>Images per class</h2><table><tr><th>class</th><th>old</th><th>old share</th><th>new</th><th>new share</th><th>added</th></tr>{class_rows}</table>
<h2>Intensity histograms (share of pixels per bin of {256 // BINS} levels; grey: old, blue: new)</h2>{charts}
{('<h2>Original size / mode mix</h2>' + mix) if mix else ''}
</body></html>
"""


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.2f} %" if total else ""


def _histogram_svg(channel: int, old, new) -> str:
    width, height, bar = 640, 160, 640 / BINS
    shares = [(_shares(old) if old is not None else None, "#999"), (_shares(new), "#36c")]
    top = max(float(s.max()) for s, _ in shares if s is not None) or 1.0
    bars = []
    for offset, (values, colour) in enumerate(shares):
        if values is None:
            continue
        for i, v in enumerate(values):
            h = height * float(v) / top
            bars.append(f"<rect x='{i * bar + offset * bar / 2:.1f}' y='{height - h:.1f}' width='{bar / 2 - 1:.1f}' "
                        f"height='{h:.1f}' fill='{colour}'/>")
    return f"<p>channel {channel}</p><svg width='{width}' height='{height}'>{''.join(bars)}</svg>"
