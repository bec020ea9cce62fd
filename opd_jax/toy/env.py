"""The two mirror 1-D tasks of the toy study (App. E): s_{t+1} = s_t + δ, δ ~ the policy."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

LEFT, RIGHT = 0, 1
TASK_NAMES = ("left", "right")
STARTS = (2.0, -2.0)    # left task starts at +2 and aims at -3; right task mirrors it
TARGETS = (-3.0, 3.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trajectories:
  """A batch of rollouts: obs [B, T, 3], actions [B, T], positions [B, T + 1] (s_0 .. s_T)."""
  obs: Array
  actions: Array
  positions: Array


def start(task: Array) -> Array:
  return jnp.asarray(STARTS, jnp.float32)[task]


def target(task: Array) -> Array:
  return jnp.asarray(TARGETS, jnp.float32)[task]


def observe(task: Array, position: Array, t: Array, horizon: int) -> Array:
  """Policy input [task id (-1 left, +1 right), position, t / T], shape position.shape + (3,)."""
  task_id = jnp.broadcast_to(2.0 * jnp.asarray(task, jnp.float32) - 1.0, position.shape)
  time = jnp.broadcast_to(jnp.asarray(t, jnp.float32) / horizon, position.shape)
  return jnp.stack([task_id, position, time], axis=-1)


def rollout(gaussian: Callable[[Array], tuple[Array, Array]], task: Array, key: Array,
            batch: int, horizon: int) -> Trajectories:
  """Samples `batch` trajectories of `horizon` steps with a lax.scan over time.

  Args:
    gaussian: obs [B, 3] -> (mean [B], std [B]) of the step δ.
    task: LEFT or RIGHT (may be traced).
    key: PRNG key.
    batch: number of trajectories B.
    horizon: number of steps T.

  Returns:
    Trajectories with obs [B, T, 3], actions [B, T], positions [B, T + 1].
  """
  s0 = jnp.full((batch,), start(task))

  def step(pos, xs):
    t, k = xs
    obs = observe(task, pos, t, horizon)
    mean, std = gaussian(obs)
    action = mean + std * jax.random.normal(k, pos.shape)
    return pos + action, (obs, action, pos + action)

  _, (obs, actions, nxt) = jax.lax.scan(
      step, s0, (jnp.arange(horizon), jax.random.split(key, horizon)))
  obs_BxTx3 = jnp.swapaxes(obs, 0, 1)
  positions = jnp.concatenate([s0[:, None], jnp.swapaxes(nxt, 0, 1)], axis=1)
  return Trajectories(obs=obs_BxTx3, actions=jnp.swapaxes(actions, 0, 1), positions=positions)


def final_distance(traj: Trajectories, task: Array) -> Array:
  """|s_T − target| per trajectory, [B]."""
  return jnp.abs(traj.positions[:, -1] - target(task))
