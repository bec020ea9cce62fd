"""Pure-functional OPD estimators: the paper's Eqs. 1-8 and App. G.3 (see docs/method.md).

Every function here is `jax.jit`-able, computes in float32 whatever the input dtype, treats the
teacher as a constant (stop-gradient), and aggregates with the token-mean: the sum over every
unmasked token of the batch divided by their count. Masked positions contribute exactly zero to
the loss and to the gradient, even when their logits are -inf or NaN; a NaN at an unmasked
position makes the loss NaN (never a finite wrong value). Masks are bool, or integer with
nonzero meaning "in the loss"; token ids are integers. Options that change the computation's
structure (k, support, tail, renormalize, clips) must be static Python values under `jax.jit`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

SUPPORTS = ("teacher", "student", "teacher+sampled", "student+sampled")
TAILS = ("none", "ema_pg")

# Log-probabilities are floored here before they multiply a probability, so that a token the
# teacher rules out (-inf) where the student still has mass gives a huge but finite penalty
# instead of inf/NaN. Real log-probabilities of float32 logits never come near this value.
LOGP_FLOOR = -1e9


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _f32(x: Array) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


# dtype kinds accepted by the public functions: (numpy kinds, what the error message says).
_DTYPES = {
    "float": ((jnp.floating,), "a floating dtype (float32, bfloat16, ...)"),
    "int": ((jnp.integer,), "an integer dtype (token ids)"),
    "mask": ((jnp.bool_, jnp.integer), "dtype bool (or integer, nonzero = in the loss)"),
}


def _check_array(name: str, x: Any, kind: str, shape: tuple[int, ...] | None = None,
                 shape_text: str = "") -> None:
  """Raises ValueError naming `name` unless x (when given) has the dtype kind and the shape."""
  if x is None:
    return
  dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
  kinds, accepted = _DTYPES[kind]
  if not any(jnp.issubdtype(dtype, k) for k in kinds):
    raise ValueError(f"{name} must have {accepted}, got {dtype}")
  if shape is not None and tuple(jnp.shape(x)) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)} ({shape_text}), got "
                     f"{tuple(jnp.shape(x))}")


def _static_hint(name: str) -> str:
  return (f"pass {name} as a static argument (jax.jit(..., static_argnames=({name!r},)) or "
          "functools.partial), not as a traced array")


def _check_static_int(name: str, value: Any, hi: int | None = None, hi_text: str = "") -> None:
  """Raises unless value is a Python int in [1, hi] (hi None: >= 1); traced: the jit remedy."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{name} must be a static Python int, got a traced value; "
                     f"{_static_hint(name)}")
  if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (
      hi is not None and value > hi):
    accepted = "a positive int" if hi is None else f"an int in [1, {hi_text}]"
    raise ValueError(f"{name} must be {accepted}, got {value!r}")


def _check_static_number(name: str, value: Any, ok, accepted: str) -> None:
  """Raises unless value is None or a Python number with ok(value); traced: the jit remedy."""
  if value is None:
    return
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{name} must be a static Python number or None, got a traced value; "
                     f"{_static_hint(name)}")
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
    raise ValueError(f"{name} must be {accepted}, got {value!r}")


def _check_pair(student_logits: Array, teacher_logits: Array, mask: Array) -> None:
  _check_array("student_logits", student_logits, "float")
  _check_array("teacher_logits", teacher_logits, "float")
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
        "student_logits and teacher_logits must have the same shape, got student "
        f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}; "
        "use masking.reconcile_vocab to slice both to the shared vocabulary.")
  if student_logits.ndim < 2:
    raise ValueError(
        f"logits must have shape [..., V] with at least one position, got {student_logits.shape}")
  _check_array("mask", mask, "mask", student_logits.shape[:-1],
               "the logits' shape without the vocabulary axis")


