"""Pure sampling rules on one step's logits: token bans, temperature, top-k, exact top-p.

Every rule draws by inverse CDF from one uniform number per row. Without top-k the draw walks
the vocabulary in token-id order among the tokens at or above the nucleus threshold, so whether
the threshold came from the fast path or the exact bisection never changes a row's sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

# Candidates examined by the top-p fast path: a `lax.top_k` of this many entries decides the
# nucleus whenever their mass already reaches p (the common case for trained language models);
# otherwise an exact bisection over the vocabulary runs instead. Either way the result is exact.
TOP_P_CANDIDATES = 64


# The blocked top-k (`topk_impl="blocked"`) first picks whole blocks of this many entries by
# their maxima, then the k entries within the chosen blocks (recursively, one size per level).
# XLA:CPU's TopK over a whole [R, V] row costs several times more than TopK over the block maxima
# and the k chosen blocks (about 3x for [8, 32000], k = 50), so "blocked" is the CPU default.
# Other backends default to their own TopK kernel ("lax"); both give exactly `lax.top_k`'s result.
TOP_K_BLOCKS = (32, 8)
# Accepted values of `topk_impl` (None picks by backend, see `resolve_topk_impl`).
TOPK_IMPLS = ("blocked", "lax")


def _as_blocks(x: Array, block: int, fill: float) -> Array:
  """[R, V] -> [R, ceil(V / block), block], the ragged end padded with `fill`."""
  r, v = x.shape
  n_blocks = -(-v // block)
  if n_blocks * block != v:
    x = jnp.pad(x, ((0, 0), (0, n_blocks * block - v)), constant_values=fill)
  return x.reshape(r, n_blocks, block)


def resolve_topk_impl(topk_impl: str | None = None) -> str:
  """The top-k algorithm to use: `topk_impl` if given, else "blocked" on CPU and "lax" elsewhere.

  Raises:
    ValueError: `topk_impl` is neither None nor one of TOPK_IMPLS.
  """
  if topk_impl is None:
    return "blocked" if jax.default_backend() == "cpu" else "lax"
  if topk_impl not in TOPK_IMPLS:
    raise ValueError(f"topk_impl must be None (pick by backend) or one of {TOPK_IMPLS}, "
                     f"got {topk_impl!r}")
  return topk_impl


def _top_k(x: Array, k: int, blocks: Sequence[int] = ()) -> tuple[Array, Array]:
  """Exactly `lax.top_k(x, k)` for x [R, V] without NaN (same values and indices, ties to lower
  ids); with `blocks` empty it is one `lax.top_k`.

  The k largest entries lie in the k blocks with the largest maxima (ties to lower blocks): each
  of them is at least the k-th largest block maximum, and a block holding one has a maximum at
  least as large. The chosen blocks are put back in id order, so ties among candidates still go
  to lower ids. Each `lax.top_k` is kept as a TopK op by a barrier: without it, XLA's simplifier
  folds the slice of the values/indices into their consumers and the CPU backend then lowers it
  to a sort of the whole row (two orders of magnitude slower for [8, 32000], k = 50).

  A row holding NaN may differ: `lax.top_k` ranks NaN first, but XLA:CPU's vectorised max
  reduction can drop a NaN and leave its block out. A NaN guard on the block maxima would cost
  a separate [R, V] pass on XLA:CPU (the select does not fuse into that reduction), for rows
  whose policy log-probs are NaN anyway.
  """
  r, v = x.shape
  n_blocks = -(-v // blocks[0]) if blocks else 0
  if n_blocks < 4 * k:  # too few blocks for the detour to pay
    return jax.lax.optimization_barrier(jax.lax.top_k(x, k))
  block = blocks[0]
  x_blocks = _as_blocks(x, block, -jnp.inf)  # the padding loses every tie to a real entry
  _, chosen = jax.lax.optimization_barrier(jax.lax.top_k(jnp.max(x_blocks, axis=-1), k))
  chosen = jnp.sort(chosen, axis=-1)
  candidates = jnp.take_along_axis(x_blocks, chosen[:, :, None], axis=1).reshape(r, k * block)
  vals, pos = _top_k(candidates, k, blocks[1:])
  ids = jnp.take_along_axis(chosen, pos // block, axis=1) * block + pos % block
  return vals, ids


def ban_tokens(logits: Array, banned_ids: Sequence[int]) -> Array:
  """Set the logits of banned token ids to -inf (before any truncation)."""
  if not banned_ids:
    return logits
  ids = jnp.asarray(tuple(banned_ids), jnp.int32)
  return logits.at[..., ids].set(-jnp.inf)


def apply_temperature(logits: Array, temperature: float | Array) -> Array:
  """logits / temperature; temperature 0 keeps the logits (the sampler then takes the argmax)."""
  t = jnp.asarray(temperature, jnp.float32)
  return logits / jnp.where(t > 0, t, 1.0)


def _nucleus(vals: Array, lse: Array, top_p: Array) -> tuple[Array, Array]:
  """(kept [R, C], decided [R]) for candidates `vals` sorted in descending order.

  A candidate is kept while the mass strictly before it is < p (so the token that crosses p is
  kept), together with every candidate tied with the last kept one. `decided` says that no
  token outside the candidates can belong to the nucleus.
  """
  probs = jnp.exp(vals - lse[:, None])
  before = jnp.cumsum(probs, axis=-1) - probs
  n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1), 1)
  threshold = jnp.take_along_axis(vals, n_keep[:, None] - 1, axis=-1)
  kept = vals >= threshold
  decided = (jnp.sum(probs, axis=-1) >= top_p) & (vals[:, -1] < threshold[:, 0])
  return kept, decided


def _draw_sorted(vals: Array, idx: Array, kept: Array, u: Array) -> tuple[Array, Array]:
  """Inverse-CDF draw among the kept prefix of descending candidates: (token, log-prob)."""
  kept_vals = jnp.where(kept, vals, -jnp.inf)
  top = vals[:, :1]
  weights = jnp.exp(kept_vals - top)
  cum = jnp.cumsum(weights, axis=-1)
  total = cum[:, -1]
  j = jnp.sum(cum <= (u * total)[:, None], axis=-1)
  j = jnp.minimum(j, jnp.sum(kept & jnp.isfinite(vals), axis=-1) - 1)
  token = jnp.take_along_axis(idx, j[:, None], axis=-1)[:, 0]
  logp = jnp.take_along_axis(vals, j[:, None], axis=-1)[:, 0] - top[:, 0] - jnp.log(total)
  return token.astype(jnp.int32), logp


def _order_keys(x: Array) -> Array:
  """uint32 keys whose unsigned order is the float order of x (for an exact bisection)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _bisect_threshold(x: Array, lse: Array, top_p: Array) -> Array:
  """Largest logit θ per row with mass{x >= θ} >= p: the exact nucleus without sorting.

  A 32-step bisection over the order-preserving integer keys of the logits; each step is one
  pass over the vocabulary.
  """
  keys = _order_keys(x)
  probs = jnp.exp(x - lse[:, None])

  def step(_, bounds):
    lo, hi = bounds                                   # mass(>= lo) >= p > mass(>= hi)
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(jnp.where(keys >= mid[:, None], probs, 0.0), axis=-1) >= top_p
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  lo = jnp.min(keys, axis=-1)
  hi = jnp.max(keys, axis=-1) + 1
  lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
  # The smallest logit whose key is >= lo is the threshold itself.
  return jnp.min(jnp.where(keys >= lo[:, None], x, jnp.inf), axis=-1)


