"""Task-alternating OPD of two teachers into one student with ĝ_γ, and its gradient variance."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from opd_jax import losses
from opd_jax.toy import env, policy

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StudySettings:
  """Static settings of the distillation study (hashable: a static argument of jit)."""
  iterations: int = 2000      # OPD updates; odd iterations (1st, 3rd, ...) use the left task
  batch: int = 64             # trajectories per update (B of App. E.2)
  micro_batches: int = 8      # M of App. E.2; the variance is over these micro-batch gradients
  lr: float = 1e-3            # Adam learning rate of the student
  horizon: int = 20           # steps per episode
  spec: policy.PolicySpec = policy.PolicySpec()
  log_every: int = 200        # progress line every this many iterations (0: silent)

  def __post_init__(self):
    if self.batch % self.micro_batches:
      raise ValueError(f"batch={self.batch} must be a multiple of micro_batches="
                       f"{self.micro_batches}")
    if self.iterations < 1:
      raise ValueError(f"iterations must be >= 1, got {self.iterations}")


def opd_surrogate(logp: Array, logq: Array, gamma: Array) -> tuple[Array, Array]:
  """`losses.sampled_token_opd` scaled by the horizon: its gradient is ĝ_γ averaged over the batch.

  The per-step rewards are r_t = log π_θ(a_t|s_t) − log q(a_t|s_t) (under stop-gradient) and
  G_t their γ-discounted reward-to-go; the library's token-mean divides by B·T, the horizon factor
  turns it into the batch mean of the per-trajectory ĝ_γ = Σ_t G_t ∇log π_θ(a_t|s_t). Also returns
  the batch mean of Σ_t r_t (a sequence-level KL estimate).

  Args:
    logp: [B, T] log π_θ(a_t|s_t) of the sampled steps (differentiated).
    logq: [B, T] the teacher's log-densities of the same steps.
    gamma: future-reward coupling in [0, 1] (may be traced).

  Returns:
    (surrogate, KL estimate), scalars.
  """
  horizon = logp.shape[-1]
  loss, aux = losses.sampled_token_opd(logp, logq, jnp.ones(logp.shape, bool), gamma=gamma)
  return horizon * loss, horizon * aux["opd/reward_mean"]


def _params_surrogate(params, obs, actions, logq, gamma, spec):
  return opd_surrogate(policy.log_prob(params, obs, actions, spec), logq, gamma)


def _output_surrogate(out_params, features, actions, logq, gamma, spec):
  mean, std = policy.head(out_params, features, spec)
  return opd_surrogate(policy.gaussian_log_prob(mean, std, actions), logq, gamma)[0]


def _split(x: Array, m: int) -> Array:
  return x.reshape((m, x.shape[0] // m) + x.shape[1:])


def microbatch_variance(grads_M) -> Array:
  """App. E.2: (1/M) Σ_m ‖g_m − ḡ‖² over the leaves of per-micro-batch gradients [M, ...]."""
  def leaf(g):
    g = g.reshape(g.shape[0], -1)
    return jnp.sum(jnp.square(g - jnp.mean(g, axis=0, keepdims=True))) / g.shape[0]
  return sum(leaf(g) for g in jax.tree.leaves(grads_M))


def _teacher_logq(teachers, task, traj, spec):
  teacher = jax.tree.map(lambda x: x[task], teachers)
  return policy.log_prob(teacher, traj.obs, traj.actions, spec)


def _train_step(s: StudySettings, tx, params, opt_state, gamma, teachers, key, it):
  """One OPD update of one student; returns new (params, opt_state) and per-iteration metrics."""
  task = it % 2  # iteration it + 1 is odd (left task) when it is even
  traj = env.rollout(lambda o: policy.apply(params, o, s.spec), task, key, s.batch, s.horizon)
  logq = _teacher_logq(teachers, task, traj, s.spec)
  m = s.micro_batches
  grad_fn = jax.grad(_params_surrogate, has_aux=True)
  grads_M, kl_M = jax.vmap(grad_fn, in_axes=(None, 0, 0, 0, None, None))(
      params, _split(traj.obs, m), _split(traj.actions, m), _split(logq, m), gamma, s.spec)
  grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads_M)
  updates, opt_state = tx.update(grads, opt_state, params)
  metrics = {
      "var": microbatch_variance(grads_M[policy.OUTPUT_LAYER]),
      "dist": jnp.mean(env.final_distance(traj, task)),
      "kl": jnp.mean(kl_M),  # sequence-level KL estimate Σ_t r_t
  }
  return optax.apply_updates(params, updates), opt_state, metrics


def _progress(s: StudySettings, start: float, gammas):
  def show(it, var_SxG, dist_SxG):
    it = int(it)
    var = np.median(np.asarray(var_SxG), axis=0)
    dist = np.median(np.asarray(dist_SxG), axis=0)
    cells = "  ".join(f"γ={g:g}: var {v:8.2e} dist {d:5.2f}" for g, v, d in zip(gammas, var, dist))
    print(f"  iter {it + 1:5d}/{s.iterations} ({env.TASK_NAMES[it % 2]:>5}, "
          f"{time.perf_counter() - start:5.1f} s)  {cells}", flush=True)
  return show


def train_students(s: StudySettings, gammas: tuple[float, ...], seed_keys: Array, teachers):
  """Distils every (seed, γ) student in one compiled program: vmap over both, scan over time.

  Students of one seed share their initialisation and their sampling noise across γ, so that
  the γ comparison is paired.

  Args:
    s: study settings.
    gammas: the γ grid.
    seed_keys: [S] PRNG keys.
    teachers: teacher parameters with leaves [S, 2, ...] (task axis LEFT, RIGHT).

  Returns:
    (initial params [S, ...], final params [S, G, ...], metrics {"var", "dist", "kl"} each
    [iterations, S, G]).
  """
  show = _progress(s, time.perf_counter(), gammas)
  return _train_students(s, jnp.asarray(gammas, jnp.float32), seed_keys, teachers, show)


@jax.jit(static_argnums=(0, 4))
def _train_students(s, gammas, seed_keys, teachers, show):
  tx = optax.adam(s.lr)
  init_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(seed_keys)
  run_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(seed_keys)
  params0 = jax.vmap(lambda k: policy.init_params(k, s.spec))(init_keys)
  n_g = gammas.shape[0]
  params = jax.tree.map(lambda x: jnp.repeat(x[:, None], n_g, axis=1), params0)
  opt_state = jax.vmap(jax.vmap(tx.init))(params)

  per_gamma = jax.vmap(lambda p, o, g, t, k, it: _train_step(s, tx, p, o, g, t, k, it),
                       in_axes=(0, 0, 0, None, None, None))
  per_seed = jax.vmap(per_gamma, in_axes=(0, 0, None, 0, 0, None))

  def body(carry, it):
    params, opt_state = carry
    keys = jax.vmap(lambda k: jax.random.fold_in(k, it))(run_keys)
    params, opt_state, metrics = per_seed(params, opt_state, gammas, teachers, keys, it)
    if s.log_every:
      # `it` is not batched, so this is a real branch: the callback runs only when logging.
      jax.lax.cond((it % s.log_every == 0) | (it == s.iterations - 1),
                   lambda: jax.debug.callback(show, it, metrics["var"], metrics["dist"]),
                   lambda: None)
    return (params, opt_state), metrics

  (params, _), metrics = jax.lax.scan(body, (params, opt_state), jnp.arange(s.iterations))
  return params0, params, metrics


@jax.jit(static_argnums=(0, 1))
def same_parameter_variance(s: StudySettings, n_batches: int, points, gammas: Array,
                            teachers, keys: Array) -> Array:
  """App. E.2 variance of every ĝ_γ at fixed student parameters, averaged over many batches.

  For each point, seed and task, `n_batches` batches of B trajectories are drawn once and every
  γ is evaluated on the same batches, so the comparison across γ is paired.

  Args:
    s: study settings.
    n_batches: batches averaged over.
    points: student parameters with leaves [P, S, ...] (e.g. initial and trained students).
    gammas: [G] γ grid.
    teachers: teacher parameters with leaves [S, 2, ...].
    keys: [S] PRNG keys.

  Returns:
    [P, S, 2, G] mean App. E.2 variance.
  """
  m = s.micro_batches
  grad_fn = jax.grad(_output_surrogate)
  per_micro = jax.vmap(grad_fn, in_axes=(None, 0, 0, 0, None, None))
  per_gamma = jax.vmap(per_micro, in_axes=(None, None, None, None, 0, None))

  def one(params, teachers_s, key, task):
    def body(total, i):
      traj = env.rollout(lambda o: policy.apply(params, o, s.spec), task,
                         jax.random.fold_in(key, i), s.batch, s.horizon)
      logq = _teacher_logq(teachers_s, task, traj, s.spec)
      features = policy.hidden_features(params, traj.obs)
      grads_GxM = per_gamma(params[policy.OUTPUT_LAYER], _split(features, m),
                            _split(traj.actions, m), _split(logq, m), gammas, s.spec)
      return total + jax.vmap(microbatch_variance)(grads_GxM), None

    total, _ = jax.lax.scan(body, jnp.zeros(gammas.shape), jnp.arange(n_batches))
    return total / n_batches

  tasks = jnp.arange(2)
  per_task = jax.vmap(one, in_axes=(None, None, None, 0))
  per_seed = jax.vmap(per_task, in_axes=(0, 0, 0, None))
  return jax.vmap(per_seed, in_axes=(0, None, None, None))(points, teachers, keys, tasks)


@jax.jit(static_argnums=(0, 1))
def student_rollouts(s: StudySettings, n: int, params, keys: Array) -> Array:
  """Positions s_0..s_T of n rollouts per student and task: params [S, G, ...] -> [S, G, 2, n, T+1].

  Every γ of a seed uses the same noise (key of its seed), so the comparison is paired.
  """
  def one(p, key, task):
    return env.rollout(lambda o: policy.apply(p, o, s.spec), task, key, n, s.horizon).positions

  per_task = jax.vmap(one, in_axes=(None, None, 0))
  per_gamma = jax.vmap(per_task, in_axes=(0, None, None))
  return jax.vmap(per_gamma, in_axes=(0, 0, None))(params, keys, jnp.arange(2))


@jax.jit(static_argnums=(0, 1))
def teacher_rollouts(s: StudySettings, n: int, teachers, keys: Array) -> Array:
  """Positions of n rollouts of each teacher on its own task: [S, 2, ...] -> [S, 2, n, T+1]."""
  def one(p, key, task):
    return env.rollout(lambda o: policy.apply(p, o, s.spec), task, key, n, s.horizon).positions

  per_task = jax.vmap(one, in_axes=(0, None, 0))
  return jax.vmap(per_task, in_axes=(0, 0, None))(teachers, keys, jnp.arange(2))
