"""`python -m opd_jax.export`: a trained run back to a Hugging Face folder that transformers
loads, with the run's weights, config and tokenizer."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import train_helpers
from opd_jax import checkpoint, errors, export, models, programs, settings, train
from opd_jax.data import tiny_arith

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_arith_dir):
  workdir = tmp_path_factory.mktemp("run")
  config = train_helpers.tiny_config(workdir, tiny_arith_dir, steps=2, **{
      "data.prompts_per_step": 8, "opt.minibatch_size": 8, "checkpoint.every": 1,
      "log.plot": True})
  train.run(config, log=lambda _: None)
  assert (workdir / "curves.png").stat().st_size > 10_000   # the trainer drew its curves
  return workdir, config


def _trained_params(workdir, config, step):
  """The student's parameters of `step`, restored as the trainer keeps them."""
  s = settings.TrainSettings.from_config(config)
  tok = models.load_tokenizer(workdir / "tokenizer")
  student = programs.model_config_of(s.model, len(tok))
  p = programs.build(s, student, len(tok), s.mesh.make())
  state, _, chosen = checkpoint.restore(workdir, p.abstract_state, step=step)
  assert chosen == step
  return nnx.merge(p.graphdef, state.params)


def test_export_writes_a_folder_transformers_loads_with_the_trained_weights(run, tmp_path):
  import torch
  import transformers
  workdir, config = run
  out = export.export(workdir, tmp_path / "hf", step=None, log=lambda _: None)
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
  ours = _trained_params(workdir, config, 2)   # the latest step, not the initial weights
  tokens = tiny_arith.encode("123+456=")[None]
  mask = np.ones_like(tokens, bool)
  want = np.asarray(models.forward(ours, tokens, mask))
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  with torch.no_grad():
    got = hf(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.decode(tokens[0]) == "123+456="
  # An earlier step gives other weights; bfloat16 halves the file.
  early = export.export(workdir, tmp_path / "hf1", step=1, dtype="bfloat16", log=lambda _: None)
  loaded, cfg = models.load_hf_checkpoint(early)
  assert cfg.dtype == "float32" and (early / "model.safetensors").stat().st_size < \
      0.6 * (out / "model.safetensors").stat().st_size
  first = np.asarray(models.forward(loaded, tokens, mask))
  assert not np.allclose(first, want, atol=1e-3)
  np.testing.assert_allclose(
      first, np.asarray(models.forward(_trained_params(workdir, config, 1), tokens, mask)),
      atol=0.1)   # bfloat16 weights


def test_export_refuses_what_it_cannot_use(run, tmp_path):
  workdir, _ = run
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  with pytest.raises(errors.ConfigError, match="--out=.* is not an empty folder"):
    export.export(workdir, tmp_path / "full")
  with pytest.raises(errors.ConfigError, match="--workdir=.* is not an existing folder"):
    export.export(tmp_path / "nope", tmp_path / "o")
  with pytest.raises(errors.ConfigError, match="--dtype='float16'"):
    export.export(workdir, tmp_path / "o", dtype="float16")


def test_export_from_the_command_line(run, tmp_path):
  workdir, _ = run
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "opd_jax.export", f"--workdir={workdir}",
                         f"--out={tmp_path / 'hf'}", "--step=2"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "exported step 2" in proc.stdout
  models.check_folder(tmp_path / "hf")
  proc = subprocess.run([sys.executable, "-m", "opd_jax.export", f"--workdir={tmp_path}/none",
                         f"--out={tmp_path / 'hf2'}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().startswith("error: --workdir=")
