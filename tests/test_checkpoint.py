"""Orbax checkpointer: sharded round trip, retention, mismatch errors and a crash mid-save."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opd_jax.checkpoint import Checkpointer
from opd_jax.sharding import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(mesh, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "params": {
          "w": jax.device_put(rng.normal(size=(8, 4)).astype(np.float32),
                              NamedSharding(mesh, P("data", "tensor"))),
          "b": jax.device_put(jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16),
                              NamedSharding(mesh, P())),
      },
      "opt_state": (jax.device_put(rng.integers(0, 100, size=(8, 2)).astype(np.int32),
                                   NamedSharding(mesh, P("fsdp"))),),
      "step": 5,
  }


def _abstract(state, specs, mesh):
  """ShapeDtypeStructs in NamedSharding(mesh, spec); Python ints (the step) stay as they are."""
  return jax.tree.map(
      lambda x, spec: x if isinstance(x, int) else
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)),
      state, specs)


def _host(tree):
  return jax.tree.map(lambda x: x if isinstance(x, int) else np.asarray(x), tree)


def test_round_trip_restores_into_other_shardings(tmp_path):
  mesh = make_mesh(2, 2, 2)
  state = _state(mesh)
  expected = _host(state)
  meta = {"data_position": 40, "config_hash": "abc", "rng": [1, 2], "lr": 0.5}
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=3)
  assert ckpt.save(5, state, meta)
  # Async: the arrays are off the devices when save returns, so the trainer may donate them.
  jax.tree.map(lambda x: x.delete() if isinstance(x, jax.Array) else None, state)
  ckpt.wait()
  assert ckpt.latest_step() == 5
  specs = {"params": {"w": P(None, "fsdp"), "b": P("tensor")}, "opt_state": (P(),), "step": P()}
  target = _abstract(expected, specs, mesh)
  restored, got_meta = ckpt.restore(5, target)
  ckpt.close()
  assert got_meta == meta
  assert restored["step"] == 5 and isinstance(restored["step"], int)
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for got, want, abstract in zip(jax.tree.leaves(restored), jax.tree.leaves(expected),
                                 jax.tree.leaves(target)):
    if isinstance(want, (int, np.integer)):
      continue
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), want)
    assert got.sharding == abstract.sharding


def test_restore_on_a_smaller_mesh(tmp_path):
  mesh = make_mesh(2, 2, 2)
  state = _state(mesh, seed=1)
  ckpt = Checkpointer(tmp_path, save_every=1, keep=1, async_save=False)
  ckpt.save(1, state, {})
  small = make_mesh(2, 1, 1, devices=jax.devices()[:2])
  specs = {"params": {"w": P("data"), "b": P()}, "opt_state": (P(None, "data"),), "step": P()}
  restored, _ = ckpt.restore(1, _abstract(state, specs, small))
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]),
                                np.asarray(state["params"]["w"]))
  assert restored["params"]["w"].sharding.mesh.devices.size == 2
  ckpt.close()


def test_keep_last_and_save_every(tmp_path):
  mesh = make_mesh(2, 2, 2)
  state = _state(mesh)
  ckpt = Checkpointer(tmp_path, save_every=3, keep=2)
  assert ckpt.latest_step() is None
  saved = [s for s in range(1, 11) if ckpt.save(s, state, {"s": s})]
  assert saved == [3, 6, 9]
  assert [s for s in range(10) if ckpt.should_save(s)] == [0, 3, 6, 9]
  assert ckpt.save(10, state, {"s": 10}, force=True)     # the end of a run
  assert not ckpt.save(10, state, {"s": 10}, force=True)  # already there: skipped
  ckpt.wait()
  assert ckpt.all_steps() == [9, 10] and ckpt.latest_step() == 10
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ["10", "9"]
  reopened = Checkpointer(tmp_path, save_every=3, keep=2)
  assert reopened.latest_step() == 10
  _, meta = reopened.restore(9, _abstract(state, jax.tree.map(lambda _: P(), state), mesh))
  assert meta == {"s": 9}
  with pytest.raises(ValueError, match="older than the newest checkpoint 10"):
    reopened.save(6, state, {}, force=True)
  reopened.close()


def test_mismatched_abstract_state_names_path_and_leaves(tmp_path):
  mesh = make_mesh(2, 2, 2)
  state = _state(mesh)
  ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
  ckpt.save(2, state, {})
  specs = jax.tree.map(lambda _: P(), state)
  good = _abstract(state, specs, mesh)
  bad = jax.tree.map(lambda x: x, good)
  bad["params"]["w"] = jax.ShapeDtypeStruct((8, 5), jnp.float32,
                                            sharding=NamedSharding(mesh, P()))
  bad["params"]["b"] = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NamedSharding(mesh, P()))
  bad["extra"] = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=NamedSharding(mesh, P()))
  del bad["opt_state"]
  with pytest.raises(ValueError) as info:
    ckpt.restore(2, bad)
  msg = str(info.value)
  assert str(tmp_path / "2") in msg
  assert "params/w: shape (8, 5) in abstract_state, (8, 4) in the checkpoint" in msg
  assert "params/b: dtype float32 in abstract_state, bfloat16 in the checkpoint" in msg
  assert "extra: in abstract_state, missing from the checkpoint" in msg
  assert "opt_state/0: in the checkpoint, missing from abstract_state" in msg
  no_sharding = jax.tree.map(lambda x: x, good)
  no_sharding["params"]["w"] = jax.ShapeDtypeStruct((8, 4), jnp.float32)
  with pytest.raises(ValueError, match="params/w: abstract_state leaf has no sharding"):
    ckpt.restore(2, no_sharding)
  with pytest.raises(ValueError, match=r"no complete checkpoint of step 3 .* steps: \[2\]"):
    ckpt.restore(3, good)
  restored, _ = ckpt.restore(2, good)   # the errors left the checkpointer usable
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]),
                                np.asarray(state["params"]["w"]))
  ckpt.close()


def test_bad_arguments(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(ValueError, match="exists and is not a folder"):
    Checkpointer(afile, save_every=1, keep=1)
  with pytest.raises(ValueError, match="save_every=0"):
    Checkpointer(tmp_path / "c", save_every=0, keep=1)
  with pytest.raises(ValueError, match="keep=-1"):
    Checkpointer(tmp_path / "c", save_every=1, keep=-1)
  ckpt = Checkpointer(tmp_path / "c", save_every=1, keep=1)
  state = {"x": jnp.ones(3)}
  with pytest.raises(ValueError, match="not strict JSON"):
    ckpt.save(1, state, {"loss": float("nan")})
  with pytest.raises(ValueError, match="not strict JSON"):
    ckpt.save(1, state, {"pos": object()})
  with pytest.raises(ValueError, match="step=-1"):
    ckpt.save(-1, state, {})
  assert ckpt.latest_step() is None
  ckpt.close()


def test_leftover_tmp_folder_is_ignored_and_cleaned(tmp_path):
  ckpt = Checkpointer(tmp_path, save_every=1, keep=2)
  state = {"x": jnp.arange(6.0)}
  ckpt.save(4, state, {"s": 4})
  ckpt.close()
  junk = tmp_path / "7.orbax-checkpoint-tmp"
  (junk / "state").mkdir(parents=True)
  (junk / "state" / "garbage").write_bytes(b"\0" * 100)
  reopened = Checkpointer(tmp_path, save_every=1, keep=2)
  assert reopened.latest_step() == 4
  abstract = {"x": jax.ShapeDtypeStruct((6,), jnp.float32,
                                        sharding=jax.sharding.SingleDeviceSharding(
                                            jax.devices()[0]))}
  restored, meta = reopened.restore(4, abstract)
  np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(6.0))
  assert meta == {"s": 4}
  assert reopened.save(7, state, {"s": 7}, force=True)
  reopened.close()
  assert sorted(os.listdir(tmp_path)) == ["4", "7"]


_CHILD = textwrap.dedent("""
    import sys, time
    import jax, numpy as np
    from opd_jax.checkpoint import Checkpointer

    def state(step):
      rng = np.random.default_rng(step)
      # 64 MB of incompressible data, so the background write takes a while.
      return {"a": [jax.numpy.asarray(rng.random((1024, 1024), np.float32)) for _ in range(16)],
              "step": step}

    ckpt = Checkpointer(sys.argv[1], save_every=1, keep=3)
    ckpt.save(1, state(1), {"step": 1})
    ckpt.wait()
    ckpt.save(2, state(2), {"step": 2})
    print("saving, latest complete step", ckpt.latest_step(), flush=True)
    time.sleep(120)
