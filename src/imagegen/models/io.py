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
    """The model in `folder`, or a one-line error saying which file is wrong and how."""
    meta = read_meta(folder)
    path = folder / WEIGHTS
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ImagegenError(f"{folder}: no trained model there ({WEIGHTS} missing)") from None
    except Exception as exc:  # torch raises many kinds for damaged files
        raise ImagegenError(f"{path}: {describe_load_error(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImagegenError(f"{path}: holds a {type(state).__name__} of other values, expected a state_dict of tensors")
    try:
        module = build(meta["kind"], meta["arch"], meta["num_classes"])
    except ImagegenError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ImagegenError(f"{folder / META}: arch {meta['arch']!r} does not describe a {meta['kind']} model "
                            f"({type(exc).__name__}: {exc})") from None
    problem = mismatch(module, state)
    if problem:
        raise ImagegenError(f"{path}: does not fit the {meta['kind']} architecture in {META}: {problem}")
    module.load_state_dict(state)
    return module.to(device).eval(), meta


def read_meta(folder: Path) -> dict:
    path = folder / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ImagegenError(f"{folder}: no trained model there ({META} missing)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ImagegenError(f"{path}: not valid JSON{where}; expected the model description train wrote") from None
    if not isinstance(meta, dict):
        raise ImagegenError(f"{path}: expected a JSON object with kind, arch and num_classes")
    missing = [key for key in ("kind", "arch", "num_classes") if key not in meta]
    if missing:
        raise ImagegenError(f"{path}: missing {', '.join(missing)}; expected kind, arch and num_classes")
    return meta


def describe_load_error(exc: Exception) -> str:
    """torch.load's failure in a few words. Never torch's own advice: it suggests weights_only=False,
    which would run whatever code a malicious file holds."""
    if "weights only load failed" in str(exc).lower():
        return "holds Python objects besides tensors and plain values; refused (only weights are loaded)"
    return "damaged or not a PyTorch file"


def mismatch(module: nn.Module, state: dict, show: int = 3) -> str:
    """What keeps `state` from loading into `module`, in one line; '' when it fits."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {shape(state[k])} vs {shape(expected[k])}" for k in expected
              if k in state and state[k].shape != expected[k].shape]
    parts = []
    for items, what, note in ((missing, "missing key", ""), (unexpected, "unexpected key", ""),
                              (shapes, "shape mismatch", "file vs model: ")):
        if items:
            more = f", +{len(items) - show} more" if len(items) > show else ""
            plural = ("es" if what.endswith("h") else "s") if len(items) > 1 else ""
            parts.append(f"{len(items)} {what}{plural} ({note}{', '.join(items[:show])}{more})")
    return "; ".join(parts)


def shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"
