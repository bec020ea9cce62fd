"""Datasets by name: where each is built from, its tokenizer, how an example is encoded."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Mapping

import numpy as np

from opd_jax.data import math_datasets, prompts, tiny_arith
from opd_jax.errors import ConfigError, DataError

# prompts: your own prompts, a local JSONL (one JSON object a line) or parquet file (data.source)
# with, per row, either "prompt" (a string: one user turn, data.template applied) or "messages"
# (a chat: a list of {"role", "content"}, sent as it is), and optionally "id", "answer" (the
# reference answer as text, for grading), "target" (a reference response, end-of-turn token
# included: the sft estimator trains on it) and "target_ids" (the response's exact ids under the
# student's tokenizer, used instead of encoding "target"). No dedup, no filter, no instruction
# of ours. chat_prompts is the same reader under the name opd_jax.heal_demo uses.
PROMPTS = "prompts"
CHAT_PROMPTS = "chat_prompts"
DATASETS = ("tiny_arith", PROMPTS, CHAT_PROMPTS) + math_datasets.NAMES
# What to do with a prompt longer than data.max_prompt_len (data.long_prompts).
LONG_PROMPTS = ("drop", "truncate", "error")


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
    raise ConfigError(f"config.data.dataset={dataset!r}: dataset {dataset!r} is not registered; "
                      f"accepted: {', '.join(DATASETS)}")


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
  if source.dataset in (PROMPTS, CHAT_PROMPTS):
    return read_prompts(source.source, dataset=source.dataset)
  split = math_datasets.DATASETS[source.dataset].split
  if source.split != split:
    raise ValueError(f"dataset {source.dataset!r} has only the split {split!r}, got "
                     f"split={source.split!r}")
  return math_datasets.load_split(source.dataset, source=source.source or None,
                                  data_dir=data_dir(source, workdir))


def _file_rows(path: pathlib.Path) -> list[tuple[str, object]]:
  """(where, row) per row of a JSONL or parquet file; `where` is "file:line" or "file row i"."""
  if path.suffix == ".parquet":
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    return [(f"{path} row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
  rows = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip():
      try:
        rows.append((f"{path}:{n}", json.loads(line)))
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: not a JSON object ({e}): {line[:100]!r}") from None
  return rows


def _messages(value, where: str) -> list[dict[str, str]]:
  ok = isinstance(value, list) and value and all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in value)
  if not ok:
    raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} "
                    f"objects of strings; got {value!r:.100}")
  if value[-1]["role"] == "assistant":
    raise DataError(f"{where}: the last message is an assistant turn; a prompt ends with the "
                    "turn the model answers")
  return [{"role": m["role"], "content": m["content"]} for m in value]


def read_prompts(path, dataset: str = PROMPTS, setting: str = "config.data.source"
                 ) -> list[dict]:
  """The rows of a prompts file (see `PROMPTS`: JSONL or parquet), checked row by row.

  Args:
    path: the file.
    dataset: the dataset's name, for the messages.
    setting: the key that names the file, for the messages (the evaluation's prompts
      benchmark reads "config.eval.sources.prompts").

  Returns:
    One dict per row: id, prompt (the text shown on the samples pages), messages (None for a
    "prompt" row), answer ("" if none), target, target_ids (None if none).
  """
  if not path:
    raise DataError(f"dataset {dataset!r} needs a file: set --{setting} to a local "
                    'JSONL or parquet file of {"prompt": ...} (or {"messages": [...]}) rows')
  path = pathlib.Path(path)
  if path.suffix not in (".jsonl", ".json", ".parquet"):
    raise DataError(f"{setting}={str(path)!r}: expected a .jsonl (one JSON object a "
                    "line) or .parquet file")
  rows = []
  for i, (where, row) in enumerate(_file_rows(path)):
    if not isinstance(row, dict):
      raise DataError(f"{where}: expected a JSON object with a non-empty string 'prompt' or a "
                      f"'messages' list; got {row!r:.100}")
    messages = row.get("messages")
    if messages is not None:
      messages = _messages(messages, where)
      text = "\n\n".join(m["content"] for m in messages)
    elif isinstance(row.get("prompt"), str) and row["prompt"]:
      text = row["prompt"]
    else:
      raise DataError(f"{where}: expected a JSON object with a non-empty string 'prompt' or a "
                      f"'messages' list; got {str(row)[:100]!r}")
    ids = row.get("target_ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
      raise DataError(f"{where}: 'target_ids' must be a list of ints; got {ids!r:.100}")
    answer = row.get("answer")
    ident = row.get("id")   # parquet rows hold None for a missing value
    rows.append({"id": str(i if ident is None else ident), "prompt": text, "messages": messages,
                 "answer": "" if answer is None else str(answer), "target": row.get("target"),
                 "target_ids": ids})
  if not rows:
    raise DataError(f"{path} holds no prompts")
  return rows


def read_chat_prompts(path) -> list[dict]:
  """The rows of a chat_prompts file: `read_prompts` under the heal demo's dataset name."""
  return read_prompts(path, dataset=CHAT_PROMPTS)


