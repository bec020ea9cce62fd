"""The mesh from axis sizes, batch shardings and host copies on the 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec

from opd_jax import sharding


def _sizes(mesh):
  return tuple(mesh.shape[a] for a in sharding.MESH_AXES)


@pytest.mark.parametrize("kwargs, sizes", [
    ({}, (8, 1, 1)),                                  # data takes every device by default
    ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
    ({"data": 1, "fsdp": 8}, (1, 8, 1)),
    ({"data": 2, "fsdp": 2, "tensor": -1}, (2, 2, 2)),
])
def test_make_mesh_sizes_and_axes(kwargs, sizes):
  mesh = sharding.make_mesh(**kwargs)
  assert mesh.axis_names == sharding.MESH_AXES
  assert _sizes(mesh) == sizes
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  sharding.check_mesh(mesh)   # the package's own meshes pass its check


def test_make_mesh_on_given_devices():
  devices = jax.devices()[:4]
  mesh = sharding.make_mesh(data=-1, tensor=2, devices=devices)
  assert _sizes(mesh) == (2, 1, 2)
  assert set(mesh.devices.flat) == set(devices)


@pytest.mark.parametrize("kwargs, message", [
    ({"data": 0}, r"mesh.data=0 is not accepted; give a positive int or -1"),
    ({"fsdp": -2}, r"mesh.fsdp=-2 is not accepted"),
    ({"tensor": True}, r"mesh.tensor=True is not accepted"),
    ({"tensor": 2.0}, r"mesh.tensor=2.0 is not accepted"),
    ({"data": -1, "fsdp": -1}, r"mesh axes \['data', 'fsdp'\] are all -1"),
    ({"data": -1, "fsdp": 3}, r"cannot use 8 devices: 8 is not a multiple of 3"),
    ({"data": 2, "fsdp": 2}, r"data\*fsdp\*tensor = 2\*2\*1 = 4 but 8 devices are present"),
])
def test_make_mesh_errors_name_the_sizes(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(**kwargs)


def test_mesh_from_config():
  assert _sizes(sharding.mesh_from_config({"data": 2, "fsdp": 4})) == (2, 4, 1)
  assert _sizes(sharding.mesh_from_config({})) == (8, 1, 1)
  with pytest.raises(ValueError, match=r"mesh settings \['model'\] are not mesh axes"):
    sharding.mesh_from_config({"data": 8, "model": 1})


def test_check_mesh_rejects_other_meshes():
  with pytest.raises(ValueError, match="must be a jax.sharding.Mesh, got tuple"):
    sharding.check_mesh((8, 1, 1))
  devices = np.array(jax.devices()).reshape(8, 1)
  with pytest.raises(ValueError, match=r"lack \['fsdp', 'tensor'\]"):
    sharding.check_mesh(Mesh(devices, ("data", "model")))
  explicit = jax.make_mesh((8, 1, 1), sharding.MESH_AXES,
                           axis_types=(AxisType.Explicit,) * 3)
  with pytest.raises(ValueError, match="are not AxisType.Auto"):
    sharding.check_mesh(explicit)


@pytest.mark.parametrize("sizes, divisor", [((8, 1, 1), 8), ((2, 2, 2), 4), ((1, 8, 1), 8),
                                            ((1, 1, 8), 1)])
def test_batch_divisor_counts_the_batch_axes(sizes, divisor):
  assert sharding.batch_divisor(sharding.make_mesh(*sizes)) == divisor


def test_batch_sharding_splits_rows_and_replicated_keeps_whole_arrays():
  mesh = sharding.make_mesh(2, 2, 2)
  rows = sharding.batch_sharding(mesh, 3)
  assert rows.spec == PartitionSpec(sharding.BATCH_AXES, None, None)
  x = np.arange(8 * 3 * 2, dtype=np.float32).reshape(8, 3, 2)
  split = jax.device_put(x, rows)
  # Rows over data x fsdp (4 ways), each slice on the 2 tensor devices.
  assert {s.data.shape for s in split.addressable_shards} == {(2, 3, 2)}
  assert sorted(s.index[0].start for s in split.addressable_shards) == [0, 0, 2, 2, 4, 4, 6, 6]
  whole = jax.device_put(x, sharding.replicated(mesh))
  assert all(np.array_equal(s.data, x) for s in whole.addressable_shards)


def test_to_host_gathers_a_sharded_array():
  mesh = sharding.make_mesh(2, 2, 2)
  x = jnp.arange(16, dtype=jnp.int32).reshape(8, 2) * 3
  host = sharding.to_host(jax.device_put(x, sharding.batch_sharding(mesh, 2)))
  assert isinstance(host, np.ndarray)
  np.testing.assert_array_equal(host, np.arange(16).reshape(8, 2) * 3)
  assert isinstance(sharding.to_host(np.ones(3)), np.ndarray)   # host values pass through


def test_traced_under_sets_the_abstract_mesh():
  mesh = sharding.make_mesh(2, 2, 2)
  with sharding.traced_under(mesh):
    assert jax.sharding.get_abstract_mesh().axis_names == sharding.MESH_AXES
  with sharding.traced_under(None):   # nothing to set: a no-op
    assert jax.sharding.get_abstract_mesh().empty


def test_initialize_distributed(monkeypatch):
  sharding.initialize_distributed(False)   # single host: nothing happens
  assert not jax.distributed.is_initialized()
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not accepted"):
    sharding.initialize_distributed(True)   # refused before JAX is asked to connect
