"""Command line: `python -m opd_jax.main --config=experiments/<name>.py[:arg] --config.x=...`."""

from __future__ import annotations

import importlib

from absl import app, flags, logging
from ml_collections import config_flags

from opd_jax import cli, errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file exposing get_config(); ':arg' is passed to it.",
    lock_config=True)

# config.experiment -> "module:function" taking the ConfigDict. Imported lazily so that an
# experiment only pays for the modules it uses.
RUNNERS = {
    "estimator_table": "opd_jax.estimator_table:run",
    "opd": "opd_jax.train:run",
    "opd_eval": "opd_jax.evaluate:train",   # the trainer with the math evaluator
    "smollm_heal": "opd_jax.heal_demo:run",  # make real-demo: a pruned SmolLM2 healed by OPD
    "tiny_arith": "opd_jax.arith_demo:run",
    "toy_variance": "opd_jax.toy.study:run",
    "toy_exact": "opd_jax.toy.exact:run",
}


def run_experiment(config) -> object:
  """Dispatch a ConfigDict to the runner named by `config.experiment`."""
  name = config.get("experiment")
  if name not in RUNNERS:
    raise errors.ConfigError(
        f"config.experiment={name!r} is not a known experiment; accepted: {', '.join(RUNNERS)}")
  if config.get("smoke"):
    from opd_jax import smoke  # pylint: disable=import-outside-toplevel
    smoke.fill_missing(config)
  module, fn = RUNNERS[name].split(":")
  return getattr(importlib.import_module(module), fn)(config)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config=experiments/<name>.py is required")
  if not flags.FLAGS["verbosity"].present:   # library INFO logs (TFDS, Orbax) only on request
    logging.set_verbosity(logging.WARNING)
  run_experiment(_CONFIG.value)


if __name__ == "__main__":
  cli.run_main(main)
