"""A trained student back to a Hugging Face folder: `python -m opd_jax.export --workdir=RUN`.

    python -m opd_jax.export --workdir=runs/lsm --out=runs/lsm/hf [--step=N] [--dtype=bfloat16]

reads the run's own settings (its config.json), restores the student's parameters of step N
(default: the latest complete checkpoint) and writes config.json, the weights as safetensors
and the student's tokenizer (chat template included) to `--out`, a folder that
`transformers.AutoModelForCausalLM.from_pretrained` and `opd_jax.models.load_hf_checkpoint` load.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

from opd_jax.errors import ConfigError

DTYPES = ("", "float32", "bfloat16")


def export(workdir, out, *, step: int | None = None, dtype: str = "",
           tokenizer: str = "", log: Callable[[str], None] = print) -> pathlib.Path:
  """Writes the student of trainer run `workdir` as a Hugging Face folder.

  Args:
    workdir: a trainer run's workdir (or its checkpoints folder, or one step's folder).
    out: the folder to write; created, and refused if it exists and is not empty.
    step: the checkpoint step (None: the step folder's own, else the latest).
    dtype: the weights' dtype in the folder; "" = the dtype the run keeps its parameters in.
    tokenizer: the tokenizer folder to copy; "" = the run's (model.tokenizer, else model.path,
      else the tokenizer the run made in its workdir, as the demo's).
    log: where the one-line summary goes.

  Returns:
    The folder written.
  """
  from opd_jax import evaluate, models  # pylint: disable=import-outside-toplevel
  if dtype not in DTYPES:
    raise ConfigError(f"--dtype={dtype!r} is not accepted; accepted: '' (the run's parameter "
                      "dtype), float32, bfloat16")
  folder, out = pathlib.Path(workdir), pathlib.Path(out)
  if not folder.is_dir():
    raise ConfigError(f"--workdir={str(workdir)!r} is not an existing folder")
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ConfigError(f"--out={str(out)!r} exists and is not an empty folder; give a new one")
  try:
    config = evaluate.run_config(folder)
  except ValueError as e:
    raise ConfigError(f"--workdir={str(workdir)!r}: {e}") from None
  if config is None:
    raise ConfigError(f"--workdir={str(workdir)!r} is not a trainer run (no checkpoints/ and "
                      "config.json); give the --config.workdir of a run")
  if not tokenizer and not (config.model.tokenizer or config.model.path):
    made = pathlib.Path(config.workdir or folder) / "tokenizer"   # e.g. tiny_arith's
    tokenizer = str(made) if made.is_dir() else ""
  model, tok, chosen, _ = evaluate.load_model(config, folder, step=step, tokenizer=tokenizer,
                                              log=log)
  # save_hf_checkpoint writes in its config's dtype; runtime choices (remat, attention) are no
  # part of the architecture and never go to config.json.
  models.save_hf_checkpoint(model, dataclasses.replace(model.config,
                                                       dtype=dtype or model.config.dtype), out)
  tok.save_pretrained(out)
  log(f"exported step {chosen} of {folder} to {out} ({model.config.model_type}, "
      f"{model.config.num_layers} layers, {dtype or model.config.dtype})")
  return out


def _cli() -> None:
  # pylint: disable=import-outside-toplevel
  from absl import flags

  from opd_jax import cli
  workdir = flags.DEFINE_string("workdir", None, "The trainer run's workdir.", required=True)
  out = flags.DEFINE_string("out", None, "The Hugging Face folder to write (new or empty).",
                            required=True)
  step = flags.DEFINE_integer("step", -1, "Checkpoint step (-1: the latest).")
  dtype = flags.DEFINE_enum("dtype", "", list(DTYPES), "Weights' dtype ('' = the run's).")
  tokenizer = flags.DEFINE_string("tokenizer", "", "Tokenizer folder ('' = the run's).")

  def run(argv):
    cli.check_usage(argv)
    export(workdir.value, out.value, step=None if step.value < 0 else step.value,
           dtype=dtype.value, tokenizer=tokenizer.value)

  cli.run_main(run)


if __name__ == "__main__":
  _cli()
