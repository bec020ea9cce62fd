"""Causal grouped-query attention: whole-matrix einsum, blockwise online softmax, fused kernels."""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from opd_jax.models.config import ATTENTION_IMPLEMENTATIONS
from opd_jax.sharding import BATCH_AXES, MESH_AXES

Array = jax.Array

# The values of ModelConfig.attention_impl. "xla": one einsum over the whole [T, S] score matrix;
# "blockwise": online softmax over key blocks, never holding [T, S] (pure JAX, every backend);
# "cudnn": jax.nn.dot_product_attention's cuDNN flash kernel (GPU); "splash": the Pallas splash
# attention kernel (TPU); "auto": see `resolve_implementation`.
IMPLEMENTATIONS = ATTENTION_IMPLEMENTATIONS
# "auto" off GPU/TPU (and where a fused kernel does not apply): the einsum while the key length
# is below this, blockwise from it. Short passes keep the einsum (a 20M-parameter model's
# forward at 8 x 256 tokens ran ~20% faster with it on CPU), and its [T, S] scores stay small
# (1024 x 1024 float32 is 4 MB per head and row).
AUTO_BLOCKWISE_MIN_KEYS = 1024
# Attention scores of masked keys. Finite, so that a query row with no valid key (a left-padding
# position) gives a finite softmax instead of NaN; such rows are never used.
MASKED_SCORE = -1e30
# The splash kernel's tile along both sequences: lengths are padded up to a multiple of it.
_SPLASH_BLOCK = 128


@flax.struct.dataclass
class CausalMask:
  """The mask of a causal pass over one sequence per row, or over packed rows, in factored form
  (never [T, T] in memory).

  Query t may attend key s when s <= t and key s is a real token; with `segment_ids` (packed
  rows: several sequences side by side) also only when both are in the same segment. Queries
  and keys are the same T positions (a full pass or a prefill).
  """
  key_valid: Array                 # [B, T] bool: position holds a real token
  # [B, T] int32 or None: the sequence each position belongs to (> 0), 0 on padding.
  segment_ids: Array | None = None

  def dense(self) -> Array:
    """The same mask as a [B, T, T] bool array."""
    t = self.key_valid.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    valid = causal[None, :, :] & self.key_valid.astype(bool)[:, None, :]
    if self.segment_ids is not None:
      valid &= self.segment_ids[:, :, None] == self.segment_ids[:, None, :]
    return valid


def packed_mask(segment_ids: Array) -> CausalMask:
  """The CausalMask of packed rows: `segment_ids` [B, T] int, 0 on padding."""
  segment_ids = segment_ids.astype(jnp.int32)
  return CausalMask(segment_ids > 0, segment_ids)


def check_implementation(name: str) -> None:
  """Raises ValueError unless `name` is one of IMPLEMENTATIONS."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl={name!r} is not an attention implementation; accepted: "
                     f"{', '.join(IMPLEMENTATIONS)}")


def _cudnn_applies(dtype, head_dim: int) -> bool:
  # cuDNN's flash attention takes float16 / bfloat16 only, head_dim a multiple of 8 up to 128
  # (256 from Hopper on; 128 is the bound that holds on every GPU).
  return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and \
      head_dim % 8 == 0 and head_dim <= 128


def _context_mesh():
  """The mesh set with `jax.set_mesh` while tracing, if it has the package's axes, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or any(a not in mesh.axis_names for a in MESH_AXES):
    return None
  return mesh