# `_draw_above` locates the uniform's token with block sums of this many entries, then a
# cumulative sum inside the one chosen block: XLA:CPU lowers a cumsum over the whole vocabulary
# to a reduce-window, which is slow for rows of tens of thousands of entries.
DRAW_BLOCK = 128


def _draw_above(x: Array, lse: Array, threshold: Array, u: Array) -> tuple[Array, Array]:
  """Inverse-CDF draw, in token-id order, among the tokens with x >= threshold."""
  v = x.shape[-1]
  weights = jnp.where(x >= threshold[:, None], jnp.exp(x - lse[:, None]), 0.0)
  w_blocks = _as_blocks(weights, DRAW_BLOCK, 0.0)
  block_mass = jnp.sum(w_blocks, axis=-1)
  block_cum = jnp.cumsum(block_mass, axis=-1)
  total = block_cum[:, -1]
  target = (u * total)[:, None]

  def first_and_last(positive):  # first / last index of a positive entry along the last axis
    ids = jax.lax.broadcasted_iota(jnp.int32, positive.shape, positive.ndim - 1)
    return (jnp.min(jnp.where(positive, ids, positive.shape[-1]), axis=-1),
            jnp.max(jnp.where(positive, ids, -1), axis=-1))

  # The block where the cumulative mass first exceeds the target (clamped against rounding to
  # blocks that hold mass), then the token inside it the same way.
  first, last = first_and_last(block_mass > 0)
  block = jnp.clip(jnp.sum(block_cum <= target, axis=-1), first, last)
  before = jnp.take_along_axis(block_cum - block_mass, block[:, None], axis=-1)
  inside = jnp.take_along_axis(w_blocks, block[:, None, None], axis=1)[:, 0]
  first, last = first_and_last(inside > 0)
  offset = jnp.sum(before + jnp.cumsum(inside, axis=-1) <= target, axis=-1)
  token = block * DRAW_BLOCK + jnp.clip(offset, first, last)
  # A row without any finite mass (NaN logits) still gets a valid id; its log-prob is NaN.
  token = jnp.clip(token, 0, v - 1).astype(jnp.int32)
  logp = jnp.take_along_axis(x, token[:, None], axis=-1)[:, 0] - lse - jnp.log(total)
  return token, logp


