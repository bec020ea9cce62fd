"""The command line's messages: a user error (a setting, a checkpoint folder, data) is one line
naming the `--config.` key, exit status 2, no traceback; `--debug` / OPD_DEBUG show it."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from opd_jax import cli, errors, models

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = "--config=experiments/math_lsm.py:smoke"


def _env(**extra):
  # A user's machine: one CPU device (the tests' 8 fake devices are for sharding tests).
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", errors.DEBUG_ENV)}
  return env | {"PYTHONUNBUFFERED": "1"} | extra


def _run(*args, **env):
  proc = subprocess.run([sys.executable, "-m", "opd_jax.main", *args], cwd=ROOT, env=_env(**env),
                        capture_output=True, text=True, timeout=600, check=False)
  return proc.returncode, proc.stdout, proc.stderr


def _one_line_error(rc, out, err, *needles):
  assert rc == 2, (rc, out[-2000:], err[-3000:])
  assert "Traceback" not in err + out, err[-3000:]
  lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, err[-3000:]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """One workdir for the runs that stop at start-up: its smoke stand-ins are made once."""
  return tmp_path_factory.mktemp("cli")


def test_misspelt_key_names_it_and_the_closest_settings(tmp_path):
  rc, out, err = _run(SMOKE, f"--config.workdir={tmp_path}", "--config.opt.learning_rate=1e-5")
  line = _one_line_error(rc, out, err, "--config.opt.learning_rate", "closest: lr")
  assert "known settings here:" in line and "weight_decay" in line
  rc, _, err = _run(SMOKE, f"--config.workdir={tmp_path}", "--config.opt.learning_rate=1e-5",
                    "--debug")
  assert rc != 0 and "Traceback" in err       # --debug shows where it came from
  rc, _, err = _run(SMOKE, f"--config.workdir={tmp_path}", "--config.optt.lr=1",
                    **{errors.DEBUG_ENV: "1"})
  assert rc != 0 and "Traceback" in err


def test_missing_config_file_and_unknown_variant_are_one_line(tmp_path):
  _one_line_error(*_run("--config=experiments/nope.py", f"--config.workdir={tmp_path}"),
                  "--config=experiments/nope.py", "no such file")
  _one_line_error(*_run("--config=experiments/math_lsm.py:huge", "--config.seed=1"),
                  "unknown config argument 'huge'; accepted: 'smoke'")


def test_bad_value_of_a_known_key_is_one_line(tmp_path):
  _one_line_error(*_run(SMOKE, f"--config.workdir={tmp_path}", "--config.opt.lr=abc"),
                  "--config.opt.lr=abc")


def test_missing_model_folder_is_a_checkpoint_error_naming_the_key(workdir, tmp_path):
  missing = tmp_path / "no_such_model"
  _one_line_error(*_run(SMOKE, f"--config.workdir={workdir}", f"--config.model.path={missing}"),
                  "config.model.path", str(missing), "--config.model.path", "does not exist")


def test_folder_without_weights_is_a_checkpoint_error_naming_the_folder(workdir, tmp_path):
  folder = tmp_path / "tokenizer_only"
  folder.mkdir()
  config = models.ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=16,
                              intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                              head_dim=8, qkv_bias=True)
  (folder / "config.json").write_text(json.dumps(models.config_to_hf(config)))
  line = _one_line_error(*_run(SMOKE, f"--config.workdir={workdir}",
                               f"--config.teacher.path={folder}"),
                         "--config.teacher.path", str(folder))
  assert "model.safetensors" in line


def test_bad_mesh_names_the_mesh_keys(workdir):
  _one_line_error(*_run(SMOKE, f"--config.workdir={workdir}", "--config.mesh.data=3"),
                  "config.mesh", "--config.mesh.data", "1 devices")


def test_over_long_prompt_names_the_row_and_the_key(workdir, tmp_path):
  source = tmp_path / "mine.jsonl"
  rows = [{"id": "short", "prompt": "What is 1+1?"},
          {"id": "too_long", "prompt": "Find x. " * 200}]
  source.write_text("".join(json.dumps(r) + "\n" for r in rows))
  args = (SMOKE, f"--config.workdir={workdir}", "--config.data.dataset=prompts",
          f"--config.data.source={source}", "--config.data.max_prompt_len=64")
  _one_line_error(*_run(*args, "--config.data.long_prompts=error"),
                  "too_long", "1 of 2 prompts", "--config.data.max_prompt_len")


def test_check_overrides_in_process():
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({"opt": {"lr": 1.0, "b1": 0.9}, "seed": 0})
  cli.check_overrides(config, ["opt.lr", "seed"])
  with pytest.raises(errors.ConfigError, match=r"'lrr' is not a setting of config.opt; "
                                               r"closest: lr"):
    cli.check_overrides(config, ["opt.lrr"])
  with pytest.raises(errors.ConfigError, match="it holds no settings"):
    cli.check_overrides(config, ["seed.x"])
