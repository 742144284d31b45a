"""imagegen: reproducible GAN and VAE image generators."""

__version__ = "0.1.0"
