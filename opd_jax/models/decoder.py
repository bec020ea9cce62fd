"""Flax NNX decoder for the Llama 3 / Qwen2 / Qwen3 families: layers, full pass, hidden states."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.models import attention
from opd_jax.models.config import ModelConfig
from opd_jax.sharding import BATCH_AXES

Array = jax.Array


def _per_feature(w: Array, ndim: int) -> Array:
  """Reshapes a [F] parameter to broadcast against [..., F] explicitly (rank promotion is off)."""
  return w.reshape((1,) * (ndim - 1) + w.shape)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel is [in, out] (the transpose of torch's weight)."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype):
    self.kernel = nnx.Param(jnp.zeros((in_features, out_features), dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

  def __call__(self, x: Array) -> Array:
    # As one [tokens, in] x [in, out] product: on [B, T, in] XLA's CPU backward materialises
    # transposed copies of the activations (half the MLP's backward time at B x T = 6144).
    kernel = self.kernel[...]
    y = jnp.einsum("nd,df->nf", x.reshape(-1, x.shape[-1]), kernel).reshape(
        x.shape[:-1] + kernel.shape[1:])
    if self.bias is not None:
      y = y + _per_feature(self.bias[...], y.ndim)
    return y


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32, scaled in the parameter dtype (as transformers does)."""

  def __init__(self, dim: int, *, eps: float, dtype):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    return _per_feature(self.weight[...], y.ndim) * y


class Embed(nnx.Module):
  """Token embedding table [V, D] (on a mesh its rows split over tensor and fsdp, its width
  whole: see partitioning; the lookup is a plain gather that XLA partitions by row)."""

  def __init__(self, vocab_size: int, dim: int, *, dtype):
    self.embedding = nnx.Param(jnp.zeros((vocab_size, dim), dtype))

  def __call__(self, tokens: Array) -> Array:
    return jnp.take(self.embedding[...], tokens, axis=0)


def constrain_rows(x: Array, axes: tuple[str, ...] = BATCH_AXES) -> Array:
  """`x` with its rows (leading axis) split over `axes` of the mesh being traced under.

  Under `jax.set_mesh` / `sharding.traced_under` of a mesh with the package's axes the decoder
  pins its hidden states' layout instead of leaving it to XLA's partitioner:
  - full passes and prefill (`axes` = BATCH_AXES): rows split over data and fsdp, so each
    device computes its own rows and the fsdp-sharded weights are gathered layer by layer.
    Left alone, the partitioner followed the weights' width split instead and computed every
    row of a mini-batch on every device (the memory plan found whole [64, T, 18944] MLP
    activations per device);
  - decoding (`axes` = DECODE_ROW_AXES): rows split over data only, whole over fsdp, so a
    matrix product with a weight whose input width is split over fsdp multiplies the matching
    slice of the activations and sums the partial products (activation-sized traffic). Rows
    split over fsdp would need the whole weight on every device at every step instead (XLA
    hoists those gathers out of the decode loop: a full copy of the model per device).
  Outside a mesh, or when the rows do not divide over `axes`, `x` is returned unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = tuple(a for a in axes if a in mesh.axis_names)
  if x.ndim == 0 or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x
  spec = jax.sharding.PartitionSpec(axes or None, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, spec)


# Mesh axes a decode step splits its hidden states' rows over (see `constrain_rows`).
DECODE_ROW_AXES = ("data",)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Rotary inverse frequencies [H/2] (float32), with Llama 3 scaling when configured."""
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  inv_freq = inv_freq.astype(np.float32)
  s = config.rope_scaling
  if s is None:
    return inv_freq
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  # Long wavelengths are divided by the factor, short ones kept, the band between interpolated.
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor))
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
  """cos and sin [..., H] (float32) for integer positions [...]."""
  pos = positions.astype(jnp.float32)[..., None]
  freqs = pos * jnp.asarray(inv_freq).reshape((1,) * positions.ndim + inv_freq.shape)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxTxNxH: Array, cos_BxTxH: Array, sin_BxTxH: Array) -> Array:
  """Rotates the halves of the head dimension (the transformers "rotate_half" convention)."""
  x = x_BxTxNxH.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos_BxTxH[:, :, None, :], sin_BxTxH[:, :, None, :]
  return (x * cos + rotated * sin).astype(x_BxTxNxH.dtype)


