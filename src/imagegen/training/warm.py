"""Warm start (train.init_from: champion): a retrain starts from the registered champion's weights.

The champion is `<dataset>-<kind>@champion` in the MLflow registry. The GAN's generator and its EMA
copy start from the champion (the registry holds the EMA generator; the discriminator starts fresh),
the VAE's encoder and decoder from the champion's (its prior is fitted again after training). The run
then takes train.warm_epochs_fraction of the section's epochs. With no champion yet, or a champion of
another architecture, training starts from scratch and the stage's metrics say why.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from imagegen.config import Config
from imagegen.errors import ImagegenError
from imagegen.layout import registered_model_name
from imagegen.models.io import mismatch

log = logging.getLogger(__name__)


def warm_start(cfg: Config, kind: str, task, root: Path) -> dict:
    """Load the champion into `task`'s models when train.init_from says so; returns what happened
    ({"init_from": "champion", "init_version": N, "init_weights_sha256": ...} or {"init_from": "none", ...})."""
    if cfg.train.init_from != "champion":
        return {"init_from": "none"}
    from imagegen import registry_reader, tracking

    tracking.configure(root)  # the project's tracking store (MLFLOW_TRACKING_URI, else its embedded one)
    uri = f"models:/{registered_model_name(cfg.data.dataset, kind)}@champion"
    try:
        module, _, version = registry_reader.load_registered(uri, "cpu", with_version=True)
    except ImagegenError as exc:
        log.warning("train-%s: train.init_from champion: %s; starting from scratch", kind, exc)
        return {"init_from": "none", "init_note": f"no champion to start from ({str(exc)[:200]})"}
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("prior.")}  # the VAE's prior is refitted
    targets = task.warm_start_targets()
    # Checked before anything is loaded: a partial load would leave some champion weights in a "from scratch" run.
    problem = next(filter(None, (mismatch(target, state) for target in targets)), "")
    if problem:  # another width, latent size, decoder depth or conditioning
        log.warning("train-%s: champion %s (v%s) has another architecture (%s); starting from scratch",
                    kind, uri, version.version, problem[:200])
        return {"init_from": "none", "init_note": f"champion v{version.version} has another architecture"}
    for target in targets:
        target.load_state_dict(state)
    log.info("train-%s: starting from %s (version %s)", kind, uri, version.version)
    return {"init_from": "champion", "init_version": int(version.version),
            "init_weights_sha256": version.tags.get("weights_sha256", "unknown")}


def epochs(cfg: Config, kind: str, init: dict, images_per_epoch: int) -> int:
    """The section's epochs (its budget in images seen over the images an epoch uses, or its `epochs` when
    set), or train.warm_epochs_fraction of them (at least 1) after a warm start."""
    full = getattr(cfg, kind).epochs_for(images_per_epoch)
    return max(1, math.ceil(full * cfg.train.warm_epochs_fraction)) if init.get("init_from") == "champion" else full
