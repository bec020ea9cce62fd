"""A run's curves from its metrics.jsonl as one PNG: `python -m opd_jax.plot --workdir=RUN`.

    python -m opd_jax.plot --workdir=runs/lsm [--out=runs/lsm/curves.png]

Six panels against the iteration: the loss; the KL and log-prob gaps to the teacher; the
evaluations; the response lengths; the time split of an iteration (rollout, scoring, update);
the gradient norm and the sampler-vs-trainer mismatch. docs/metrics.md says what each name is.
The trainer draws the same figure into its workdir at the end of a run (`log.plot`).
"""

from __future__ import annotations

import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opd_jax import metrics
from opd_jax.errors import ConfigError

CURVES_FILE = "curves.png"
Series = tuple[list[int], list[float]]

# Panel title -> which metric names it draws (a name, or a regex matched in full).
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss",)),
    ("KL and gaps to the teacher (nats / token)",
     ("teacher/logp_gap", "kl/logp_gap", "opd/reward_mean", "policy/kl_before_after",
      "eval/reverse_kl")),
    ("evaluation", (r"eval/[^/]+/(pass@1|avg@\d+)", "eval/accuracy", "eval/exact_match",
                    "eval/end_fraction", "env/success_rate")),
    ("response length (tokens)", ("rollout/length_mean", "rollout/length_max",
                                  r"eval/[^/]+/mean_length")),
    ("time per iteration (s)", ("time/rollout", "time/scoring", "time/update")),
    ("gradient norm; log-prob mismatch", ("opt/grad_norm", "opt/grad_norm_max",
                                          "rollout/logprob_mismatch_mean")),
)


def _strip_task(name: str) -> str:
  return re.sub(r"^task/[^/]+/", "", name)


def panels(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Series]]:
  """Panel title -> {metric name: (steps, values)} of the metrics rows (`metrics.read_metrics`),
  non-finite values left out; names a run never wrote, and panels with none, are absent."""
  out: dict[str, dict[str, Series]] = {}
  names = sorted({k for r in rows for k in r if k != "step"})
  for title, wanted in PANELS:
    chosen = [n for n in names if any(re.fullmatch(w, _strip_task(n)) for w in wanted)]
    series = {}
    for name in chosen:
      points = [(int(r["step"]), float(r[name])) for r in rows
                if name in r and isinstance(r[name], (int, float)) and math.isfinite(r[name])]
      if points:
        series[name] = ([s for s, _ in points], [v for _, v in points])
    if series:
      out[title] = series
  return out


def plot(workdir, out=None, *, title: str = "") -> pathlib.Path:
  """Draws the curves of `workdir`'s metrics.jsonl into `out` (default workdir/curves.png).

  Returns:
    The PNG written.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(workdir)
  rows = metrics.read_metrics(workdir)
  if not rows:
    raise ConfigError(f"--workdir={str(workdir)!r} has no {metrics.METRICS_FILE}: give the "
                      "--config.workdir of a trainer run")
  drawn = panels(rows)
  out = pathlib.Path(out) if out else workdir / CURVES_FILE
  cols = 2 if len(drawn) > 1 else 1
  nrows = max(1, -(-len(drawn) // cols))
  fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 3.4 * nrows), squeeze=False)
  for ax, (name, series) in zip(axes.flat, drawn.items()):
    if name.startswith("time per iteration"):   # stacked: the split of each iteration
      steps = sorted({s for xs, _ in series.values() for s in xs})
      ys = [[dict(zip(*series[n])).get(s, 0.0) for s in steps] for n in series]
      ax.stackplot(steps, ys, labels=list(series), alpha=0.8)
    else:
      for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    if name.startswith("gradient norm"):
      ax.set_yscale("log")
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(drawn):]:
    ax.axis("off")
  fig.suptitle(title or f"{workdir.name}: {metrics.METRICS_FILE}, {len(rows)} rows", fontsize=11)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp.png")
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, out)
  return out


def _cli() -> None:
  # pylint: disable=import-outside-toplevel
  from absl import app, flags

  from opd_jax import cli
  workdir = flags.DEFINE_string("workdir", None, "The trainer run's workdir.", required=True)
  out = flags.DEFINE_string("out", "", "The PNG to write (default: WORKDIR/curves.png).")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
    print(plot(workdir.value, out.value or None))

  cli.run_main(run)


def after_run(workdir, log: Callable[[str], None] = print) -> None:
  """The trainer's end-of-run figure (workdir/curves.png); a drawing problem is only logged."""
  try:
    plot(workdir)
  except Exception as e:  # pylint: disable=broad-except  (a figure never fails a finished run)
    log(f"curves not drawn: {type(e).__name__}: {e}")


if __name__ == "__main__":
  _cli()
