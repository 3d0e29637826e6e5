"""pdjax: Planned Diffusion (arXiv 2510.18087) in JAX/Flax NNX, for TPUs."""

__version__ = "0.1.0"