""")


def test_kill_during_async_save_leaves_previous_checkpoint(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(_CHILD)
  directory = tmp_path / "ckpt"
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  child = subprocess.Popen([sys.executable, str(script), str(directory)], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, env=env, text=True)
  try:
    line = child.stdout.readline()
    child.send_signal(signal.SIGKILL)
  finally:
    child.kill()
    child.wait()
  assert line.strip() == "saving, latest complete step 1"   # step 2 is still being written
  # The kill landed mid-write: step 2 exists only as an unfinished temporary folder.
  assert sorted(os.listdir(directory)) == ["1", "2.orbax-checkpoint-tmp"]
  ckpt = Checkpointer(directory, save_every=1, keep=3)
  assert ckpt.latest_step() == 1
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {"a": [jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=sharding)] * 16,
              "step": 0}
  restored, meta = ckpt.restore(1, abstract)
  rng = np.random.default_rng(1)
  for got in restored["a"]:
    np.testing.assert_array_equal(np.asarray(got), rng.random((1024, 1024), np.float32))
  assert restored["step"] == 1 and meta == {"step": 1}
  # A resumed run saves step 2 again over the cleaned-up leftover.
  assert ckpt.save(2, restored, {"step": 2})
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_nnx_params_and_optax_state_round_trip(tmp_path):
  """The trainer's state: NNX params, optax state, a step; abstract state from eval_shape."""
  optax = pytest.importorskip("optax")
  from flax import nnx
  mesh = make_mesh(2, 2, 2)
  tx = optax.adamw(1e-2)

  def init():
    graphdef, params = nnx.split(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), nnx.Param)
    return graphdef, {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}

  graphdef, state = init()
  spec = lambda x: P("fsdp", "tensor") if x.ndim == 2 else P()  # noqa: E731
  shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), state)
  state = jax.device_put(state, shardings)
  grads = jax.tree.map(jnp.ones_like, state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  state = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
           "step": state["step"] + 1}
  ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
  ckpt.save(1, state, {})
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          jax.eval_shape(lambda: init()[1]), shardings)
  restored, _ = ckpt.restore(1, abstract)
  ckpt.close()
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding == want.sharding
  x = jnp.ones((2, 8))
  np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef, restored["params"])(x)),
                                np.asarray(nnx.merge(graphdef, state["params"])(x)))