def attend(q_BxTxNxH: Array, k: Array, v: Array, valid_BxTxS, *, heads_major: bool = False,
           implementation: str = "xla", block_q: int = 512, block_kv: int = 512) -> Array:
  """Grouped-query attention with an explicit validity mask; scores and softmax in float32.

  Keys and values are [B, S, K, H] as the projections give them, or with `heads_major` laid out
  as the KV cache stores them: keys [B, K, S, H], values [B, K, H, S]. Both products then
  contract the operand's minor axis, which XLA's matrix products take as it is: decoding does
  not transpose the cache every step.

  Args:
    q_BxTxNxH: queries [B, T, N, H].
    k, v: keys and values (layout above).
    valid_BxTxS: a bool [B, T, S] mask, or (full pass, prefill) an `attention.CausalMask`.
    heads_major: keys/values in the cache's layout (decoding).
    implementation, block_q, block_kv: see `attention.attention` (ignored with heads_major).

  Returns:
    [B, T, N * H].
  """
  b, t, n, h = q_BxTxNxH.shape
  if heads_major:
    # Decoding: one query row against the cache. Its scores are [B, N, 1, S], already linear in
    # S, and the cache layout feeds the einsum without a transpose: blocks would only add work.
    if isinstance(valid_BxTxS, attention.CausalMask):
      valid_BxTxS = valid_BxTxS.dense()
    out = attention.xla_attention(q_BxTxNxH, k, v, valid_BxTxS, heads_major=True)
  else:
    out = attention.attention(q_BxTxNxH, k, v, valid_BxTxS, implementation=implementation,
                              block_q=block_q, block_kv=block_kv)
  return out.reshape(b, t, n * h)


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary embeddings and optional q/k RMSNorm (Qwen3)."""

  def __init__(self, config: ModelConfig):
    d, h, dt = config.hidden_size, config.head_dim, config.dtype
    self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, h
    self.attention_impl = config.attention_impl
    self.block_q, self.block_kv = config.attention_block_q, config.attention_block_kv
    self.q_proj = Linear(d, config.num_heads * h, use_bias=config.qkv_bias, dtype=dt)
    self.k_proj = Linear(d, config.num_kv_heads * h, use_bias=config.qkv_bias, dtype=dt)
    self.v_proj = Linear(d, config.num_kv_heads * h, use_bias=config.qkv_bias, dtype=dt)
    self.o_proj = Linear(config.num_heads * h, d, use_bias=config.o_bias, dtype=dt)
    self.q_norm = RMSNorm(h, eps=config.rms_norm_eps, dtype=dt) if config.qk_norm else None
    self.k_norm = RMSNorm(h, eps=config.rms_norm_eps, dtype=dt) if config.qk_norm else None

  def __call__(self, x_BxTxD: Array, cos: Array, sin: Array, valid_BxTxS: Array,
               kv_cache: tuple[Array, Array] | None = None, index: Array | None = None,
               attend_to_cache: bool = False) -> tuple[Array, tuple[Array, Array] | None]:
    """Returns the attention output and, when a cache is given, the cache with k, v written.

    With `kv_cache`, the new keys/values are written at slot `index` of its sequence axis;
    `attend_to_cache` then chooses whether the queries attend to the whole cache (decoding, mask
    over cache slots) or only to the new keys (prefill, mask over the new positions).
    """
    b, t, _ = x_BxTxD.shape
    # Decoding: the projections' outputs stay in the decode layout (rows whole over fsdp, see
    # constrain_rows); the cache, split by rows, then takes each device's rows by slicing.
    rows = (lambda y: constrain_rows(y, DECODE_ROW_AXES)) if attend_to_cache else (lambda y: y)
    q = rows(self.q_proj(x_BxTxD)).reshape(b, t, self.num_heads, self.head_dim)
    k = rows(self.k_proj(x_BxTxD)).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = rows(self.v_proj(x_BxTxD)).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    choice = dict(implementation=self.attention_impl, block_q=self.block_q,
                  block_kv=self.block_kv)
    if kv_cache is None:
      return self.o_proj(attend(q, k, v, valid_BxTxS, **choice)), None
    k_cache, v_cache = kv_cache         # [B, K, S, H] and [B, K, H, S]
    zero = jnp.zeros((), jnp.int32)
    k_cache = jax.lax.dynamic_update_slice(
        k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype), (zero, zero, index, zero))
    v_cache = jax.lax.dynamic_update_slice(
        v_cache, v.transpose(0, 2, 3, 1).astype(v_cache.dtype), (zero, zero, zero, index))
    if attend_to_cache:
      out = attend(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), valid_BxTxS,
                   heads_major=True)
      # Decoding: back to the decode layout before the output projection (see constrain_rows).
      out = constrain_rows(out, DECODE_ROW_AXES)
    else:
      out = attend(q, k, v, valid_BxTxS, **choice)
    return self.o_proj(out), (k_cache, v_cache)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: ModelConfig):
    d, f, dt, bias = config.hidden_size, config.intermediate_size, config.dtype, config.mlp_bias
    self.gate_proj = Linear(d, f, use_bias=bias, dtype=dt)
    self.up_proj = Linear(d, f, use_bias=bias, dtype=dt)
    self.down_proj = Linear(f, d, use_bias=bias, dtype=dt)

  def __call__(self, x: Array) -> Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: ModelConfig):
    eps, dt = config.rms_norm_eps, config.dtype
    self.input_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dt)
    self.self_attn = Attention(config)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dt)
    self.mlp = MLP(config)

  def __call__(self, x, cos, sin, valid, kv_cache=None, index=None, attend_to_cache=False):
    attn, kv_cache = self.self_attn(self.input_layernorm(x), cos, sin, valid, kv_cache, index,
                                    attend_to_cache)
    x = x + attn
    return x + self.mlp(self.post_attention_layernorm(x)), kv_cache


def stacked_layers(config: ModelConfig) -> DecoderLayer:
  """One DecoderLayer whose every parameter carries a leading layer axis: [L, ...] for L layers.

  Layer i's parameters are slice i of each array (what `Decoder.trunk` scans over).
  """
  graphdef, state = nnx.split(DecoderLayer(config))
  n = config.num_layers
  return nnx.merge(graphdef, jax.tree.map(
      lambda x: jnp.broadcast_to(x[None], (n,) + x.shape), state))


def _remat(body, policy: str):
  """`body` wrapped in jax.checkpoint as the ModelConfig.remat policy says (under grad only)."""
  if policy == "none":
    return body
  # "dots" saves the weight matmuls' outputs (no batch dimension in their contraction); the
  # attention products, which carry batch and head dimensions, are recomputed with the rest.
  saveable = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == "dots"
              else None)
  # prevent_cse=False: inside a scan, recomputation cannot be merged with the forward pass anyway.
  return jax.checkpoint(body, policy=saveable, prevent_cse=False)


class Decoder(nnx.Module):
  """The causal language model.

  Attribute names follow transformers' so that checkpoint names map one-to-one (see hf_io):
  embed_tokens, layers.self_attn.q_proj, ..., norm, lm_head. `layers` is ONE DecoderLayer whose
  parameters are stacked over a leading layer axis (`stacked_layers`; layer i is slice i, the
  checkpoint's model.layers.{i}.*). The full pass runs them by a `jax.lax.scan`, so that its
  compile time does not grow with depth; the cached passes run them one by one (see `trunk`).
  The constructor only allocates (kernels zero, norm scales one); get weights from
  `load_hf_checkpoint` or `init_model`, and build the structure alone with
  `nnx.eval_shape(lambda: Decoder(config))`.
  """

  def __init__(self, config: ModelConfig):
    self.config = config
    dt = config.dtype
    self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dt)
    self.layers = stacked_layers(config)
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dt)
    self.lm_head = (None if config.tie_word_embeddings else
                    Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dt))

  def trunk(self, tokens_BxT: Array, positions_BxT: Array, valid_BxTxS: Array,
            kv_cache: tuple[Array, Array] | None = None, index: Array | None = None,
            attend_to_cache: bool = False, layers: tuple[DecoderLayer, ...] | None = None):
    """Embeddings -> layers -> final norm; the layers run in one scan without a cache.

    Args:
      tokens_BxT, positions_BxT: token ids and their rotary positions.
      valid_BxTxS: which keys each query may attend to.
      kv_cache: None, or the cache as (keys, values): tuples of one array per layer, keys
        [B, K, S, H] and values [B, K, H, S] (see `KVCache`).
      index, attend_to_cache: as `Attention.__call__` takes them.
      layers: with a cache only: `unstack_layers(self)`, computed once outside a decode loop
        (None: computed here).

    Returns:
      (hidden [B, T, D] after the final norm, the updated (keys, values) or None).
    """
    cos, sin = rope_cos_sin(positions_BxT, rope_inv_freq(self.config))
    decoding = kv_cache is not None and attend_to_cache
    rows = DECODE_ROW_AXES if decoding else BATCH_AXES
    x = constrain_rows(self.embed_tokens(tokens_BxT), rows)
    layer_def, layer_params = nnx.split(self.layers)
    if kv_cache is None:
      # The scan body sees one layer's parameters as a plain pytree; merging rebuilds the module.
      # The carry is pinned to its row split on the way in and out (see `constrain_rows`).
      def body(x, params):
        layer = nnx.merge(layer_def, params)
        return constrain_rows(layer(constrain_rows(x), cos, sin, valid_BxTxS)[0]), None
      x, _ = jax.lax.scan(_remat(body, self.config.remat), x, layer_params)
      return self.norm(x), None

    # The cached passes (prefill, decoding; never differentiated) run the layers one by one, each
    # with its own parameters and its own cache arrays, so XLA feeds the weights to the matrix
    # products and writes the new keys into the cache in place. In a scan over the stacked arrays
    # (measured on CPU) it copied every layer's weights and cache slice before use, and a decode
    # step took ~1.2x the time. Under jit each slice below is one copy of the layer's weights: a
    # decode loop passes `layers` sliced once before the loop.
    if layers is None:
      layers = unstack_layers(self)
    k_layers, v_layers = kv_cache
    new_k, new_v = [], []
    for layer, k, v in zip(layers, k_layers, v_layers, strict=True):
      x, (k, v) = layer(x, cos, sin, valid_BxTxS, (k, v), index, attend_to_cache)
      x = constrain_rows(x, rows)
      new_k.append(k)
      new_v.append(v)
    return self.norm(x), (tuple(new_k), tuple(new_v))


def unstack_layers(model: Decoder) -> tuple[DecoderLayer, ...]:
  """The model's layers as separate modules: layer i holds slice i of every stacked parameter.

  Under jit each slice is a copy of that layer's weights. XLA does not hoist slices out of a
  loop, so a decode loop should call this once before the loop and pass the result to every
  `decode_step` (as the sampler does): sliced inside the loop, the weights are copied again at
  every step.
  """
  layer_def, layer_params = nnx.split(model.layers)
  return tuple(nnx.merge(layer_def, jax.tree.map(lambda p, i=i: p[i], layer_params))
               for i in range(model.config.num_layers))


def unembedding(model: Decoder) -> Array:
  """The output projection [D, V]: the embedding's transpose when tied, else lm_head's kernel."""
  if model.lm_head is None:
    return model.embed_tokens.embedding[...].T
  return model.lm_head.kernel[...]


def logits_from_hidden(model: Decoder, hidden: Array) -> Array:
  """float32 logits [..., V] from final hidden states [..., D] (as returned with return_hidden)."""
  return jnp.einsum("...d,dv->...v", hidden, unembedding(model),
                    preferred_element_type=jnp.float32)


def _concrete(x) -> np.ndarray | None:
  """x's values on the host, or None under jit (a tracer) or when another process holds part."""
  if isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  return np.asarray(x)


def check_token_ids(tokens, vocab_size: int | None = None, *, name: str = "tokens") -> None:
  """Token ids must be an integer array, and (when concrete) every id must lie in [0, vocab).

  Under jit the values are unknown, so only the dtype is checked there. An id outside the
  vocabulary is not an error inside XLA: the embedding lookup returns NaN for it.
  """
  if not hasattr(tokens, "dtype"):
    raise ValueError(f"{name} must be an integer array (numpy or jax), got {type(tokens).__name__}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}; accepted: any "
                     "integer dtype (convert with .astype(np.int32))")
  values = None if vocab_size is None else _concrete(tokens)
  if values is None or values.size == 0:
    return
  bad = (values < 0) | (values >= vocab_size)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    at = (f"row {where[0]}, position {where[1]}" if len(where) == 2 else
          f"position {', '.join(map(str, where))}")
    raise ValueError(f"{name} holds ids outside the vocabulary [0, {vocab_size}): "
                     f"{int(values[where])} at {at} ({int(bad.sum())} such ids); padding "
                     "positions too must hold a valid id (e.g. 0)")


def check_tokens(tokens: Array, attention_mask: Array, *, vocab_size: int | None = None,
                 left_padded: bool = False,
                 names: tuple[str, str] = ("tokens", "attention_mask")) -> None:
  """Checks a batch of token ids and its mask, as forward, prefill and the sampler take them.

  Always (also under jit): tokens is a [B, T] integer array, the mask has the same shape and is
  bool or integer. When the arrays are concrete (not traced, and held by this process alone),
  also their values: ids in [0, vocab_size) (with vocab_size given), integer masks only 0 or 1,
  and with `left_padded` every row some padding (False) first, then only real tokens (True), at
  least one of them. Inside jit none of the value checks can run.

  Args:
    tokens: int [B, T] token ids.
    attention_mask: bool (or 0/1 integer) [B, T], true on real tokens.
    vocab_size: the model's vocabulary size (None: ids are not range-checked).
    left_padded: require left padding and at least one real token per row.
    names: the two arguments' names, for the error messages.

  Raises:
    ValueError: naming the argument, the problem with an example row/position, and what is
      accepted.
  """
  tokens_name, mask_name = names
  for name, x in ((tokens_name, tokens), (mask_name, attention_mask)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"{name} must be an array (numpy or jax), got {type(x).__name__}")
  if tokens.ndim != 2:
    raise ValueError(f"{tokens_name} must have shape [B, T] (batch, length), got "
                     f"{tuple(tokens.shape)}")
  if tuple(attention_mask.shape) != tuple(tokens.shape):
    raise ValueError(f"{mask_name} must have the {tokens_name}' shape {tuple(tokens.shape)}, "
                     f"got {tuple(attention_mask.shape)}")
  mask_dtype = attention_mask.dtype
  if not (mask_dtype == jnp.bool_ or jnp.issubdtype(mask_dtype, jnp.integer)):
    raise ValueError(f"{mask_name} must be bool (True on real tokens), got dtype {mask_dtype}; "
                     "accepted: bool, or integers 0/1 as tokenizers return")
  check_token_ids(tokens, vocab_size, name=tokens_name)
  mask = _concrete(attention_mask)
  if mask is None:
    return
  if mask.dtype != np.bool_:
    bad = (mask != 0) & (mask != 1)
    if bad.any():
      b, t = (int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"{mask_name} must be bool or 0/1, got {mask[b, t]} at row {b}, "
                       f"position {t}")
    mask = mask.astype(bool)
  if not left_padded:
    return
  if mask.shape[0] == 0:
    raise ValueError(f"{tokens_name} must hold at least one row, got shape {mask.shape}")
  empty = ~mask.any(axis=1)
  if empty.any():
    rows = np.flatnonzero(empty).tolist() if mask.shape[1] else "all"
    raise ValueError(f"{mask_name}: every row needs at least one real token (True); empty rows: "
                     f"{rows}")
  gaps = mask[:, :-1] & ~mask[:, 1:]          # a real token followed by padding
  if gaps.any():
    b, t = (int(i) for i in np.argwhere(gaps)[0])
    raise ValueError(
        f"{mask_name} must be left-padded: each row padding (False) first, then only real "
        f"tokens (True); row {b} has a real token at position {t} followed by padding at "
        f"{t + 1}. Right padding or holes would make the model continue from a padding slot: "
        "move every row's padding to its left")


def positions_from_mask(attention_mask: Array) -> Array:
  """Rotary position of each token: its index among the row's valid tokens (0 on padding)."""
  mask = attention_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def positions_from_segments(segment_ids: Array) -> Array:
  """Rotary position of each token of packed rows: its index within its segment (a run of equal
  ids; 0 where a run starts)."""
  t = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate([jnp.ones(segment_ids.shape[:-1] + (1,), bool),
                            segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)


def causal_valid(attention_mask: Array) -> attention.CausalMask:
  """Query t may attend key s when s <= t and key s is not padding; in factored form (a
  CausalMask over the [B, T] mask; `.dense()` gives the [B, T, T] array), so that a blockwise
  or fused attention never builds the [T, T] mask."""
  return attention.CausalMask(attention_mask.astype(bool))


def with_config(model: Decoder, config: ModelConfig) -> Decoder:
  """The model's parameters (shared, not copied) under `config`, which may differ from the
  model's config only in runtime choices (remat and the attention fields): these are static,
  part of the graph definition, so a model loaded from config.json takes them this way.

  Raises:
    ValueError: `config` describes another architecture or dtype.
  """
  runtime = dict(remat=config.remat, attention_impl=config.attention_impl,
                 attention_block_q=config.attention_block_q,
                 attention_block_kv=config.attention_block_kv)
  if dataclasses.replace(model.config, **runtime) != config:
    raise ValueError(f"with_config changes only remat and the attention settings; {config} "
                     f"differs from the model's {model.config} in its architecture or dtype")
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(config)))
  return nnx.merge(graphdef, nnx.state(model))


