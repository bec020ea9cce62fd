"""opd_jax: on-policy distillation for language models in JAX/Flax (arXiv 2603.25562)."""

__version__ = "0.1.0"