class Subset:
  """The rows `indices` of a random-access data source, itself random-access."""

  def __init__(self, source, indices):
    self._source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self._source[int(self.indices[i])]


def fitting_prompts(examples, encode: Callable[[Mapping], "Encoded"], max_prompt_len: int,
                    long_prompts: str, *, name: str = "",
                    report: Callable[[str], None] = print):
  """`examples` less the prompts longer than `max_prompt_len` tokens (student's or teacher's
  rendering), checked once when the dataset is opened, so that no step draws one.

  Args:
    examples: a random-access data source of a dataset's examples.
    encode: the dataset's encoder (`encoder(..., long_prompts=long_prompts)`).
    max_prompt_len: config.data.max_prompt_len.
    long_prompts: "drop" (leave them out, counted and reported with their first ids),
      "truncate" (the encoder keeps their last max_prompt_len tokens: nothing to drop) or
      "error" (a DataError naming them).
    name: the task's name, for the messages.
    report: where the count of dropped prompts goes.

  Returns:
    `examples` itself when every prompt fits (or with "truncate"), else a `Subset`.
  """
  if long_prompts not in LONG_PROMPTS:
    raise DataError(f"config.data.long_prompts={long_prompts!r} is not accepted; accepted: "
                    f"{', '.join(LONG_PROMPTS)}")
  longest = getattr(encode, "longest", None)   # a bound on every prompt's length, if known
  if long_prompts == "truncate" or (longest is not None and longest <= max_prompt_len):
    return examples   # nothing to drop: cut by the encoder, or no prompt is that long
  long, kept = [], []
  for i in range(len(examples)):
    example = examples[i]
    e = encode(example, check=False)
    n = max(len(e.prompt), len(e.teacher_prompt))
    if n > max_prompt_len:
      ident = example.get("id", i) if isinstance(example, Mapping) else i
      long.append((_text(ident), n))
    else:
      kept.append(i)
  if not long:
    return examples
  shown = ", ".join(f"{ident} ({n} tokens)" for ident, n in long[:5])
  shown += ", ..." if len(long) > 5 else ""
  where = f"task {name!r}: " if name else ""
  what = (f"{where}{len(long)} of {len(examples)} prompts are longer than "
          f"config.data.max_prompt_len={max_prompt_len} tokens (ids {shown})")
  if long_prompts == "error" or not kept:
    raise DataError(f"{what}; raise --config.data.max_prompt_len, or set "
                    "--config.data.long_prompts=drop (leave them out) or truncate (keep their "
                    "last max_prompt_len tokens)")
  report(f"{what}: dropped (--config.data.long_prompts=truncate keeps them, cut to their last "
         f"{max_prompt_len} tokens)")
  return Subset(examples, kept)


