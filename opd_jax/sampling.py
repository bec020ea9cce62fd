"""XLA-compiled rollout sampler: prefill + `lax.while_loop` decode, top-p/top-k, token masks."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from opd_jax import losses, models
from opd_jax import sampling_rules as rules
from opd_jax import sharding

Array = jax.Array

# Prompt lengths are padded (on the left) up to the next bucket so that a new length reuses the
# compiled program: powers of two from this minimum, unless a list is given.
MIN_BUCKET = 16
# The decode loop runs in up to SEGMENTS pieces of at least MIN_SEGMENT steps (see _segment_ends).
SEGMENTS = 4
MIN_SEGMENT = 32
# With compaction the unfinished rows move into a smaller bucket of rows whenever they fit the
# next smaller one; the buckets halve (rounded up to a multiple of the mesh's batch ways) at most
# COMPACT_HALVINGS times below the full batch, never below COMPACT_MIN_ROWS (see _row_buckets).
COMPACT_HALVINGS = 6
COMPACT_MIN_ROWS = 1
# Buckets of at most B*G / COMPACT_FULL_CACHE rows take a cache for the whole budget at once
# instead of one per loop segment: one decode program per small bucket, not one per (bucket,
# segment). The rare long responses that reach the late segments run in these buckets, so each new
# (bucket, segment) pair met late in a run would otherwise compile another program; a few rows'
# reads of a longer cache cost less than that (see _cache_end).
COMPACT_FULL_CACHE = 8
_TRACES = {"generate": 0, "prefill": 0, "decode": 0, "resize": 0, "finish": 0}
_LAST_SCHEDULE: list = []


@flax.struct.dataclass
class Rollout:
  """G sampled responses per prompt; rows b*G .. b*G+G-1 belong to prompt b.

  tokens: int32 [B*G, N] response tokens (0 after a row has stopped).
  mask: bool [B*G, N] true on real response tokens; the stop token itself is included.
  sample_logprobs: float32 [B*G, N] log-prob of each token under the distribution it was actually
    drawn from: temperature, bans, top-k and top-p applied and renormalised (0 for greedy). This
    is the behaviour policy π_b of an importance weight.
  policy_logprobs: float32 [B*G, N] log-prob under the untruncated student at temperature 1,
    log softmax(logits)[y]: the π_θ(y_t | c_t) the OPD estimators differentiate.
  """
  tokens: Array
  mask: Array
  sample_logprobs: Array
  policy_logprobs: Array


@flax.struct.dataclass
class _DecodeState:
  step: Array           # [] int32, next response column to fill
  hidden: Array         # [R, D] final hidden state of each row's last token
  done: Array           # [R] bool, row has emitted a stop token
  tokens: Array         # [R, N]
  mask: Array           # [R, N]
  sample_logprobs: Array
  policy_logprobs: Array
  cache: models.KVCache
  rows: Array           # [R] int32, each row's index in the [B*G, N] output (its random draws)


def compiled_programs() -> int:
  """How many times the sampler's programs have been traced (compiled) in this process: the
  uncompacted rollout program, and with compaction its prefill, decode, resize and finish
  programs (one per shape each)."""
  return sum(_TRACES.values())


def last_schedule() -> list[dict]:
  """The decode programs the last compacted `sample` call of this process ran, in order: one
  dict per program with `rows` (the bucket), `cache_len`, `start` and `stop` (decode steps
  [start, stop) it ran) and `active` (unfinished rows when it stopped). Empty after an
  uncompacted call."""
  return [dict(d) for d in _LAST_SCHEDULE]


def bucket_length(length: int, buckets: Sequence[int] | None = None) -> int:
  """The padded prompt length used for a prompt of `length` tokens."""
  if buckets:
    fits = [b for b in sorted(buckets) if b >= length]
    if not fits:
      raise ValueError(f"prompt length {length} exceeds the largest prompt bucket "
                       f"{max(buckets)}; add a larger bucket to prompt_buckets")
    return fits[0]
  return max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())


def _segment_ends(max_new_tokens: int) -> tuple[int, ...]:
  """Decode steps at which the loop stops to grow the KV cache.

  Every decode step attends over the whole cache, so a cache sized for the final length wastes
  reads early on. The loop runs in up to SEGMENTS pieces of at least MIN_SEGMENT steps (one piece
  when max_new_tokens < 2 * MIN_SEGMENT), each with a cache just long enough for it (one compiled
  loop body per piece).
  """
  n = max(1, min(SEGMENTS, max_new_tokens // MIN_SEGMENT))
  return tuple(-(-max_new_tokens * (i + 1) // n) for i in range(n))


def _row_buckets(n_rows: int, divisor: int = 1) -> tuple[int, ...]:
  """The row counts compaction may move the unfinished rows into, ascending: the full batch and
  up to COMPACT_HALVINGS halvings of it, each at least COMPACT_MIN_ROWS and rounded up to a
  multiple of `divisor` (the mesh's batch ways, so that every bucket splits evenly over them)."""
  out, b = {n_rows}, n_rows
  for _ in range(COMPACT_HALVINGS):
    b = max(-(-b // 2), COMPACT_MIN_ROWS)
    out.add(min(n_rows, -(-b // divisor) * divisor))
  return tuple(sorted(out))


def _cache_end(rows: int, n_total: int, segment_end: int, max_new_tokens: int) -> int:
  """The decode step up to which a bucket of `rows` rows runs in one program (its cache holds the
  prompt and this many response slots): the current segment's end, or the whole budget for a
  bucket of at most n_total / COMPACT_FULL_CACHE rows."""
  return max_new_tokens if rows * COMPACT_FULL_CACHE <= n_total else segment_end


def _constrain(mesh, x, axis=0):
  """x with its rows (axis `axis`) over the mesh's batch axes."""
  if mesh is None:
    return x
  spec = [None] * x.ndim
  spec[axis] = sharding.BATCH_AXES
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def _constrain_hidden(x):
  # The [R, D] hidden state between decode steps, and the [R, V] logits as the unembedding
  # gives them, keep the decode step's row layout, so that the unembedding multiplies the
  # hidden states slice by slice instead of gathering the [D, V] weight on every device; the
  # sampling rules then split the logits by rows again.
  return models.constrain_rows(x, models.DECODE_ROW_AXES)


def _constrain_tree(mesh, cache):
  return models.cache.map_rows(functools.partial(_constrain, mesh), cache)


def _start(model, prompts, prompt_mask, *, max_len, max_new_tokens, num_samples, mesh):
  """Prefill: the decode state of the B*G rows at step 0, with a cache of `max_len` slots."""
  cache = models.init_cache(model.config, prompts.shape[0], max_len)
  hidden, cache = models.prefill(model, prompts, prompt_mask, _constrain_tree(mesh, cache),
                                 return_hidden=True)
  hidden = hidden[:, -1]
  if num_samples > 1:  # G rollouts per prompt share one prefill
    cache = models.cache.map_rows(lambda x, axis: jnp.repeat(x, num_samples, axis=axis), cache)
    hidden = jnp.repeat(hidden, num_samples, axis=0)
  n_rows = hidden.shape[0]
  zeros = functools.partial(jnp.zeros, (n_rows, max_new_tokens))
  return _DecodeState(step=jnp.zeros((), jnp.int32), hidden=_constrain_hidden(hidden),
                      done=jnp.zeros((n_rows,), bool), tokens=zeros(jnp.int32),
                      mask=zeros(bool), sample_logprobs=zeros(jnp.float32),
                      policy_logprobs=zeros(jnp.float32), cache=_constrain_tree(mesh, cache),
                      rows=jnp.arange(n_rows, dtype=jnp.int32))


def _decode(model, layers, init, rng, temperature, top_p, *, end, shrink_at, n_total, top_k,
            banned, stop, mesh, topk_impl, vocab=None):
  """One `lax.while_loop` over decode steps until step `end`, every row done, or (compaction) at
  most `shrink_at` rows unfinished."""
  stop_ids = jnp.asarray(stop if stop else (-1,), jnp.int32)
  constrain = functools.partial(_constrain, mesh)

  def cond(s):
    return (s.step < end) & (jnp.sum(~s.done, dtype=jnp.int32) > shrink_at)

  def body(s: _DecodeState):
    # The logits live only inside one iteration (the carry holds the [R, D] hidden state): a
    # carried [R, V] buffer is copied by XLA every step, since the next logits are written while
    # the current ones are still read.
    logits = constrain(_constrain_hidden(models.logits_from_hidden(model, s.hidden)))
    if vocab is not None:   # the shared vocabulary only: padding rows are no tokens
      logits = logits[:, :vocab]
    # Row r's uniform is entry r of one draw over all B*G rows: a function of (rng, r, step)
    # alone, whichever rows share the bucket (compaction leaves every row's tokens unchanged).
    u = jax.random.uniform(jax.random.fold_in(rng, s.step), (n_total,))[s.rows]
    tok, sample_lp = rules.draw(logits, u, temperature=temperature, top_k=top_k, top_p=top_p,
                                banned_ids=banned, topk_impl=topk_impl)
    live = ~s.done
    tok = jnp.where(live, tok, 0)
    # [R, V] logits, [R] tokens: XLA fuses the log-softmax into the gather of the one entry.
    policy_lp = losses.token_logprobs(logits, tok)
    col = (slice(None), s.step)
    done = s.done | jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    # The last iteration's decode step is wasted work (1/N of it); guarding it with a lax.cond
    # saves no time, so the body stays straight-line.
    hidden, cache = models.decode_step(model, tok, s.cache, return_hidden=True,
                                       layers=layers)
    return s.replace(
        step=s.step + 1, hidden=_constrain_hidden(hidden), done=done,
        tokens=s.tokens.at[col].set(tok), mask=s.mask.at[col].set(live),
        sample_logprobs=s.sample_logprobs.at[col].set(jnp.where(live, sample_lp, 0.0)),
        policy_logprobs=s.policy_logprobs.at[col].set(jnp.where(live, policy_lp, 0.0)),
        cache=cache)

  return jax.lax.while_loop(cond, body, init)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "top_k", "banned", "stop", "num_samples",
                     "mesh", "segment_ends", "topk_impl", "vocab"))
def _generate(graphdef, state, prompts, prompt_mask, rng, temperature, top_p, *,
              max_new_tokens, top_k, banned, stop, num_samples, mesh, segment_ends, topk_impl,
              vocab=None):
  # The uncompacted rollout, one program: the KV cache is allocated here, inside the program,
  # and each while loop updates its carry in place; between loop segments it is grown (copied)
  # into a longer one. No copy of it ever exists outside the compiled program.
  _TRACES["generate"] += 1
  with sharding.traced_under(mesh):
    model = nnx.merge(graphdef, state)
    p = prompts.shape[1]
    out = _start(model, prompts, prompt_mask, max_len=p + segment_ends[0],
                 max_new_tokens=max_new_tokens, num_samples=num_samples, mesh=mesh)
    # Each layer's weights sliced out of the stacked parameters once, here, not at every step.
    layers = models.decoder.unstack_layers(model)
    for i, end in enumerate(segment_ends):
      if i:
        out = out.replace(cache=_constrain_tree(mesh, models.grow_cache(out.cache, p + end)))
      out = _decode(model, layers, out, rng, temperature, top_p, end=end, shrink_at=0,
                    n_total=out.done.shape[0], top_k=top_k, banned=banned, stop=stop, mesh=mesh,
                    topk_impl=topk_impl, vocab=vocab)
    return Rollout(tokens=out.tokens, mask=out.mask, sample_logprobs=out.sample_logprobs,
                   policy_logprobs=out.policy_logprobs)


# The compacted rollout: a prefill program, then decode programs (one per bucket of rows and
# cache length) run from the host, which reads the step and the unfinished rows after each and
# resizes the state in between (moves the unfinished rows into a smaller bucket, grows the
# cache); the rows' outputs are scattered back into the [B*G, N] arrays as buckets shrink.

@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "max_new_tokens",
                                             "num_samples", "mesh"))
def _prefill_rows(graphdef, state, prompts, prompt_mask, *, max_len, max_new_tokens, num_samples,
                  mesh):
  _TRACES["prefill"] += 1
  with sharding.traced_under(mesh):
    s = _start(nnx.merge(graphdef, state), prompts, prompt_mask, max_len=max_len,
               max_new_tokens=max_new_tokens, num_samples=num_samples, mesh=mesh)
    full = Rollout(tokens=s.tokens, mask=s.mask, sample_logprobs=s.sample_logprobs,
                   policy_logprobs=s.policy_logprobs)
    return s, jax.tree.map(lambda x: _constrain(mesh, jnp.zeros_like(x)), full)


@functools.partial(
    jax.jit, donate_argnames=("s",),
    static_argnames=("graphdef", "end", "shrink_at", "n_total", "top_k", "banned", "stop",
                     "mesh", "topk_impl", "vocab"))
def _decode_rows(graphdef, state, s, rng, temperature, top_p, *, end, shrink_at, n_total, top_k,
                 banned, stop, mesh, topk_impl, vocab=None):
  _TRACES["decode"] += 1
  with sharding.traced_under(mesh):
    model = nnx.merge(graphdef, state)
    s = _decode(model, models.decoder.unstack_layers(model), s, rng, temperature, top_p,
                end=end, shrink_at=shrink_at, n_total=n_total, top_k=top_k, banned=banned,
                stop=stop, mesh=mesh, topk_impl=topk_impl, vocab=vocab)
    return s, jnp.stack([s.step, jnp.sum(~s.done, dtype=jnp.int32)])


def _scatter_rows(full: Rollout, s: _DecodeState, mesh) -> Rollout:
  """The bucket's rows written into their rows of the [B*G, N] outputs."""
  return jax.tree.map(
      lambda f, x: _constrain(mesh, f.at[s.rows].set(x, unique_indices=True)), full,
      Rollout(tokens=s.tokens, mask=s.mask, sample_logprobs=s.sample_logprobs,
              policy_logprobs=s.policy_logprobs))


@functools.partial(jax.jit, donate_argnames=("full",),
                   static_argnames=("rows", "max_len", "mesh"))
def _resize_rows(s, full, *, rows, max_len, mesh):
  """The state with its unfinished rows (and done ones to fill up) in a bucket of `rows` rows and
  a cache of `max_len` slots; the outputs of the rows left out written into `full` first."""
  _TRACES["resize"] += 1
  with sharding.traced_under(mesh):
    if rows < s.done.shape[0]:
      full = _scatter_rows(full, s, mesh)
      # Unfinished rows first, each group in row order; done rows fill the bucket up.
      keep = jnp.argsort(s.done, stable=True)[:rows]

      def take(x, axis=0):
        return _constrain(mesh, jnp.take(x, keep, axis=axis), axis)
      s = s.replace(hidden=_constrain_hidden(jnp.take(s.hidden, keep, axis=0)),
                    done=take(s.done), tokens=take(s.tokens), mask=take(s.mask),
                    sample_logprobs=take(s.sample_logprobs),
                    policy_logprobs=take(s.policy_logprobs), rows=take(s.rows),
                    cache=models.cache.map_rows(take, s.cache))
    if max_len > s.cache.max_len:
      s = s.replace(cache=_constrain_tree(mesh, models.grow_cache(s.cache, max_len)))
    return s, full


@functools.partial(jax.jit, donate_argnames=("full",), static_argnames=("mesh",))
def _finish_rows(s, full, *, mesh):
  _TRACES["finish"] += 1
  with sharding.traced_under(mesh):
    return _scatter_rows(full, s, mesh)


def _generate_compacted(graphdef, state, prompts, prompt_mask, rng, temperature, top_p, *,
                        max_new_tokens, top_k, banned, stop, num_samples, mesh, segment_ends,
                        topk_impl, vocab=None):
  """The rollout with finished rows dropped between decode programs (see `sample`)."""
  p = prompts.shape[1]
  n_total = prompts.shape[0] * num_samples
  buckets = _row_buckets(n_total, 1 if mesh is None else sharding.batch_divisor(mesh))
  rows, segment, start = n_total, 0, 0
  end = _cache_end(rows, n_total, segment_ends[0], max_new_tokens)
  s, full = _prefill_rows(graphdef, state, prompts, prompt_mask, max_len=p + end,
                          max_new_tokens=max_new_tokens, num_samples=num_samples, mesh=mesh)
  while True:
    smaller = [b for b in buckets if b < rows]
    shrink_at = smaller[-1] if smaller else 0
    s, counts = _decode_rows(graphdef, state, s, rng, temperature, top_p, end=end,
                             shrink_at=shrink_at, n_total=n_total, top_k=top_k, banned=banned,
                             stop=stop, mesh=mesh, topk_impl=topk_impl, vocab=vocab)
    step, active = (int(c) for c in sharding.to_host(counts))
    _LAST_SCHEDULE.append(dict(rows=rows, cache_len=p + end, start=start, stop=step,
                               active=active))
    if active == 0 or step >= max_new_tokens:
      break
    if active <= shrink_at:
      rows = min(b for b in buckets if b >= active)
    while step >= segment_ends[segment]:
      segment += 1
    end = _cache_end(rows, n_total, segment_ends[segment], max_new_tokens)
    s, full = _resize_rows(s, full, rows=rows, max_len=p + end, mesh=mesh)
    start = step
  return _finish_rows(s, full, mesh=mesh)


def _check_vocab(vocab_size, rows: int) -> int:
  if vocab_size is None:
    return rows
  if not isinstance(vocab_size, int) or not 0 < vocab_size <= rows:
    raise ValueError(f"vocab_size must be an int in [1, {rows}] (the model's embedding rows), "
                     f"got {vocab_size!r}")
  return vocab_size


def _check_args(prompts, prompt_mask, vocab, *, max_new_tokens, temperature, top_p, top_k,
                banned, stop, num_samples):
  # Shapes and dtypes always; values (ids in the vocabulary, left padding, no empty row) only
  # when the arrays are concrete, i.e. not when `sample` is itself traced.
  models.decoder.check_tokens(prompts, prompt_mask, vocab_size=vocab, left_padded=True,
                              names=("prompts", "prompt_mask"))
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if not 0.0 < float(top_p) <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if float(temperature) < 0.0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  if not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
  for name, ids in (("banned_token_ids", banned), ("stop_token_ids", stop)):
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
      raise ValueError(f"{name} {bad} are outside the vocabulary [0, {vocab})")
  if len(set(banned)) == vocab:
    raise ValueError(f"banned_token_ids bans all {vocab} tokens of the vocabulary: nothing could "
                     "be sampled")
  both = sorted(set(banned) & set(stop))
  if both:
    raise ValueError(f"stop_token_ids {both} are also in banned_token_ids: they could never be "
                     "sampled, so the sequences would never stop on them")


def sample(model, prompts, prompt_mask, rng, *, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, banned_token_ids: Sequence[int] = (),
           stop_token_ids: Sequence[int] = (), num_samples: int = 1,
           prompt_buckets: Sequence[int] | None = None, mesh: Mesh | None = None,
           topk_impl: str | None = None, compact: bool = True,
           vocab_size: int | None = None) -> Rollout:
  """Sample `num_samples` responses per prompt with one compiled program per shape.

  Args:
    model: an `opd_jax.models.Decoder`.
    prompts: int [B, P] left-padded prompt tokens, ids in [0, V) (padding positions included).
    prompt_mask: bool (or 0/1 integer) [B, P], true on real prompt tokens: each row some padding
      (False) first, then only real tokens (True), at least one.
    rng: a PRNG key; at decode step t row r takes entry r of uniform(fold_in(rng, t), [B*G]), a
      function of (rng, r, t) alone: compaction does not change any row's tokens.
    max_new_tokens: N, the response budget (the loop ends earlier when every row has stopped).
    temperature: >= 0, 0 is greedy; traced (changing it does not recompile).
    top_p: nucleus mass in (0, 1], exact over the full vocabulary; traced.
    top_k: keep the k most likely tokens (0 = off); static.
    banned_token_ids: ids set to -inf before any truncation; never sampled.
    stop_token_ids: ids that end a sequence (kept in the response, later positions masked).
    num_samples: G rollouts per prompt; the prompt is prefilled once.
    prompt_buckets: padded prompt lengths to compile for (default: powers of two >= 16).
    mesh: optional (data, fsdp, tensor) mesh; rows are sharded over data and fsdp.
    topk_impl: the top-k algorithm of `sampling_rules.draw`, "blocked" or "lax" (the same
      tokens unless the logits hold NaN); None picks by backend ("blocked" on CPU, "lax" on
      GPU/TPU). Static.
    compact: drop finished rows. The decode loop then runs as several compiled programs from
      the host, which reads the step and the number of unfinished rows after each: when those
      fit the next smaller row bucket (halvings of B*G, at most COMPACT_HALVINGS, each a
      multiple of the mesh's batch ways), they move into it with their KV cache, and the
      outputs of the rows left behind are written into the [B*G, N] arrays. Each row keeps
      its random numbers, so it samples what `compact=False` samples wherever the model's
      outputs for a row do not depend on the number of rows computed with it; where a matrix
      product rounds differently at another row count (as XLA's CPU dot does for some
      shapes), a draw within rounding of a token boundary can take the neighbouring token,
      as it can in a batch of another size without compaction. The cost follows the
      unfinished rows instead of the longest one; one program per (row bucket, cache
      length) met, compiled on first use, where buckets of at most B*G / COMPACT_FULL_CACHE
      rows take a cache for the whole budget (one program each, whichever segment the rare
      long responses reach). False, or
      `sample` itself traced (under jit the host cannot read the rows): the whole rollout is
      one program over all rows.
    vocab_size: the tokens to sample from and normalise over, ids [0, vocab_size) (default:
      every embedding row). The trainer passes the vocabulary the student shares with its
      teachers: rows past it (padding of an embedding) are never drawn and, like the scorer's,
      both log-probs are normalised over the shared tokens only. Static.

  Returns:
    A Rollout with [B*G, N] fields.

  Raises:
    ValueError: a bad setting, or prompts that break the rules above (ids, dtypes, shapes, left
      padding, empty rows), with the argument, an example row/position and what is accepted.
      When `sample` is itself traced, only shapes and dtypes of the prompts can be checked.
  """
  # numpy inputs stay on the host for the checks; lists become numpy arrays.
  prompts, prompt_mask = (x if isinstance(x, jax.Array) else np.asarray(x)
                          for x in (prompts, prompt_mask))
  config = model.config
  banned, stop = tuple(int(i) for i in banned_token_ids), tuple(int(i) for i in stop_token_ids)
  vocab = _check_vocab(vocab_size, config.vocab_size)
  if any(vocab <= i < config.vocab_size for i in stop):
    raise ValueError(f"stop_token_ids {[i for i in stop if i >= vocab]} are outside the sampled "
                     f"vocabulary [0, {vocab}) (vocab_size)")
  _check_args(prompts, prompt_mask, config.vocab_size, max_new_tokens=max_new_tokens,
              temperature=temperature, top_p=top_p, top_k=top_k, banned=banned, stop=stop,
              num_samples=num_samples)
  banned = tuple(i for i in banned if i < vocab)   # ids past the vocabulary are never drawn
  topk_impl = rules.resolve_topk_impl(topk_impl)
  b, p = prompts.shape
  padded = bucket_length(p, prompt_buckets)
  pad = ((0, 0), (padded - p, 0))
  prompts = jnp.pad(prompts.astype(jnp.int32), pad)
  prompt_mask = jnp.pad(jnp.asarray(prompt_mask, bool), pad)
  if mesh is not None:
    rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    prompts, prompt_mask = jax.device_put((prompts, prompt_mask), rows)
  graphdef, state = nnx.split(model)
  traced = any(isinstance(x, jax.core.Tracer)
               for x in jax.tree.leaves((state, prompts, prompt_mask, rng)))
  generate = _generate_compacted if compact and not traced else _generate
  _LAST_SCHEDULE.clear()
  return generate(graphdef, state, prompts, prompt_mask, rng,
                  jnp.float32(temperature), jnp.float32(top_p), max_new_tokens=max_new_tokens,
                  top_k=top_k, banned=banned, stop=stop, num_samples=num_samples, mesh=mesh,
                  segment_ends=_segment_ends(max_new_tokens),
                  topk_impl=topk_impl, vocab=vocab if vocab < config.vocab_size else None)
