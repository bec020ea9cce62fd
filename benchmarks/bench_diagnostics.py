"""Cost of the estimator diagnostics (opd_jax.diagnostics) against a trainer iteration (one JSON
line).

Two short trainer runs of the same config, random student and teacher of the demo's shapes on
its arithmetic prompts (32 prompts x 4 rollouts of 5 tokens, LSM with K = 8, two AdamW steps):
(a) at the default settings with the estimator diagnostics off (`log.diagnostics_positions=0`):
the median seconds of an iteration; (b) with the diagnostics on every iteration
(`log.diagnostics_every=1`, `log.diagnostics_positions` as given, 64 by default): the median of
`time/diagnostics`. Compilation is excluded (the first iterations are dropped). At the default
`log.diagnostics_every` (10) the cost per iteration is the diagnostics' time / 10.

  python benchmarks/bench_diagnostics.py                      # ~1 min on 2 cores
  python benchmarks/bench_diagnostics.py --positions=256 --steps=6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from opd_jax import configs, train  # noqa: E402


def _config(workdir: str, data_dir: str, a: argparse.Namespace, **log):
  c = configs.opd()
  c.workdir, c.steps, c.seed = workdir, a.steps, 0
  c.data.dataset, c.data.data_dir, c.data.chat_template = "tiny_arith", data_dir, False
  c.data.prompts_per_step, c.rollout.num_samples = a.prompts, 4
  c.rollout.max_new_tokens, c.rollout.stop_strings, c.rollout.banned_strings = 5, ("<eos>",), ()
  c.rollout.top_p = 0.9
  for group, (hidden, mlp, std) in ((c.model, (96, 192, 0.05)), (c.teacher, (128, 256, 0.1))):
    group.random.update(dict(hidden_size=hidden, intermediate_size=mlp, num_layers=2,
                             num_heads=4, num_kv_heads=2, init_std=std))
  c.loss.estimator, c.loss.k = "lsm", 8
  c.opt.minibatch_size, c.opt.lr = a.prompts * 2, 5e-4
  c.mesh.data = 1
  c.checkpoint.every = 10_000   # only the final state is saved
  c.log.samples_every, c.log.tensorboard = 0, False
  for k, v in log.items():
    c.log[k] = v
  return c


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=12, help="iterations per run")
  parser.add_argument("--skip", type=int, default=2, help="first iterations dropped (compiling)")
  parser.add_argument("--positions", type=int, default=64, help="log.diagnostics_positions")
  parser.add_argument("--prompts", type=int, default=32, help="data.prompts_per_step")
  a = parser.parse_args()
  if a.steps <= a.skip:
    raise SystemExit(f"--steps={a.steps} must exceed --skip={a.skip}")
  root = tempfile.mkdtemp(prefix="bench_diagnostics_")
  quiet = lambda _: None   # pylint: disable=unnecessary-lambda-assignment
  base = train.run(_config(f"{root}/a", f"{root}/tfds", a, diagnostics_positions=0), log=quiet)
  diag = train.run(_config(f"{root}/b", f"{root}/tfds", a, diagnostics_every=1,
                           diagnostics_positions=a.positions), log=quiet)
  iteration = statistics.median(r["time/step"] for r in base[a.skip:])
  seconds = statistics.median(r["time/diagnostics"] for r in diag[a.skip:])
  every = configs.opd().log.diagnostics_every
  print(json.dumps({
      "positions": a.positions, "rollouts": a.prompts * 4, "iteration_s": round(iteration, 4),
      "diagnostics_s": round(seconds, 4),
      "fraction_of_a_diagnostic_iteration": round(seconds / iteration, 4),
      "diagnostics_every": every, "fraction_per_iteration": round(seconds / iteration / every, 4),
      "load": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
  main()
