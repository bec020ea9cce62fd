"""Parameter shardings of the Decoder on a (data, fsdp, tensor) mesh, and random initialisation."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from opd_jax.models.config import ModelConfig
from opd_jax.models.decoder import Decoder

MESH_AXES = ("data", "fsdp", "tensor")
# Activations and cache rows are split over both batch-like axes.
BATCH_AXES = ("data", "fsdp")

# Last path element of a parameter -> mesh axis of each of its dimensions. Kernels are [in, out]:
# projections into heads / MLP width split their output over `tensor` (column parallel), those
# back to the model width split their input (row parallel); fsdp shards the model width.
_ROW_PARALLEL = ("o_proj", "down_proj")


def check_mesh(mesh: Mesh) -> None:
  """Raises ValueError unless `mesh` has the data, fsdp and tensor axes, all of type Auto."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  missing = [a for a in MESH_AXES if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"mesh axes {mesh.axis_names} lack {missing}; the model needs axes named "
                     f"{MESH_AXES}")
  explicit = [n for n, t in zip(mesh.axis_names, mesh.axis_types)
              if t != jax.sharding.AxisType.Auto]
  if explicit:
    raise ValueError(f"mesh axes {explicit} are not AxisType.Auto; build the mesh with "
                     "axis_types=(jax.sharding.AxisType.Auto,) * n (the model code is GSPMD-style)")


def param_partition_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """PartitionSpec of the Decoder parameter at `path` (as in nnx.to_flat_state) with `shape`.

  A dimension whose size is not a multiple of its mesh axis size is replicated instead.
  """
  names = [str(p) for p in path]
  leaf, owner = names[-1], names[-2] if len(names) > 1 else ""
  if leaf == "embedding":                         # [V, D]
    axes = ("tensor", "fsdp")
  elif leaf == "kernel":                          # [in, out]
    axes = ("tensor", "fsdp") if owner in _ROW_PARALLEL else ("fsdp", "tensor")
  elif leaf == "bias" and owner not in _ROW_PARALLEL:
    axes = ("tensor",)
  else:                                           # norms, row-parallel biases
    axes = (None,) * len(shape)
  axes = tuple(a if a is not None and dim % mesh.shape[a] == 0 else None
               for a, dim in zip(axes, shape))
  return PartitionSpec(*axes)


def model_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """A State of NamedShardings with the structure of the Decoder's (abstract) `state`."""
  check_mesh(mesh)
  flat = []
  for path, var in nnx.to_flat_state(state):
    spec = param_partition_spec(path, var.shape, mesh)
    flat.append((path, var.replace(NamedSharding(mesh, spec))))
  return nnx.from_flat_state(flat)


def init_model(config: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None):
  """A randomly initialised Decoder (normal(0.02) weights), sharded on `mesh` when given.

  Args:
    config: the architecture and dtype.
    seed: PRNG seed of the initialisation.
    mesh: optional (data, fsdp, tensor) mesh with Auto axes; each parameter is created directly
      with its sharding (no replicated copy first).

  Returns:
    The Decoder.
  """
  def make_state():
    return nnx.split(Decoder(config, rngs=nnx.Rngs(seed)))[1]
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(seed))))
  out_shardings = None if mesh is None else model_shardings(abstract, mesh)
  state = jax.jit(make_state, out_shardings=out_shardings)()
  return nnx.merge(graphdef, state)
