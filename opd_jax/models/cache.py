"""Fixed-length KV cache (a pytree) with prefill and one-token decode steps for the Decoder.

The cache can be carried through `jax.lax.while_loop` and donated. Typical use, with the model
passed functionally:

    graphdef, state = nnx.split(model)

    @jax.jit
    def generate(state, prompts_BxP, prompt_mask_BxP):
      model = nnx.merge(graphdef, state)
      cache = init_cache(model.config, prompts_BxP.shape[0], max_len)
      hidden, cache = prefill(model, prompts_BxP, prompt_mask_BxP, cache, return_hidden=True)
      logits_BxV = logits_from_hidden(model, hidden[:, -1])    # last prompt position
      def body(carry):
        ...
        logits_BxV, cache = decode_step(model, next_token_B, cache)
        ...
      return jax.lax.while_loop(cond, body, init)

Slots 0..P-1 hold the (left-padded) prompt; decode step i writes slot P+i. Rotary positions are
per row: a prompt with n real tokens puts its first generated token at position n.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from opd_jax.models.config import ModelConfig
from opd_jax.models.decoder import (Decoder, DecoderLayer, causal_valid, check_token_ids,
                                    check_tokens, logits_from_hidden, positions_from_mask)
from opd_jax.sharding import BATCH_AXES, check_mesh

Array = jax.Array


@flax.struct.dataclass
class KVCache:
  """Per-layer keys/values, heads-major, plus per-row bookkeeping; S = max_len slots.

  S is fixed for a given cache (a fixed-shape pytree); `grow_cache` makes a longer copy.

  Keys are [B, K, S, H] and values [B, K, H, S] (K key/value heads, H head dim): the layouts the
  decode step's two attention products read without transposing the cache. One array per layer,
  not one stacked [L, ...] array: the cached passes run the layers one by one (see
  `Decoder.trunk`), and each writes its new keys into its own array in place.
  """
  k: tuple[Array, ...]      # one [B, K, S, H] array per layer, rotary already applied
  v: tuple[Array, ...]      # one [B, K, H, S] array per layer
  valid: Array              # [B, S] bool: slot holds a real token of that row
  next_position: Array      # [B] int32: rotary position of the row's next token
  index: Array              # [] int32: the next slot to write (same for every row)

  @property
  def max_len(self) -> int:
    return self.valid.shape[1]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None, *,
               mesh: jax.sharding.Mesh | None = None) -> KVCache:
  """An empty cache.

  Args:
    config: the model's ModelConfig.
    batch: B, the number of rows.
    max_len: S, prompt length plus the largest number of decode steps. Writing past S is not
      checked inside compiled code (the last slot would be overwritten): size it accordingly.
    dtype: cache dtype; defaults to the model dtype.
    mesh: optional (data, fsdp, tensor) mesh: rows are sharded over data and fsdp, heads over
      tensor. Under jit, leave it None and let the compiler place the cache.

  Returns:
    A KVCache with nothing valid, index 0.
  """
  if batch <= 0 or max_len <= 0:
    raise ValueError(f"batch and max_len must be positive, got batch={batch}, max_len={max_len}")
  dtype = jnp.dtype(dtype or config.dtype)
  k_shape = (batch, config.num_kv_heads, max_len, config.head_dim)
  v_shape = (batch, config.num_kv_heads, config.head_dim, max_len)
  layers_k = tuple(jnp.zeros(k_shape, dtype) for _ in range(config.num_layers))
  layers_v = tuple(jnp.zeros(v_shape, dtype) for _ in range(config.num_layers))
  cache = KVCache(k=layers_k, v=layers_v, valid=jnp.zeros((batch, max_len), bool),
                  next_position=jnp.zeros((batch,), jnp.int32), index=jnp.zeros((), jnp.int32))
  if mesh is not None:
    check_mesh(mesh)
    kv = NamedSharding(mesh, PartitionSpec(BATCH_AXES, "tensor", None, None))
    rows = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    cache = KVCache(k=jax.device_put(cache.k, kv), v=jax.device_put(cache.v, kv),
                    valid=jax.device_put(cache.valid, rows),
                    next_position=jax.device_put(cache.next_position, rows),
                    index=cache.index)
  return cache


def grow_cache(cache: KVCache, max_len: int) -> KVCache:
  """The same cache with room for `max_len` slots (new slots empty); a copy of every array."""
  extra = max_len - cache.max_len
  if extra < 0:
    raise ValueError(f"grow_cache cannot shrink a cache of {cache.max_len} slots to {max_len}")

  def pad(x, axis):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)
  return cache.replace(k=tuple(pad(k, 2) for k in cache.k), v=tuple(pad(v, 3) for v in cache.v),
                       valid=pad(cache.valid, 1))


def map_rows(fn, cache: KVCache) -> KVCache:
  """Applies `fn(x, axis)` to every per-row array of the cache; `axis` is x's row (batch) axis.

  For operations on rows whatever the layout: repeating rows, constraining them to a sharding.
  """
  return cache.replace(k=tuple(fn(k, 0) for k in cache.k), v=tuple(fn(v, 0) for v in cache.v),
                       valid=fn(cache.valid, 0), next_position=fn(cache.next_position, 0))


def prefill(model: Decoder, tokens: Array, attention_mask: Array, cache: KVCache, *,
            return_hidden: bool = False) -> tuple[Array, KVCache]:
  """Runs the prompt through the model and writes its keys/values to slots 0..P-1 of the cache.

  Args:
    model: the Decoder.
    tokens: int [B, P] left-padded prompts, ids in [0, V) (padding positions included).
    attention_mask: bool (or 0/1 integer) [B, P], true on real prompt tokens: in each row some
      padding (False) first, then only real tokens (True), at least one.
    cache: an empty cache from `init_cache` (index 0) with max_len >= P.
    return_hidden: return final hidden states [B, P, D] instead of float32 logits [B, P, V];
      `logits_from_hidden(model, hidden[:, -1])` then gives the last-position logits only.

  Returns:
    (logits or hidden states, the filled cache). The outputs equal `forward`'s.

  Raises:
    ValueError: bad shapes or dtypes; when called outside jit also ids outside [0, V), a mask
      that is not left padding, or a row without real tokens (see `check_tokens`).
  """
  check_tokens(tokens, attention_mask, vocab_size=model.config.vocab_size, left_padded=True)
  p = tokens.shape[1]
  if p > cache.max_len:
    raise ValueError(f"prompt length {p} exceeds the cache's max_len {cache.max_len}")
  mask = attention_mask.astype(bool)
  hidden, (k, v) = model.trunk(tokens, positions_from_mask(mask), causal_valid(mask),
                                kv_cache=(cache.k, cache.v), index=jnp.int32(0))
  cache = KVCache(
      k=k, v=v,
      valid=jax.lax.dynamic_update_slice(cache.valid, mask, (0, 0)),
      next_position=jnp.sum(mask, axis=-1, dtype=jnp.int32),
      index=jnp.asarray(p, jnp.int32))
  return (hidden if return_hidden else logits_from_hidden(model, hidden)), cache


def decode_step(model: Decoder, tokens: Array, cache: KVCache, *, return_hidden: bool = False,
                layers: tuple[DecoderLayer, ...] | None = None) -> tuple[Array, KVCache]:
  """Feeds one token per row, attending to every valid slot of that row's cache.

  Args:
    model: the Decoder.
    tokens: int [B] ids in [0, V), the token each row appends (written at slot `cache.index`).
    cache: the cache after `prefill` and any earlier decode steps.
    return_hidden: return final hidden states [B, D] instead of float32 logits [B, V].
    layers: `unstack_layers(model)`, when the step runs inside a loop: computed once before the
      loop, it keeps XLA from copying every layer's weights out of the stacked parameters at
      every step. None: sliced here.

  Returns:
    (logits [B, V] or hidden [B, D], the updated cache).

  Raises:
    ValueError: a bad shape or dtype; outside jit also ids outside [0, V).
  """
  if tokens.ndim != 1 or tokens.shape[0] != cache.valid.shape[0]:
    raise ValueError(f"tokens must have shape [B] = ({cache.valid.shape[0]},), "
                     f"got {tuple(tokens.shape)}")
  check_token_ids(tokens, model.config.vocab_size)
  valid = jax.lax.dynamic_update_slice(
      cache.valid, jnp.ones((cache.valid.shape[0], 1), bool), (0, cache.index))
  hidden, (k, v) = model.trunk(tokens[:, None], cache.next_position[:, None],
                                valid[:, None, :], kv_cache=(cache.k, cache.v),
                                index=cache.index, attend_to_cache=True, layers=layers)
  cache = KVCache(k=k, v=v, valid=valid,
                  next_position=cache.next_position + 1, index=cache.index + 1)
  hidden = hidden[:, 0]
  return (hidden if return_hidden else logits_from_hidden(model, hidden)), cache