def draw(logits: Array, u: Array, *, temperature: float | Array = 1.0, top_k: int = 0,
         top_p: float | Array = 1.0, banned_ids: Sequence[int] = (),
         candidates: int = TOP_P_CANDIDATES, topk_impl: str | None = None
         ) -> tuple[Array, Array]:
  """Sample one token per row: bans, temperature, top-k, exact top-p, then an inverse-CDF draw.

  Top-k keeps exactly k tokens (ties broken towards lower ids, as `lax.top_k`), chosen before the
  division by the temperature, which does not reorder them (up to ties created by rounding);
  top-p keeps the smallest descending prefix whose mass reaches p (the crossing token included)
  plus any token tied with its last one, renormalised after top-k as transformers does.
  Temperature 0 is greedy.
  Without top-k, the nucleus threshold comes from a `lax.top_k` of `candidates` entries when their
  mass reaches p in every row, else from an exact bisection over the vocabulary (no sort); the
  draw itself does not depend on which of the two found the threshold.

  Args:
    logits: [R, V] logits of the next token.
    u: [R] uniform numbers in [0, 1), one per row (the only randomness).
    temperature: >= 0; may be traced.
    top_k: 0 (off) or the number of tokens kept; static.
    top_p: nucleus mass in (0, 1]; may be traced.
    banned_ids: token ids that are never sampled.
    candidates: size of the fast top-p path's `lax.top_k`.
    topk_impl: how the top-k and the top-p candidates are found, "blocked" (block maxima first)
      or "lax" (one `lax.top_k`); both give the same tokens for rows without NaN logits (see
      `_top_k`). None picks by backend ("blocked" on
      CPU, "lax" elsewhere: see TOP_K_BLOCKS). Static.

  Returns:
    (tokens [R] int32, log-probs [R] of the tokens under the distribution sampled from; 0 for
    greedy).
  """
  blocks = TOP_K_BLOCKS if resolve_topk_impl(topk_impl) == "blocked" else ()
  x = ban_tokens(logits.astype(jnp.float32), banned_ids)
  temperature = jnp.asarray(temperature, jnp.float32)

  def greedy_draw(x):
    return greedy(x), jnp.zeros(x.shape[:1], jnp.float32)

  # The temperature is applied inside the sampling branch, where XLA fuses the division into
  # its first pass over the row (or, with top-k, applies it to the k survivors only).
  def sample_draw(x):
    return _draw_truncated(x, u, temperature, top_k, top_p, candidates, blocks)

  return jax.lax.cond(temperature > 0, sample_draw, greedy_draw, x)


def _draw_truncated(x: Array, u: Array, temperature: Array, top_k: int, top_p: float | Array,
                    candidates: int, blocks: Sequence[int]) -> tuple[Array, Array]:
  p = jnp.asarray(top_p, jnp.float32)
  vocab = x.shape[-1]
  if top_k > 0:
    vals, idx = _top_k(x, min(top_k, vocab), blocks)
    vals = apply_temperature(vals, temperature)
    kept, _ = _nucleus(vals, jax.nn.logsumexp(vals, axis=-1), p)
    token, logp = _draw_sorted(vals, idx, kept, u)
  else:
    x = apply_temperature(x, temperature)
    lse = jax.nn.logsumexp(x, axis=-1)

    def nucleus_threshold(x):
      vals, _ = _top_k(x, min(candidates, vocab), blocks)
      kept, decided = _nucleus(vals, lse, p)
      fast = jnp.min(jnp.where(kept, vals, jnp.inf), axis=-1)
      return jax.lax.cond(jnp.all(decided), lambda x: fast,
                          lambda x: _bisect_threshold(x, lse, p), x)

    threshold = jax.lax.cond(p >= 1.0, lambda x: jnp.full(x.shape[:1], -jnp.inf),
                             nucleus_threshold, x)
    token, logp = _draw_above(x, lse, threshold, u)
  return token, logp


def greedy(logits: Array, rng: Array | None = None) -> Array:
  """The argmax rule `(logits, rng) -> tokens` (rng unused); ties go to the lowest id.

  Written as a max and a min over ids (XLA:CPU's variadic argmax reduction is ~10x slower), with
  `jnp.argmax`'s result, a NaN included: it counts as the largest entry.
  """
  del rng
  best = jnp.max(logits, axis=-1, keepdims=True)
  ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  hit = (logits == best) | jnp.isnan(logits)             # max() is NaN when a NaN is present
  return jnp.min(jnp.where(hit, ids, logits.shape[-1] - 1), axis=-1)


def sample(logits: Array, rng: Array, **settings) -> Array:
  """The rule `(logits, rng) -> tokens` for `draw`'s settings (one uniform per row from rng)."""
  return draw(logits, jax.random.uniform(rng, logits.shape[:1]), **settings)[0]
