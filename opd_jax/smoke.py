"""Tiny offline stand-ins for the `:smoke` experiment variants: tokenizer, models and data files.

A paper experiment file names a 7B student, its teacher, DAPO-Math-17K and five benchmarks, all
local paths a user sets. Its `:smoke` variant sets `config.smoke = True`: every such path left
empty is then filled with a tiny stand-in made here, inside `<workdir>/smoke_assets/` (made once,
reused by a second run in the same workdir):
  - a ChatML byte-level BPE tokenizer in which "<", "think", "<|im_end|>" and "<|endoftext|>" are
    single tokens, like Qwen's;
  - random Qwen2-style student and teacher folders (config.json + safetensors + tokenizer) whose
    embedding has more rows than the tokenizer has tokens (padding rows, as real checkpoints have);
  - a few rows of DAPO-Math-17K and of each benchmark in their published layouts, built into a
    TFDS folder, and a prompts file with answers (the `prompts` benchmark's file).
The tests make the same assets with `build_assets`, so what a user runs is what is tested.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import ml_collections

# Single tokens in the stand-in tokenizer (the paper's special-token mask strings and the ends).
MASK_STRINGS = ("<", "think", "<|im_end|>")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_VOCAB = 300
MODEL_VOCAB = 320   # larger than the tokenizer's: the rows past it are embedding padding
# ChatML, as the Qwen instruct models use.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = ["What is 2 + 3? The answer is 5.", "Let me think step by step about the problem.",
           "The teacher and the student agree on the final answer.", "<think> hmm </think>",
           "Compute 12 * 7 = 84, then add 16 to get 100."]
_DONE = "assets.json"


def make_chatml_tokenizer(folder, *, vocab_size: int = TOKENIZER_VOCAB):
  """Trains a byte-level BPE on a small corpus and saves a transformers tokenizer folder with a
  ChatML chat template and the special tokens <|endoftext|>, <|im_start|>, <|im_end|>.

  Args:
    folder: output folder (may be a checkpoint folder).
    vocab_size: total vocabulary including the 256 byte tokens and the specials (>= 260).

  Returns:
    The PreTrainedTokenizerFast (reload it with AutoTokenizer.from_pretrained(folder)).
  """
  import tokenizers  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
    raise ValueError(f"vocab_size={vocab_size}; a byte-level BPE needs at least "
                     f"{256 + len(SPECIAL_TOKENS) + 1}")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
  wrapped = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
      additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE)
  wrapped.save_pretrained(str(pathlib.Path(folder)))
  return wrapped


def make_tokenizer(folder):
  """The ChatML tokenizer plus "think" as one (non-special) token, like Qwen's vocabulary:
  "<", "think", "<|im_end|>" and "<|endoftext|>" each encode to a single id."""
  tok = make_chatml_tokenizer(folder)
  tok.add_tokens(["think"])
  tok.save_pretrained(str(folder))
  for s in MASK_STRINGS + ("<|endoftext|>",):
    if len(tok.encode(s, add_special_tokens=False)) != 1:
      raise AssertionError(f"{s!r} is not one token of the smoke tokenizer")
  return tok


def make_model_folder(folder, *, seed: int, std: float = 0.02, tokenizer_from=None
                      ) -> pathlib.Path:
  """A random Qwen2-style checkpoint folder (config.json + safetensors), tokenizer copied in."""
  from opd_jax import models  # pylint: disable=import-outside-toplevel
  config = models.ModelConfig(
      model_type="qwen2", vocab_size=MODEL_VOCAB, hidden_size=32, intermediate_size=64,
      num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
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
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return path


def problem(name: str, i: int) -> tuple[str, str]:
  """Problem i of a tiny benchmark and its answer."""
  return f"[{name}] What is {i} plus 0?", str(i)


def write_benchmarks(root, n: int = 3) -> dict[str, pathlib.Path]:
  """n problems per benchmark, each in one of its published layouts; {name: source file}."""
  root = pathlib.Path(root)
  rows = lambda name: [problem(name, i) for i in range(n)]  # noqa: E731
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


def write_prompts(root, n: int = 3) -> pathlib.Path:
  """A held-out prompts file (the format of data.dataset="prompts"), every row with its answer:
  the `prompts` benchmark's stand-in."""
  return _jsonl(pathlib.Path(root) / "prompts" / "heldout.jsonl", [
      {"id": f"p{i}", "prompt": problem("prompts", i)[0], "answer": problem("prompts", i)[1]}
      for i in range(n)])


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


