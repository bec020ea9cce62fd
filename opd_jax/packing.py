"""Rows for the scoring and update passes that pay for the tokens generated, not the budget.

A rollout batch holds R sequences: a left-padded prompt [R, P] (and its teacher rendering
[R, Pt]) and a right-padded response [R, N] of which row i uses the first n_i columns. The
compiled passes read a `layout` of them instead, one of three modes (`config.opt.packing`):

- "off": one sequence per row, the whole budget: [prompt | response] rows of P + N tokens.
- "trim": one sequence per row, the response columns cut to a bucket of the longest n_i.
- "pack": several sequences side by side per row (segment ids keep them apart in attention,
  rotary positions restart per sequence), rows of a bucketed width W holding at most W tokens
  (and never more teacher or response tokens than an unpacked row, so no array is wider than
  without packing), micro-batches formed by a per-device token budget.

Every per-token array of the passes (targets, masks, the sampler's log-probs, the teacher's
scores) lives in the "compact" layout [rows, C]: the response tokens of a row's sequences, one
after the other; `s_index` / `t_index` [rows, C] name the column of the student's / teacher's
row whose hidden state predicts each of them. The estimators' losses are token means over these
positions, so they do not depend on the mode (tests/test_packing.py).

Rows keep the update's meaning: mini-batch m is the set of rollouts i with i % minibatches == m
(as without packing), packed into its own rows; packed row g belongs to mini-batch g % M and,
within it, to micro-batch (g // M) % micro, which is how `steps` splits rows. Each process packs
its own rows; the static sizes are agreed over processes (their maximum).

Everything here runs on the host (numpy) between the rollout and the scoring pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np

MODES = ("off", "trim", "pack")
MIN_BUCKET = 16


def bucket(n: int, limit: int | None = None) -> int:
  """The padded size of `n`: the next power of two from MIN_BUCKET on, at most `limit`."""
  size = max(MIN_BUCKET, 1 << (max(int(n), 1) - 1).bit_length())
  return min(size, limit) if limit is not None else size


@dataclasses.dataclass(frozen=True)
class Geometry:
  """The static sizes of one layout (they key the compiled passes).

  width, teacher_width: tokens per student / teacher row.
  compact: response tokens per row (the per-token arrays' second dimension).
  minibatches, micro: the update's mini-batches and each one's micro-batches.
  packed: rows may hold several sequences (attention needs segment ids).
  """
  width: int
  teacher_width: int
  compact: int
  minibatches: int
  micro: int
  packed: bool


@dataclasses.dataclass
class Layout:
  """One batch in packed rows: `arrays` for the compiled passes (numpy, this process's rows) and
  where each sequence went, to bring per-token results back to the [R, N] response layout.

  arrays: tokens / segments [rows, W], t_tokens / t_segments [rows, Wt] (segment 0 = padding),
    s_index / t_index [rows, C], and the compact per-token arrays [rows, C]: response,
    response_mask, loss_mask, policy_logprobs, sampled_mask (when given) and c_segments (the
    sequence of each compact token, 0 on padding).
  row, offset, length [R]: sequence i's compact tokens are arrays[...][row[i], offset[i] :
    offset[i] + length[i]], its response columns 0 .. length[i] - 1.
  """
  geometry: Geometry
  arrays: dict[str, np.ndarray]
  row: np.ndarray
  offset: np.ndarray
  length: np.ndarray
  budget: int           # response columns of the unpacked batch (N)

  def unpack(self, compact: np.ndarray) -> np.ndarray:
    """A compact per-token array [rows, C, ...] as [R, N, ...] (zeros past each length)."""
    out = np.zeros((len(self.row), self.budget) + compact.shape[2:], compact.dtype)
    for i, (r, o, n) in enumerate(zip(self.row, self.offset, self.length)):
      out[i, :n] = compact[r, o:o + n]
    return out


def response_lengths(response_mask: np.ndarray) -> np.ndarray:
  """Columns each row uses: one past its last real response token (0 when it has none)."""
  any_real = response_mask.any(axis=1)
  last = response_mask.shape[1] - np.argmax(response_mask[:, ::-1], axis=1)
  return np.where(any_real, last, 0).astype(np.int64)


def _agree(*sizes: int) -> tuple[int, ...]:
  """The maximum of each size over processes (every process packs its own rows)."""
  if jax.process_count() == 1:
    return sizes
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  gathered = multihost_utils.process_allgather(np.asarray(sizes, np.int64))
  return tuple(int(x) for x in np.max(gathered.reshape(-1, len(sizes)), axis=0))


def _first_fit(sizes: np.ndarray, capacity: np.ndarray) -> list[list[int]]:
  """Sequence indices per row: first fit, longest first. sizes [S, 3]: each sequence's student,
  teacher and response tokens; a row holds at most `capacity` [3] of each."""
  rows: list[list[int]] = []
  free: list[np.ndarray] = []
  for i in sorted(range(len(sizes)), key=lambda i: -int(sizes[i, 0])):
    for r, room in enumerate(free):
      if np.all(sizes[i] <= room):
        rows[r].append(i)
        room -= sizes[i]
        break
    else:
      rows.append([i])
      free.append(capacity - sizes[i])
  return rows


def _pow2(n: int) -> int:
  return 1 << (max(int(n), 1) - 1).bit_length()


def _half_octave(n: int) -> int:
  """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... that is >= n (at most a third more)."""
  p = _pow2(n)
  return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


def micro_rows(need: int, width: int, unpacked_rows: int, unpacked_width: int, ways: int,
               microbatch_tokens: int) -> tuple[int, int]:
  """(micro-batches, rows per micro-batch) for mini-batches of at most `need` packed rows of
  `width`: each device's rows of a micro-batch hold at most the token budget (at least one row),
  and no more rows than needed (micro-batches a power of two, rows per device one of 1, 2, 3, 4,
  6, 8, 12, ...: few compiled programs, at most a third of the rows empty). The budget defaults
  to the tokens of the unpacked micro-batch (`unpacked_rows` rows of `unpacked_width` per
  device), so packing never needs more memory."""
  budget = microbatch_tokens or max(unpacked_rows, 1) * unpacked_width
  budget_rows = max(budget // width, 1)                       # per device
  micro = _pow2(-(-need // (budget_rows * ways)))
  per_device = min(_half_octave(-(-need // (micro * ways))), budget_rows)
  return micro, per_device * ways


def worst_case(mode: str, rows: int, prompt: int, teacher_prompt: int, budget: int, *,
               minibatches: int, micro: int, ways: int, microbatch_tokens: int
               ) -> tuple[Geometry, int]:
  """The largest geometry (and row count) a batch of `rows` sequences of at most `prompt` /
  `teacher_prompt` + `budget` tokens can take (the memory plan): for "pack", the unpacked rows'
  widths (a packed row never holds more) and every sequence as long as it may be (one per row,
  the most micro-batches)."""
  if mode != "pack":
    return Geometry(prompt + budget, teacher_prompt + budget, budget, minibatches, micro,
                    False), rows
  width = prompt + budget
  micro_count, per_micro = micro_rows(rows // minibatches, width,
                                      rows // minibatches // micro // ways, width, ways,
                                      microbatch_tokens)
  return (Geometry(width, teacher_prompt + budget, budget, minibatches, micro_count, True),
          minibatches * micro_count * per_micro)


def abstract_arrays(geometry: Geometry, rows: int, sampled_mask: bool = False
                    ) -> dict[str, tuple[tuple[int, ...], type]]:
  """{name: (shape, dtype)} of `pack`'s arrays for `rows` rows of `geometry`."""
  g = geometry
  out = {"tokens": ((rows, g.width), np.int32), "segments": ((rows, g.width), np.int32),
         "t_tokens": ((rows, g.teacher_width), np.int32),
         "t_segments": ((rows, g.teacher_width), np.int32)}
  for k, dtype in (("response", np.int32), ("response_mask", bool), ("loss_mask", bool),
                   ("policy_logprobs", np.float32)) + ((("sampled_mask", bool),) if sampled_mask
                                                       else ()):
    out[k] = ((rows, g.compact), dtype)
  if g.packed:
    for k in ("s_index", "t_index", "c_segments"):
      out[k] = ((rows, g.compact), np.int32)
  return out


def plan_rows(mode: str, batch: Mapping[str, np.ndarray], *, minibatches: int, micro: int,
              ways: int, microbatch_tokens: int) -> tuple[Geometry, list[list[int]]]:
  """The geometry and which sequences share each row (row g listed at position g).

  Args:
    mode: one of MODES.
    batch: this process's rows: prompt_mask [R, P], teacher_prompt_mask [R, Pt],
      response_mask [R, N].
    minibatches: the update's mini-batches per iteration (R % minibatches == 0).
    micro: micro-batches per mini-batch of the unpacked layout ("off" and "trim").
    ways: rows per micro-batch must be a multiple of this (the process's share of the mesh's
      batch ways).
    microbatch_tokens: "pack": tokens per row group of one device in a micro-batch (the budget
      that bounds a micro-batch's activations); 0: the unpacked micro-batch's tokens.
  """
  if mode not in MODES:
    raise ValueError(f"config.opt.packing={mode!r} is not accepted; accepted: {', '.join(MODES)}")
  r, p = batch["prompt_mask"].shape
  pt, n = batch["teacher_prompt_mask"].shape[1], batch["response_mask"].shape[1]
  lengths = response_lengths(batch["response_mask"])
  if mode in ("off", "trim"):
    cols = n if mode == "off" else bucket(_agree(int(lengths.max(initial=0)))[0], n)
    return Geometry(p + cols, pt + cols, cols, minibatches, micro, False), [[i] for i in range(r)]
  p_len = batch["prompt_mask"].sum(axis=1)
  t_len = batch["teacher_prompt_mask"].sum(axis=1)
  student = p_len + lengths
  # Never wider than an unpacked row (every sequence fits in one).
  width = bucket(_agree(int(student.max(initial=1)))[0], p + n)
  groups = []
  # A row never holds more teacher tokens or response tokens than an unpacked row: the teacher's
  # rows and the per-token arrays are never wider than without packing.
  sizes = np.stack([student, t_len + lengths, lengths], axis=1)
  capacity = np.array([width, pt + n, n])
  for m in range(minibatches):
    members = list(range(m, r, minibatches))
    groups.append([[members[j] for j in row] for row in _first_fit(sizes[members], capacity)])
  need, = _agree(max(len(g) for g in groups))
  micro_count, per_micro = micro_rows(need, width, r // minibatches // micro // ways, p + n,
                                      ways, microbatch_tokens)
  total = minibatches * micro_count * per_micro
  rows: list[list[int]] = [[] for _ in range(total)]
  for m, group in enumerate(groups):
    for k, members in enumerate(group):
      j, q = divmod(k, per_micro)
      rows[(q * micro_count + j) * minibatches + m] = members
  compact = max((int(sum(lengths[i] for i in row)) for row in rows), default=1)
  teacher = max((int(sum(t_len[i] + lengths[i] for i in row)) for row in rows), default=1)
  compact, teacher = _agree(compact, teacher)
  return Geometry(width, bucket(teacher, pt + n), bucket(compact, n), minibatches, micro_count,
                  True), rows


def pack(mode: str, batch: Mapping[str, np.ndarray], *, minibatches: int, micro: int,
         ways: int, microbatch_tokens: int = 0) -> Layout:
  """This process's rows of a batch in the layout of `mode` (see the module docstring).

  Args:
    mode, minibatches, micro, ways, microbatch_tokens: as in `plan_rows`.
    batch: numpy arrays: prompt / prompt_mask [R, P], teacher_prompt / teacher_prompt_mask
      [R, Pt] (left-padded), response / response_mask / loss_mask / policy_logprobs [R, N]
      (right-padded) and optionally sampled_mask [R, N].
  """
  geo, rows = plan_rows(mode, batch, minibatches=minibatches, micro=micro, ways=ways,
                        microbatch_tokens=microbatch_tokens)
  r = batch["prompt"].shape[0]
  lengths = response_lengths(batch["response_mask"])
  per_token = [k for k in ("response", "response_mask", "loss_mask", "policy_logprobs",
                           "sampled_mask") if k in batch]
  g = len(rows)
  out = {"tokens": np.zeros((g, geo.width), np.int32),
         "segments": np.zeros((g, geo.width), np.int32),
         "t_tokens": np.zeros((g, geo.teacher_width), np.int32),
         "t_segments": np.zeros((g, geo.teacher_width), np.int32),
         "s_index": np.zeros((g, geo.compact), np.int32),
         "t_index": np.zeros((g, geo.compact), np.int32),
         "c_segments": np.zeros((g, geo.compact), np.int32)}
  for k in per_token:
    out[k] = np.zeros((g, geo.compact), batch[k].dtype)
  where = np.zeros((3, r), np.int64)
  for gi, members in enumerate(rows):
    cols = {"student": 0, "teacher": 0, "compact": 0}
    for si, i in enumerate(members):
      n = int(lengths[i]) if geo.packed else geo.compact
      for side, prompt_key, tok, seg, idx in (
          ("student", "prompt", "tokens", "segments", "s_index"),
          ("teacher", "teacher_prompt", "t_tokens", "t_segments", "t_index")):
        mask = batch[prompt_key + "_mask"][i].astype(bool)
        # Packed rows hold the prompt's real tokens only; a row of its own keeps the left
        # padding (the unpacked pass, bit for bit).
        prompt = batch[prompt_key][i][mask] if geo.packed else batch[prompt_key][i]
        seg_ids = np.full(len(prompt), si + 1) if geo.packed else mask.astype(np.int32)
        start = cols[side]
        end = start + len(prompt) + n
        out[tok][gi, start:end] = np.concatenate([prompt, batch["response"][i][:n]])
        out[seg][gi, start:end] = np.concatenate([seg_ids, np.full(n, si + 1)])
        c0 = cols["compact"]
        out[idx][gi, c0:c0 + n] = start + len(prompt) - 1 + np.arange(n)
        cols[side] = end
      c0 = cols["compact"]
      for k in per_token:
        out[k][gi, c0:c0 + n] = batch[k][i][:n]
      out["c_segments"][gi, c0:c0 + n] = si + 1
      where[:, i] = (gi, c0, lengths[i])
      cols["compact"] = c0 + n
  if not geo.packed:      # one sequence per row: the passes slice, they need no positions
    for k in ("s_index", "t_index", "c_segments"):
      del out[k]
  return Layout(geo, out, *where, budget=batch["response"].shape[1])
