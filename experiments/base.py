"""Settings shared by every experiment; each experiment file starts from get_config() here."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = ""        # which runner opd_jax.main dispatches to (see opd_jax.main.RUNNERS)
  c.seed = 0               # root PRNG seed; per-step keys are fold_in(root, step)
  c.workdir = ""           # where outputs (figures, tables, checkpoints) are written; "" = none
  return c
