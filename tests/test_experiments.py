"""Every experiment file: loads, documents itself, and runs its ':smoke' variant on CPU."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from opd_jax import arith_demo, main
from opd_jax.settings import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "experiments").glob("*.py"))


def load(path, arg=None):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config(arg)


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_experiment_file_documents_itself_and_has_a_smoke_variant(path):
  module, config = load(path)
  for part in ("Run:", "Runtime:", "Expected:"):
    assert part in module.__doc__, f"{path.name}: docstring lacks {part!r}"
  assert config.experiment in main.RUNNERS
  _, smoke = load(path, "smoke")
  assert smoke.experiment == config.experiment
  with pytest.raises(ValueError, match="smoke"):
    load(path, "no-such-variant")


@pytest.mark.slow   # 44 s; the demo's :smoke runs from the command line in the slow
#                     tests/test_command_line.py too
def test_tiny_arith_smoke_runs_every_method(tmp_path, tiny_arith_dir, capsys):
  _, config = load(ROOT / "experiments" / "tiny_arith.py", "smoke")
  config.workdir = str(tmp_path)
  config.data.data_dir = str(tiny_arith_dir)
  # sampled-token OPD runs in tests/test_train.py; here the two other methods keep it short.
  config.demo.methods = ("lsm", "sft")
  results = main.run_experiment(config)
  out = capsys.readouterr().out
  assert set(results) == {"lsm", "sft"}
  for method, per_seed in results.items():
    evals = per_seed[0]
    assert sorted(evals) == [0, 2, 4], method
    assert all(0.0 <= e["accuracy"] <= 1.0 and e["reverse_kl"] >= 0.0 for e in evals.values())
  assert "exact match" in out and "best mean exact match" in out
  assert (tmp_path / "curves.png").exists()
  saved = json.loads((tmp_path / "results.json").read_text())
  assert len(saved["table"]) == 2 * 3
  assert set(saved["summary"]["methods"]) == {"lsm", "sft"}
  # Each run is a real trainer workdir: metrics and a final checkpoint.
  for method in results:
    assert (tmp_path / "runs" / f"{method}_seed0" / "checkpoints" / "4").is_dir()
  # A second demo in the same workdir reads every evaluation back and trains nothing.
  again = main.run_experiment(config)
  out = capsys.readouterr().out
  assert again == results
  assert json.loads((tmp_path / "results.json").read_text())["table"] == saved["table"]
  assert "lsm seed 0: already complete" in out and "teacher: loaded from" in out
  assert "step 1/" not in out


@pytest.mark.parametrize("key, value, instead", [
    ("loss.estimator", "full_rkl", "config.demo.methods"),
    ("rollout.top_p", 1.5, "config.demo.methods"),
    ("seed", 3, "config.demo.seeds"),
    ("model.path", "/models/x", "config.demo.student"),
    ("teacher.random.hidden_size", 8, "config.demo.teacher"),
])
def test_demo_refuses_trainer_settings_it_sets_per_run(tmp_path, key, value, instead):
  _, config = load(ROOT / "experiments" / "tiny_arith.py", "smoke")
  config.workdir = str(tmp_path)
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=f"config.{key}=.* is not used by the demo.*{instead}"):
    main.run_experiment(config)
  assert not any(tmp_path.iterdir())   # refused before anything was made


def test_demo_summary_averages_over_seeds_and_names_the_leader():
  ev = lambda acc, kl: {"accuracy": acc, "reverse_kl": kl}  # noqa: E731
  results = {
      "a": {0: {0: ev(0.3, 1.0), 50: ev(0.5, 0.5)}, 1: {0: ev(0.4, 1.0), 50: ev(0.9, 0.1)}},
      "b": {0: {0: ev(0.3, 1.0), 50: ev(0.8, 0.2)}, 1: {0: ev(0.4, 1.0), 50: ev(0.7, 0.2)}},
  }
  summary = arith_demo.summarize(results)
  assert summary["methods"]["a"]["mean_accuracy"] == pytest.approx({0: 0.35, 50: 0.7})
  assert summary["methods"]["b"]["mean_accuracy"] == pytest.approx({0: 0.35, 50: 0.75})
  assert summary["methods"]["a"]["mean_reverse_kl"][50] == pytest.approx(0.3)
  assert summary["methods"]["a"]["gain"] == pytest.approx({0: 0.2, 1: 0.5})
  assert summary["leader"] == {0: "tie: a, b", 50: "b"}
  # The fine-tuning control is reported but never the leader.
  results["sft"] = {0: {0: ev(0.3, 1.0), 50: ev(1.0, 0.0)}}
  assert arith_demo.summarize(results)["leader"][50] == "b"


@pytest.mark.slow  # keeps `make test` under 10 minutes; `make test-all` runs it
def test_a_config_path_works_from_any_directory(tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
      [sys.executable, "-m", "opd_jax.main",
       f"--config={ROOT / 'experiments' / 'toy_variance.py'}:smoke",
       f"--config.workdir={tmp_path / 'toy'}"], cwd=tmp_path, env=env, capture_output=True,
      text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (tmp_path / "toy" / "summary.csv").exists()
