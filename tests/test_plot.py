"""`python -m opd_jax.plot`: a run's curves from its metrics.jsonl, one PNG."""

import math
import os
import pathlib
import subprocess
import sys

import pytest

from opd_jax import errors, metrics, plot

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _write_run(workdir):
  with metrics.MetricsWriter(workdir, primary=True, tensorboard=False) as w:
    w.write(0, {"eval/math500/pass@1": 0.1, "eval/math500/mean_length": 90.0})
    for step in (1, 2, 3):
      w.write(step, {"loss": 1.0 / step, "teacher/logp_gap": -2.0 + step / 2,
                     "rollout/length_mean": 10.0 * step, "time/rollout": 1.0,
                     "time/scoring": 0.5, "time/update": 2.0, "opt/grad_norm": 3.0 / step,
                     "opd/clip_fraction": 0.1, "loss_scale": float("nan") if step == 2 else 1.0})
    w.write(3, {"eval/math500/pass@1": 0.4, "eval/math500/mean_length": 80.0})


def test_panels_hold_each_metric_at_its_steps(tmp_path):
  _write_run(tmp_path)
  drawn = plot.panels(metrics.read_metrics(tmp_path))
  assert drawn["loss"] == {"loss": ([1, 2, 3], [1.0, 0.5, 1 / 3])}
  assert drawn["KL and gaps to the teacher (nats / token)"] == {
      "teacher/logp_gap": ([1, 2, 3], [-1.5, -1.0, -0.5])}
  assert drawn["evaluation"] == {"eval/math500/pass@1": ([0, 3], [0.1, 0.4])}
  assert drawn["response length (tokens)"]["eval/math500/mean_length"] == ([0, 3], [90.0, 80.0])
  assert set(drawn["time per iteration (s)"]) == {"time/rollout", "time/scoring", "time/update"}
  assert not any("opd/clip_fraction" in series for series in drawn.values())   # not drawn
  # Multi-task names land in the same panels.
  tasked = plot.panels([{"step": 1, "task/math/teacher/logp_gap": -1.0, "loss": 2.0}])
  assert tasked["KL and gaps to the teacher (nats / token)"] == {
      "task/math/teacher/logp_gap": ([1], [-1.0])}
  nan_only = plot.panels([{"step": 1, "loss": math.nan}])
  assert nan_only == {}


def test_plot_writes_a_png_and_the_command_line_says_where(tmp_path):
  _write_run(tmp_path / "run")
  out = plot.plot(tmp_path / "run")
  assert out == tmp_path / "run" / plot.CURVES_FILE
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
  with pytest.raises(errors.ConfigError, match="has no metrics.jsonl"):
    plot.plot(tmp_path / "empty")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "opd_jax.plot", f"--workdir={tmp_path / 'run'}",
                         f"--out={tmp_path / 'c.png'}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path / "c.png"), proc.stderr
  assert (tmp_path / "c.png").stat().st_size > 10_000
