"""The torch device a stage runs on, from params.yaml train.device (training, evaluation and sampling alike)."""

from __future__ import annotations

import torch

from imagegen.errors import ImagegenError


def select_device(preference: str) -> torch.device:
    """'auto' picks cuda > mps > cpu; an explicit choice that is not available is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if preference == "auto":
        return torch.device(next(name for name in ("cuda", "mps", "cpu") if available[name]))
    if not available[preference]:
        raise ImagegenError(f"params.yaml train.device: '{preference}' is not available on this machine; use auto or cpu")
    return torch.device(preference)
