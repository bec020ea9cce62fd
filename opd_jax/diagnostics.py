"""Estimator diagnostics: the active estimator against the exact reverse KL, on sampled positions.

Every `log.diagnostics_every` iterations (and the last), after scoring and before the update, on
the current parameters, the trainer draws `log.diagnostics_positions` response positions of the
batch at random, runs the student and the teacher on the rows that hold them, and materialises
both models' logits over the shared vocabulary at those positions only ([n, V]). There it compares
the configured estimator's loss (`Estimator.logits_loss`, the update's loss on materialised
logits) and its gradient with respect to the student's logits with the exact full-vocabulary
reverse KL of Eq. 4 (`losses.full_reverse_kl`) and its gradient. The figures ("diag/..."):

  reverse_kl            the exact reverse KL per token at the sampled loss positions
  loss_gap              the estimator's loss minus that reverse KL
  grad_cosine           cosine between the estimator's gradient and the exact one
  grad_rel_diff         |g_estimator - g_exact| / |g_exact| (0: the exact gradient)
  teacher_topk_mass     the teacher's probability mass on its top-K (K = loss.k)
  sampled_outside_topk  fraction of sampled tokens outside the teacher's top-K
  special_kl_share      share of the reverse KL summed over all sampled response positions that
                        sits on special tokens (the tokenizer's specials, loss.mask_strings)
  positions             sampled positions that are in the loss (the comparisons' sample)

The cost is bounded by the sample: one forward pass of each model over n rows, whatever the
batch size (a row is run once per position drawn in it; the update's micro-batch of rows at a
time), plus [n, V] logits and their gradient. n is rounded up to a multiple of those rows.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from opd_jax import estimators, losses, masking, models, sharding
from opd_jax.settings import LossSettings

Array = jax.Array
METRICS = ("diag/reverse_kl", "diag/loss_gap", "diag/grad_cosine", "diag/grad_rel_diff",
           "diag/teacher_topk_mass", "diag/sampled_outside_topk", "diag/special_kl_share",
           "diag/positions")


@dataclasses.dataclass(frozen=True)
class Static:
  """What keys the compiled diagnostics program (hashable)."""
  loss: LossSettings
  vocab: int                       # the shared vocabulary (ids >= vocab never count)
  positions: int                   # response positions drawn per diagnostic iteration
  special_ids: tuple[int, ...]     # special tokens (for the special-token share)
  mesh: Mesh | None = None
  chunk: int = 0                   # rows run at a time (a divisor of `positions`; 0: all)


def _hidden_at(model, prompt: Array, prompt_mask: Array, response: Array, cols: Array) -> Array:
  """[n, D] hidden states predicting response token `cols[i]` of row i (one causal pass)."""
  tokens = jnp.concatenate([prompt, response], axis=1)
  mask = jnp.concatenate([prompt_mask, jnp.ones(response.shape, bool)], axis=1)
  hidden = models.forward(model, tokens, mask, return_hidden=True)
  at = prompt.shape[1] - 1 + cols
  return jnp.take_along_axis(hidden, at[:, None, None], axis=1)[:, 0]


def _unit_cosine(a: Array, b: Array) -> Array:
  den = jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b))
  return jnp.where(den > 0, jnp.sum(a * b) / jnp.where(den > 0, den, 1.0), 0.0)


def compare(student_logits: Array, teacher_logits: Array, tokens: Array, loss_mask: Array,
            response_mask: Array, special: Array, loss: LossSettings) -> dict[str, Array]:
  """The diagnostics of n positions from their materialised logits.

  Args:
    student_logits / teacher_logits: [n, V] float32 over the shared vocabulary.
    tokens: [n] the sampled tokens; loss_mask / response_mask: [n] bool (the comparisons use the
      loss positions; the special-token share uses every response position); special: [n] bool,
      the token is a special token.
    loss: the run's LossSettings (the estimator and its options).

  Returns:
    {"diag/...": scalar} (see the module docstring).
  """
  estimator = estimators.get(loss.estimator)
  s, t = student_logits[:, None].astype(jnp.float32), teacher_logits[:, None].astype(jnp.float32)
  y, m = tokens[:, None], loss_mask[:, None]

  def exact(z):
    return losses.full_reverse_kl(z, t, m)[0]

  def active(z):
    return estimator.logits_loss(z, t, y, m, loss)

  kl_exact, g_exact = jax.value_and_grad(exact)(s)
  est, g_est = jax.value_and_grad(active)(s)
  ref = jnp.sqrt(jnp.sum(g_exact * g_exact))
  diff = jnp.sqrt(jnp.sum((g_est - g_exact) ** 2))
  n = jnp.maximum(jnp.sum(loss_mask), 1)
  k = min(loss.k, teacher_logits.shape[-1])
  t_logp = jax.nn.log_softmax(t[:, 0], axis=-1)
  top_logp, top_ids = jax.lax.top_k(t_logp, k)
  inside = jnp.any(top_ids == tokens[:, None], axis=-1)
  s_logp = jax.nn.log_softmax(s[:, 0], axis=-1)
  kl_pos = jnp.sum(jnp.exp(s_logp) * (s_logp - t_logp), axis=-1)      # [n] reverse KL
  kl_all = jnp.sum(jnp.where(response_mask, kl_pos, 0.0))
  kl_special = jnp.sum(jnp.where(response_mask & special, kl_pos, 0.0))
  return {
      "diag/reverse_kl": kl_exact,
      "diag/loss_gap": est - kl_exact,
      "diag/grad_cosine": _unit_cosine(g_est, g_exact),
      "diag/grad_rel_diff": jnp.where(ref > 0, diff / jnp.where(ref > 0, ref, 1.0), diff),
      "diag/teacher_topk_mass": jnp.sum(jnp.where(
          loss_mask, jnp.sum(jnp.exp(top_logp), -1), 0.0)) / n,
      "diag/sampled_outside_topk": jnp.sum(loss_mask & ~inside) / n,
      "diag/special_kl_share": jnp.where(kl_all > 0, kl_special / jnp.where(
          kl_all > 0, kl_all, 1.0), 0.0),
      "diag/positions": jnp.sum(loss_mask).astype(jnp.float32),
  }


def draw_positions(key: Array, response_mask: Array, n: int) -> tuple[Array, Array, Array]:
  """n (row, column) response positions drawn uniformly without replacement among the response
  tokens (fewer tokens than n: the rest are drawn among padding and marked invalid)."""
  flat = response_mask.reshape(-1)
  score = jnp.where(flat, jax.random.uniform(key, flat.shape), -1.0)
  _, idx = jax.lax.top_k(score, n)
  return idx // response_mask.shape[1], idx % response_mask.shape[1], flat[idx]


@functools.partial(jax.jit, static_argnames=("student_def", "teacher_def", "static"))
def diagnose(student_def, student_params, teacher_def, teacher_params, batch: dict, key: Array,
             *, static: Static) -> dict[str, Array]:
  """The "diag/" metrics of one batch (see the module docstring).

  Args:
    student_def, student_params: the student (compute dtype; no gradient to its parameters).
    teacher_def, teacher_params: the teacher (never donated).
    batch: prompt / prompt_mask [R, P], teacher_prompt / teacher_prompt_mask [R, Pt],
      response / response_mask / loss_mask [R, N] (`tasks.Batch.scoring_inputs()`; other keys
      are ignored).
    key: the draw of the positions.
    static: the loss settings, vocabulary, sample size and special ids.
  """
  with sharding.traced_under(static.mesh):
    student, teacher = (nnx.merge(student_def, student_params),
                        nnx.merge(teacher_def, teacher_params))
    n = min(static.positions, batch["response"].size)
    rows, cols, valid = draw_positions(key, batch["response_mask"], n)
    names = ("prompt", "prompt_mask", "teacher_prompt", "teacher_prompt_mask", "response")
    drawn = {k: jnp.take(batch[k], rows, axis=0) for k in names} | {"cols": cols}

    def logits(part):
      s_hidden = _hidden_at(student, part["prompt"], part["prompt_mask"], part["response"],
                            part["cols"])
      t_hidden = _hidden_at(teacher, part["teacher_prompt"], part["teacher_prompt_mask"],
                            part["response"], part["cols"])
      return (models.logits_from_hidden(student, s_hidden)[:, :static.vocab],
              models.logits_from_hidden(teacher, t_hidden)[:, :static.vocab])

    # `chunk` rows run at a time (the update's micro-batch rows, which its own passes hold), so
    # the sample's activations are those of one micro-batch's forward pass per model.
    chunk = static.chunk if static.chunk and n % static.chunk == 0 else n
    parts = jax.tree.map(lambda x: x.reshape((n // chunk, chunk) + x.shape[1:]), drawn)
    s_logits, t_logits = (x.reshape((n,) + x.shape[2:]) for x in jax.lax.map(logits, parts))
    tokens = drawn["response"][jnp.arange(n), cols]
    loss_mask = valid & batch["loss_mask"][rows, cols]
    special = (jnp.isin(tokens, jnp.asarray(static.special_ids, jnp.int32))
               if static.special_ids else jnp.zeros_like(valid))
    return compare(jax.lax.stop_gradient(s_logits), jax.lax.stop_gradient(t_logits), tokens,
                   loss_mask, valid, special, static.loss)


def special_ids(tokenizer: Any, mask_ids: tuple[int, ...], vocab: int) -> tuple[int, ...]:
  """The tokenizer's special-token ids and the loss's mask ids inside the shared vocabulary."""
  ids = set(getattr(tokenizer, "all_special_ids", ()) or ()) | set(mask_ids)
  return tuple(sorted(i for i in ids if 0 <= i < vocab))


def chunk_for(p) -> int:
  """Rows the diagnostics run at a time: the update's micro-batch (else mini-batch) rows."""
  s = p.settings
  return s.opt.microbatch_size or s.opt.minibatch_size