def _check_topk_options(support: Any, tail: Any, renormalize: Any, *, has_sampled: bool,
                       tail_weight_clip: Any, supports: tuple[str, ...] = SUPPORTS,
                       others: str = "") -> None:
  """Validates the top-K loss options shared by the materialised and the fused estimators.

  Args:
    support, tail, renormalize, tail_weight_clip: as in `topk_reverse_kl`.
    has_sampled: whether sampled_tokens were given.
    supports: the supports this caller accepts.
    others: appended to the unknown-support message (where the other supports are available).
  """
  if not isinstance(support, str) or support not in supports:
    raise ValueError(f"support {support!r} is not accepted here; accepted: "
                     f"{', '.join(supports)}{others}")
  if tail not in TAILS:
    raise ValueError(f"unknown tail {tail!r}; accepted: {', '.join(TAILS)}")
  if isinstance(renormalize, jax.core.Tracer):
    raise ValueError(f"renormalize must be a static Python bool; {_static_hint('renormalize')}")
  if renormalize not in (True, False):
    raise ValueError(f"renormalize must be True or False, got {renormalize!r}")
  if not has_sampled and (tail == "ema_pg" or support.endswith("+sampled")):
    what = f"tail={tail!r}" if tail == "ema_pg" else f"support={support!r}"
    raise ValueError(f"{what} needs sampled_tokens ([B, T] ids of the rollout tokens)")
  _check_static_number("tail_weight_clip", tail_weight_clip, lambda c: c > 0, "> 0 or None")


def _sanitize(logits: Array, mask: Array) -> Array:
  """float32 logits with masked positions replaced by zeros (keeps their gradient exactly 0)."""
  return jnp.where(mask[..., None], _f32(logits), 0.0)