def tokenizer_for(folder: str, dataset: str, workdir: pathlib.Path):
  """The tokenizer in `folder`, or the dataset's own one when `folder` is empty."""
  # pylint: disable=import-outside-toplevel
  if folder:
    from opd_jax import models
    return models.load_tokenizer(folder)
  if dataset == "tiny_arith":
    return tiny_arith.make_tokenizer(pathlib.Path(workdir) / "tokenizer")
  raise ConfigError(f"dataset {dataset!r} has no tokenizer of its own: set "
                    "--config.model.tokenizer (or --config.model.path) to a local tokenizer folder")


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def encoder(dataset: str, tokenizer, teacher_tokenizer, *, chat_template: bool,
            max_prompt_len: int, template: str = "{prompt}", long_prompts: str = "error"
            ) -> Callable[..., Encoded]:
  """`encode(example, check=True) -> Encoded` for the dataset's examples.

  Math problems are wrapped in the instruction of `prompts.INSTRUCTION` and rendered twice: with
  the student's chat template and tokenizer, and with the teacher's, so that the teacher scores
  the conversation in its own format. tiny_arith examples are stored as token ids. A `prompts`
  row's "prompt" becomes `template.format(prompt=...)` (one user turn); its "messages" are
  rendered as they are.

  A prompt longer than `max_prompt_len` tokens keeps its last `max_prompt_len` tokens when
  `long_prompts` is "truncate"; otherwise it is a DataError (with `check`; `fitting_prompts`
  leaves such prompts out of the dataset beforehand).
  """
  _check(dataset)
  if "{prompt}" not in template:
    raise DataError(f"config.data.template={template!r} is not accepted; it must hold "
                    "'{prompt}', where each row's prompt goes")

  def fit(ids, check: bool) -> np.ndarray:
    if len(ids) > max_prompt_len:
      if long_prompts == "truncate":
        ids = ids[len(ids) - max_prompt_len:]
      elif check:
        raise DataError(f"a prompt of {len(ids)} tokens exceeds config.data.max_prompt_len="
                        f"{max_prompt_len}; raise it or set --config.data.long_prompts=drop or "
                        "truncate")
    return np.asarray(ids, np.int32)

  if dataset == "tiny_arith":
    def encode(example: Mapping, check: bool = True) -> Encoded:
      prompt = fit(list(example["prompt_ids"]), check)
      shown = "".join(tiny_arith.VOCAB[i] for i in prompt.tolist())
      return Encoded(prompt, prompt, np.asarray(example["target_ids"], np.int32),
                     _text(example["answer"]), shown)
    encode.longest = tiny_arith.PROMPT_LEN   # every prompt's length: `fitting_prompts` skips
    return encode

  def render(messages, plain: str) -> tuple[list[int], list[int]]:
    if chat_template:
      return (prompts.encode_prompt(messages, tokenizer),
              prompts.encode_prompt(messages, teacher_tokenizer))
    return (tokenizer.encode(plain, add_special_tokens=False),
            teacher_tokenizer.encode(plain, add_special_tokens=False))

  def encode_math(example: Mapping, check: bool = True) -> Encoded:
    problem = _text(example["problem"])
    ids, teacher_ids = render(prompts.prompt_messages(problem),
                              f"{problem}\n\n{prompts.INSTRUCTION}")
    return Encoded(fit(ids, check), fit(teacher_ids, check), None, _text(example["answer"]),
                   problem)

  if dataset in (PROMPTS, CHAT_PROMPTS):
    def encode_prompts(example: Mapping, check: bool = True) -> Encoded:
      messages = example.get("messages")
      if messages is None:
        body = template.format(prompt=_text(example["prompt"]))
        messages = prompts.prompt_messages(body, instruction="")
      elif not chat_template:
        raise DataError(f"row {example.get('id')!r} is a 'messages' chat, which needs "
                        "--config.data.chat_template=True")
      else:
        body = ""
      ids, teacher_ids = render(messages, body)
      target, target_ids = example.get("target"), example.get("target_ids")
      if target_ids is not None:
        target_ids = np.asarray(target_ids, np.int32)
      elif target is not None:
        target_ids = np.asarray(tokenizer.encode(_text(target), add_special_tokens=False),
                                np.int32)
      return Encoded(fit(ids, check), fit(teacher_ids, check), target_ids,
                     _text(example.get("answer", "")), _text(example["prompt"]))
    return encode_prompts

  return encode_math