def positions_for(p) -> int:
  """`log.diagnostics_positions` rounded up to a multiple of the rows run at a time (a
  multiple of the mesh's batch ways)."""
  step = chunk_for(p)
  return -(-p.settings.log.diagnostics_positions // step) * step


def maybe_run(p, tokenizer, task, params, state, batch, key: Array, done: int
              ) -> dict[str, float]:
  """The trainer's hook: the diagnostics of iteration `done` when it is a diagnostic iteration
  and `log.diagnostics_positions` > 0 (else {}); `params` are the compute copy (None: made from
  `state.params`). Includes "time/diagnostics" (seconds)."""
  s = p.settings
  if not (s.log.diagnostics_positions and p.diagnostic(done)):
    return {}
  t0 = time.perf_counter()
  params = p.compute_params(state.params) if params is None else params
  mask_ids = tuple(masking.ids_for_strings(tokenizer, s.loss.mask_strings))
  static = Static(s.loss, p.vocab, positions_for(p), special_ids(tokenizer, mask_ids, p.vocab),
                  p.mesh, chunk_for(p))
  inputs = {k: v for k, v in batch.scoring_inputs().items() if k in (
      "prompt", "prompt_mask", "teacher_prompt", "teacher_prompt_mask", "response",
      "response_mask", "loss_mask")}
  out = diagnose(p.graphdef, params, task.teacher_def, task.teacher_params, inputs,
                 jax.random.fold_in(key, 3), static=static)
  values = {k: float(v) for k, v in jax.device_get(out).items()}
  return values | {"time/diagnostics": time.perf_counter() - t0}
