"""The fair champion contest: the registered champion scored again, as the evaluate stage scored the challenger."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from imagegen.config import Config
from imagegen.data.integrity import HASH_KEY, RECORD
from imagegen.device import select_device
from imagegen.errors import ImagegenError
from imagegen.evaluation.features import FEATURES_DIR
from imagegen.evaluation.sampling import generate
from imagegen.evaluation.stage import Scorer, rounded
from imagegen.fsutil import sha256_file
from imagegen.layout import PREPARED_DIR, data_version
from imagegen.models.io import WEIGHTS
from imagegen.registry_reader import load_registered, tag_float

log = logging.getLogger(__name__)


class Contest:
    """The fair contest: the champion, loaded from the registry, is sampled and scored as the evaluate stage
    scored the challenger (evaluation.stage.Scorer: same samples count and seed, today's test split, today's
    feature net), so both values are computed on the same data. Without models/features or a test split
    (nothing to score on) the champion's recorded value is used, and the record says so."""

    def __init__(self, cfg: Config, root: Path):
        self.cfg, self.root, self.scorer = cfg, root, None
        self.data_version = data_version(root)

    @functools.cached_property
    def scored_on(self) -> dict:
        """What both sides are scored on: the same for every kind, so read once."""
        try:
            test = json.loads((self.root / RECORD).read_text())[HASH_KEY]["test"]
        except (OSError, ValueError, KeyError, TypeError):
            test = "unknown"
        return {"data_version": self.data_version, "test_sha256": test,
                "features_sha256": sha256_file(self.root / FEATURES_DIR / WEIGHTS)}

    def champion_score(self, name: str, champion) -> dict:
        metric = self.cfg.register_.metric
        recorded = tag_float(champion, metric)
        info = {"champion_value": recorded, "champion_value_recorded": recorded,
                "champion_data_version": champion.tags.get("dvc_data_md5", "unknown"),
                "challenger_data_version": self.data_version,
                "champion_rescored": False}
        if not (self.root / FEATURES_DIR / WEIGHTS).is_file() or not (self.root / PREPARED_DIR / "test.npz").is_file():
            log.warning("register: %s champion v%s not re-scored (no feature net or test split here): comparing "
                        "with its recorded %s", name, champion.version, metric)
            return info
        device = select_device(self.cfg.train.device)
        if self.scorer is None:
            self.scorer = Scorer.load(self.cfg, self.root, device)
        module, description = load_registered(f"models:/{name}/{champion.version}", device)
        try:
            self.scorer.check_shape(description, f"{name} champion v{champion.version}")
        except ImagegenError as exc:
            log.warning("register: %s; comparing with its recorded %s", exc, metric)
            return info
        samples = generate(module, description, self.cfg.eval.n_samples, self.cfg.eval.seed, device=device)
        scores = rounded(self.scorer.score(samples))
        log.info("register: %s champion v%s re-scored on today's test split: %s %s (recorded %s)", name,
                 champion.version, metric, scores[metric], recorded)
        return {**info, "champion_value": float(scores[metric]), "champion_rescored": True,
                "champion_scores": {k: v for k, v in scores.items() if isinstance(v, (int, float))},
                "scored_on": self.scored_on}