def _safe_logsumexp(x: Array, axis: int = -1) -> Array:
  """logsumexp with finite gradients: -inf (not NaN) for an all -inf row, NaN for a NaN row."""
  m = jnp.max(x, axis=axis, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  s = jnp.sum(jnp.exp(x - m), axis=axis, keepdims=True)
  out = jnp.log(jnp.where(s > 0, s, 1.0)) + m
  out = jnp.where(s > 0, out, jnp.where(jnp.isnan(s), jnp.nan, -jnp.inf))
  return jnp.squeeze(out, axis)


def _kl_terms(logp: Array, logq: Array) -> Array:
  """Σ_v p (log p - log q) over the last axis, exactly 0 where p = 0, finite where q = 0.

  NaN in either argument (where p may be > 0) propagates: it is bad input, not zero mass.
  """
  p = jnp.exp(logp)
  dead = (p == 0) & ~jnp.isnan(logq)
  safe_logp = jnp.where(dead, 0.0, logp)
  safe_logq = jnp.where(dead, 0.0, jnp.maximum(logq, LOGP_FLOOR))
  return jnp.sum(jnp.where(dead, 0.0, p * (safe_logp - safe_logq)), axis=-1)


def _entropy(logp: Array) -> Array:
  p = jnp.exp(logp)
  return -jnp.sum(jnp.where(p == 0, 0.0, p * jnp.where(p == 0, 0.0, logp)), axis=-1)


def _token_mean(values: Array, mask: Array) -> tuple[Array, Array]:
  """(Σ mask·values / max(N, 1), N) with N the number of unmasked tokens."""
  maskf = mask.astype(jnp.float32)
  n = jnp.sum(maskf)
  total = jnp.sum(jnp.where(mask, values, 0.0))
  return total / jnp.maximum(n, 1.0), n


def _log_softmax(logits: Array) -> Array:
  """log_softmax: -inf everywhere (not NaN) on a row without any finite logit, NaN on a NaN row."""
  lse = _safe_logsumexp(logits)[..., None]
  empty = lse == -jnp.inf
  return jnp.where(empty, -jnp.inf, logits - jnp.where(empty, 0.0, lse))


def _gather(x: Array, idx: Array) -> Array:
  return jnp.take_along_axis(x, idx, axis=-1)


# ----------------------------------------------------------------------------------------------
# public estimators
# ----------------------------------------------------------------------------------------------


def token_logprobs(logits: Array, tokens: Array) -> Array:
  """Log-probability of each token under the logits' softmax.

  Args:
    logits: [..., T, V] logits (any float dtype).
    tokens: [..., T] integer token ids in [0, V).

  Returns:
    [..., T] float32 log-probabilities.
  """
  _check_array("logits", logits, "float")
  _check_array("tokens", tokens, "int", logits.shape[:-1],
               "the logits' shape without the vocabulary axis")
  # Gather first, normalise after: the same values as gathering from `_log_softmax`, without an
  # elementwise pass over [..., V] (this runs in the sampler's decode loop).
  x = _f32(logits)
  lse = _safe_logsumexp(x)
  empty = lse == -jnp.inf
  picked = _gather(x, tokens[..., None].astype(jnp.int32))[..., 0]
  return jnp.where(empty, -jnp.inf, picked - jnp.where(empty, 0.0, lse))


def full_reverse_kl(student_logits: Array, teacher_logits: Array, mask: Array
                    ) -> tuple[Array, dict[str, Array]]:
  """Full-vocabulary per-prefix reverse KL, KL(π_θ ‖ q) (Eq. 4), token-mean aggregated.

  Args:
    student_logits: [B, T, V] student logits (differentiated).
    teacher_logits: [B, T, V] teacher logits (treated as constants).
    mask: [B, T] bool, True where the position is in the loss.

  Returns:
    (loss, aux): scalar loss and a flat dict of scalar diagnostics.
  """
  _check_pair(student_logits, teacher_logits, mask)
  mask = mask.astype(bool)
  logp = _log_softmax(_sanitize(student_logits, mask))
  logq = _log_softmax(jax.lax.stop_gradient(_sanitize(teacher_logits, mask)))
  loss, n = _token_mean(_kl_terms(logp, logq), mask)
  ent, _ = _token_mean(_entropy(jax.lax.stop_gradient(logp)), mask)
  return loss, {"kl/student_entropy": ent, "kl/num_tokens": n}


def _with_sampled_slot(top: Array, sampled_tokens: Array) -> tuple[Array, Array]:
  """The sampled token as a (K+1)-th slot: (indices [..., K+1], valid [..., K+1]).

  The extra slot is valid only when the token is not already in `top`, so valid[..., K] is also
  the EMA-PG tail's "sampled token outside the support" indicator.
  """
  y = sampled_tokens[..., None].astype(top.dtype)
  outside = ~jnp.any(top == y, axis=-1, keepdims=True)
  valid = jnp.concatenate([jnp.ones(top.shape, bool), outside], axis=-1)
  return jnp.concatenate([top, y], axis=-1), valid


def _topk_token_terms(zs_sup: Array, zt_sup: Array, lse_s: Array, lse_t: Array, *,
                      renormalize: bool, tail: str = "none", zs_y: Array | None = None,
                      zt_y: Array | None = None, outside: Array | None = None,
                      behavior_logprobs: Array | None = None,
                      tail_weight_clip: float | None = None) -> tuple[Array, dict[str, Array]]:
  """Per-position top-K reverse KL and its "kl/…" diagnostics, from the support's logits.

  The one home of the top-K maths, shared by `topk_reverse_kl` (materialised logits) and
  `topk.topk_reverse_kl_from_hidden` (fused), which differ only in how they obtain these inputs.
  Positions where lse_s, lse_t (or the sampled-token inputs) are NaN get a NaN loss.

  Args:
    zs_sup: [..., S] float32 student logits on the support, -inf at unused slots (differentiated).
    zt_sup: [..., S] float32 teacher logits on the support, -inf at unused slots (constants).
    lse_s: [...] student logsumexp over the whole vocabulary (the unrenormalised loss and the
      tail differentiate through it).
    lse_t: [...] teacher logsumexp over the whole vocabulary.
    renormalize: renormalise both distributions inside the support.
    tail: "none" | "ema_pg".
    zs_y, zt_y: [...] student / teacher logits of the sampled token (None: no sampled token).
    outside: [...] bool, the sampled token is outside the un-augmented top-K (tail only).
    behavior_logprobs: [...] float32 behaviour log-probs of the sampled tokens, finite at masked
      positions (tail only; None: on-policy).
    tail_weight_clip: optional upper cap on the tail's importance weight.

  Returns:
    (per_token [...], diagnostics: name -> [...]); aggregate with `_reduce_token_terms`.
  """
  if renormalize:
    logp_sup, logq_sup = _log_softmax(zs_sup), _log_softmax(zt_sup)
  else:
    logp_sup, logq_sup = zs_sup - lse_s[..., None], zt_sup - lse_t[..., None]
  per_token = _kl_terms(logp_sup, logq_sup)
  invalid = jnp.isnan(lse_s) | jnp.isnan(lse_t)

  # Diagnostics on the (augmented) support, measured with full-vocabulary probabilities.
  aux_tok = {
      "kl/teacher_mass": jnp.sum(jnp.exp(zt_sup - lse_t[..., None]), axis=-1),
      "kl/student_mass": jnp.sum(jnp.exp(jax.lax.stop_gradient(zs_sup - lse_s[..., None])), -1),
  }
  if zs_y is not None:
    logp_y, logq_y = zs_y - lse_s, zt_y - lse_t
    invalid = invalid | jnp.isnan(zs_y) | jnp.isnan(zt_y)
    aux_tok["kl/logp_gap"] = jax.lax.stop_gradient(logq_y - logp_y)
    if tail == "ema_pg":
      sg_logp_y = jax.lax.stop_gradient(logp_y)
      if behavior_logprobs is None:
        weight = jnp.ones_like(logp_y)
      else:
        blp = jax.lax.stop_gradient(behavior_logprobs)
        invalid = invalid | jnp.isnan(blp)
        weight = jnp.exp(sg_logp_y - blp)
      if tail_weight_clip is not None:
        weight = jnp.minimum(weight, tail_weight_clip)
      ratio = jnp.exp(logp_y - sg_logp_y)  # value 1, gradient ∇ log π(y)
      log_ratio_y = jnp.maximum(sg_logp_y, LOGP_FLOOR) - jnp.maximum(logq_y, LOGP_FLOOR)
      per_token = per_token + jnp.where(outside, weight * ratio * log_ratio_y, 0.0)
      aux_tok["kl/tail_fraction"] = outside.astype(jnp.float32)
      aux_tok["kl/tail_weight"] = jnp.where(outside, weight, 0.0)
  # A NaN input is bad input, whether or not it reached the support: the loss says so.
  return jnp.where(invalid, jnp.nan, per_token), aux_tok


def _reduce_token_terms(per_token: Array, aux_tok: dict[str, Array], mask: Array
                        ) -> tuple[Array, dict[str, Array]]:
  """Token-mean of the per-position loss and diagnostics, plus "kl/num_tokens"."""
  loss, n = _token_mean(per_token, mask)
  aux = {name: _token_mean(v, mask)[0] for name, v in aux_tok.items()}
  aux["kl/num_tokens"] = n
  return loss, aux


def _overlap(s_top: Array, t_top: Array, vocab: int) -> Array:
  """Fraction of the teacher's top-K that is also in the student's top-K, per position."""
  k = s_top.shape[-1]
  if k * k <= vocab:  # pairwise comparison is cheaper than a vocabulary-sized membership table
    hit = jnp.any(s_top[..., :, None] == t_top[..., None, :], axis=-2)
  else:
    member = jnp.zeros(s_top.shape[:-1] + (vocab,), bool)
    member = jnp.put_along_axis(member, s_top, True, axis=-1, inplace=False)
    hit = _gather(member, t_top)
  return jnp.mean(hit.astype(jnp.float32), axis=-1)


def topk_reverse_kl(student_logits: Array, teacher_logits: Array, mask: Array, *, k: int = 32,
                    support: str = "teacher", renormalize: bool = True, tail: str = "none",
                    sampled_tokens: Array | None = None,
                    behavior_logprobs: Array | None = None,
                    tail_weight_clip: float | None = None) -> tuple[Array, dict[str, Array]]:
  """Reverse KL on a top-K local support: the paper's LSM (Eqs. 6-8) and its App. G.3 variants.

  The default (support="teacher", renormalize=True, tail="none") is the paper's method: on the
  teacher's K most probable tokens S, both distributions are renormalised (log_softmax over the
  K gathered logits) and ℓ = Σ_{v∈S} π̂(v)(log π̂(v) − log q̂(v)); the gradient flows analytically
  through the student's gathered logits, never through the support's indices.

  Variants: support "student" (student top-K), "teacher+sampled" / "student+sampled" (the sampled
  token is added as a (K+1)-th slot only when it is not already in the top-K). With
  renormalize=False, log-probabilities are the full-vocabulary ones (the gradient also flows
  through the student's logsumexp). tail="ema_pg" adds the sampled-token tail correction
  ℓ_tail = w · 1[y ∉ S] · ρ · sg(log π(y) − log q(y)) with ρ = π(y)/sg(π(y)) and
  w = sg(π(y)/π_behaviour(y)) (capped from above by `tail_weight_clip`), where S is the
  un-augmented top-K. Without `behavior_logprobs` the rollout is taken to be on-policy (w = 1).
  Note: head (unrenormalised) + tail estimates ∇ of Eq. 4 up to the term ∇π_θ(S), the gradient
  of the student's mass on S, which the head's self-term adds; tests pin this identity.

  Args:
    student_logits: [B, T, V] student logits (differentiated).
    teacher_logits: [B, T, V] teacher logits (constants).
    mask: [B, T] bool loss mask.
    k: support size, 1 <= k <= V.
    support: "teacher" | "student" | "teacher+sampled" | "student+sampled".
    renormalize: renormalise both distributions inside the support (the method) or not.
    tail: "none" | "ema_pg".
    sampled_tokens: [B, T] ids of the rollout's tokens; needed by "+sampled" supports and the
      EMA-PG tail; when given, the teacher−student log-prob gap on them is logged.
    behavior_logprobs: [B, T] log-probs of the sampled tokens under the behaviour (rollout)
      policy, for the tail's importance weight.
    tail_weight_clip: optional upper cap on the tail's importance weight w.

  Returns:
    (loss, aux): scalar token-mean loss and flat scalar diagnostics "kl/…".
  """
  _check_pair(student_logits, teacher_logits, mask)
  vocab = student_logits.shape[-1]
  _check_static_int("k", k, vocab, f"vocab size = {vocab}")
  _check_topk_options(support, tail, renormalize, has_sampled=sampled_tokens is not None,
                      tail_weight_clip=tail_weight_clip)
  positions = "the mask's shape"
  _check_array("sampled_tokens", sampled_tokens, "int", mask.shape, positions)
  _check_array("behavior_logprobs", behavior_logprobs, "float", mask.shape, positions)

  mask = mask.astype(bool)
  zs = _sanitize(student_logits, mask)
  zt = jax.lax.stop_gradient(_sanitize(teacher_logits, mask))
  _, s_top = jax.lax.top_k(jax.lax.stop_gradient(zs), k)
  _, t_top = jax.lax.top_k(zt, k)
  idx = t_top if support.startswith("teacher") else s_top
  valid = jnp.ones(idx.shape, bool)
  zs_y = zt_y = outside = blp = None
  if sampled_tokens is not None:
    y = jnp.where(mask, sampled_tokens, 0).astype(jnp.int32)
    top_y, valid_y = _with_sampled_slot(idx, y)
    zs_y, zt_y = _gather(zs, y[..., None])[..., 0], _gather(zt, y[..., None])[..., 0]
    outside = valid_y[..., -1]
    if support.endswith("+sampled"):
      idx, valid = top_y, valid_y
  if behavior_logprobs is not None:
    blp = jnp.where(mask, _f32(behavior_logprobs), 0.0)

  per_token, aux_tok = _topk_token_terms(
      jnp.where(valid, _gather(zs, idx), -jnp.inf), jnp.where(valid, _gather(zt, idx), -jnp.inf),
      _safe_logsumexp(zs), _safe_logsumexp(zt), renormalize=renormalize, tail=tail, zs_y=zs_y,
      zt_y=zt_y, outside=outside, behavior_logprobs=blp, tail_weight_clip=tail_weight_clip)
  aux_tok["kl/overlap"] = _overlap(s_top, t_top, vocab)
  aux_tok["kl/student_entropy"] = _entropy(jax.lax.stop_gradient(_log_softmax(zs)))
  return _reduce_token_terms(per_token, aux_tok, mask)


def _check_gamma(gamma: Any) -> None:
  if isinstance(gamma, (int, float)) and not 0.0 <= float(gamma) <= 1.0:
    raise ValueError(f"gamma must be in [0, 1] (0 = token level, 1 = sequence level), got {gamma}")


def reward_to_go(rewards: Array, mask: Array, gamma: float | Array,
                 segment_ids: Array | None = None) -> Array:
  """Discounted reward-to-go G_t = Σ_{t' ≥ t} γ^{t'−t} mask_{t'} r_{t'} along the last axis.

  Computed with a parallel (associative) scan, so it is O(log T) deep on accelerators. `gamma`
  may be a traced scalar (e.g. vmapped over a grid of γ).

  Args:
    rewards: [..., T] per-token rewards.
    mask: [..., T] bool; masked rewards are dropped (time still advances through them).
    gamma: discount in [0, 1].
    segment_ids: optional [..., T] ints: several sequences side by side along the axis (packed
      rows); the sum t' runs over t's own sequence only.

  Returns:
    [..., T] float32 returns, zero at masked positions.
  """
  _check_gamma(gamma)
  _check_array("mask", mask, "mask", jnp.shape(rewards), "the rewards' shape")
  mask = mask.astype(bool)
  r = jnp.where(mask, _f32(rewards), 0.0)
  g = jnp.broadcast_to(jnp.asarray(gamma, jnp.float32), r.shape)
  if segment_ids is not None:
    # No discounted future crosses into the next sequence: the map at a sequence's last token
    # ignores what comes after it.
    same = segment_ids[..., 1:] == segment_ids[..., :-1]
    g = g * jnp.concatenate([same, jnp.zeros(same.shape[:-1] + (1,), bool)], axis=-1)

  def compose(acc, nxt):
    # Scanning from the sequence end: each step is the affine map x -> r_t + γ·x, and the
    # composition of the accumulated map with the next one is again affine.
    a1, b1 = acc
    a2, b2 = nxt
    return a1 * a2, b2 + a2 * b1

  _, returns = jax.lax.associative_scan(compose, (g, r), reverse=True, axis=r.ndim - 1)
  return jnp.where(mask, returns, 0.0)


def sampled_token_opd(student_logprobs: Array, teacher_logprobs: Array, mask: Array, *,
                      gamma: float | Array = 0.0, behavior_logprobs: Array | None = None,
                      ppo_clip: float | None = None, advantage_clip: float | None = None,
                      segment_ids: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """Sampled-token OPD (Eq. 5) as a policy-gradient surrogate whose gradient is ĝ_γ (Eq. 3).

  Rewards are the log-ratios r_t = log π_b(y_t) − log q(y_t) under stop-gradient, where π_b is
  the behaviour policy (`behavior_logprobs`, or the current student when None). G is their
  γ-discounted reward-to-go (γ = 0: token level, Eq. 2; γ = 1: sequence level, Eq. 1), optionally
  clipped to [−advantage_clip, advantage_clip]. With ratio ρ_t = π_θ(y_t)/π_b(y_t), the per-token
  surrogate is ρ_t G_t, or with PPO clipping max(ρ_t G_t, clip(ρ_t, 1 ± ε) G_t) (the negative of
  PPO's min with advantage −G). Token-mean aggregated, so on-policy
  d loss / d student_logprobs[b, t] = mask[b, t] · G[b, t] / N.

  Args:
    student_logprobs: [B, T] log π_θ(y_t | c_t) of the sampled tokens (differentiated).
    teacher_logprobs: [B, T] log q(y_t | c_t) (constants).
    mask: [B, T] bool loss mask.
    gamma: future-reward coupling in [0, 1] (may be traced).
    behavior_logprobs: [B, T] log-probs under the rollout policy, for importance ratios.
    ppo_clip: PPO clip ε (the paper's code uses 0.2) or None.
    advantage_clip: clamp G to [−c, c] (the authors' code optionally uses 5) or None.
    segment_ids: [B, T] ints for packed rows (several sequences per row): the reward-to-go
      stays within each sequence (see `reward_to_go`).

  Returns:
    (loss, aux): scalar surrogate (its value is the token-mean of ρ·G) and "opd/…" diagnostics.
  """
  _check_gamma(gamma)
  if tuple(student_logprobs.shape) != tuple(teacher_logprobs.shape):
    raise ValueError(
        "student_logprobs and teacher_logprobs must have the same shape, got student "
        f"{tuple(student_logprobs.shape)} and teacher {tuple(teacher_logprobs.shape)}")
  positions = "student_logprobs' shape"
  _check_array("student_logprobs", student_logprobs, "float")
  _check_array("teacher_logprobs", teacher_logprobs, "float")
  _check_array("mask", mask, "mask", student_logprobs.shape, positions)
  _check_array("behavior_logprobs", behavior_logprobs, "float", student_logprobs.shape, positions)
  _check_static_number("ppo_clip", ppo_clip, lambda c: 0 < c < 1, "in (0, 1) or None")
  _check_static_number("advantage_clip", advantage_clip, lambda c: c > 0, "> 0 or None")

  mask = mask.astype(bool)

  def clean(x):  # masked positions -> 0, -inf -> finite floor
    return jnp.where(mask, jnp.maximum(_f32(x), LOGP_FLOOR), 0.0)

  logp = clean(student_logprobs)
  logq = jax.lax.stop_gradient(clean(teacher_logprobs))
  if behavior_logprobs is None:
    logp_b = jax.lax.stop_gradient(logp)
  else:
    logp_b = jax.lax.stop_gradient(clean(behavior_logprobs))

  rewards = logp_b - logq
  returns = jax.lax.stop_gradient(reward_to_go(rewards, mask, gamma, segment_ids))
  if advantage_clip is not None:
    returns = jnp.clip(returns, -advantage_clip, advantage_clip)

  ratio = jnp.exp(logp - logp_b)
  surrogate = ratio * returns
  if ppo_clip is not None:
    clipped = jnp.clip(ratio, 1.0 - ppo_clip, 1.0 + ppo_clip) * returns
    clip_frac = (clipped > surrogate).astype(jnp.float32)
    surrogate = jnp.maximum(surrogate, clipped)
  else:
    clip_frac = jnp.zeros_like(surrogate)

  loss, n = _token_mean(surrogate, mask)
  aux = {
      "opd/reward_mean": _token_mean(rewards, mask)[0],
      "opd/return_mean": _token_mean(returns, mask)[0],
      "opd/logp_gap": _token_mean(logq - jax.lax.stop_gradient(logp), mask)[0],
      "opd/ratio_mean": _token_mean(jax.lax.stop_gradient(ratio), mask)[0],
      "opd/clip_fraction": _token_mean(clip_frac, mask)[0],
      "opd/num_tokens": n,
  }
  return loss, aux
