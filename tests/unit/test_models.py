import pytest
import torch

from imagegen.config import GANConfig
from imagegen.models.gan import Discriminator, Generator
from imagegen.models.vae import VAE, ResidualBlock, negative_elbo
from imagegen.training.tasks import GANTask


@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("kernel_size", [4, 5])
def test_gan_shapes(num_classes, kernel_size):
    g = Generator(latent_dim=8, width=4, num_classes=num_classes, kernel_size=kernel_size)
    d = Discriminator(width=4, num_classes=num_classes, kernel_size=kernel_size)
    labels = torch.arange(5) % 10 if num_classes else None
    images = g(torch.randn(5, 8), labels)
    assert images.shape == (5, 1, 28, 28)
    assert images.min() >= -1 and images.max() <= 1
    assert d(images, labels).shape == (5,)


def test_conditional_generator_depends_on_label():
    torch.manual_seed(0)
    g = Generator(latent_dim=8, width=4, num_classes=10).eval()
    z = torch.randn(1, 8).repeat(2, 1)
    a, b = g(z, torch.tensor([0, 7]))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("num_classes", [0, 10])
def test_vae_shapes(num_classes):
    vae = VAE(latent_dim=3, width=4, num_classes=num_classes)
    labels = torch.arange(6) % 10 if num_classes else None
    x = torch.rand(6, 1, 28, 28)
    logits, mu, logvar = vae(x, labels)
    assert logits.shape == x.shape and mu.shape == logvar.shape == (6, 3)
    assert vae.sample(4, labels[:4] if num_classes else None).shape == (4, 1, 28, 28)
    loss, recon, kl = negative_elbo(logits, x, mu, logvar)
    assert loss.shape == (6,) and torch.all(kl >= 0) and torch.allclose(loss, recon + kl)


def test_a_new_residual_block_is_the_identity_and_then_learns():
    torch.manual_seed(0)
    block = ResidualBlock(4)
    x = torch.randn(2, 4, 7, 7)
    assert torch.equal(block(x), x)
    block(x).pow(2).sum().backward()
    assert block.body[2].weight.grad.abs().sum() > 0  # the zero-started convolution still gets a gradient


def test_decoder_blocks_deepen_only_the_decoder():
    plain, deep = VAE(latent_dim=4, width=4), VAE(latent_dim=4, width=4, decoder_blocks=2)
    assert sum(isinstance(m, ResidualBlock) for m in deep.decoder) == 4  # 2 at 7 x 7, 2 at 14 x 14
    assert [p.shape for p in deep.encoder.parameters()] == [p.shape for p in plain.encoder.parameters()]
    assert deep.decode(torch.randn(3, 4)).shape == (3, 1, 28, 28)


def test_vae_step_lowers_loss_on_fixed_batch():
    torch.manual_seed(0)
    vae = VAE(latent_dim=4, width=4)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    x = torch.rand(16, 1, 28, 28).round()

    def loss():
        logits, mu, logvar = vae(x, generator=torch.Generator().manual_seed(1))
        return negative_elbo(logits, x, mu, logvar)[0].mean()

    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    assert loss().item() < before.item()


@pytest.mark.parametrize("loss_kind", ["hinge", "bce"])
def test_gan_steps_lower_their_losses(loss_kind):
    """One discriminator step lowers the D loss, one generator step the G loss (fixed batch and z)."""
    torch.manual_seed(0)
    task = GANTask(GANConfig(latent_dim=8, width=4, loss=loss_kind, lr_g=1e-3, lr_d=1e-3), 10, torch.device("cpu"))
    task.prepare_models(compile_models=False, ddp=False)
    real = torch.rand(16, 1, 28, 28) * 2 - 1
    z = torch.randn(16, 8)
    fake = task.generator(z).detach()
    d, g = task.discriminator, task.generator
    d.eval(), g.eval()  # freeze spectral-norm power iterations and BN statistics for a fair before/after

    def d_loss():
        return task.d_loss(d(real), d(fake))

    def g_loss():
        return task.g_loss(d(g(z)))

    for loss_fn, opt in ((d_loss, task.optimizers["discriminator"]), (g_loss, task.optimizers["generator"])):
        before = loss_fn()
        opt.zero_grad()
        before.backward()
        opt.step()
        assert loss_fn().item() < before.item()


@pytest.mark.parametrize("amp, cpu_has_bf16, expected", [(True, True, torch.bfloat16), (True, False, torch.float32),
                                                         (False, True, torch.float32)])
def test_amp_runs_cpu_steps_in_bf16_only_where_the_cpu_does_bf16_in_hardware(monkeypatch, amp, cpu_has_bf16, expected):
    """Emulated bf16 is slower than float32, so train.amp leaves such CPUs in float32."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_has_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    task = GANTask(GANConfig(latent_dim=8, width=4), 10, torch.device("cpu"), amp=amp)
    task.prepare_models(compile_models=False, ddp=False)
    seen = []
    for module in (task.generator.body[0], task.discriminator.head):
        module.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    task.step(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), torch.Generator())
    assert seen and set(seen) == {expected}


def test_batchnorm_recalibration_fits_statistics_to_the_weights():
    from imagegen.training.tasks import recalibrate_batchnorm

    torch.manual_seed(0)
    g = Generator(latent_dim=8, width=4)
    for module in g.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.fill_(5.0)  # statistics that belong to other weights
    z = torch.randn(2048, 8)
    with torch.no_grad():
        batch_stats = g.train()(z)
        stale = g.eval()(z)
        recalibrate_batchnorm(g, 8, 0, torch.device("cpu"), batches=8, batch_size=512)
        assert not g.training
        fresh = g(z)
    assert (stale - batch_stats).abs().mean() > 0.1
    assert (fresh - batch_stats).abs().mean() < 0.02
