"""opd_jax: on-policy distillation for language models in JAX/Flax (arXiv 2603.25562)."""

__version__ = "0.1.0"

import os as _os

# transformers says "PyTorch was not found. Models won't be available ..." when it is imported
# without PyTorch. This package uses only its tokenizers and configs (the models are ours), so
# the advice would only mislead; set the variable to "" to see transformers' advisories again.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
