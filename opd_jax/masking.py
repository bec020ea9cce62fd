"""Loss masks: special-token masking, teacher/student vocabulary reconciliation, entropy-top masks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def special_token_mask(tokens: Array, special_ids: Sequence[int] | Array, response_mask: Array, *,
                       first_occurrence_only: bool = True) -> Array:
  """Loss mask with convention tokens removed (docs/method.md, special-token masking).

  The authors' rule: for each listed id, its FIRST occurrence inside each response is excluded
  from the loss; with `first_occurrence_only=False` every occurrence is excluded.

  Args:
    tokens: [B, T] response token ids.
    special_ids: ids to mask (e.g. from `ids_for_strings(tok, ["<", "think", "<|im_end|>"])`).
    response_mask: [B, T] bool, True on real response tokens.
    first_occurrence_only: mask only the first occurrence per response of each id.

  Returns:
    [B, T] bool loss mask: `response_mask` without the masked special positions.
  """
  if tuple(tokens.shape) != tuple(response_mask.shape):
    raise ValueError(
        f"tokens {tuple(tokens.shape)} and response_mask {tuple(response_mask.shape)} must match")
  response_mask = jnp.asarray(response_mask).astype(bool)
  tokens = jnp.asarray(tokens)
  ids = jnp.asarray(special_ids, dtype=tokens.dtype).reshape(-1)
  if ids.size == 0:
    return response_mask
  ids = ids.reshape((1,) * tokens.ndim + (-1,))
  hits = (tokens[..., None] == ids) & response_mask[..., None]          # [B, T, S]
  if first_occurrence_only:
    seen = jnp.cumsum(hits.astype(jnp.int32), axis=-2)
    hits = hits & (seen == 1)
  return response_mask & ~jnp.any(hits, axis=-1)


def ids_for_strings(tokenizer: Any, strings: Sequence[str]) -> list[int]:
  """Resolve configured token strings to ids; each string must be exactly one token.

  Args:
    tokenizer: a transformers tokenizer (anything with `encode(text, add_special_tokens=False)`).
    strings: token strings such as "<", "think", "<|im_end|>".

  Returns:
    One id per string, in order.
  """
  ids = []
  for s in strings:
    pieces = tokenizer.encode(s, add_special_tokens=False)
    if len(pieces) != 1:
      shown = tokenizer.convert_ids_to_tokens(pieces) if hasattr(
          tokenizer, "convert_ids_to_tokens") else pieces
      raise ValueError(
          f"special-token string {s!r} is not a single token for this tokenizer: it encodes to "
          f"{len(pieces)} pieces {shown}; list single tokens only")
    ids.append(int(pieces[0]))
  return ids


def shared_vocab_size(student_tokenizer: Any, teacher_tokenizer: Any) -> int:
  """Number of real tokens shared by two tokenizers that must agree token for token.

  Raises ValueError naming a few differing entries when the vocabularies disagree; the
  models' `vocab_size` (embedding rows, often padded) is not consulted.
  """
  sv, tv = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
  if sv != tv:
    diff = sorted(set(sv.items()) ^ set(tv.items()), key=lambda kv: kv[1])[:5]
    raise ValueError(
        f"student and teacher tokenizers disagree ({len(sv)} vs {len(tv)} tokens; e.g. "
        f"{diff}); on-policy distillation needs the same vocabulary")
  return max(sv.values()) + 1 if sv else 0


def reconcile_vocab(student_logits: Array, teacher_logits: Array, vocab_size: int
                    ) -> tuple[Array, Array]:
  """Slice both models' logits to the shared range of real tokens [0, vocab_size).

  Models of one family can pad their embedding differently (Qwen2.5-3B: 151936 rows, 7B: 152064)
  although the tokenizer is the same; rows past the tokenizer's size are never real tokens.

  Args:
    student_logits: [..., Vs] logits.
    teacher_logits: [..., Vt] logits, same leading shape.
    vocab_size: number of real tokens (e.g. `shared_vocab_size(student_tok, teacher_tok)`).

  Returns:
    (student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]).
  """
  if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
    raise ValueError(
        "student and teacher logits must agree on every axis but the vocabulary, got student "
        f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}")
  if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
    raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
  for name, x in (("student", student_logits), ("teacher", teacher_logits)):
    if x.shape[-1] < vocab_size:
      raise ValueError(
          f"{name} logits have {x.shape[-1]} vocabulary entries, fewer than the tokenizer's "
          f"vocab_size={vocab_size}: the {name} model does not cover this tokenizer")
  return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]


def entropy_top_mask(student_logits: Array, mask: Array, ratio: float | Array) -> Array:
  """Keep only the `ratio` fraction of highest-entropy loss tokens (the authors' entropy mask).

  Ranked over all unmasked tokens of the batch; ties broken by position (earlier first);
  ceil(ratio · N) tokens are kept, N the number of unmasked tokens.

  Args:
    student_logits: [B, T, V] logits.
    mask: [B, T] bool loss mask.
    ratio: fraction in (0, 1] (the authors use 0.2); may be traced.

  Returns:
    [B, T] bool mask, a subset of `mask`.
  """
  if isinstance(ratio, (int, float)) and not 0.0 < float(ratio) <= 1.0:
    raise ValueError(f"ratio must be in (0, 1], got {ratio}")
  if tuple(mask.shape) != tuple(student_logits.shape[:-1]):
    raise ValueError(
        f"mask must have the logits' shape without the vocabulary axis, "
        f"{tuple(student_logits.shape[:-1])}, got {tuple(mask.shape)}")
  mask = jnp.asarray(mask).astype(bool)
  logits = jnp.where(mask[..., None], student_logits.astype(jnp.float32), 0.0)
  logp = jax.nn.log_softmax(jax.lax.stop_gradient(logits), axis=-1)
  p = jnp.exp(logp)
  ent = -jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, logp, 0.0), 0.0), axis=-1)
  flat = jnp.where(mask, ent, -jnp.inf).reshape(-1)
  order = jnp.argsort(-flat, stable=True)
  ranks = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
  n = jnp.sum(mask)
  keep = jnp.ceil(jnp.asarray(ratio, jnp.float32) * n).astype(ranks.dtype)
  return (ranks.reshape(mask.shape) < keep) & mask
