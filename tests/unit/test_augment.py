"""Small folders: the training budget in images seen, and the discriminator's adaptive augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagegen.config import GANConfig, VAEConfig
from imagegen.training.augment import adapt, augment
from imagegen.training.data import DeviceBatches
from imagegen.training.loop import LoopConfig, report_every
from imagegen.training.tasks import GANTask

CPU = torch.device("cpu")


def steps_for(section, n_images: int) -> int:
    data = DeviceBatches(np.zeros((n_images, 1, 28, 28), np.uint8), np.zeros(n_images, np.int64),
                         section.batch_size, CPU, seed=0)
    return section.epochs_for(data.images_per_epoch) * data.steps_per_epoch


@pytest.mark.parametrize("section", [GANConfig(images=50_000), VAEConfig(images=50_000)])
def test_a_small_folder_gets_as_many_steps_as_a_large_one(section):
    small, large = steps_for(section, 500), steps_for(section, 5000)
    assert small == pytest.approx(large, rel=0.01), (small, large)
    assert small > 10 * 500 // section.batch_size  # many epochs of the small folder, not one


def test_the_defaults_keep_fashion_mnists_epochs_and_an_explicit_epochs_wins():
    gan, vae = GANConfig(), VAEConfig()
    assert gan.epochs_for(60_000 // 64 * 64) == 14 and vae.epochs_for(60_000 // 128 * 128) == 16
    assert GANConfig(epochs=3).epochs_for(448) == 3
    assert report_every(59_968) == 1 and report_every(448) == 134  # a small folder's short epochs, reported as often


def test_reports_every_nth_epoch_and_the_last():
    cfg = LoopConfig(epochs=10, seed=0, checkpoint_path=None, checkpoint_every=1, fingerprint="", report_every=4)
    assert [e for e in range(1, 11) if cfg.reports(e)] == [4, 8, 10]


def images(n=8, channels=1, seed=0):
    return torch.rand(n, channels, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("channels", [1, 3])
def test_augmentation_is_the_identity_at_p_0_and_changes_images_at_p_1(channels):
    x = images(channels=channels)
    same = augment(x, torch.tensor(0.0), torch.Generator().manual_seed(1))
    assert torch.equal(same, x)
    changed = augment(x, torch.tensor(1.0), torch.Generator().manual_seed(1))
    assert changed.shape == x.shape
    assert all(not torch.equal(a, b) for a, b in zip(changed, x))  # each image: shifted, cut out (and recoloured)
    assert (changed == 0).flatten(1).float().mean(1).min() > 0.1  # a cutout of half the side: over 1/10 zeroed


@pytest.mark.parametrize("channels", [1, 3])
def test_gradients_reach_the_generator_through_the_augmentation(channels):
    task = GANTask(GANConfig(latent_dim=8, width=4, augment=True), 0, CPU, image_shape=(channels, 28, 28))
    task.augment_p.fill_(1.0)
    fake = task.generator(torch.randn(4, 8))
    task.discriminator(task.augmented(fake, torch.Generator().manual_seed(0))).mean().backward()
    grads = [p.grad for p in task.generator.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_ada_moves_p_by_the_sign_of_the_overfitting_signal():
    p = torch.tensor(0.0)
    unsure = torch.tensor([1.0, -1.0] * 50)  # a discriminator that cannot tell: p stays at 0
    for _ in range(5):
        adapt(p, unsure, target=0.6, speed_images=1000)
    assert float(p) == 0.0
    adapt(p, torch.full((100,), 2.0), target=0.6, speed_images=1000)  # every real judged real: overfitting
    assert float(p) == pytest.approx(0.1)
    for _ in range(20):
        adapt(p, torch.full((100,), 2.0), target=0.6, speed_images=1000)
    assert float(p) == 1.0  # never above 1
    adapt(p, unsure, target=0.6, speed_images=1000)
    assert float(p) == pytest.approx(0.9)


@pytest.fixture
def one_thread():
    """Tiny models: a second thread only waits on the first (and on a busy machine much longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_tiny(steps: int) -> GANTask:
    """A tiny GAN trained with augmentation on 16 random images: its discriminator memorises them."""
    torch.manual_seed(0)
    cfg = GANConfig(latent_dim=8, width=4, batch_size=16, augment=True, ada_speed_images=2000, lr_d=1e-2)
    task = GANTask(cfg, 0, CPU, amp=False)
    task.prepare_models(compile_models=False, ddp=False)
    data = DeviceBatches(np.random.default_rng(0).integers(0, 256, (16, 1, 28, 28), dtype=np.uint8),
                         np.zeros(16, np.int64), 16, CPU, seed=0)
    for step in range(steps):
        batch, labels = next(data.epoch(step))
        task.step(batch, labels, torch.Generator().manual_seed(step))
    return task


def test_the_probability_rises_when_the_discriminator_overfits_a_tiny_set(one_thread):
    assert float(train_tiny(60).augment_p) > 0.2


def test_resume_restores_the_probability_exactly(one_thread):
    trained = train_tiny(10)
    fresh = GANTask(trained.cfg, 0, CPU, amp=False)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.augment_p, trained.augment_p) and float(fresh.augment_p) > 0
