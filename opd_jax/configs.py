"""Settings shared by every experiment file: each one's get_config() starts from base() here."""

import ml_collections


def base() -> ml_collections.ConfigDict:
  """The fields every experiment has, each with its default."""
  c = ml_collections.ConfigDict()
  c.experiment = ""        # which runner opd_jax.main dispatches to (see opd_jax.main.RUNNERS)
  c.seed = 0               # root PRNG seed; per-step keys are fold_in(root, step)
  c.workdir = ""           # where outputs (figures, tables, checkpoints) are written; "" = none
  return c
