"""The command-line entry point and the estimator demo, run in-process on the smoke config."""

import importlib.util
import pathlib

import ml_collections
import pytest

from opd_jax import estimator_table, main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


@pytest.mark.slow  # keeps `make test` under 10 minutes; `make test-all` runs it
def test_demo_smoke_table(capsys):
  rows = main.run_experiment(load_config("estimator_table", "smoke"))
  out = capsys.readouterr().out
  assert "LSM: teacher top-K, renorm" in out and "ms/call" in out
  assert {r["k"] for r in rows} == {"-", "16", "32", "48", "64"}
  full = next(r["loss"] for r in rows if r["estimator"].startswith("full"))
  at_v = [r for r in rows if r["k"] == "64" and "renorm" in r["estimator"]]
  assert at_v and all(r["loss"] == pytest.approx(full, rel=1e-5) for r in at_v)
  masses = [r["teacher_mass"] for r in rows if r["estimator"].startswith("LSM")]
  assert masses == sorted(masses) and masses[-1] == pytest.approx(1.0)


def test_unknown_experiment_is_rejected():
  config = ml_collections.ConfigDict({"experiment": "nope"})
  with pytest.raises(ValueError, match="accepted: estimator_table"):
    main.run_experiment(config)


def test_unknown_config_argument_is_rejected():
  with pytest.raises(ValueError, match="accepted: 'smoke'"):
    load_config("estimator_table", "huge")


def test_demo_settings_are_frozen():
  s = estimator_table.TableSettings.from_config(load_config("estimator_table", "smoke"))
  with pytest.raises(Exception):
    s.vocab = 3


def test_transformers_advice_about_missing_pytorch_is_silenced(capfd):
  import os  # pylint: disable=import-outside-toplevel

  import opd_jax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  from transformers.utils import logging as hf_logging  # pylint: disable=import-outside-toplevel
  assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == "1"
  hf_logging.get_logger("transformers").warning_advice("PyTorch was not found. Models won't ...")
  assert "PyTorch was not found" not in capfd.readouterr().err
