"""Test helpers for the math evaluation and the paper's experiment files: a ChatML tokenizer with
Qwen's relevant single tokens, tiny random student/teacher Hugging Face folders, and small data
files in the published formats of DAPO-Math-17K and the five benchmarks."""

from __future__ import annotations

import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

import model_helpers

MASK_STRINGS = ("<", "think", "<|im_end|>")
MODEL_VOCAB = 320   # larger than the tokenizer's: the rows past it are embedding padding


def make_tokenizer(folder) -> object:
  """model_helpers' ChatML BPE plus "think" as one (non-special) token, like Qwen's vocabulary:
  "<", "think", "<|im_end|>" and "<|endoftext|>" each encode to a single id."""
  tok = model_helpers.make_tokenizer(folder, vocab_size=300)
  tok.add_tokens(["think"])
  tok.save_pretrained(str(folder))
  for s in MASK_STRINGS + ("<|endoftext|>",):
    assert len(tok.encode(s, add_special_tokens=False)) == 1, s
  return tok


def make_model_folder(folder, *, seed: int, std: float = 0.02, tokenizer_from=None):
  """A random Qwen2-style checkpoint folder (config.json + safetensors), tokenizer copied in."""
  # pylint: disable=import-outside-toplevel
  from opd_jax import models
  config = model_helpers.tiny_model_config(vocab_size=MODEL_VOCAB, hidden_size=32, num_layers=1)
  model = models.init_model(config, seed=seed, std=std)
  models.save_hf_checkpoint(model, config, folder)
  if tokenizer_from is not None:
    models.load_tokenizer(tokenizer_from).save_pretrained(str(folder))
  return pathlib.Path(folder)


def _jsonl(path: pathlib.Path, rows) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _parquet(path: pathlib.Path, rows) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return path


def problem(name: str, i: int) -> tuple[str, str]:
  """Problem i of a tiny benchmark and its answer."""
  return f"[{name}] What is {i} plus 0?", str(i)


def write_benchmarks(root, n: int = 3) -> dict[str, pathlib.Path]:
  """n problems per benchmark, each in one of its published layouts; {name: source file}."""
  root = pathlib.Path(root)
  rows = lambda name: [problem(name, i) for i in range(n)]
  return {
      "math500": _jsonl(root / "math500" / "test.jsonl", [
          {"problem": p, "answer": a, "solution": "", "unique_id": f"test/x/{i}.json"}
          for i, (p, a) in enumerate(rows("math500"))]),
      "aime24": _parquet(root / "aime24" / "train.parquet", [
          {"id": i, "problem": p, "answer": a, "solution": ""}
          for i, (p, a) in enumerate(rows("aime24"))]),
      "aime25": _jsonl(root / "aime25" / "aime2025-I.jsonl", [
          {"question": p, "answer": a} for p, a in rows("aime25")]),
      "minerva_math": _jsonl(root / "minerva" / "test.jsonl", [
          {"question": p, "answer": a} for p, a in rows("minerva_math")]),
      "olympiadbench": _parquet(root / "olympiad" / "OE_TO_maths_en_COMP" / "train.parquet", [
          {"id": 100 + i, "question": p, "final_answer": [f"${a}$"]}
          for i, (p, a) in enumerate(rows("olympiadbench"))]),
  }


def write_dapo(root, n: int = 8) -> pathlib.Path:
  """DAPO-Math-17K's published parquet layout, n distinct problems."""
  head = ("Solve the following math problem step by step. The last line of your response should "
          "be of the form Answer: $Answer (without quotes) where $Answer is the answer to the "
          "problem.\n\n")
  tail = "\n\nRemember to put your answer on its own line after \"Answer:\"."
  return _parquet(pathlib.Path(root) / "dapo" / "dapo-math-17k.parquet", [
      {"data_source": "math_dapo", "ability": "MATH",
       "prompt": [{"content": head + f"Compute {i} times 2." + tail, "role": "user"}],
       "reward_model": {"ground_truth": str(2 * i), "style": "rule-lm"},
       "extra_info": {"index": f"uuid-{i}"}} for i in range(n)])


def build_assets(root) -> dict:
  """Tokenizer, student and teacher folders, benchmark and DAPO sources, and one TFDS folder
  with every dataset already built: what the evaluation and experiment tests share."""
  # pylint: disable=import-outside-toplevel
  from opd_jax.data import math_datasets
  root = pathlib.Path(root)
  make_tokenizer(root / "tokenizer")
  student = make_model_folder(root / "student", seed=0, tokenizer_from=root / "tokenizer")
  teacher = make_model_folder(root / "teacher", seed=1, std=0.5, tokenizer_from=root / "tokenizer")
  sources = write_benchmarks(root / "sources")
  dapo = write_dapo(root / "sources")
  tfds_dir = root / "tfds"
  for name, src in sources.items():
    math_datasets.build(name, source=src, data_dir=tfds_dir)
  math_datasets.build("dapo_math_17k", source=dapo, data_dir=tfds_dir)
  return dict(tokenizer=root / "tokenizer", student=student, teacher=teacher, sources=sources,
              dapo=dapo, tfds=tfds_dir)


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
