"""Top-K reverse KL fused with the unembedding: chunked, vocabulary-sharded, never [N, V] logits."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from opd_jax import losses
from opd_jax.sharding import BATCH_AXES

Array = jax.Array

# The fused loss needs only the teacher's top-K statistics, so it offers the teacher supports;
# the student ones (losses.SUPPORTS) need the teacher's full logits.
FUSED_SUPPORTS = ("teacher", "teacher+sampled")
# One set of options and one floor, the losses module's (re-exported under their old names).
SUPPORTS = losses.SUPPORTS
TAILS = losses.TAILS
LOGP_FLOOR = losses.LOGP_FLOOR
# The diagnostics of `topk_reverse_kl_from_hidden` that read the student's full-vocabulary sweep
# (left out, or NaN, when `statistics` is off).
STATISTICS = ("kl/student_mass", "kl/logp_gap", "kl/overlap", "kl/student_entropy")


class TopK(NamedTuple):
  """The teacher's statistics the top-K loss needs, per position.

  indices: [..., K] int32, by decreasing logit; equal logits: lower vocabulary index first.
  logits: [..., K] float32 logits at `indices`.
  logsumexp: [...] float32 logsumexp over the whole vocabulary.
  sampled_logits: [...] float32 logit of the sampled token (None unless asked for); needed by
    the EMA-PG tail, the "teacher+sampled" support and the "kl/logp_gap" diagnostic.
  """
  indices: Array
  logits: Array
  logsumexp: Array
  sampled_logits: Array | None = None


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one chunked pass (hashable: it keys the custom_vjp)."""
  k: int                    # running top-K size (0: none)
  chunk_tokens: int
  chunk_vocab: int
  entropy: bool             # also accumulate the full-vocabulary entropy
  dense_grad: bool          # the loss depends on the logsumexp: backward sweeps the vocabulary
  mesh: Mesh | None
  data_axis: tuple[str, ...]
  tensor_axis: str | None
  # The forward's vocabulary sweep (logsumexp, entropy, top-K): "always"; "never" (the logits at
  # the requested columns alone, by row gathers; the other statistics NaN); "cond" (a traced
  # flag chooses, one program for both).
  sweep: str = "always"


class _Stats(NamedTuple):
  gathered: Array           # [n, C] logits at the requested columns
  lse: Array                # [n]
  entropy: Array            # [n] (zeros unless plan.entropy)
  top_logits: Array         # [n, k]
  top_indices: Array        # [n, k] int32


# ----------------------------------------------------------------------------------------------
# per-device chunked passes (offset: the global index of this device's first vocabulary column)
# ----------------------------------------------------------------------------------------------


def _chunk_start(j: Array, cv: int, v_loc: int) -> Array:
  # The last chunk slides back to end at v_loc instead of padding the unembedding (a D×V copy);
  # the columns it shares with the previous chunk are masked to -inf, so each is counted once.
  return jnp.minimum(j * cv, v_loc - cv)