def resolve_implementation(implementation: str, *, kv_len: int, dtype, head_dim: int,
                           factored: bool, backend: str | None = None,
                           segmented: bool = False) -> str:
  """The implementation "auto" stands for; any other name is returned unchanged.

  "auto": on GPU the cuDNN kernel for float16/bfloat16 with head_dim a multiple of 8 up to 128;
  on TPU the splash kernel when it can be partitioned (one device, or traced under
  `jax.set_mesh` of a (data, fsdp, tensor) mesh: a Pallas kernel is opaque to XLA's
  partitioner, which would otherwise gather its operands whole); both only for a full causal
  pass (a `CausalMask`; cuDNN not for packed rows, whose segments it cannot take through
  `jax.nn.dot_product_attention`). Otherwise the whole-matrix einsum for fewer than
  AUTO_BLOCKWISE_MIN_KEYS keys, blockwise from there.

  Args:
    implementation: one of IMPLEMENTATIONS.
    kv_len: S, the number of keys.
    dtype: the query/key/value dtype.
    head_dim: H.
    factored: the mask is a `CausalMask` (the fused kernels take no other mask).
    backend: "cpu", "gpu" or "tpu"; default `jax.default_backend()`.
    segmented: the CausalMask has segment ids (packed rows).

  Returns:
    One of "xla", "blockwise", "cudnn", "splash".
  """
  check_implementation(implementation)
  if implementation != "auto":
    return implementation
  backend = backend or jax.default_backend()
  if factored and not segmented and backend == "gpu" and _cudnn_applies(dtype, head_dim):
    return "cudnn"
  if factored and backend == "tpu" and (jax.device_count() == 1 or _context_mesh() is not None):
    return "splash"
  return "blockwise" if kv_len >= AUTO_BLOCKWISE_MIN_KEYS else "xla"


def attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask, *,
              implementation: str = "auto", block_q: int = 512, block_kv: int = 512) -> Array:
  """Grouped-query attention of N query heads over K key/value heads (N % K == 0).

  Scores and softmax statistics are float32; query row t of head n uses key/value head
  n // (N / K). A query row without any valid key gets a finite, meaningless output.

  Args:
    q_BxTxNxH: queries [B, T, N, H] (rotary already applied).
    k_BxSxKxH, v_BxSxKxH: keys and values [B, S, K, H].
    mask: a `CausalMask` (T == S), or a bool [B, T, S] array (true: query t may attend key s).
    implementation: one of IMPLEMENTATIONS; the fused ones need a `CausalMask`.
    block_q, block_kv: query / key block lengths of "blockwise" (clipped to T / S).

  Returns:
    [B, T, N, H] in the values' dtype.

  Raises:
    ValueError: an unknown implementation, or a fused one with a dense mask.
    RuntimeError: a fused kernel selected on a backend that lacks it.
  """
  factored = isinstance(mask, CausalMask)
  segmented = factored and mask.segment_ids is not None
  impl = resolve_implementation(implementation, kv_len=k_BxSxKxH.shape[1],
                                dtype=q_BxTxNxH.dtype, head_dim=q_BxTxNxH.shape[-1],
                                factored=factored, segmented=segmented)
  if impl in ("cudnn", "splash") and not factored:
    raise ValueError(f"attention_impl={impl!r} takes the causal mask of a full pass "
                     "(CausalMask), not an explicit [B, T, S] mask; use 'xla' or 'blockwise'")
  if impl == "cudnn" and segmented:
    raise ValueError("attention_impl='cudnn' cannot keep packed sequences apart (no segment "
                     "ids in jax.nn.dot_product_attention); use 'auto', 'blockwise' or 'xla' for "
                     "packed rows, or config.opt.packing='trim' (one sequence per row)")
  if impl == "xla":
    return xla_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask.dense() if factored else mask)
  if impl == "blockwise":
    return blockwise_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, block_q=block_q,
                               block_kv=block_kv)
  if impl == "cudnn":
    return cudnn_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
  return splash_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)


# ----------------------------------------------------------------------------------------------
# whole-matrix einsum
# ----------------------------------------------------------------------------------------------