def forward(model: Decoder, tokens: Array, attention_mask: Array, *,
            return_hidden: bool = False, segment_ids: Array | None = None) -> Array:
  """Full causal pass (no cache), for scoring and tests; call it under jax.jit or nnx.jit.

  Args:
    model: the Decoder.
    tokens: int [B, T] ids in [0, V), padding positions included.
    attention_mask: bool (or 0/1 integer) [B, T], true on real tokens. Padding may sit anywhere
      (left of a prompt, right of a response): rotary positions are counted per row over the real
      tokens, and no token attends to padding.
    return_hidden: return the final hidden states [B, T, D] (after the last RMSNorm, before the
      unembedding, in the model dtype) instead of the logits.
    segment_ids: packed rows: int [B, T], the sequence each token belongs to (> 0; runs of equal
      ids, 0 on padding, where `attention_mask` must be false). A token attends only to its own
      sequence and its rotary position counts from its sequence's first token.

  Returns:
    float32 logits [B, T, V] (or the hidden states). Values at padding positions are finite but
    meaningless.

  Raises:
    ValueError: bad shapes or dtypes; when called outside jit also ids outside [0, V) or a mask
      other than 0/1 (see `check_tokens`).
  """
  check_tokens(tokens, attention_mask, vocab_size=model.config.vocab_size)
  if segment_ids is None:
    positions, mask = positions_from_mask(attention_mask), causal_valid(attention_mask)
  else:
    positions, mask = positions_from_segments(segment_ids), attention.packed_mask(segment_ids)
  hidden, _ = model.trunk(tokens, positions, mask)
  return hidden if return_hidden else logits_from_hidden(model, hidden)
