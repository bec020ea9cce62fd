"""Mesh axis names, the mesh from axis sizes, multi-host start-up and host copies (a leaf)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# The three axes every mesh of the package has, in this order. `data` and `fsdp` both split the
# batch (rows, tokens); `fsdp` also shards the model width of the parameters and optimizer state;
# `tensor` splits attention heads, MLP width and the vocabulary.
MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes that split batch-like dimensions (rollout rows, flattened tokens), everywhere.
BATCH_AXES = ("data", "fsdp")


def check_mesh(mesh: Mesh) -> None:
  """Raises ValueError unless `mesh` has the data, fsdp and tensor axes, all of type Auto."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  missing = [a for a in MESH_AXES if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"mesh axes {mesh.axis_names} lack {missing}; the model needs axes named "
                     f"{MESH_AXES}")
  explicit = [n for n, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Auto]
  if explicit:
    raise ValueError(f"mesh axes {explicit} are not AxisType.Auto; build the mesh with "
                     "opd_jax.sharding.make_mesh (the model code is GSPMD-style)")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *,
              devices: list | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes over `devices` (default: all global devices).

  Args:
    data, fsdp, tensor: axis sizes; at most one may be -1, meaning "all remaining devices".
    devices: the devices to use (default `jax.devices()`, every process's).

  Returns:
    The mesh. Raises ValueError naming the sizes when they do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  for name, size in sizes.items():
    if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
      raise ValueError(f"mesh.{name}={size!r} is not accepted; give a positive int or -1 "
                       "(all remaining devices)")
  free = [n for n, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh axes {free} are all -1; at most one axis may take the remaining "
                     "devices")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if len(devices) % fixed:
      raise ValueError(f"mesh {sizes} cannot use {len(devices)} devices: {len(devices)} is not "
                       f"a multiple of {fixed}")
    sizes[free[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} "
                     f"= {math.prod(sizes.values())} but {len(devices)} devices are present; "
                     "make the product equal the device count (or set one axis to -1)")
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def mesh_from_config(axes: Mapping[str, int]) -> Mesh:
  """`make_mesh` from a mapping with the keys data, fsdp, tensor (e.g. a config's `mesh`)."""
  unknown = sorted(set(axes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh settings {unknown} are not mesh axes; accepted: {MESH_AXES}")
  return make_mesh(**{a: axes[a] for a in MESH_AXES if a in axes})


def traced_under(mesh: Mesh | None):
  """A context manager for code being traced: inside it `jax.sharding.get_abstract_mesh()` is
  `mesh`, which is how the decoder finds the batch axes to split its activations' rows over
  (`models.decoder.constrain_rows`). Usable inside `jax.jit` (unlike `jax.set_mesh`); does
  nothing when `mesh` is None."""
  if mesh is None:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Rows (the leading dimension) split over BATCH_AXES, every other dimension replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
  """How many ways BATCH_AXES split the rows: a batch must be a multiple of this."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def to_host(x) -> np.ndarray:
  """A (global) array on the host; gathered from every process when it spans several, so on
  several hosts every process must call it (a collective)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def local_rows(x) -> np.ndarray:
  """This process's rows of a global array whose rows are split over the batch axes (the
  whole array on one process), in row order; no collective."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  by_start = {}
  for shard in x.addressable_shards:
    by_start.setdefault(shard.index[0].start or 0, shard)     # replicas hold the same rows
  return np.concatenate([np.asarray(by_start[k].data) for k in sorted(by_start)])


def initialize_distributed(enabled: bool) -> None:
  """Multi-host start-up: `jax.distributed.initialize()` (cluster from the environment).

  Must run before anything touches devices. On TPU pods and SLURM / Open MPI GPU clusters JAX
  finds the coordinator, process count and process id on its own; elsewhere set
  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on
  every process (JAX itself reads only the first; the other two are passed on from here).
  """
  if not enabled:
    return
  given = {}
  for var, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    value = os.environ.get(var, "")
    if value:
      if not value.isdigit():
        raise ValueError(f"{var}={value!r} is not accepted; expected a non-negative integer")
      given[arg] = int(value)
  jax.distributed.initialize(**given)
