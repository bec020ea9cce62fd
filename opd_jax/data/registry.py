"""Datasets by name: where each is built from, its tokenizer, how an example is encoded."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Mapping

import numpy as np

from opd_jax.data import math_datasets, prompts, tiny_arith

# chat_prompts: user prompts in a local JSONL file (data.source), one {"prompt": str, "answer":
# str (optional), "target": str (optional reference response, end-of-turn token included),
# "target_ids": [int] (optional: the response's exact ids under the student's tokenizer, used
# instead of encoding "target": sampled ids rarely re-encode to the same, or as many, tokens)}
# per line, sent as one user turn without an instruction of our own (opd_jax.heal_demo).
CHAT_PROMPTS = "chat_prompts"
DATASETS = ("tiny_arith", CHAT_PROMPTS) + math_datasets.NAMES


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One prompt, ready for the trainer.

  prompt: int32 token ids for the student (chat template applied where configured).
  teacher_prompt: the same conversation rendered with the teacher's template and tokenizer.
  target: int32 ids of the reference response (with its end token), or None.
  answer: the reference answer as text (for grading).
  prompt_text: the prompt as text (for the samples pages).
  """
  prompt: np.ndarray
  teacher_prompt: np.ndarray
  target: np.ndarray | None
  answer: str
  prompt_text: str


def _check(dataset: str) -> None:
  if dataset not in DATASETS:
    raise ValueError(f"dataset {dataset!r} is not registered; accepted: {', '.join(DATASETS)}")


def is_text(dataset: str) -> bool:
  """Whether the dataset's prompts are text rendered by a tokenizer (not stored token ids)."""
  _check(dataset)
  return dataset != "tiny_arith"


def data_dir(source, workdir: pathlib.Path) -> pathlib.Path:
  """The TFDS data_dir of a DatasetSource: its own, else workdir/tfds."""
  return pathlib.Path(source.data_dir) if source.data_dir else pathlib.Path(workdir) / "tfds"


def open_split(source, workdir: pathlib.Path):
  """The configured split of a DatasetSource as a random-access data source (built once)."""
  _check(source.dataset)
  if source.dataset == "tiny_arith":
    return tiny_arith.load(data_dir(source, workdir), source.split)
  if source.dataset == CHAT_PROMPTS:
    return read_chat_prompts(source.source)
  split = math_datasets.DATASETS[source.dataset].split
  if source.split != split:
    raise ValueError(f"dataset {source.dataset!r} has only the split {split!r}, got "
                     f"split={source.split!r}")
  return math_datasets.load_split(source.dataset, source=source.source or None,
                                  data_dir=data_dir(source, workdir))


def read_chat_prompts(path) -> list[dict]:
  """The examples of a chat_prompts JSONL file (see `CHAT_PROMPTS`), checked line by line."""
  if not path:
    raise ValueError(f"dataset {CHAT_PROMPTS!r} needs data.source: a local JSONL file of "
                     '{"prompt": ...} lines')
  rows = []
  for n, line in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
    if not line.strip():
      continue
    row = json.loads(line)
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
      raise ValueError(f"{path}:{n}: expected a JSON object with a non-empty string 'prompt'; "
                       f"got {line[:100]!r}")
    ids = row.get("target_ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
      raise ValueError(f"{path}:{n}: 'target_ids' must be a list of ints; got {ids!r:.100}")
    rows.append({"prompt": row["prompt"], "answer": str(row.get("answer", "")),
                 "target": row.get("target"), "target_ids": ids})
  if not rows:
    raise ValueError(f"{path} holds no prompts")
  return rows


def tokenizer_for(folder: str, dataset: str, workdir: pathlib.Path):
  """The tokenizer in `folder`, or the dataset's own one when `folder` is empty."""
  # pylint: disable=import-outside-toplevel
  if folder:
    from opd_jax import models
    return models.load_tokenizer(folder)
  if dataset == "tiny_arith":
    return tiny_arith.make_tokenizer(pathlib.Path(workdir) / "tokenizer")
  raise ValueError(f"dataset {dataset!r} has no tokenizer of its own: set config.model.tokenizer "
                   "(or model.path) to a local tokenizer folder")


def encoder(dataset: str, tokenizer, teacher_tokenizer, *, chat_template: bool,
            max_prompt_len: int) -> Callable[[Mapping], Encoded]:
  """`encode(example) -> Encoded` for the dataset's examples.

  Math problems are wrapped in the instruction of `prompts.INSTRUCTION` and rendered twice: with
  the student's chat template and tokenizer, and with the teacher's, so that the teacher scores
  the conversation in its own format. tiny_arith examples are stored as token ids.
  """
  _check(dataset)

  def checked(ids) -> np.ndarray:
    if len(ids) > max_prompt_len:
      raise ValueError(f"a prompt of {len(ids)} tokens exceeds config.data.max_prompt_len="
                       f"{max_prompt_len}")
    return np.asarray(ids, np.int32)

  def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

  if dataset == "tiny_arith":
    def encode(example: Mapping) -> Encoded:
      prompt = checked(example["prompt_ids"])
      shown = "".join(tiny_arith.VOCAB[i] for i in prompt.tolist())
      return Encoded(prompt, prompt, np.asarray(example["target_ids"], np.int32),
                     text(example["answer"]), shown)
    return encode

  def encode_math(example: Mapping) -> Encoded:
    problem = text(example["problem"])
    if chat_template:
      messages = prompts.prompt_messages(problem)
      ids = prompts.encode_prompt(messages, tokenizer)
      teacher_ids = prompts.encode_prompt(messages, teacher_tokenizer)
    else:
      body = f"{problem}\n\n{prompts.INSTRUCTION}"
      ids = tokenizer.encode(body, add_special_tokens=False)
      teacher_ids = teacher_tokenizer.encode(body, add_special_tokens=False)
    return Encoded(checked(ids), checked(teacher_ids), None, text(example["answer"]), problem)

  if dataset == CHAT_PROMPTS:
    def encode_chat(example: Mapping) -> Encoded:
      prompt = text(example["prompt"])
      if chat_template:
        messages = prompts.prompt_messages(prompt, instruction="")
        ids = prompts.encode_prompt(messages, tokenizer)
        teacher_ids = prompts.encode_prompt(messages, teacher_tokenizer)
      else:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        teacher_ids = teacher_tokenizer.encode(prompt, add_special_tokens=False)
      target, target_ids = example.get("target"), example.get("target_ids")
      if target_ids is not None:
        target_ids = np.asarray(target_ids, np.int32)
      elif target is not None:
        target_ids = np.asarray(tokenizer.encode(text(target), add_special_tokens=False),
                                np.int32)
      return Encoded(checked(ids), checked(teacher_ids), target_ids, text(example["answer"]),
                     prompt)
    return encode_chat

  return encode_math
