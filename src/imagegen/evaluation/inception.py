"""The standard FID network: Inception-v3 as in the 2015-12-05 TensorFlow graph (pt_inception weights).

It differs from torchvision's Inception3 only in some pooling branches: average pools that
exclude padding (blocks 5b-5d, 6b-6e, 7b) and a max pool in block 7c. Images are upsampled
to 299 x 299 (bilinear), grey ones repeated to 3 channels, and scaled to [-1, 1]; the features are the
2048-d pool output. Weights come only from the file the user configures: nothing is downloaded.
On a CPU this is slow (about 6 GFLOPs an image); it is meant for GPU runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv

from imagegen.errors import ImagegenError
from imagegen.evaluation.metrics import fid


def _avg_pool_no_pad(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x):
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _with_pool(block: type, pool) -> type:
    class Block(block):
        def _forward(self, x):
            outputs = super()._forward(x)
            outputs[-1] = self.branch_pool(pool(x))
            return outputs

    Block.__name__ = f"FID{block.__name__}"
    return Block


def fid_inception(weights: Path) -> nn.Module:
    blocks = [tv.BasicConv2d, _with_pool(tv.InceptionA, _avg_pool_no_pad), tv.InceptionB,
              _with_pool(tv.InceptionC, _avg_pool_no_pad), tv.InceptionD,
              _with_pool(tv.InceptionE, _avg_pool_no_pad), tv.InceptionAux]
    net = tv.Inception3(num_classes=1008, aux_logits=False, inception_blocks=blocks, init_weights=False)
    net.Mixed_7c = _with_pool(tv.InceptionE, _max_pool)(2048)
    from imagegen.models.io import describe_load_error, mismatch

    what = f"eval.inception_weights {weights}: not pt_inception-2015-12-05 weights"
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable file
        raise ImagegenError(f"{what} ({describe_load_error(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImagegenError(f"{what} (holds a {type(state).__name__}, expected a state_dict of tensors)")
    problem = mismatch(net, state)
    if problem:
        raise ImagegenError(f"{what} ({problem})")
    net.load_state_dict(state)
    net.fc = nn.Identity()  # the 2048-d pool features, not the logits
    return net.eval()


@torch.no_grad()
def inception_features(net: nn.Module, images: np.ndarray, device, batch_size: int = 100) -> np.ndarray:
    """2048-d features of uint8 N x C x H x W images (C = 1 or 3; N x H x W: grey)."""
    from imagegen.data.arrays import as_nchw

    images = as_nchw(images)
    net = net.to(device)
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size]).to(device).float().div(255)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        out.append(net(2 * x - 1).double().cpu())
    return torch.cat(out).numpy()


class InceptionFID:
    """The standard FID against a fixed reference set, whose features are computed once."""

    def __init__(self, weights: Path, reference_images: np.ndarray, device):
        self.net, self.device = fid_inception(weights), device
        self.reference = inception_features(self.net, reference_images, device)

    def fid(self, samples: np.ndarray) -> float:
        return fid(inception_features(self.net, samples, self.device), self.reference)
