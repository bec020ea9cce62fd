"""Gaussian MLP policy of the toy study: [task id, position, t/T] -> N(mean, std) over the step."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jax.Array
Params = dict

# Layer names in order; "out" is the output layer whose gradient the variance is measured on.
LAYERS = ("hidden1", "hidden2", "out")
OUTPUT_LAYER = "out"
OBS_DIM = 3


@dataclasses.dataclass(frozen=True)
class PolicySpec:
  """Architecture of the policy (hashable, so jitted code can close over it)."""
  hidden: int = 64          # width of both hidden layers (64: 4,546 parameters)
  std_floor: float = 0.075  # std = std_floor + softplus(raw): keeps log-densities finite
  max_step: float = 0.5     # mean = max_step · tanh(raw): bounded steps, so paths are gradual
  init_std: float = 0.1     # std of a freshly initialised policy (sets the output bias)

  def __post_init__(self):
    if self.hidden < 1 or self.std_floor <= 0 or self.max_step <= 0:
      raise ValueError(f"PolicySpec needs hidden >= 1, std_floor > 0 and max_step > 0, got {self}")
    if not self.init_std > self.std_floor:
      raise ValueError(f"PolicySpec.init_std={self.init_std} must exceed std_floor="
                       f"{self.std_floor}")


def init_params(key: Array, spec: PolicySpec) -> Params:
  """A 3-layer MLP (3 -> hidden -> hidden -> 2), LeCun-normal weights, zero biases.

  The output layer starts 100x smaller, and its std bias at softplus⁻¹(init_std − std_floor),
  so that every policy starts near mean 0 and std = init_std, whatever the seed.

  Args:
    key: PRNG key.
    spec: the architecture.

  Returns:
    {"hidden1": {"w", "b"}, "hidden2": {...}, "out": {...}}.
  """
  h = spec.hidden
  sizes = ((OBS_DIM, h), (h, h), (h, 2))
  params = {}
  for name, (n_in, n_out), k in zip(LAYERS, sizes, jax.random.split(key, len(LAYERS))):
    scale = 1.0 / math.sqrt(n_in) * (0.01 if name == OUTPUT_LAYER else 1.0)
    params[name] = {"w": scale * jax.random.normal(k, (n_in, n_out), jnp.float32),
                    "b": jnp.zeros((n_out,), jnp.float32)}
  excess = spec.init_std - spec.std_floor
  std_bias = excess + math.log(-math.expm1(-excess))  # softplus⁻¹(excess), stable for any excess
  params[OUTPUT_LAYER]["b"] = jnp.asarray([0.0, std_bias], jnp.float32)
  return params


def num_params(params: Params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def _dense(layer: Params, x: Array) -> Array:
  bias = layer["b"].reshape((1,) * (x.ndim - 1) + layer["b"].shape)  # explicit broadcast
  return x @ layer["w"] + bias


def hidden_features(params: Params, obs: Array) -> Array:
  """Activations feeding the output layer, [..., hidden]."""
  h = jnp.tanh(_dense(params["hidden1"], obs))
  return jnp.tanh(_dense(params["hidden2"], h))


def head(out_params: Params, features: Array, spec: PolicySpec) -> tuple[Array, Array]:
  """Output layer: features -> (mean, std), bounded mean and floored std."""
  raw = _dense(out_params, features)
  return spec.max_step * jnp.tanh(raw[..., 0]), spec.std_floor + jax.nn.softplus(raw[..., 1])


def apply(params: Params, obs: Array, spec: PolicySpec) -> tuple[Array, Array]:
  """Gaussian parameters of the step δ for observations [..., 3]; returns (mean, std), [...]."""
  return head(params[OUTPUT_LAYER], hidden_features(params, obs), spec)


def gaussian_log_prob(mean: Array, std: Array, x: Array) -> Array:
  """log N(x; mean, std²), elementwise."""
  z = (x - mean) / std
  return -0.5 * z * z - jnp.log(std) - 0.5 * math.log(2.0 * math.pi)


def log_prob(params: Params, obs: Array, actions: Array, spec: PolicySpec) -> Array:
  """log π(a | s) for observations [..., 3] and actions [...]."""
  mean, std = apply(params, obs, spec)
  return gaussian_log_prob(mean, std, actions)
