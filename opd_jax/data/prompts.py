"""Prompts: student and teacher chat-template rendering, re-tokenisation checks, left padding."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# The one instruction every math prompt carries (the paper's format: reasoning inside
# <think> ... </think>, the final answer in \boxed{}). It follows the problem in the user turn.
INSTRUCTION = ("Reason step by step inside <think> and </think>, then give the final answer "
               "in \\boxed{}.")

Messages = Sequence[Mapping[str, str]]
_INT32_MAX = np.iinfo(np.int32).max


def prompt_messages(problem: str, *, instruction: str = INSTRUCTION,
                    system: str | None = None) -> list[dict[str, str]]:
  """The chat conversation for one problem: [system?, user(problem + instruction)].

  Args:
    problem: the problem text (as `math_datasets` stores it: no instruction of its own).
    instruction: appended to the problem after a blank line; "" for none.
    system: an optional system message.

  Returns:
    A list of {"role", "content"} messages, ready for `tokenizer.apply_chat_template`.
  """
  if not isinstance(problem, str) or not problem.strip():
    raise ValueError(f"problem must be a non-empty string; got {problem!r:.100}")
  content = f"{problem.strip()}\n\n{instruction}" if instruction else problem.strip()
  messages = [] if system is None else [{"role": "system", "content": system}]
  return messages + [{"role": "user", "content": content}]


def encode_prompt(messages: Messages, tokenizer: Any) -> list[int]:
  """Token ids of a prompt under `tokenizer`'s chat template, ending with the assistant header.

  Args:
    messages: a conversation (e.g. from `prompt_messages`).
    tokenizer: a Hugging Face tokenizer with a `chat_template`.

  Returns:
    The ids the model continues from (`add_generation_prompt=True`).
  """
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no "
        "chat_template; set tokenizer.chat_template (a Jinja string) or load a tokenizer that "
        "ships one")
  if not messages:
    raise ValueError("prompt messages are empty; expected at least one {'role', 'content'} turn")
  if messages[-1].get("role") == "assistant":
    raise ValueError("the prompt's last message is an assistant turn; the prompt must end with "
                     "the turn the model answers (user or system)")
  encoded = tokenizer.apply_chat_template(
      [dict(m) for m in messages], add_generation_prompt=True, tokenize=True, return_dict=True)
  return list(encoded["input_ids"])


def encode_prompts(problems: Sequence[str], tokenizer: Any, *, instruction: str = INSTRUCTION,
                   system: str | None = None) -> list[list[int]]:
  """`encode_prompt(prompt_messages(p, ...), tokenizer)` for each problem."""
  return [encode_prompt(prompt_messages(p, instruction=instruction, system=system), tokenizer)
          for p in problems]


def render_for_teacher(messages: Messages, response_text: str,
                       teacher_tokenizer: Any) -> tuple[list[int], list[int]]:
  """The student's conversation re-rendered with the teacher's chat template and tokenizer.

  The teacher must score a response in its own prompt format: feeding it the student's rendered
  prompt shifts its log-probs without any error. The prompt is rendered by the teacher's
  template; the response text is tokenised by the teacher's tokenizer on its own (as the student
  generated it after its prompt), special-token strings included (decode the student's ids with
  `skip_special_tokens=False`).

  Args:
    messages: the prompt conversation the student answered.
    response_text: the student's decoded response.
    teacher_tokenizer: the teacher's Hugging Face tokenizer, with a `chat_template`.

  Returns:
    (prompt_ids, response_ids) under the teacher. With a shared vocabulary, the teacher scores
    the student's own response ids after `prompt_ids`; compare them with `response_ids` through
    `check_retokenization` to know that this is sound.
  """
  if not isinstance(response_text, str):
    raise ValueError(f"response_text must be a string; got {type(response_text).__name__}")
  prompt_ids = encode_prompt(messages, teacher_tokenizer)
  response_ids = teacher_tokenizer(response_text, add_special_tokens=False)["input_ids"]
  return prompt_ids, list(response_ids)


def retokenize(response_ids: Sequence[Sequence[int]], student_tokenizer: Any,
               teacher_tokenizer: Any) -> list[list[int]]:
  """Each student response decoded by the student's tokenizer, re-encoded by the teacher's.

  Args:
    response_ids: per row, the student's response ids (no padding; see `unpad`).
    student_tokenizer: decodes them (special tokens kept as text).
    teacher_tokenizer: encodes the text (no BOS/EOS added).

  Returns:
    Per row, the teacher tokenizer's ids of the same text.
  """
  if not response_ids:
    return []
  texts = student_tokenizer.batch_decode(
      [list(map(int, r)) for r in response_ids], skip_special_tokens=False,
      clean_up_tokenization_spaces=False)
  return [list(ids) for ids in teacher_tokenizer(texts, add_special_tokens=False)["input_ids"]]


# Re-tokenisation alignment: after a difference, the two id sequences are back in step where
# RESYNC_WINDOW consecutive ids agree (or both remaining tails agree), searched for within
# RESYNC_LOOKAHEAD ids on each side; beyond that the rest of the row counts as different.
RESYNC_WINDOW = 4
RESYNC_LOOKAHEAD = 32


@dataclasses.dataclass(frozen=True)
class RetokenizationStats:
  """How far the teacher's tokenisation of a batch of responses is from the student's ids.

  Each row's two id sequences are aligned: runs of equal ids match, and each stretch between
  runs counts as the longer of its two sides (a student token spelled in two pieces where the
  teacher has one token counts 2). Aligning, rather than comparing position i with position i,
  keeps one local split from shifting, and so counting, every later position of the row.
  """
  mismatched: int       # aligned positions that differ
  positions: int        # aligned positions (>= each side's token count)
  rows_mismatched: int
  rows: int
  # (row, student position, student id or -1, teacher id or -1) of the first difference.
  first_mismatch: tuple[int, int, int, int] | None

  @property
  def fraction(self) -> float:
    """Mismatched over aligned positions, in [0, 1] (0 for an empty batch)."""
    return self.mismatched / self.positions if self.positions else 0.0

  def metrics(self, prefix: str = "retok/") -> dict[str, float]:
    """Scalars for a metrics writer."""
    return {f"{prefix}mismatch_fraction": self.fraction,
            f"{prefix}rows_mismatched": float(self.rows_mismatched)}


def _resync(s: list[int], t: list[int], i: int, j: int) -> tuple[int, int] | None:
  """The nearest (di, dj) after a difference at (i, j) from which s and t agree again."""
  for total in range(1, 2 * RESYNC_LOOKAHEAD + 1):
    for di in range(max(0, total - RESYNC_LOOKAHEAD), min(total, RESYNC_LOOKAHEAD) + 1):
      a, b = i + di, j + total - di
      if a > len(s) or b > len(t):
        continue
      if (s[a:a + RESYNC_WINDOW] == t[b:b + RESYNC_WINDOW] and
          (min(len(s) - a, len(t) - b) >= RESYNC_WINDOW or s[a:] == t[b:])):
        return di, total - di
  return None


def _align(s: list[int], t: list[int]) -> tuple[int, int, tuple[int, int] | None]:
  """(mismatched, aligned positions, (i, j) of the first difference or None) of one row."""
  i = j = mismatched = aligned = 0
  first = None
  while i < len(s) and j < len(t):
    if s[i] == t[j]:
      i, j, aligned = i + 1, j + 1, aligned + 1
      continue
    first = first or (i, j)
    step = _resync(s, t, i, j)
    if step is None:
      break
    mismatched += max(step)
    aligned += max(step)
    i, j = i + step[0], j + step[1]
  rest = max(len(s) - i, len(t) - j)
  if rest:
    first = first or (i, j)
  return mismatched + rest, aligned + rest, first


def retokenization_stats(student_ids: Sequence[Sequence[int]],
                         teacher_ids: Sequence[Sequence[int]]) -> RetokenizationStats:
  """Counts the response tokens that differ between the two tokenisations (see the stats).

  Args:
    student_ids: per row, the student's response ids.
    teacher_ids: per row, the teacher tokenizer's ids of the same response (e.g. `retokenize`).

  Returns:
    A `RetokenizationStats`.
  """
  if len(student_ids) != len(teacher_ids):
    raise ValueError(f"student_ids has {len(student_ids)} rows but teacher_ids has "
                     f"{len(teacher_ids)}; give one teacher tokenisation per response")
  mismatched = positions = rows_mismatched = 0
  first = None
  for row, (s, t) in enumerate(zip(student_ids, teacher_ids)):
    s, t = [int(x) for x in s], [int(x) for x in t]
    count, aligned, where = _align(s, t)
    mismatched += count
    positions += aligned
    if count:
      rows_mismatched += 1
      if first is None:
        i, j = where
        first = (row, i, s[i] if i < len(s) else -1, t[j] if j < len(t) else -1)
  return RetokenizationStats(mismatched, positions, rows_mismatched, len(student_ids), first)


def check_retokenization(student_ids: Sequence[Sequence[int]],
                         teacher_ids: Sequence[Sequence[int]],
                         max_fraction: float) -> RetokenizationStats:
  """`retokenization_stats`, raising when too many positions differ; call it on every batch.

  A teacher that scores the student's ids assumes both read the response as the same tokens; a
  high mismatch fraction means different vocabularies or tokenizers, so per-token teacher
  log-probs would be meaningless.

  Args:
    student_ids: per row, the student's response ids.
    teacher_ids: per row, the teacher tokenizer's ids of the same text.
    max_fraction: the largest accepted mismatch fraction, in [0, 1].

  Returns:
    The stats (log `stats.metrics()`).
  """
  if isinstance(max_fraction, bool) or not isinstance(max_fraction, (int, float)) or not (
      0.0 <= max_fraction <= 1.0):
    raise ValueError(f"max_fraction must be a number in [0, 1]; got {max_fraction!r}")
  stats = retokenization_stats(student_ids, teacher_ids)
  if stats.fraction > max_fraction:
    row, pos, s_id, t_id = stats.first_mismatch
    raise ValueError(
        f"{stats.mismatched} of {stats.positions} aligned response tokens ({stats.fraction:.2%}, "
        f"in {stats.rows_mismatched} of {stats.rows} rows) re-tokenise differently under the "
        f"teacher's tokenizer, above max_fraction={max_fraction}; first at row {row}, response "
        f"token {pos}: student id {s_id}, teacher id {t_id} (-1: none). Teacher and student must "
        "share one tokenizer for per-token scoring; check the two tokenizer paths")
  return stats


def unpad(tokens: Any, mask: Any) -> list[list[int]]:
  """Per row, the ids where `mask` is true (e.g. a rollout's response tokens and mask).

  Args:
    tokens: int [B, N].
    mask: bool [B, N].

  Returns:
    B lists of ints.
  """
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  if tokens.ndim != 2 or tokens.shape != mask.shape:
    raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} must be equal 2-D shapes")
  return [row[m].tolist() for row, m in zip(tokens, mask.astype(bool))]


def left_pad(ids_list: Sequence[Sequence[int]], pad_id: int,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Stacks prompts into the left-padded batch the sampler takes.

  Args:
    ids_list: B non-empty prompts of token ids.
    pad_id: the id written in padding positions (masked out, never attended to).
    length: the padded length P; None for the longest prompt.

  Returns:
    (tokens int32 [B, P], mask bool [B, P]), each prompt right-aligned, mask true on its tokens.
  """
  if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)) or not (
      0 <= pad_id <= _INT32_MAX):
    raise ValueError(f"pad_id must be an integer in [0, {_INT32_MAX}]; got {pad_id!r}")
  if isinstance(ids_list, np.ndarray) and ids_list.ndim == 2:
    ids_list = list(ids_list)
  if len(ids_list) == 0:
    raise ValueError("ids_list is empty; expected at least one prompt")
  rows = []
  for i, ids in enumerate(ids_list):
    row = np.asarray(ids)
    if row.ndim != 1 or row.size == 0:
      raise ValueError(f"prompt {i} must be a non-empty 1-D list of token ids; got shape "
                       f"{row.shape}")
    if not np.issubdtype(row.dtype, np.integer):
      raise ValueError(f"prompt {i} must hold integer token ids; got dtype {row.dtype}")
    if row.min() < 0 or row.max() > _INT32_MAX:
      raise ValueError(f"prompt {i} has token ids outside [0, {_INT32_MAX}]: min {row.min()}, "
                       f"max {row.max()}")
    rows.append(row)
  longest = max(len(r) for r in rows)
  if length is None:
    length = longest
  elif isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < longest:
    row = int(np.argmax([len(r) for r in rows]))
    raise ValueError(f"length={length!r} must be an integer >= the longest prompt, {longest} "
                     f"tokens (prompt {row}); truncate prompts or raise the length")
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, row in enumerate(rows):
    tokens[i, length - len(row):] = row
    mask[i, length - len(row):] = True
  return tokens, mask