def xla_attention(q_BxTxNxH: Array, k: Array, v: Array, valid_BxTxS: Array, *,
                  heads_major: bool = False) -> Array:
  """One einsum over the whole [T, S] score matrix, masked with an explicit validity mask.

  Keys and values are [B, S, K, H], or with `heads_major` laid out as the KV cache stores them:
  keys [B, K, S, H], values [B, K, H, S]. Both products then contract the operand's minor axis,
  which XLA's matrix products take as it is: decoding does not transpose the cache every step.

  Returns:
    [B, T, N, H] in the values' dtype.
  """
  b, t, n, h = q_BxTxNxH.shape
  kv_heads = k.shape[1 if heads_major else 2]
  q = q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h)
  if heads_major:
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
  else:
    # Heads-major operands for a full pass too: with queries [B, K, G, T, H] and keys
    # [B, K, S, H] both products contract minor axes and the [T, S] scores are never
    # transposed (measured on CPU: about 8 % less time for a whole 8 x 256 forward pass).
    q = q.transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (h ** -0.5)
  scores = jnp.where(valid_BxTxS[:, None, None, :, :], scores, MASKED_SCORE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  if heads_major:
    return jnp.einsum("bkgts,bkhs->btkgh", probs, v).reshape(b, t, n, h)
  out = jnp.einsum("bkgts,bksh->bkgth", probs, v)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# ----------------------------------------------------------------------------------------------
# blockwise (online softmax, flash-style), with its own backward pass
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Blocks:
  """Static layout of one blockwise call (hashable: a non-differentiable custom_vjp argument)."""
  t: int                    # real query length
  s: int                    # real key length
  bq: int
  bk: int
  causal: bool              # mask is a CausalMask: skip key blocks past the diagonal
  segmented: bool = False   # causal, and the mask array holds segment ids (packed rows)

  @property
  def nq(self) -> int:
    return -(-self.t // self.bq)

  @property
  def nk(self) -> int:
    return -(-self.s // self.bk)


def _pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _block_scores(lay: _Blocks, q_i, k_j, mask, i, j, scale):
  """Masked float32 scores [B, K, G, bq, bk] of query block i against key block j, and the
  validity used (masked entries hold MASKED_SCORE; keys past S hold -inf so they never count)."""
  s = jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * scale
  q_idx = i * lay.bq + jnp.arange(lay.bq)
  k_idx = j * lay.bk + jnp.arange(lay.bk)
  if lay.segmented:
    key_seg = jax.lax.dynamic_slice_in_dim(mask, j * lay.bk, lay.bk, axis=1)     # [B, bk]
    query_seg = jax.lax.dynamic_slice_in_dim(mask, i * lay.bq, lay.bq, axis=1)   # [B, bq]
    valid = ((k_idx[None, :] <= q_idx[:, None])[None] & (key_seg > 0)[:, None, :]
             & (query_seg[:, :, None] == key_seg[:, None, :]))
  elif lay.causal:
    key_valid = jax.lax.dynamic_slice_in_dim(mask, j * lay.bk, lay.bk, axis=1)   # [B, bk]
    valid = (k_idx[None, :] <= q_idx[:, None])[None] & key_valid[:, None, :]
  else:
    valid = jax.lax.dynamic_slice(mask, (0, i * lay.bq, j * lay.bk),
                                  (mask.shape[0], lay.bq, lay.bk))
  valid = valid[:, None, None]                                         # [B, 1, 1, bq, bk]
  s = jnp.where(valid, s, MASKED_SCORE)
  in_range = (k_idx < lay.s)[None, None, None, None, :]
  return jnp.where(in_range, s, -jnp.inf), valid


def _kv_blocks_for(lay: _Blocks, i):
  """How many key blocks query block i visits (causal: up to the one holding its last query)."""
  if not lay.causal:
    return lay.nk
  return jnp.minimum(lay.nk, ((i + 1) * lay.bq - 1) // lay.bk + 1)


def _flash_forward(lay: _Blocks, q, k, v, mask):
  """Blockwise forward on padded, heads-major operands. Returns out [B,K,G,Tp,H] (v's dtype)
  and each query row's float32 score max and softmax denominator [B,K,G,Tp]. (Not their
  log-sum-exp: for a row without valid keys, max + log(sum) rounds back to MASKED_SCORE.)"""
  b, kh, g, _, h = q.shape
  scale = h ** -0.5

  def one_query_block(i):
    q_i = jax.lax.dynamic_slice_in_dim(q, i * lay.bq, lay.bq, axis=3)

    def body(j, carry):
      m, l, acc = carry
      k_j = jax.lax.dynamic_slice_in_dim(k, j * lay.bk, lay.bk, axis=2)
      v_j = jax.lax.dynamic_slice_in_dim(v, j * lay.bk, lay.bk, axis=2)
      s, _ = _block_scores(lay, q_i, k_j, mask, i, j, scale)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(s - m_new[..., None])
      l = alpha * l + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype), v_j,
                      preferred_element_type=jnp.float32)
      return m_new, l, alpha[..., None] * acc + pv

    init = (jnp.full((b, kh, g, lay.bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, kh, g, lay.bq), jnp.float32),
            jnp.zeros((b, kh, g, lay.bq, h), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, _kv_blocks_for(lay, i), body, init)
    return (acc / l[..., None]).astype(v.dtype), m, l

  out, m, l = jax.lax.map(one_query_block, jnp.arange(lay.nq))   # [nq, B, K, G, bq, (H)]
  rows = lambda x: jnp.moveaxis(x, 0, 3).reshape((b, kh, g, lay.nq * lay.bq) + x.shape[5:])
  return rows(out), rows(m), rows(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(lay: _Blocks, q, k, v, mask):
  return _flash_forward(lay, q, k, v, mask)[0]


def _flash_fwd(lay, q, k, v, mask):
  out, m, l = _flash_forward(lay, q, k, v, mask)
  return out, (q, k, v, mask, out, m, l)


def _flash_bwd(lay, residuals, d_out):
  """Recomputes each score block from q, k and the saved row max and denominator (flash
  attention's backward): memory O(T) besides one [bq, bk] block, never the [T, S] probabilities."""
  q, k, v, mask, out, row_max, row_sum = residuals
  b, kh, g, tp, h = q.shape
  scale = h ** -0.5
  # D_t = sum_h dO * O: the softmax backward's row term, sum_s P_ts dP_ts.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

  def one_key_block(dq, j):
    k_j = jax.lax.dynamic_slice_in_dim(k, j * lay.bk, lay.bk, axis=2)
    v_j = jax.lax.dynamic_slice_in_dim(v, j * lay.bk, lay.bk, axis=2)

    def body(i, carry):
      dq, dk, dv = carry
      rows = lambda x: jax.lax.dynamic_slice_in_dim(x, i * lay.bq, lay.bq, axis=3)
      q_i, do_i, delta_i = rows(q), rows(d_out), rows(delta)
      s, valid = _block_scores(lay, q_i, k_j, mask, i, j, scale)
      p = jnp.exp(s - rows(row_max)[..., None]) / rows(row_sum)[..., None]
      dv = dv + jnp.einsum("bkgqs,bkgqh->bksh", p.astype(do_i.dtype), do_i,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkgqh,bksh->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
      # Masked scores are constants: no gradient flows through them.
      ds = jnp.where(valid, p * (dp - delta_i[..., None]), 0.0) * scale
      dq_i = jnp.einsum("bkgqs,bksh->bkgqh", ds.astype(k_j.dtype), k_j,
                        preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_slice_in_dim(dq, rows(dq) + dq_i, i * lay.bq, axis=3)
      dk = dk + jnp.einsum("bkgqs,bkgqh->bksh", ds.astype(q_i.dtype), q_i,
                           preferred_element_type=jnp.float32)
      return dq, dk, dv

    # Causal: query blocks that end before this key block starts see none of it.
    first = (j * lay.bk) // lay.bq if lay.causal else 0
    zeros = jnp.zeros((b, kh, lay.bk, h), jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(first, lay.nq, body, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(one_key_block, jnp.zeros(q.shape, jnp.float32),
                              jnp.arange(lay.nk))
  kv_shape = (b, kh, lay.nk * lay.bk, h)
  dk = jnp.moveaxis(dk, 0, 2).reshape(kv_shape)
  dv = jnp.moveaxis(dv, 0, 2).reshape(kv_shape)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask, *,
                        block_q: int = 512, block_kv: int = 512) -> Array:
  """Online-softmax attention over [block_q, block_kv] score blocks; never holds [T, S].

  Forward: for each query block a loop over key blocks keeps a float32 running max, sum and
  weighted value sum. Backward (a custom VJP): recomputes each score block from the saved
  per-row max and denominator, so memory grows as T + S, not T * S. With a `CausalMask`, key
  blocks past a query block's last row are skipped (half the work of the einsum) and the mask
  is built per block from the [B, T] key validity.

  Args:
    q_BxTxNxH: queries [B, T, N, H].
    k_BxSxKxH, v_BxSxKxH: keys and values [B, S, K, H].
    mask: a `CausalMask` (T == S) or a bool [B, T, S] array.
    block_q, block_kv: block lengths (clipped to T / S; need not divide them).

  Returns:
    [B, T, N, H] in the values' dtype. With a dense mask, equal to `xla_attention` on every row
    (a row without valid keys averages all S values, as there); with a `CausalMask`, such rows
    (padding queries) average the values of the blocks they visit: finite, never used.
  """
  b, t, n, h = q_BxTxNxH.shape
  s, kv_heads = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
  for name, value in (("block_q", block_q), ("block_kv", block_kv)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"attention {name}={value!r}; accepted: a positive int")
  causal = isinstance(mask, CausalMask)
  if causal and t != s:
    raise ValueError(f"a CausalMask needs as many queries as keys, got T={t}, S={s}")
  segmented = causal and mask.segment_ids is not None
  lay = _Blocks(t=t, s=s, bq=min(block_q, t), bk=min(block_kv, s), causal=causal,
                segmented=segmented)
  tp, sp = lay.nq * lay.bq, lay.nk * lay.bk
  q = q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
  q = _pad_axis(q, 3, tp)
  k = _pad_axis(k_BxSxKxH.transpose(0, 2, 1, 3), 2, sp)
  v = _pad_axis(v_BxSxKxH.transpose(0, 2, 1, 3), 2, sp)
  if segmented:
    m = _pad_axis(mask.segment_ids.astype(jnp.int32), 1, max(tp, sp), 0)
  elif causal:
    m = _pad_axis(mask.key_valid.astype(bool), 1, max(tp, sp), False)
  else:
    m = _pad_axis(_pad_axis(mask.astype(bool), 1, tp, False), 2, sp, False)
  out = _flash(lay, q, k, v, m)[:, :, :, :t]                       # [B, K, G, T, H]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# ----------------------------------------------------------------------------------------------
# fused kernels (GPU: cuDNN; TPU: Pallas splash attention)
# ----------------------------------------------------------------------------------------------


def _require_backend(impl: str, backend: str) -> None:
  if jax.default_backend() != backend:
    raise RuntimeError(f"attention_impl={impl!r} needs a {backend.upper()} backend, but JAX runs "
                       f"on {jax.default_backend()!r}; use 'auto', 'blockwise' or 'xla' here")


def cudnn_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array,
                    mask: CausalMask) -> Array:
  """cuDNN's fused flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`).

  cuDNN masks padding only at the end of a row (sequence lengths), so each row is rotated to
  start at its first real token, run with a causal + padding mask, and rotated back. Exact when
  each row's real tokens form one contiguous run (left and/or right padding, no holes), as in
  every pass the sampler and the trainer make. Rotary embeddings are already applied, so the
  rotation changes no position. Needs float16/bfloat16 and head_dim a multiple of 8 (<= 128;
  <= 256 from Hopper on).

  Returns:
    [B, T, N, H]. Padding queries get finite, meaningless outputs.
  """
  _require_backend("cudnn", "gpu")
  valid = mask.key_valid.astype(bool)
  b, t = valid.shape
  start = jnp.argmax(valid, axis=1).astype(jnp.int32)            # first real token (0: none)
  count = jnp.maximum(jnp.sum(valid, axis=1, dtype=jnp.int32), 1)
  ar = jnp.arange(t, dtype=jnp.int32)[None, :]
  to_front = ((ar + start[:, None]) % t)[:, :, None, None]       # row r, slot t' <- t' + start
  back = ((ar - start[:, None]) % t)[:, :, None, None]
  take = lambda x, idx: jnp.take_along_axis(x, idx, axis=1)
  out = jax.nn.dot_product_attention(
      take(q_BxTxNxH, to_front), take(k_BxSxKxH, to_front), take(v_BxSxKxH, to_front),
      is_causal=True, query_seq_lengths=count, key_value_seq_lengths=count,
      implementation="cudnn")
  return take(out, back)


def splash_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array,
                     mask: CausalMask, *, interpret: bool = False) -> Array:
  """The Pallas splash attention kernel (TPU), causal, with padding as a segment id.

  Real tokens are segment 1 (packed rows: their own segment ids) and padding segment 0; the
  kernel's causal mask and-ed with "same segment" is exactly the decoder's mask for every real query (any padding layout), and padding
  queries attend padding keys (at least themselves), so no row is empty. Lengths are padded to a
  multiple of 128 (the kernel's tile). Queries are scaled by 1/sqrt(H) here (the kernel does not
  scale). Each [batch row, key/value head] pair is one multi-query kernel call (vmapped). Traced
  under `jax.set_mesh` of a (data, fsdp, tensor) mesh, the call runs per device in a
  `jax.shard_map`: rows split over data and fsdp, key/value heads over tensor (each where it
  divides); without one, XLA cannot partition the kernel and gathers its operands.

  Args:
    q_BxTxNxH, k_BxSxKxH, v_BxSxKxH: as in `attention`.
    mask: the CausalMask.
    interpret: run the kernel in the Pallas interpreter (any backend; for tests).

  Returns:
    [B, T, N, H] in the values' dtype.
  """
  if not interpret:
    _require_backend("splash", "tpu")
  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  b, t, n, h = q_BxTxNxH.shape
  kv_heads = k_BxSxKxH.shape[2]
  g = n // kv_heads
  tp = -(-t // _SPLASH_BLOCK) * _SPLASH_BLOCK
  segments = mask.key_valid.astype(jnp.int32) if mask.segment_ids is None else mask.segment_ids
  segments = _pad_axis(segments.astype(jnp.int32), 1, tp, 0)            # [B, Tp]
  q = (q_BxTxNxH * jnp.asarray(h ** -0.5, q_BxTxNxH.dtype)).reshape(b, t, kv_heads, g, h)
  q = _pad_axis(q.transpose(0, 2, 3, 1, 4), 3, tp)                       # [B, K, G, Tp, H]
  k = _pad_axis(k_BxSxKxH.transpose(0, 2, 1, 3), 2, tp)                  # [B, K, Tp, H]
  v = _pad_axis(v_BxSxKxH.transpose(0, 2, 1, 3), 2, tp)
  kernel = splash.make_splash_mqa_single_device(
      mask=splash.MultiHeadMask([splash.CausalMask((tp, tp))] * g), interpret=interpret)

  def one(q_GxTxH, k_TxH, v_TxH, seg_T):
    return kernel(q_GxTxH, k_TxH, v_TxH, segment_ids=splash.SegmentIds(seg_T, seg_T))

  run = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))
  mesh = _context_mesh()
  if mesh is not None:
    rows = BATCH_AXES if b % math.prod(mesh.shape[a] for a in BATCH_AXES) == 0 else None
    heads = "tensor" if kv_heads % mesh.shape["tensor"] == 0 else None
    run = jax.shard_map(run, mesh=mesh, in_specs=(
        PartitionSpec(rows, heads), PartitionSpec(rows, heads), PartitionSpec(rows, heads),
        PartitionSpec(rows)), out_specs=PartitionSpec(rows, heads), check_vma=False)
  out = run(q, k, v, segments)[:, :, :, :t]                                # [B, K, G, T, H]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(v_BxSxKxH.dtype)