def _pad_rows(x: Array, n_pad: int) -> Array:
  if x.shape[0] == n_pad:
    return x
  return jnp.pad(x, [(0, n_pad - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _token_chunks(ct: int, *xs: Array) -> list[Array]:
  n_pad = -(-xs[0].shape[0] // ct) * ct
  return [_pad_rows(x, n_pad).reshape((n_pad // ct, ct) + x.shape[1:]) for x in xs]


def _local_forward(plan: _Plan, h: Array, w: Array, cols: Array, mask: Array, offset: Array
                   ) -> _Stats:
  """Online logsumexp, entropy, running top-K and gathered logits over this device's vocabulary."""
  n, v_loc = h.shape[0], w.shape[1]
  ct, cv = min(plan.chunk_tokens, n), min(plan.chunk_vocab, v_loc)
  n_vchunks, k = -(-v_loc // cv), plan.k
  cols_loc = cols - offset

  def sweep(xs):
    h_c, cols_c, mask_c = xs
    h_c = jnp.where(mask_c[:, None], h_c.astype(jnp.float32), 0.0)  # masked rows: zero logits

    def body(carry, j):
      m, s, a, got, top_v, top_i = carry
      start = _chunk_start(j, cv, v_loc)
      z = h_c @ lax.dynamic_slice_in_dim(w, start, cv, axis=1).astype(jnp.float32)
      z = jnp.where((start + jnp.arange(cv) >= j * cv)[None, :], z, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(z, axis=-1))
      delta = jnp.where(jnp.isfinite(m), m - m_new, 0.0)
      scale = jnp.where(jnp.isfinite(m), jnp.exp(delta), 0.0)
      e = jnp.exp(z - m_new[:, None])
      if plan.entropy:  # a = Σ e^{z-m} (z - m), rescaled like s when the running max moves
        a = scale * (a + delta * s) + jnp.sum(jnp.where(e > 0, e * (z - m_new[:, None]), 0.0), -1)
      s = scale * s + jnp.sum(e, axis=-1)
      owned = (cols_c >= j * cv) & (cols_c < start + cv)
      picked = jnp.take_along_axis(z, jnp.clip(cols_c - start, 0, cv - 1), axis=-1)
      got = jnp.where(owned, picked, got)
      if k:  # the running list comes first: on equal logits the lower index wins, as lax.top_k
        cv_v, cv_i = lax.top_k(z, k)
        top_v, pos = lax.top_k(jnp.concatenate([top_v, cv_v], -1), k)
        top_i = jnp.take_along_axis(
            jnp.concatenate([top_i, cv_i + start + offset], -1), pos, axis=-1)
      return (m_new, s, a, got, top_v, top_i), None

    zeros = jnp.zeros((ct,), jnp.float32)
    init = (zeros - jnp.inf, zeros, zeros, jnp.zeros(cols_c.shape, jnp.float32),
            jnp.full((ct, k), -jnp.inf, jnp.float32), jnp.zeros((ct, k), jnp.int32))
    out, _ = lax.scan(body, init, jnp.arange(n_vchunks))
    return out

  chunks = _token_chunks(ct, h, cols_loc, mask)
  flat = lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])[:n]
  m, s, a, got, top_v, top_i = (flat(x) for x in lax.map(sweep, chunks))
  if plan.tensor_axis is not None:  # exact merge of the per-shard partial results
    m_g = lax.pmax(m, plan.tensor_axis)
    scale = jnp.exp(m - m_g)
    a = lax.psum(scale * (a + (m - m_g) * s), plan.tensor_axis)
    s = lax.psum(scale * s, plan.tensor_axis)
    m = m_g
    got = lax.psum(got, plan.tensor_axis)  # each column is owned by one shard, 0 elsewhere
    if k:  # gathered in shard order = vocabulary order, so ties still go to the lower index
      top_v, pos = lax.top_k(lax.all_gather(top_v, plan.tensor_axis, axis=1, tiled=True), k)
      top_i = jnp.take_along_axis(
          lax.all_gather(top_i, plan.tensor_axis, axis=1, tiled=True), pos, axis=-1)
  entropy = jnp.log(s) - a / s if plan.entropy else jnp.zeros_like(s)
  return _Stats(got, m + jnp.log(s), entropy, top_v, top_i)


def _gather_tokens(plan: _Plan, n: int, c: int, d: int) -> int:
  """Tokens per block of the row-gathered passes: [t, c, d] gathered unembedding rows, as many
  floats as one [chunk_tokens, chunk_vocab] logits block of the sweep."""
  return max(1, min(n, plan.chunk_tokens * plan.chunk_vocab // max(c * d, 1)))


def _support_rows(w: Array, cols: Array) -> Array:
  """[t, C, D] float32: the unembedding's columns `cols` ([t, C], clipped to this device's
  vocabulary) as rows of its transpose."""
  return jnp.take(w.T, jnp.clip(cols, 0, w.shape[1] - 1), axis=0).astype(jnp.float32)


def _local_gathered(plan: _Plan, h: Array, w: Array, cols: Array, mask: Array, offset: Array
                    ) -> Array:
  """The logits at `cols` alone, [n, C]: rows of the unembedding's transpose gathered per token
  (no vocabulary sweep). Columns another shard owns give 0 before the merge, as in the sweep."""
  n, d, v_loc = h.shape[0], h.shape[1], w.shape[1]
  c = cols.shape[1]
  cols_loc = cols - offset

  def block(xs):
    h_c, cols_c, mask_c = xs
    h_c = jnp.where(mask_c[:, None], h_c.astype(jnp.float32), 0.0)
    owned = (cols_c >= 0) & (cols_c < v_loc)
    return jnp.where(owned, jnp.einsum("td,tcd->tc", h_c, _support_rows(w, cols_c)), 0.0)

  chunks = _token_chunks(_gather_tokens(plan, n, c, d), h, cols_loc, mask)
  got = lax.map(block, chunks)
  got = got.reshape((-1, c))[:n]
  if plan.tensor_axis is not None:
    got = lax.psum(got, plan.tensor_axis)
  return got


def _local_backward(plan: _Plan, h: Array, w: Array, cols: Array, mask: Array, lse: Array,
                    g_got: Array, g_lse: Array, offset: Array) -> tuple[Array, Array]:
  """(dh, dw) of this device's vocabulary: dz = g_lse·softmax + scatter(g_got), in chunks."""
  n, d, v_loc = h.shape[0], h.shape[1], w.shape[1]
  ct, cv = min(plan.chunk_tokens, n), min(plan.chunk_vocab, v_loc)
  cols_loc = cols - offset
  g_got = jnp.where(mask[:, None] & (cols_loc >= 0) & (cols_loc < v_loc), g_got, 0.0)
  g_lse = jnp.where(mask, g_lse, 0.0)

  def dense(dw, xs):
    h_c, cols_c, mask_c, lse_c, gg_c, gl_c = xs
    h_c = jnp.where(mask_c[:, None], h_c.astype(jnp.float32), 0.0)
    rows = jnp.arange(ct)[:, None]

    def body(carry, j):
      dh, dw = carry
      start = _chunk_start(j, cv, v_loc)
      w_j = lax.dynamic_slice_in_dim(w, start, cv, axis=1).astype(jnp.float32)
      z = h_c @ w_j
      owned = (start + jnp.arange(cv) >= j * cv)[None, :]
      dz = jnp.where(owned, gl_c[:, None] * jnp.exp(z - lse_c[:, None]), 0.0)
      hit = (cols_c >= j * cv) & (cols_c < start + cv)
      dz = dz.at[rows, jnp.clip(cols_c - start, 0, cv - 1)].add(jnp.where(hit, gg_c, 0.0))
      dh = dh + dz @ w_j.T
      dw_j = lax.dynamic_slice_in_dim(dw, start, cv, axis=1) + h_c.T @ dz
      return (dh, lax.dynamic_update_slice_in_dim(dw, dw_j, start, axis=1)), None

    init = (jnp.zeros((ct, d), jnp.float32), dw)
    (dh, dw), _ = lax.scan(body, init, jnp.arange(-(-v_loc // cv)))
    return dw, dh

  def sparse(dwt, xs):
    # Only the gathered columns carry gradient: rows of the unembedding's transpose are gathered
    # and scattered per token (no vocabulary sweep, no matmul against the whole unembedding).
    h_c, cols_c, mask_c, _, gg_c, _ = xs
    h_c = jnp.where(mask_c[:, None], h_c.astype(jnp.float32), 0.0)
    idx = jnp.clip(cols_c, 0, v_loc - 1)   # slots of other shards carry a zero cotangent
    dh = jnp.einsum("tc,tcd->td", gg_c, _support_rows(w, idx))
    dwt = dwt.at[idx.reshape(-1)].add((gg_c[:, :, None] * h_c[:, None, :]).reshape(-1, d))
    return dwt, dh

  if plan.dense_grad:
    chunks = _token_chunks(ct, h, cols_loc, mask, lse, g_got, g_lse)
    dw, dh = lax.scan(dense, jnp.zeros(w.shape, jnp.float32), chunks)
  else:
    chunks = _token_chunks(_gather_tokens(plan, n, cols.shape[1], d), h, cols_loc, mask, lse,
                           g_got, g_lse)
    dwt, dh = lax.scan(sparse, jnp.zeros(w.shape[::-1], jnp.float32), chunks)
    dw = dwt.T
  dh = dh.reshape(-1, d)[:n]
  if plan.tensor_axis is not None:
    dh = lax.psum(dh, plan.tensor_axis)
  if plan.data_axis:
    dw = lax.psum(dw, plan.data_axis)
  return dh.astype(h.dtype), dw.astype(w.dtype)


# ----------------------------------------------------------------------------------------------
# global entry points: plain calls, or shard_map over (data: tokens, tensor: vocabulary)
# ----------------------------------------------------------------------------------------------


def _offset(plan: _Plan, v_loc: int) -> Array:
  if plan.tensor_axis is None:
    return jnp.int32(0)
  return lax.axis_index(plan.tensor_axis).astype(jnp.int32) * v_loc


def _explicit(plan: _Plan) -> bool:
  return plan.mesh is not None and AxisType.Explicit in plan.mesh.axis_types


def _sharded(plan: _Plan, fn, in_specs, out_specs):
  if plan.mesh is None:
    return fn
  # check_vma off: the bodies are never differentiated by JAX (custom_vjp owns the backward).
  mapped = jax.shard_map(fn, mesh=plan.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)
  if not _explicit(plan):
    return mapped
  # Explicit axes carry the sharding in the type: shard_map wants it resharded first.
  return lambda *args: mapped(*(jax.reshard(a, NamedSharding(plan.mesh, spec))
                                for a, spec in zip(args, in_specs)))


def _local_stats(plan: _Plan, h: Array, w: Array, cols: Array, mask: Array, sweep: Array
                 ) -> _Stats:
  offset = _offset(plan, w.shape[1])

  def full():
    return _local_forward(plan, h, w, cols, mask, offset)

  def gathered():
    nan = jnp.full((h.shape[0],), jnp.nan, jnp.float32)
    return _Stats(_local_gathered(plan, h, w, cols, mask, offset), nan, nan,
                  jnp.full((h.shape[0], plan.k), jnp.nan, jnp.float32),
                  jnp.zeros((h.shape[0], plan.k), jnp.int32))

  if plan.sweep == "always":
    return full()
  if plan.sweep == "never":
    return gathered()
  return lax.cond(sweep, full, gathered)


def _forward(plan: _Plan, h: Array, w: Array, cols: Array, mask: Array,
             sweep: Array | None = None) -> _Stats:
  tok, voc = plan.data_axis or None, plan.tensor_axis
  fn = lambda h, w, c, m, s: _local_stats(plan, h, w, c, m, s)
  out_specs = _Stats(P(tok, None), P(tok), P(tok), P(tok, None), P(tok, None))
  sweep = jnp.asarray(True if sweep is None else sweep, bool)
  return _sharded(plan, fn, (P(tok, None), P(None, voc), P(tok, None), P(tok), P()), out_specs)(
      h, w, cols, mask, sweep)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _student_stats(plan: _Plan, h: Array, w: Array, cols: Array, mask: Array, sweep: Array
                   ) -> _Stats:
  return _forward(plan, h, w, cols, mask, sweep)


def _student_stats_fwd(plan, h, w, cols, mask, sweep):
  stats = _forward(plan, h, w, cols, mask, sweep)
  return stats, (h, w, cols, mask, stats.lse)


def _student_stats_bwd(plan, res, g):
  h, w, cols, mask, lse = res
  tok, voc = plan.data_axis or None, plan.tensor_axis
  fn = lambda *a: _local_backward(plan, *a, _offset(plan, a[1].shape[1]))
  row, row2 = P(tok), P(tok, None)
  in_specs = (row2, P(None, voc), row2, row, row, row2, row)
  dh, dw = _sharded(plan, fn, in_specs, (row2, P(None, voc)))(
      h, w, cols, mask, lse, g.gathered, g.lse)
  if _explicit(plan):  # cotangents must carry their primal's sharding type
    dh, dw = (jax.reshard(x, jax.typeof(p).sharding) for x, p in ((dh, h), (dw, w)))
  return dh, dw, None, None, None


_student_stats.defvjp(_student_stats_fwd, _student_stats_bwd)


def _make_plan(hidden: Array, unembed: Array, *, k: int, chunk_tokens: int, chunk_vocab: int,
               entropy: bool, dense_grad: bool, mesh: Mesh | None,
               data_axis: str | tuple[str, ...] | None, tensor_axis: str | None) -> _Plan:
  """Validate the shapes and options shared by both public functions."""
  losses._check_array("hidden", hidden, "float")
  losses._check_array("unembed", unembed, "float")
  if hidden.ndim not in (2, 3) or unembed.ndim != 2 or hidden.shape[-1] != unembed.shape[0]:
    raise ValueError(
        f"hidden must be [N, D] or [B, T, D] and unembed [D, V] with the same D, got hidden "
        f"{tuple(hidden.shape)} and unembed {tuple(unembed.shape)}")
  for name, value in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
    losses._check_static_int(name, value)
  data = () if data_axis is None else (data_axis,) if isinstance(data_axis, str) else tuple(
      data_axis)
  v_loc = unembed.shape[1]
  if mesh is None:
    data, tensor_axis = (), None
  else:
    named = [("data_axis", data_axis, a) for a in data]
    named += [("tensor_axis", tensor_axis, tensor_axis)] if tensor_axis is not None else []
    for arg, value, axis in named:
      if axis not in mesh.shape:
        raise ValueError(
            f"mesh axis {axis!r} ({arg}={value!r}) is not in the mesh's axes "
            f"{tuple(mesh.axis_names)}; build the mesh with opd_jax.sharding.make_mesh, or name "
            "only this mesh's axes (None: leave that dimension unsharded)")
    if tensor_axis is not None:
      if v_loc % mesh.shape[tensor_axis]:
        raise ValueError(
            f"unembed's vocabulary size {v_loc} must be divisible by the size "
            f"{mesh.shape[tensor_axis]} of the tensor axis {tensor_axis!r}; pad the unembedding")
      v_loc //= mesh.shape[tensor_axis]
  losses._check_static_int("k", k, min(v_loc, chunk_vocab),
                           f"min(vocabulary per device = {v_loc}, chunk_vocab = {chunk_vocab})")
  return _Plan(k=k, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab, entropy=entropy,
               dense_grad=dense_grad, mesh=mesh, data_axis=data, tensor_axis=tensor_axis)


def _flat_rows(plan: _Plan, *xs: Array | None) -> list[Array | None]:
  """Flatten [B, T, ...] to [N, ...] and pad N to a multiple of the data-parallel size."""
  lead = 1 if xs[0].ndim == 2 else 2
  n = math.prod(xs[0].shape[:lead])
  dp = math.prod(plan.mesh.shape[a] for a in plan.data_axis) if plan.data_axis else 1
  n_pad = -(-n // dp) * dp
  return [None if x is None else _pad_rows(x.reshape((n,) + x.shape[lead:]), n_pad) for x in xs]


def _unflat(plan: _Plan, x: Array, lead: tuple[int, ...]) -> Array:
  """Drop the padding rows and restore the leading shape of [N, ...] per-token results."""
  n = math.prod(lead)
  if _explicit(plan) and (x.shape[0] != n or len(lead) != 1):
    # With explicit axes an uneven slice or reshape of a sharded dimension is a type error;
    # these per-token arrays are O(N × K), so replicating them costs little.
    x = jax.reshard(x, NamedSharding(plan.mesh, P()))
  return x[:n].reshape(lead + x.shape[1:])


def teacher_topk_from_hidden(hidden: Array, unembed: Array, *, k: int,
                             sampled_tokens: Array | None = None, chunk_tokens: int = 1024,
                             chunk_vocab: int = 8192, mesh: Mesh | None = None,
                             data_axis: str | tuple[str, ...] | None = BATCH_AXES,
                             tensor_axis: str | None = "tensor") -> TopK:
  """Teacher top-K logits and full logsumexp from final hidden states, without [N, V] logits.

  Logits are produced in [chunk_tokens, chunk_vocab] blocks, merged into a running top-K and an
  online logsumexp, so peak memory is O(chunk_tokens × chunk_vocab). The result equals
  `lax.top_k` and `logsumexp` of `hidden @ unembed` in float32 (ties: lower index first). With a
  mesh, tokens are split over `data_axis` (by default BATCH_AXES, ("data", "fsdp"), as the
  models split batch rows) and the vocabulary over `tensor_axis` (the unembedding stays sharded;
  the per-shard top-K and partial logsumexp are merged exactly). Every named axis must be in the
  mesh (a ValueError says which is not). Treated as a constant (stop-gradient). A NaN in a
  position's logits gives a NaN logsumexp there.

  Args:
    hidden: [N, D] or [B, T, D] final hidden states (any float dtype).
    unembed: [D, V] unembedding (output projection) matrix.
    k: number of top entries, 1 <= k <= min(V per device, chunk_vocab).
    sampled_tokens: optional [N] / [B, T] token ids whose logits are also returned.
    chunk_tokens: tokens per block.
    chunk_vocab: vocabulary entries per block.
    mesh: optional mesh for the sharded version (e.g. `opd_jax.sharding.make_mesh`).
    data_axis: mesh axis (or axes) splitting the tokens; None: not split.
    tensor_axis: mesh axis splitting the vocabulary; None: not split.

  Returns:
    TopK(indices, logits, logsumexp, sampled_logits) shaped like hidden without D (plus K).
  """
  plan = _make_plan(hidden, unembed, k=k, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab,
                    entropy=False, dense_grad=False, mesh=mesh, data_axis=data_axis,
                    tensor_axis=tensor_axis)
  lead = hidden.shape[:-1]
  losses._check_array("sampled_tokens", sampled_tokens, "int", lead, "hidden's shape without D")
  cols = (jnp.zeros(lead + (0,), jnp.int32) if sampled_tokens is None
          else sampled_tokens[..., None].astype(jnp.int32))
  h, cols, mask = _flat_rows(plan, lax.stop_gradient(hidden), cols, jnp.ones(lead, bool))
  stats = _forward(plan, h, lax.stop_gradient(unembed), cols, mask)
  unflat = lambda x: _unflat(plan, x, tuple(lead))
  sampled = None if sampled_tokens is None else unflat(stats.gathered[:, 0])
  return TopK(unflat(stats.top_indices), unflat(stats.top_logits), unflat(stats.lse), sampled)


# ----------------------------------------------------------------------------------------------
# the loss: the fused passes supply the support's logits, losses owns the per-position maths
# ----------------------------------------------------------------------------------------------


def topk_reverse_kl_from_hidden(
    student_hidden: Array, student_unembed: Array, teacher_topk: TopK, mask: Array, *,
    support: str = "teacher", renormalize: bool = True, tail: str = "none",
    sampled_tokens: Array | None = None, behavior_logprobs: Array | None = None,
    tail_weight_clip: float | None = None, chunk_tokens: int = 1024, chunk_vocab: int = 8192,
    mesh: Mesh | None = None, data_axis: str | tuple[str, ...] | None = BATCH_AXES,
    tensor_axis: str | None = "tensor", statistics: bool | Array = True
    ) -> tuple[Array, dict[str, Array]]:
  """`losses.topk_reverse_kl` on the teacher's top-K, from the student's final hidden states.

  Same value, gradient and "kl/…" diagnostics as materialising `student_hidden @ unembed` and
  calling `losses.topk_reverse_kl` with the same options (`support` in FUSED_SUPPORTS; student
  supports need the teacher's logits off its top-K and are only available there). Forward and
  backward run in [chunk_tokens, chunk_vocab] blocks (custom_vjp), so memory is
  O(chunk_tokens × chunk_vocab) plus the D × V gradient, never O(N × V). With renormalize=True and
  no tail (the paper's method) the loss only sees the support's logits and the backward touches
  only those K (+1) columns; otherwise it sweeps the vocabulary again. A NaN in the student's
  hidden states or unembedding, or in the teacher's statistics, at an unmasked position makes the
  loss NaN.

  Args:
    student_hidden: [B, T, D] (or [N, D]) student final hidden states (differentiated).
    student_unembed: [D, V] student unembedding (differentiated).
    teacher_topk: TopK from `teacher_topk_from_hidden` (constants), shaped like the mask; needs
      `sampled_logits` when sampled_tokens are given.
    mask: [B, T] (or [N]) bool loss mask; masked positions contribute exactly zero.
    support: "teacher" | "teacher+sampled" (FUSED_SUPPORTS).
    renormalize, tail, sampled_tokens, behavior_logprobs, tail_weight_clip: as in
      `losses.topk_reverse_kl`.
    chunk_tokens, chunk_vocab, mesh, data_axis, tensor_axis: as in `teacher_topk_from_hidden`.
    statistics: whether to compute the student's full-vocabulary statistics that only the
      diagnostics read when the loss is renormalised without a tail ("kl/student_mass",
      "kl/logp_gap", "kl/overlap", "kl/student_entropy"). False: the forward gathers the
      support's unembedding rows instead of sweeping the vocabulary (the sweep is most of the
      loss's cost) and those diagnostics are left out; a traced bool chooses at run time in one
      program, and the skipped diagnostics are NaN. The loss and its gradient are the same
      either way (to float rounding). Ignored (always computed) when the loss itself needs them
      (renormalize=False or a tail).

  Returns:
    (loss, aux): scalar token-mean loss and the scalar diagnostics of `losses.topk_reverse_kl`.
  """
  losses._check_topk_options(
      support, tail, renormalize, has_sampled=sampled_tokens is not None,
      tail_weight_clip=tail_weight_clip, supports=FUSED_SUPPORTS,
      others=" (student supports need the teacher's logits off its top-K: use "
             "losses.topk_reverse_kl on materialised logits)")
  if sampled_tokens is not None and teacher_topk.sampled_logits is None:
    raise ValueError("sampled_tokens needs teacher_topk.sampled_logits: call "
                     "teacher_topk_from_hidden(..., sampled_tokens=...)")
  lead = tuple(student_hidden.shape[:-1])
  k = teacher_topk.indices.shape[-1]
  positions = "student_hidden's shape without D"
  for name, x, kind, shape in (
      ("mask", mask, "mask", lead),
      ("teacher_topk.indices", teacher_topk.indices, "int", lead + (k,)),
      ("teacher_topk.logits", teacher_topk.logits, "float", lead + (k,)),
      ("teacher_topk.logsumexp", teacher_topk.logsumexp, "float", lead),
      ("teacher_topk.sampled_logits", teacher_topk.sampled_logits, "float", lead),
      ("sampled_tokens", sampled_tokens, "int", lead),
      ("behavior_logprobs", behavior_logprobs, "float", lead)):
    losses._check_array(name, x, kind, shape, positions)
  dense = (not renormalize) or tail == "ema_pg"
  if dense or (isinstance(statistics, (bool, np.bool_)) and statistics):
    sweep = "always"
  elif isinstance(statistics, (bool, np.bool_)):
    sweep = "never"
  else:
    losses._check_array("statistics", statistics, "mask", (), "a scalar")
    sweep = "cond"
  plan = dataclasses.replace(
      _make_plan(student_hidden, student_unembed, k=k, chunk_tokens=chunk_tokens,
                 chunk_vocab=chunk_vocab, entropy=True, dense_grad=dense, mesh=mesh,
                 data_axis=data_axis, tensor_axis=tensor_axis), sweep=sweep)

  # Masked positions get harmless constants, so nothing there can turn a zero gradient into NaN.
  mask = mask.astype(bool)
  m1 = mask[..., None]
  t_top = jnp.where(m1, teacher_topk.indices.astype(jnp.int32), jnp.arange(k, dtype=jnp.int32))
  zt_top = jnp.where(m1, lax.stop_gradient(teacher_topk.logits).astype(jnp.float32), 0.0)
  lse_t = jnp.where(mask, lax.stop_gradient(teacher_topk.logsumexp).astype(jnp.float32), 0.0)
  cols, valid = t_top, jnp.ones(t_top.shape, bool)
  zt_y = blp = None
  if sampled_tokens is not None:
    cols, valid = losses._with_sampled_slot(t_top, jnp.where(mask, sampled_tokens, 0))
    zt_y = jnp.where(mask, lax.stop_gradient(teacher_topk.sampled_logits).astype(jnp.float32), 0.0)
  if behavior_logprobs is not None:
    blp = jnp.where(mask, behavior_logprobs.astype(jnp.float32), 0.0)

  h, w_cols, w_mask = _flat_rows(plan, student_hidden, cols, mask)
  swept = jnp.asarray(statistics, bool) if sweep == "cond" else jnp.asarray(sweep == "always")
  stats = _student_stats(plan, h, student_unembed, w_cols, w_mask, swept)
  unflat = lambda x: _unflat(plan, x, tuple(lead))
  got, lse_s = unflat(stats.gathered), unflat(stats.lse)
  if not dense:
    lse_s = lax.stop_gradient(lse_s)  # the sparse backward drops the logsumexp's cotangent
  if sweep != "always":   # the renormalised loss does not read it: no NaN from a skipped sweep
    lse_s = jnp.where(swept, lse_s, 0.0)

  zs_sup, zt_sup = got[..., :k], zt_top
  if support == "teacher+sampled":  # the sampled token as a (K+1)-th slot when not in the top-K
    zs_sup = jnp.where(valid, got, -jnp.inf)
    zt_sup = jnp.where(valid, jnp.concatenate([zt_top, zt_y[..., None]], -1), -jnp.inf)
  per_token, aux_tok = losses._topk_token_terms(
      zs_sup, zt_sup, lse_s, lse_t, renormalize=renormalize, tail=tail,
      zs_y=None if zt_y is None else got[..., k], zt_y=zt_y,
      outside=None if zt_y is None else valid[..., k], behavior_logprobs=blp,
      tail_weight_clip=tail_weight_clip)
  if sweep == "never":
    aux_tok = {name: v for name, v in aux_tok.items() if name not in STATISTICS}
    return losses._reduce_token_terms(per_token, aux_tok, mask)
  s_top = unflat(stats.top_indices)
  hit = jnp.any(s_top[..., :, None] == t_top[..., None, :], axis=-2)
  aux_tok["kl/overlap"] = jnp.mean(hit.astype(jnp.float32), axis=-1)
  aux_tok["kl/student_entropy"] = lax.stop_gradient(unflat(stats.entropy))
  if sweep == "cond":
    aux_tok = {name: jnp.where(swept, v, jnp.nan) if name in STATISTICS else v
               for name, v in aux_tok.items()}
  return losses._reduce_token_terms(per_token, aux_tok, mask)