_TWO_PROCESS_CHILD = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    directory, process_id, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address="localhost:" + port, num_processes=2,
                               process_id=process_id)
    import numpy as np, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from opd_jax.checkpoint import Checkpointer
    from opd_jax.sharding import make_mesh

    mesh = make_mesh(2, 2, 1)   # 4 devices, 2 per process
    full = np.arange(32, dtype=np.float32).reshape(8, 4)
    x = jax.make_array_from_callback(full.shape, NamedSharding(mesh, P(("data", "fsdp"))),
                                     lambda index: full[index])
    ckpt = Checkpointer(directory, save_every=1, keep=1)
    # Every process calls save / wait / restore / close with the same arguments.
    ckpt.save(1, {"x": x, "step": 1}, {"pos": 1})
    ckpt.save(2, {"x": 2 * x, "step": 2}, {"pos": 2})
    ckpt.wait()
    abstract = {"x": jax.ShapeDtypeStruct((8, 4), jnp.float32,
                                          sharding=NamedSharding(mesh, P(None, "fsdp"))),
                "step": 0}
    state, meta = ckpt.restore(ckpt.latest_step(), abstract)
    ok = all(np.array_equal(np.asarray(s.data), 2 * full[s.index])
             for s in state["x"].addressable_shards)
    print("result", ckpt.all_steps(), state["step"], meta, ok, flush=True)
    ckpt.close()
""")


@pytest.mark.slow
def test_two_processes_save_and_restore_one_sharded_checkpoint(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(_TWO_PROCESS_CHILD)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  children = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt"), str(i),
                                port], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env=env, text=True) for i in range(2)]
  try:
    outputs = [child.communicate(timeout=180)[0] for child in children]
  finally:
    for child in children:
      child.kill()
      child.wait()
  for child, out in zip(children, outputs):
    assert child.returncode == 0, out
    assert "result [2] 2 {'pos': 2} True" in out
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["2"]


def test_a_run_its_checkpoints_folder_and_a_step_folder_all_locate_the_checkpoints(tmp_path):
  from opd_jax import checkpoint  # pylint: disable=import-outside-toplevel
  mesh = make_mesh(2, 2, 2)
  specs = {"params": {"w": P("data", "tensor"), "b": P()}, "opt_state": (P("fsdp"),),
           "step": None}
  run = tmp_path / "run"
  with Checkpointer(run / "checkpoints", save_every=1, keep=3, async_save=False) as ckpt:
    for step in (2, 4):
      ckpt.save(step, _state(mesh, seed=step), {"step": step})
  folder = run / "checkpoints"
  assert checkpoint.locate(run) == (folder, None)
  assert checkpoint.locate(folder, 2) == (folder, 2)
  assert checkpoint.locate(folder / "2") == (folder, 2)
  abstract = _abstract(_state(mesh), specs, mesh)
  for path, step, want in ((run, None, 4), (folder, 2, 2), (folder / "2", None, 2)):
    state, meta, got = checkpoint.restore(path, abstract, step=step)
    assert got == want and meta == {"step": want}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]),
                                  np.asarray(_state(mesh, seed=want)["params"]["w"]))
  with pytest.raises(ValueError, match="folder of step 2, but step 4"):
    checkpoint.locate(folder / "2", 4)
  with pytest.raises(ValueError, match="config.checkpoint.init=.*holds no checkpoint"):
    checkpoint.locate(tmp_path, name="config.checkpoint.init")
  with pytest.raises(ValueError, match="not an existing folder"):
    checkpoint.locate(tmp_path / "nowhere")
  # Reading never writes into another run's folder (no tmp clean-up, no new folders).
  before = sorted(p.name for p in folder.iterdir())
  reader = Checkpointer(folder, read_only=True)
  with pytest.raises(ValueError, match="read-only"):
    reader.save(6, _state(mesh), {})
  reader.close()
  assert sorted(p.name for p in folder.iterdir()) == before