def build_assets(root) -> dict[str, pathlib.Path]:
  """Tokenizer, student and teacher folders, benchmark and DAPO sources, and one TFDS folder
  with every dataset already built; made once (a second call reads `root/assets.json`).

  Returns:
    {tokenizer, student, teacher, dapo, prompts, tfds: path, sources: {benchmark: path}}.
  """
  # pylint: disable=import-outside-toplevel
  from opd_jax.data import math_datasets
  root = pathlib.Path(root)
  done = root / _DONE
  if done.is_file():
    saved = json.loads(done.read_text())
    if "prompts" not in saved:   # assets made before the prompts benchmark's file
      saved["prompts"] = str(write_prompts(root / "sources"))
      done.write_text(json.dumps(saved, indent=1))
    return {k: ({b: pathlib.Path(p) for b, p in v.items()} if isinstance(v, dict)
                else pathlib.Path(v)) for k, v in saved.items()}
  make_tokenizer(root / "tokenizer")
  student = make_model_folder(root / "student", seed=0, tokenizer_from=root / "tokenizer")
  teacher = make_model_folder(root / "teacher", seed=1, std=0.5, tokenizer_from=root / "tokenizer")
  sources = write_benchmarks(root / "sources")
  dapo = write_dapo(root / "sources")
  tfds_dir = root / "tfds"
  for name, src in sources.items():
    math_datasets.build(name, source=src, data_dir=tfds_dir)
  math_datasets.build("dapo_math_17k", source=dapo, data_dir=tfds_dir)
  assets = dict(tokenizer=root / "tokenizer", student=student, teacher=teacher, sources=sources,
                dapo=dapo, prompts=write_prompts(root / "sources"), tfds=tfds_dir)
  done.write_text(json.dumps({k: ({b: str(p) for b, p in v.items()} if isinstance(v, dict)
                                  else str(v)) for k, v in assets.items()}, indent=1))
  return assets


def fill_missing(config: ml_collections.ConfigDict,
                 log: Callable[[str], None] = print) -> list[str]:
  """Points every empty model, dataset and benchmark path of a smoke config at the stand-ins.

  Paths the user set are kept. The stand-ins are made in `<workdir>/smoke_assets` on first use.

  Args:
    config: an OPD experiment config (`opd_jax.configs.opd()` shape) with a workdir.
    log: where the list of filled settings goes.

  Returns:
    The `--config.` keys that were filled.
  """
  if not config.workdir:
    raise ValueError("config.workdir='' is not accepted; a smoke run makes its tiny models and "
                     "data in <workdir>/smoke_assets (--config.workdir=DIR)")
  root = pathlib.Path(config.workdir) / "smoke_assets"
  filled: list[tuple[str, Callable[[dict], None]]] = []

  def model(group, name: str, key: str) -> None:
    if not group.path and not group.tokenizer:
      filled.append((name + ".path", lambda a: setattr(group, "path", str(a[key]))))

  def data(group, name: str) -> None:
    if group.dataset and group.dataset != "tiny_arith" and not group.source \
        and not group.data_dir:
      filled.append((name + ".data_dir", lambda a: setattr(group, "data_dir", str(a["tfds"]))))

  model(config.model, "model", "student")
  if config.tasks:
    for i, task in enumerate(config.tasks):
      model(task.teacher, f"tasks[{i}].teacher", "teacher")
      if not task.environment:
        data(task.data, f"tasks[{i}].data")
  else:
    model(config.teacher, "teacher", "teacher")
    data(config.data, "data")
  sources = dict(config.eval.sources)
  math = [b for b in config.eval.benchmarks if b != "prompts"]
  if (config.eval.every and math and not config.eval.data_dir
      and not any(sources.get(b) for b in math)):
    filled.append(("eval.data_dir", lambda a: setattr(config.eval, "data_dir", str(a["tfds"]))))
  if config.eval.every and "prompts" in config.eval.benchmarks and not sources.get("prompts"):
    filled.append(("eval.sources.prompts",
                   lambda a: setattr(config.eval.sources, "prompts", str(a["prompts"]))))
  if not filled:
    return []
  assets = build_assets(root)
  for _, fill in filled:
    fill(assets)
  names = [name for name, _ in filled]
  log(f"smoke: tiny stand-ins from {root} for " + ", ".join(f"config.{n}" for n in names))
  return names
