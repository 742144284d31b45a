"""Trained weights on disk: models/<kind>/weights.pt (a state_dict) + model.json (how to rebuild it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from imagegen.errors import ImagegenError

WEIGHTS, META = "weights.pt", "model.json"


def build(kind: str, arch: dict, num_classes: int) -> nn.Module:
    if kind == "gan":
        from imagegen.models.gan import Generator

        return Generator(arch["latent_dim"], arch["width"], num_classes, arch["kernel_size"])
    if kind == "vae":
        from imagegen.models.vae import VAE

        # VAEs saved before priors existed have no "prior" key: N(0, I).
        return VAE(arch["latent_dim"], arch["width"], num_classes, arch.get("prior", "standard"),
                   arch.get("prior_components", 32), arch.get("prior_width", 128))
    if kind == "features":
        from imagegen.evaluation.features import FeatureNet

        return FeatureNet(arch["width"], arch["feature_dim"], num_classes)
    raise ImagegenError(f"unknown model kind {kind!r}; expected gan, vae or features")


def save_model(folder: Path, module: nn.Module, meta: dict) -> None:
    """Write into `folder` (the caller makes it atomic)."""
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, folder / WEIGHTS)
    (folder / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_model(folder: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    try:
        meta = json.loads((folder / META).read_text())
        state = torch.load(folder / WEIGHTS, map_location=device, weights_only=True)
        module = build(meta["kind"], meta["arch"], meta["num_classes"])
        module.load_state_dict(state)
    except FileNotFoundError as exc:
        raise ImagegenError(f"{folder}: no trained model there ({Path(exc.filename).name} missing)") from None
    except ImagegenError:
        raise
    except Exception as exc:  # corrupt JSON or weights, missing keys, weights of another architecture
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ImagegenError(f"{folder}: not a loadable model ({type(exc).__name__}: {first})") from None
    return module.to(device).eval(), meta
