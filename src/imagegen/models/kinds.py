"""The table of model kinds: what a `kind` in model.json means.

Each entry builds the module from a ModelDescription and, for a generator, turns latents into
images in [0, 1] (N x C x H x W). Callers look a kind up here instead of branching on its name;
a capability (`reconstructs`: has an encoder, so reconstructions and likelihoods) is a field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from imagegen.errors import ImagegenError
from imagegen.models.description import ModelDescription


@dataclass(frozen=True)
class Kind:
    name: str
    build: Callable[[ModelDescription], nn.Module]
    # latents (+ labels) -> images in [0, 1], N x C x H x W; None: not a generator
    to_images: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    reconstructs: bool = False  # has an encoder: reconstructions and likelihood metrics


def _gan(d: ModelDescription) -> nn.Module:
    from imagegen.models.gan import Generator

    return Generator(d.arch["latent_dim"], d.arch["width"], d.num_classes, d.arch["kernel_size"], d.image_shape)


def _gan_images(module: nn.Module, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    return (module(z, labels).float() + 1) / 2  # tanh output in [-1, 1]


def _vae(d: ModelDescription) -> nn.Module:
    from imagegen.models.vae import VAE

    # VAEs saved before priors (residual blocks) existed have no "prior" ("decoder_blocks") key: N(0, I) (none).
    return VAE(d.arch["latent_dim"], d.arch["width"], d.num_classes, d.arch.get("prior", "standard"),
               d.arch.get("prior_components", 32), d.arch.get("prior_width", 128), d.image_shape,
               d.arch.get("decoder_blocks", 0))


def _vae_images(module: nn.Module, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    return torch.sigmoid(module.decode(z, labels).float())  # Bernoulli logits


def _features(d: ModelDescription) -> nn.Module:
    from imagegen.models.features import FeatureNet

    return FeatureNet(d.arch["width"], d.arch["feature_dim"], d.num_classes, d.image_shape)


KINDS: dict[str, Kind] = {
    "gan": Kind("gan", _gan, _gan_images),
    "vae": Kind("vae", _vae, _vae_images, reconstructs=True),
    "features": Kind("features", _features),
}
GENERATORS = tuple(name for name, kind in KINDS.items() if kind.to_images is not None)


def kind_of(description: ModelDescription) -> Kind:
    try:
        return KINDS[description.kind]
    except KeyError:
        raise ImagegenError(f"unknown model kind {description.kind!r}; expected one of {', '.join(KINDS)}") from None


def build(description: ModelDescription) -> nn.Module:
    return kind_of(description).build(description)


def to_images(module: nn.Module, description: ModelDescription, z: torch.Tensor,
              labels: torch.Tensor | None) -> torch.Tensor:
    """Latents -> images in [0, 1] (N x C x H x W) of a generator kind."""
    kind = kind_of(description)
    if kind.to_images is None:
        raise ImagegenError(f"a {kind.name} model does not generate images; expected one of {', '.join(GENERATORS)}")
    return kind.to_images(module, z, labels)
