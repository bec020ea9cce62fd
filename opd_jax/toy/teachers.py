"""REINFORCE training of the toy study's teachers, one Gaussian MLP per task."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from opd_jax import losses
from opd_jax.toy import env, policy

Array = jax.Array

TEACHER_REWARDS = ("final", "per_step")


@dataclasses.dataclass(frozen=True)
class TeacherSettings:
  """Static settings of teacher training (hashable: passed to jit as a static argument)."""
  reward: str = "final"       # "final": −|s_T − target|; "per_step": −|s_{t+1} − target| each step
  iterations: int = 600       # REINFORCE updates per teacher
  batch: int = 64             # trajectories per update
  lr: float = 1e-3            # Adam learning rate
  horizon: int = 20           # steps per episode
  spec: policy.PolicySpec = policy.PolicySpec()

  def __post_init__(self):
    if self.reward not in TEACHER_REWARDS:
      raise ValueError(f"teacher reward {self.reward!r} is not known; accepted: "
                       f"{', '.join(TEACHER_REWARDS)}")


def _returns(s: TeacherSettings, traj: env.Trajectories, task: Array) -> Array:
  """Per-step returns [B, T] that REINFORCE weights the scores with."""
  tgt = env.target(task)
  if s.reward == "final":
    final = -jnp.abs(traj.positions[:, -1] - tgt)
    return jnp.broadcast_to(final[:, None], traj.actions.shape)
  step_rewards = -jnp.abs(traj.positions[:, 1:] - tgt)
  return losses.reward_to_go(step_rewards, jnp.ones(step_rewards.shape, bool), 1.0)


def _train_one(s: TeacherSettings, key: Array, task: Array) -> tuple[dict, Array]:
  init_key, run_key = jax.random.split(key)
  params = policy.init_params(init_key, s.spec)
  tx = optax.adam(s.lr)
  opt_state = tx.init(params)

  def step(carry, it):
    params, opt_state = carry
    traj = env.rollout(lambda o: policy.apply(params, o, s.spec), task,
                       jax.random.fold_in(run_key, it), s.batch, s.horizon)
    returns = _returns(s, traj, task)
    # Baseline: the batch mean at each step; advantages normalised for a scale-free step size.
    adv = returns - jnp.mean(returns, axis=0, keepdims=True)
    adv = adv / (jnp.std(adv) + 1e-6)

    def loss_fn(p):
      logp = policy.log_prob(p, traj.obs, traj.actions, s.spec)
      return -jnp.mean(jnp.sum(adv * logp, axis=1))

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), jnp.mean(env.final_distance(traj, task))

  (params, _), dist = jax.lax.scan(step, (params, opt_state), jnp.arange(s.iterations))
  return params, dist


@jax.jit(static_argnums=0)
def train_teachers(s: TeacherSettings, keys: Array) -> tuple[dict, Array]:
  """Trains one teacher per (seed key, task), all in one compiled program.

  Args:
    s: teacher settings.
    keys: [S] PRNG keys, one per seed.

  Returns:
    (params with leaves [S, 2, ...] (task axis: LEFT, RIGHT), mean |s_T − target| of each
    training batch, [S, 2, iterations]).
  """
  tasks = jnp.arange(2)

  def per_seed(key):
    task_keys = jax.vmap(lambda t: jax.random.fold_in(key, t))(tasks)
    return jax.vmap(lambda k, t: _train_one(s, k, t))(task_keys, tasks)

  return jax.vmap(per_seed)(keys)
