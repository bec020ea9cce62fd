"""Test helpers for the math evaluation and the paper's experiment files: the package's smoke
stand-ins (opd_jax.smoke: a ChatML tokenizer with Qwen's relevant single tokens, tiny random
student/teacher Hugging Face folders, small data files in the published formats of
DAPO-Math-17K and the five benchmarks), and how a test points a config at them."""

from __future__ import annotations

from opd_jax import smoke

MASK_STRINGS = smoke.MASK_STRINGS
MODEL_VOCAB = smoke.MODEL_VOCAB
make_tokenizer = smoke.make_tokenizer
make_model_folder = smoke.make_model_folder
problem = smoke.problem
write_benchmarks = smoke.write_benchmarks
write_dapo = smoke.write_dapo
build_assets = smoke.build_assets


def fill_paths(c, assets: dict, workdir) -> None:
  """Points a paper experiment config at the tiny assets (the paths a user must set)."""
  c.workdir = str(workdir)
  c.model.path = str(assets["student"])
  c.data.data_dir = str(assets["tfds"])
  c.eval.data_dir = str(assets["tfds"])
  if c.tasks:
    c.tasks[0].teacher.path = str(assets["teacher"])
    c.tasks[0].data.source = str(assets["dapo"])
    c.tasks[0].data.data_dir = str(assets["tfds"])
    c.tasks[1].data.dataset = "math500"
    c.tasks[1].data.split = "test"
    c.tasks[1].data.data_dir = str(assets["tfds"])
    c.tasks[1].teacher.path = str(assets["teacher"])
  else:
    c.teacher.path = str(assets["teacher"])
    c.data.source = str(assets["dapo"])
