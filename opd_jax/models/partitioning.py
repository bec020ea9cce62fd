"""Parameter shardings of the Decoder on a (data, fsdp, tensor) mesh, and random initialisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from opd_jax.models.config import ModelConfig
from opd_jax.models.decoder import Decoder
from opd_jax.sharding import BATCH_AXES, MESH_AXES, check_mesh  # noqa: F401  (re-exported)

# Last path element of a parameter -> mesh axis of each of its dimensions. Kernels are [in, out]:
# projections into heads / MLP width split their output over `tensor` (column parallel), those
# back to the model width split their input (row parallel); fsdp shards the model width.
_ROW_PARALLEL = ("o_proj", "down_proj")
# The embedding's rows (the vocabulary) split over tensor and fsdp together, its width whole: a
# lookup then reads each token's row where it lives and sums the [rows, T, D] result over those
# axes (activation-sized traffic). With the width split over fsdp as well, fsdp would split both
# the batch and the width of the looked-up activations, and XLA re-shards that by gathering the
# whole table ("Involuntary full rematerialization"): ~1 GB per step at 7B. The first of these
# whose size divides the vocabulary is used.
_EMBEDDING_ROW_AXES = (("tensor", "fsdp"), ("tensor",), ("fsdp",))


def param_partition_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """PartitionSpec of the Decoder parameter at `path` (as in nnx.to_flat_state) with `shape`.

  A dimension whose size is not a multiple of its mesh axis size is replicated instead. The
  stacked layer parameters (path "layers", ...) have a leading layer axis, replicated: every
  device holds its share of every layer, and the scan over layers slices it locally.
  """
  names = [str(p) for p in path]
  if is_stacked(path):
    inner = param_partition_spec(path[1:], shape[1:], mesh)
    return PartitionSpec(None, *inner)
  leaf, owner = names[-1], names[-2] if len(names) > 1 else ""
  if leaf == "embedding":                         # [V, D]
    fits = [rows for rows in _EMBEDDING_ROW_AXES
            if shape[0] % int(np.prod([mesh.shape[a] for a in rows])) == 0]
    return PartitionSpec(fits[0] if fits else None, None)
  if leaf == "kernel":                            # [in, out]
    axes = ("tensor", "fsdp") if owner in _ROW_PARALLEL else ("fsdp", "tensor")
  elif leaf == "bias" and owner not in _ROW_PARALLEL:
    axes = ("tensor",)
  else:                                           # norms, row-parallel biases
    axes = (None,) * len(shape)
  axes = tuple(a if a is not None and dim % mesh.shape[a] == 0 else None
               for a, dim in zip(axes, shape))
  return PartitionSpec(*axes)


def is_stacked(path: tuple) -> bool:
  """Whether the Decoder parameter at `path` is a stacked layer parameter ([L, ...])."""
  return len(path) > 1 and str(path[0]) == "layers"


def model_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """A State of NamedShardings with the structure of the Decoder's (abstract) `state`."""
  check_mesh(mesh)
  flat = []
  for path, var in nnx.to_flat_state(state):
    spec = param_partition_spec(path, var.shape, mesh)
    flat.append((path, var.replace(NamedSharding(mesh, spec))))
  return nnx.from_flat_state(flat)


def _initial_value(path: tuple, shape: tuple[int, ...], seed: tuple[int, ...], std: float,
                   dtype) -> np.ndarray:
  leaf = str(path[-1])
  if leaf not in ("kernel", "embedding"):
    return (np.ones(shape) if leaf == "weight" else np.zeros(shape)).astype(dtype)  # norms/biases
  if not is_stacked(path):
    return np.random.default_rng(seed).normal(0.0, std, shape).astype(dtype)
  # One layer at a time (its own seed), so the host holds one float64 layer, not all of them.
  out = np.empty(shape, dtype)
  for layer in range(shape[0]):
    out[layer] = np.random.default_rng(seed + (layer,)).normal(0.0, std, shape[1:])
  return out


def init_model(config: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None,
               std: float = 0.02) -> Decoder:
  """A randomly initialised Decoder: N(0, std) kernels and embeddings, unit norms, zero biases.

  Values are drawn on the host with numpy one parameter at a time (nothing to compile, so tests
  get a model in milliseconds; the values do not depend on the mesh) and each array is created
  directly with its sharding.

  Args:
    config: the architecture and dtype.
    seed: seed of the draw.
    mesh: optional (data, fsdp, tensor) mesh with Auto axes. None: the first device.
    std: standard deviation of kernels and embeddings (transformers' initializer_range is 0.02;
      tests that want peaked next-token distributions use more).

  Returns:
    The Decoder.
  """
  if mesh is not None:
    check_mesh(mesh)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config)))
  dtype = jnp.dtype(config.dtype)
  flat = []
  for i, (path, var) in enumerate(nnx.to_flat_state(abstract)):
    host = _initial_value(path, var.shape, (seed, i), std, dtype)
    sharding = (SingleDeviceSharding(jax.devices()[0]) if mesh is None else
                NamedSharding(mesh, param_partition_spec(path, var.shape, mesh)))
    array = jax.make_array_from_callback(var.shape, sharding, lambda idx, host=host: host[idx])
    flat.append((path, var.replace(array)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
