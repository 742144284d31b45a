"""What one optimisation step means for each model; the loop in loop.py is shared.

A task owns its models, optimisers and (for the GAN) the EMA generator, and exposes
`step`, `sample`, `state_dict` / `load_state_dict` and `export` (the weights to ship).

On CUDA a step is a few hundred small kernels, so Python and launch overhead, not the GPU,
set the pace. There the whole step (forwards, backwards, fused Adam, EMA) is captured once as
a CUDA graph and replayed (`StepGraph`); nothing in a step reads a value back to the host.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from imagegen.errors import ImagegenError
from imagegen.models.description import LEGACY_SHAPE
from imagegen.models.gan import Discriminator, Generator
from imagegen.models.io import memory_format_for
from imagegen.models.kinds import KINDS
from imagegen.models.vae import VAE, negative_elbo
from imagegen.training.augment import adapt, augment

log = logging.getLogger(__name__)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up here: on CUDA, and on CPUs that do bf16 maths in
    hardware (AVX512-BF16 or AMX; on a 2-core Zen 4 EPYC a GAN epoch is about 1.25x faster: docs/performance.md).
    Elsewhere a CPU emulates bf16, slower than float32."""
    if device.type == "cuda":
        return True
    cpu = torch.cpu
    return device.type == "cpu" and any(getattr(cpu, check, lambda: False)()
                                        for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


class Task:
    kind: str
    keeps_best = False
    trained: tuple[str, ...]
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]

    def __init__(self, device: torch.device, amp: bool, channels_last: bool):
        self.device = device
        self.autocast_enabled = amp and fast_bf16(device)
        self.memory_format = memory_format_for(device, channels_last)
        self.graph: StepGraph | None = None

    def autocast(self):
        if not self.autocast_enabled:
            return contextlib.nullcontext()
        # No weight-cast cache on CUDA: a graph must not keep casts from the capture (the docs require this).
        # On a CPU the cache is most of bf16's gain (GAN step: x1.2 without it, x1.6 with it).
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              cache_enabled=self.device.type != "cuda")

    def place(self, module: nn.Module) -> nn.Module:
        return module.to(self.device, memory_format=self.memory_format)

    def adam(self, params, **options) -> torch.optim.Adam:
        """Adam; on CUDA its fused kernel with the step count kept on the device, so a CUDA graph can replay it."""
        if self.device.type == "cuda":
            options.update(fused=True, capturable=True)
        return torch.optim.Adam(params, **options)

    def prepare_models(self, compile_models: bool, ddp: bool, cuda_graphs: bool = False) -> None:
        """Optionally torch.compile and wrap for DDP (training copies only); on CUDA without DDP,
        replay each step as a CUDA graph when `cuda_graphs`."""
        for module in self.modules.values():
            self.place(module)
        self.train_modules = dict(self.modules)
        for name in self.trained:
            module = self.modules[name]
            if ddp:
                from torch.nn.parallel import DistributedDataParallel

                ids = [self.device.index] if self.device.type == "cuda" else None
                module = DistributedDataParallel(module, device_ids=ids)
            if compile_models:
                module = torch.compile(module)
            self.train_modules[name] = module
        self.graph = StepGraph(self.train_step) if cuda_graphs and self.device.type == "cuda" and not ddp else None

    def step(self, images, labels, noise: torch.Generator) -> dict[str, torch.Tensor]:
        """One optimisation step; the losses stay on the device (reading them would wait for the GPU)."""
        if self.graph is not None:
            return self.graph(images, labels, noise)
        return self.train_step(images, labels, noise)

    def train_step(self, images, labels, noise: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])

    def as_input(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finalize(self, data) -> dict:
        """After the last epoch, on the main process, before export: any fit on the finished model
        (the VAE's prior). Returns metrics for metrics/train-<kind>.json."""
        return {}


class GANTask(Task):
    kind = "gan"
    keeps_best = True  # the stage scores each epoch (BestByFid) and export() ships the best one
    trained = ("generator", "discriminator")  # the EMA copy is updated by hand, never wrapped

    def __init__(self, cfg, num_classes: int, device, amp=True, channels_last=True,
                 image_shape: tuple[int, int, int] = LEGACY_SHAPE):
        super().__init__(device, amp, channels_last)
        self.cfg, self.image_shape = cfg, tuple(image_shape)
        self.num_classes = num_classes if cfg.conditional else 0
        self.generator = self.place(Generator(cfg.latent_dim, cfg.width, self.num_classes, cfg.kernel_size,
                                              self.image_shape))
        self.discriminator = self.place(Discriminator(cfg.width, self.num_classes, cfg.spectral_norm, cfg.kernel_size,
                                                      self.image_shape))
        self.ema = copy.deepcopy(self.generator).requires_grad_(False)
        # On CUDA the count lives on the device, so the EMA's warm-up needs no host value (see update_ema).
        self.ema_updates: int | torch.Tensor = torch.zeros((), device=device) if device.type == "cuda" else 0
        self.best: dict | None = None  # {"epoch", "score", "ema": state_dict}: see keep_if_best
        # The discriminator's augmentation probability (training/augment.py); None: no augmentation.
        self.augment_p = torch.zeros((), device=device) if cfg.augment else None
        self.modules = {"generator": self.generator, "discriminator": self.discriminator, "ema": self.ema}
        betas = tuple(cfg.betas)
        self.optimizers = {
            "generator": self.adam(self.generator.parameters(), lr=cfg.lr_g, betas=betas),
            "discriminator": self.adam(self.discriminator.parameters(), lr=cfg.lr_d, betas=betas),
        }

    def as_input(self, images):
        return (images.float() / 127.5 - 1).contiguous(memory_format=self.memory_format)

    def d_loss(self, real_out, fake_out):
        if self.cfg.loss == "hinge":
            return F.relu(1 - real_out).mean() + F.relu(1 + fake_out).mean()
        real_target = torch.full_like(real_out, 1 - self.cfg.label_smoothing)
        return (F.binary_cross_entropy_with_logits(real_out, real_target)
                + F.binary_cross_entropy_with_logits(fake_out, torch.zeros_like(fake_out)))

    def g_loss(self, fake_out):
        if self.cfg.loss == "hinge":
            return -fake_out.mean()
        return F.binary_cross_entropy_with_logits(fake_out, torch.ones_like(fake_out))  # non-saturating

    def train_step(self, images, labels, noise: torch.Generator) -> dict[str, torch.Tensor]:
        generator, discriminator = self.train_modules["generator"], self.train_modules["discriminator"]
        real = self.as_input(images)
        labels = labels if self.num_classes else None
        z = torch.randn(len(real), self.cfg.latent_dim, generator=noise, device=self.device)
        with self.autocast():
            fake = generator(z, labels)
            both_labels = torch.cat([labels, labels]) if labels is not None else None
            both = self.augmented(torch.cat([real, fake.detach()]), noise)
            real_out, fake_out = discriminator(both, both_labels).float().chunk(2)
            d_loss = self.d_loss(real_out, fake_out)
        self.optimizers["discriminator"].zero_grad(set_to_none=True)
        d_loss.backward()
        self.optimizers["discriminator"].step()

        with self.autocast():
            g_loss = self.g_loss(discriminator(self.augmented(fake, noise), labels).float())
        self.optimizers["generator"].zero_grad(set_to_none=True)
        g_loss.backward()
        self.optimizers["generator"].step()
        self.update_ema()
        losses = {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(),
                  "d_real": real_out.detach().mean(), "d_fake": fake_out.detach().mean()}
        if self.augment_p is not None:
            adapt(self.augment_p, real_out.detach(), self.cfg.ada_target, self.cfg.ada_speed_images)
            losses["augment_p"] = self.augment_p.clone()
        return losses

    def augmented(self, images: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
        return images if self.augment_p is None else augment(images, self.augment_p, noise)

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "ema_updates": int(self.ema_updates), "best": self.best}
        if self.augment_p is not None:
            state["augment_p"] = self.augment_p.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.augment_p is not None:
            self.augment_p.copy_(state["augment_p"])
        if isinstance(self.ema_updates, torch.Tensor):
            self.ema_updates.fill_(state["ema_updates"])
        else:
            self.ema_updates = state["ema_updates"]
        self.best = state["best"]

    def keep_if_best(self, epoch: int, score: float) -> None:
        """Remember the EMA weights of the epoch with the lowest score (lower is better); export() ships them."""
        if self.best is None or score < self.best["score"]:
            weights = {k: v.detach().cpu().clone() for k, v in self.ema.state_dict().items()}
            self.best = {"epoch": epoch, "score": score, "ema": weights}

    @torch.no_grad()
    def update_ema(self):
        """ema += (1 - decay) * (generator - ema). Warm-up: early on, average over the few steps there
        are rather than the random init. On CUDA the decay is computed on the device and all parameters
        move at once (foreach kernels), so a CUDA graph can replay it; elsewhere a loop of lerp_ is
        faster (measured on a CPU: 1.7 ms against 4.4 ms per update of the default generator)."""
        ema, current = list(self.ema.parameters()), list(self.generator.parameters())
        if isinstance(self.ema_updates, torch.Tensor):
            n = self.ema_updates.add_(1)
            decay = ((1 + n) / (10 + n)).clamp(max=self.cfg.ema_decay)
            moves = torch._foreach_sub(current, ema)
            torch._foreach_mul_(moves, 1 - decay)
            torch._foreach_add_(ema, moves)
            return
        self.ema_updates += 1
        decay = min(self.cfg.ema_decay, (1 + self.ema_updates) / (10 + self.ema_updates))
        for ema_p, p in zip(ema, current, strict=True):
            ema_p.lerp_(p, 1 - decay)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Images in [0, 1] from the EMA generator."""
        recalibrate_batchnorm(self.ema, self.cfg.latent_dim, self.num_classes, self.device)
        with self.autocast():
            return KINDS["gan"].to_images(self.ema, z, labels if self.num_classes else None)

    def warm_start_targets(self) -> list[nn.Module]:
        """What a registered GAN's weights (its EMA generator) are loaded into: the generator and its EMA
        (the discriminator starts fresh)."""
        return [self.generator, self.ema]

    def export(self) -> nn.Module:
        if self.best is not None:
            self.ema.load_state_dict(self.best["ema"])
        recalibrate_batchnorm(self.ema, self.cfg.latent_dim, self.num_classes, self.device)
        return self.ema


@torch.no_grad()
def recalibrate_batchnorm(generator: nn.Module, latent_dim: int, num_classes: int, device: torch.device,
                          batches: int = 16, batch_size: int = 256, seed: int = 0) -> None:
    """Recompute BatchNorm statistics for the generator's own weights, then leave it in eval mode.

    The EMA generator's weights are an average, so statistics gathered by the trained generator
    do not fit them; measured here on Fashion-MNIST, refreshing them took the EMA samples' domain
    FID from 108 to 73 (the raw generator: 84).
    """
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches below
    noise = torch.Generator(device=device).manual_seed(seed)
    generator.train()
    for _ in range(batches):
        z = torch.randn(batch_size, latent_dim, generator=noise, device=device)
        labels = torch.randint(num_classes, (batch_size,), generator=noise, device=device) if num_classes else None
        generator(z, labels)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    generator.eval()


class VAETask(Task):
    kind = "vae"
    trained = ("vae",)

    def __init__(self, cfg, num_classes: int, device, amp=True, channels_last=True,
                 image_shape: tuple[int, int, int] = LEGACY_SHAPE):
        super().__init__(device, amp, channels_last)
        self.cfg, self.image_shape = cfg, tuple(image_shape)
        if cfg.prior == "class_mixture" and cfg.prior_components < num_classes:  # now, not after the epochs
            raise ImagegenError(f"vae.prior_components: {cfg.prior_components} for {num_classes} classes; "
                                "expected at least one component per class with vae.prior: class_mixture")
        self.num_classes = num_classes if cfg.conditional else 0
        self.vae = self.place(VAE(cfg.latent_dim, cfg.width, self.num_classes, image_shape=self.image_shape,
                                  decoder_blocks=cfg.decoder_blocks))
        self.modules = {"vae": self.vae}
        self.optimizers = {"vae": self.adam(self.vae.parameters(), lr=cfg.lr)}

    def as_input(self, images):
        return (images.float() / 255).contiguous(memory_format=self.memory_format)

    def train_step(self, images, labels, noise: torch.Generator) -> dict[str, torch.Tensor]:
        x = self.as_input(images)
        labels = labels if self.num_classes else None
        with self.autocast():
            logits, mu, logvar = self.train_modules["vae"](x, labels, generator=noise)
        loss, recon, kl = negative_elbo(logits.float(), x, mu.float(), logvar.float(), self.cfg.beta)
        loss = loss.mean()
        self.optimizers["vae"].zero_grad(set_to_none=True)
        loss.backward()
        self.optimizers["vae"].step()
        return {"loss": loss.detach(), "recon": recon.detach().mean(), "kl": kl.detach().mean()}

    @torch.no_grad()
    def sample(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        self.vae.eval()
        out = KINDS["vae"].to_images(self.vae, z, labels if self.num_classes else None)
        self.vae.train()
        return out

    @torch.no_grad()
    def finalize(self, data) -> dict:
        """Fit the configured prior to the codes of the training images (vae.prior). The first stage was
        trained with N(0, I) and is left as it is; only where samples start from changes."""
        import time

        from imagegen.models.priors import build_prior, posterior_codes

        cfg = self.cfg
        if cfg.prior == "standard":
            return {}
        started = time.perf_counter()
        seed = data.seed
        labels = data.labels if self.num_classes else None
        codes = posterior_codes(self.vae, data.images, labels, torch.Generator().manual_seed(seed))
        prior = build_prior(cfg.prior, cfg.latent_dim, cfg.prior_components, cfg.prior_width).to(self.device)
        torch.manual_seed(seed)  # the second stage's initial weights
        metrics = prior.fit(codes, seed=seed, epochs=cfg.prior_epochs, labels=data.labels)  # class_mixture: labels
        self.vae.prior = prior.eval()
        return {**metrics, "prior_fit_seconds": round(time.perf_counter() - started, 2)}

    def warm_start_targets(self) -> list[nn.Module]:
        """What a registered VAE's weights are loaded into (its prior is fitted again after training)."""
        return [self.vae]

    def export(self) -> nn.Module:
        return self.vae


class StepGraph:
    """A training step captured once as a CUDA graph, then replayed: one launch instead of hundreds.

    The first `warmup` calls run eagerly on a side stream (cuDNN picks its algorithms and Adam makes
    its state, as capture requires); the next call captures the step and replays it; later calls copy
    the batch into the captured input buffers and replay. Every call is exactly one training step.
    The noise generator is registered with the graph: a replay draws from the generator's current
    seed and offset, so after `noise.manual_seed(s)` it draws what an eager step would.
    """

    def __init__(self, step, warmup: int = 3):
        self.step, self.warmup, self.calls = step, warmup, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.outputs: dict[str, torch.Tensor] = {}
        self.noise: torch.Generator | None = None
        self.failed = False

    def __call__(self, images, labels, noise: torch.Generator) -> dict[str, torch.Tensor]:
        if self.failed:
            return self.step(images, labels, noise)
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream(images.device)
            side.wait_stream(torch.cuda.current_stream(images.device))
            with torch.cuda.stream(side):
                out = self.step(images, labels, noise)
            torch.cuda.current_stream(images.device).wait_stream(side)
            return out
        if self.graph is None:
            try:
                self.capture(images, labels, noise)
            except Exception as exc:  # nothing ran during the capture: this step runs eagerly, as do all later ones
                log.warning("CUDA graph capture of the training step failed (%s: %s); continuing without graphs",
                            type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                self.failed, self.graph = True, None
                torch.cuda.synchronize()
                return self.step(images, labels, noise)
        else:
            if noise is not self.noise:
                raise RuntimeError("StepGraph: the step was captured with another noise generator")
            self.inputs[0].copy_(images, non_blocking=True)
            self.inputs[1].copy_(labels, non_blocking=True)
        self.graph.replay()
        return self.outputs

    def capture(self, images, labels, noise: torch.Generator) -> None:
        self.inputs, self.noise = (images.clone(), labels.clone()), noise
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(noise)
        with torch.cuda.graph(graph):
            self.outputs = self.step(*self.inputs, noise)
        self.graph = graph
