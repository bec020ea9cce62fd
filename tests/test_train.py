"""The OPD trainer: config checks, runs per estimator, mesh equivalence, non-finite stop, resume."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_helpers
from opd_jax import errors, estimators, models, settings, sharding, steps, train
from opd_jax.data import order, tiny_arith
from opd_jax.settings import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _lines(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _strip_timing(rows):
  return [{k: v for k, v in r.items() if not k.startswith(train.TIMING_PREFIXES)} for r in rows]


# ----------------------------------------------------------------------------------------------
# config boundary
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, match", [
    ({"loss.estimator": "kl"}, r"config.loss.estimator='kl' is not accepted; accepted: lsm"),
    ({"rollout.top_p": 1.5}, r"config.rollout.top_p=1.5 .*\(0, 1\]"),
    ({"rollout.top_p": 0.0}, r"config.rollout.top_p=0.0"),
    ({"opt.minibatch_size": 3}, r"config.opt.minibatch_size=3 .*8 rollouts per step"),
    ({"model.path": "/no/such/folder"},
     r"config.model.path='/no/such/folder'.*local Hugging Face folder"),
    ({"teacher.path": "/no/such/folder"}, r"config.teacher.path="),
    ({"data.dataset": ""}, r"config.data.dataset='' .*registered dataset"),
    ({"loss.support": "student"}, r"config.loss.support='student' .*teacher, teacher\+sampled"),
    ({"loss.gamma": 1.5}, r"config.loss.gamma=1.5 .*\[0, 1\]"),
    ({"workdir": ""}, r"config.workdir='' .*--config.workdir=DIR"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, overrides, match):
  c = train_helpers.tiny_config(tmp_path / "w", tmp_path / "tfds", **overrides)
  with pytest.raises(errors.UserError, match=match) as raised:
    settings.TrainSettings.from_config(c)
  # A model folder that cannot be loaded is a CheckpointError (naming the key and the folder).
  path = any(k.endswith(".path") for k in overrides)
  assert type(raised.value) is (models.CheckpointError if path else settings.ConfigError)
  assert not (tmp_path / "w").exists()


def test_unknown_setting_is_named(tmp_path):
  c = train_helpers.tiny_config(tmp_path, tmp_path)
  c.loss.temperature = 2.0
  with pytest.raises(settings.ConfigError, match=r"config.loss.temperature is not a setting"):
    settings.TrainSettings.from_config(c)


def test_layout_errors_need_the_mesh_and_vocabulary(tmp_path, tiny_arith_dir):
  # 8 fake devices: a mini-batch of 4 rows cannot be split 8 ways.
  c = train_helpers.tiny_config(tmp_path / "a", tiny_arith_dir)
  with pytest.raises(settings.ConfigError, match=r"minibatch_size=4 must be a multiple of the "
                     r"mesh's batch ways data\*fsdp=8"):
    train.run(c, log=lambda _: None)
  c = train_helpers.tiny_config(tmp_path / "b", tiny_arith_dir, **{
      "loss.k": 100, "opt.minibatch_size": 8, "data.prompts_per_step": 8})
  with pytest.raises(settings.ConfigError, match=r"config.loss.k=100 exceeds the shared "
                     r"vocabulary of 14 tokens"):
    train.run(c, log=lambda _: None)


def test_data_order_is_a_pure_function_of_seed_step_process():
  a = order.batch_indices(10, seed=3, step=2, global_batch=4)
  assert np.array_equal(a, order.batch_indices(10, seed=3, step=2, global_batch=4))
  # Processes take disjoint contiguous shares of the same global batch.
  parts = [order.batch_indices(10, seed=3, step=2, global_batch=4, process_index=p,
                               process_count=2) for p in range(2)]
  assert np.array_equal(np.concatenate(parts), a)
  # Every epoch is a permutation; batches cross epoch boundaries without repeats inside an epoch.
  seq = np.concatenate([order.batch_indices(10, seed=3, step=s, global_batch=4)
                        for s in range(5)])
  assert sorted(seq[:10].tolist()) == list(range(10))
  assert sorted(seq[10:20].tolist()) == list(range(10))
  with pytest.raises(ValueError, match="multiple of the process count 3"):
    order.batch_indices(10, seed=0, step=0, global_batch=4, process_count=3)


# ----------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------


def _mesh8(**kw):
  # Rows split 8 ways on the test's 8 fake devices: 8 prompts x 2 rollouts, mini-batches of 8.
  return {"data.prompts_per_step": 8, "opt.minibatch_size": 8, **kw}


@pytest.mark.parametrize("estimator", [
    "lsm",   # sampled-token OPD runs end to end in the kill-and-resume test
    pytest.param("sampled_token", marks=pytest.mark.slow),
    pytest.param("full_rkl", marks=pytest.mark.slow),
    pytest.param("sft", marks=pytest.mark.slow)])
def test_two_iterations_write_metrics_checkpoint_and_samples(tmp_path, tiny_arith_dir,
                                                             estimator):
  c = train_helpers.tiny_config(tmp_path, tiny_arith_dir, steps=2,
                                **_mesh8(**{"loss.estimator": estimator}))
  history = train.run(c, log=lambda _: None)
  assert [h["step"] for h in history] == [1, 2]
  rows = _lines(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2]
  expected = {"loss", "opt/grad_norm", "opt/lr", "policy/entropy", "rollout/length_mean",
              "rollout/length_max", "rollout/truncated_fraction", "time/rollout",
              "time/scoring", "time/update", "perf/tokens_per_s"}
  if estimator != "sft":
    expected |= {"teacher/logp_gap", "teacher/topk_mass", "teacher/sampled_outside_topk",
                 "teacher/topk_overlap", "rollout/logprob_mismatch_max",
                 "rollout/logprob_mismatch_mean", "policy/kl_before_after"}
  if estimator == "lsm":
    expected |= {"kl/teacher_mass", "kl/student_mass", "kl/overlap"}
  if estimator == "sampled_token":
    expected |= {"opd/clip_fraction"}
  assert expected <= set(rows[-1]), expected - set(rows[-1])
  # Iteration 1 is not a diagnostic one (log.diagnostics_every=10; the last one is): no
  # post-update KL, the student's scoring pass only where the estimator reads it, and LSM's
  # update skips the student's vocabulary sweep (its entropy, mass and overlap).
  skipped = {"policy/kl_before_after"} | (
      set() if estimator == "sampled_token" else {"teacher/topk_overlap",
                                                  "rollout/logprob_mismatch_max",
                                                  "rollout/logprob_mismatch_mean"})
  if estimator == "lsm":
    skipped |= {"policy/entropy", "kl/student_mass", "kl/overlap"}
  assert not skipped & set(rows[0]) and (expected - skipped) <= set(rows[0])
  assert not train_helpers.undocumented_metrics({k for r in rows for k in r})   # metrics.md
  assert all(np.isfinite(v) for r in rows for v in r.values())
  assert json.loads((tmp_path / "config.json").read_text())["loss"]["estimator"] == estimator
  assert (tmp_path / "checkpoints" / "2").is_dir()
  page = tmp_path / "samples" / "step_2.html"
  assert page.exists() == (estimator != "sft")
  if estimator != "sft":
    # The rollout's policy log-probs (KV-cache decode) and the scoring forward (full pass) are
    # two computations of the same numbers: their logged mismatch is small.
    assert 0.0 <= rows[-1]["rollout/logprob_mismatch_mean"] <= rows[-1][
        "rollout/logprob_mismatch_max"] < 1e-4


@pytest.mark.slow   # two trainer runs (~30 s); tests/test_checkpoint.py covers every folder form
def test_checkpoint_init_starts_from_another_runs_step_folder(tmp_path, tiny_arith_dir):
  first = train_helpers.tiny_config(tmp_path / "a", tiny_arith_dir, steps=2, **_mesh8(
      **{"checkpoint.every": 1, "checkpoint.async_save": False}))
  train.run(first, log=lambda _: None)
  # checkpoint.locate (tests/test_checkpoint.py) accepts the run, its checkpoints/ or a step.
  said = []
  second = train_helpers.tiny_config(
      tmp_path / "b", tiny_arith_dir, steps=1,
      **_mesh8(**{"checkpoint.init": str(tmp_path / "a" / "checkpoints" / "1")}))
  train.run(second, log=said.append)
  # The first line after the teacher/student check's.
  started = [m for m in said if m.startswith("started from")]
  assert started[:1] == [
      f"started from {tmp_path / 'a' / 'checkpoints' / '1'} step 1 (parameters only)"]
  assert said.index(started[0]) == 1 and said[0].startswith("teacher/student check:")
  second.checkpoint.init_step = 2
  second.workdir = str(tmp_path / "c")
  with pytest.raises(ConfigError, match=r"config.checkpoint.init=.* is the folder of step 1, "
                     "but step 2 was asked for"):
    train.run(second, log=said.append)


def test_non_finite_loss_stops_the_run_without_a_checkpoint(tmp_path, tiny_arith_dir):
  # A teacher whose output head is NaN makes every teacher log-prob NaN.
  config = models.ModelConfig(model_type="qwen2", vocab_size=len(tiny_arith.VOCAB),
                              hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                              num_kv_heads=1, head_dim=16, qkv_bias=True,
                              max_position_embeddings=64)
  teacher = models.init_model(config, seed=0)
  teacher.lm_head.kernel[...] = jnp.full(teacher.lm_head.kernel[...].shape, jnp.nan)
  folder = tmp_path / "nan_teacher"
  models.save_hf_checkpoint(teacher, config, folder)
  tiny_arith.make_tokenizer(folder)
  c = train_helpers.tiny_config(tmp_path / "w", tiny_arith_dir, steps=2, **_mesh8(**{
      "loss.estimator": "sampled_token", "teacher.path": str(folder)}))
  with pytest.raises(train.NonFiniteError, match=r"step 1: loss = nan"):
    train.run(c, log=lambda _: None)
  assert not any((tmp_path / "w" / "checkpoints").glob("[0-9]*"))


# ----------------------------------------------------------------------------------------------
# the update on a mesh
# ----------------------------------------------------------------------------------------------


def _synthetic_batch(rng, rows, p, n, vocab, k):
  prompt = rng.integers(2, vocab, (rows, p)).astype(np.int32)
  prompt_mask = np.ones((rows, p), bool)
  prompt_mask[: rows // 2, :2] = False                       # some left padding
  response = rng.integers(2, vocab, (rows, n)).astype(np.int32)
  mask = np.arange(n)[None, :] < rng.integers(1, n + 1, (rows, 1))
  return {"prompt": prompt, "prompt_mask": prompt_mask, "response": response,
          "response_mask": mask, "loss_mask": mask, "teacher_prompt": prompt,
          "teacher_prompt_mask": prompt_mask, "policy_logprobs": np.zeros((rows, n), np.float32)}


# Slow (21 s for LSM): in the fast suite tests/test_packing.py compares LSM's update on the
# (2, 2, 2) mesh with one device (packed rows).
@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["lsm", "sampled_token"])
def test_update_on_a_2x2x2_mesh_matches_one_device(estimator):
  config = models.ModelConfig(model_type="qwen2", vocab_size=16, hidden_size=32,
                              intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=8, qkv_bias=True, max_position_embeddings=64)
  # A large Adam ε keeps the step linear in tiny gradients: with ε = 1e-8, a gradient entry at
  # the level of float32 reduction-order noise would move its parameter by ±lr either way.
  opt = settings.OptSettings(minibatch_size=8, lr=1e-2, warmup_steps=0, schedule="constant",
                             b1=0.9, b2=0.999, eps=1e-3, weight_decay=0.01, grad_clip=1.0)
  loss = settings.LossSettings(estimator, k=4, support="teacher", renormalize=True, tail="none",
                               tail_weight_clip=None, gamma=0.0, ppo_clip=0.2,
                               advantage_clip=None, chunk_tokens=1024, chunk_vocab=8192)
  batch = _synthetic_batch(np.random.default_rng(0), 16, 8, 6, 16, 4)
  results = []
  one, eight = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), sharding.make_mesh(2, 2, 2)
  # Last: the 8-row mini-batches in two micro-batches of 4 rows (gradients accumulated, weighted
  # by their loss tokens, which differ from row to row here): the same update.
  scored = {}
  for mesh, micro in ((one, 0), (eight, 0), (eight, 4)):
    opt = dataclasses.replace(opt, microbatch_size=micro)
    shapes = steps.Shapes(vocab=16, k=4, mesh=mesh)
    student = models.init_model(config, seed=0, mesh=mesh, std=0.3)
    s_def, s_params = nnx.split(student)
    rows = [jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for v in batch.values()]
    placed = dict(zip(batch, rows))
    if mesh not in scored:   # the micro-batched update reuses the mesh's scores
      t_def, t_params = nnx.split(models.init_model(config, seed=1, mesh=mesh, std=0.3))
      scored[mesh] = steps.score(s_def, s_params, t_def, t_params, placed, shapes=shapes,
                                 full_logits=estimators.get(estimator).full_teacher_logits)[0]
    scores = scored[mesh]
    ubatch = {k: placed[k] for k in ("prompt", "prompt_mask", "response", "loss_mask")}
    ubatch |= {k: scores[k] for k in estimators.get(estimator).score_keys}
    shard = steps.train_state_shardings(config, opt, 10, mesh)
    state = steps.init_state(s_params, opt, 10, shard)
    update = steps.make_update(config, loss, opt, shapes, 2, 10)
    state, metrics = update(state, ubatch, jax.random.key(0))
    # The state keeps its explicit shardings (parameters split over fsdp / tensor).
    emb = state.params["embed_tokens"]["embedding"][...]
    assert emb.sharding.spec == jax.tree.leaves(shard.params["embed_tokens"])[0].spec
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (p1, m1) = results[0]
  for p8, m8 in results[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), p1, p8)
    # Metrics are O(1) means, and kl_before_after a small difference of O(1) log-probs: float32
    # reduction order over 8 devices moves them by ~1e-6 in absolute terms.
    for key in m1:
      np.testing.assert_allclose(m1[key], m8[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_scoring_in_minibatches_gives_the_same_scores():
  config = models.ModelConfig(model_type="qwen2", vocab_size=16, hidden_size=32,
                              intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                              head_dim=8, qkv_bias=True, max_position_embeddings=64)
  mesh = sharding.make_mesh(2, 2, 2)
  batch = _synthetic_batch(np.random.default_rng(1), 16, 8, 6, 16, 4)
  placed = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
  s_def, s_params = nnx.split(models.init_model(config, seed=0, mesh=mesh, std=0.3))
  t_def, t_params = nnx.split(models.init_model(config, seed=1, mesh=mesh, std=0.3))
  shapes = steps.Shapes(vocab=16, k=4, mesh=mesh)
  whole, split = (jax.device_get(steps.score(s_def, s_params, t_def, t_params, placed,
                                             shapes=shapes, minibatches=n))
                  for n in (1, 2))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), whole, split)


# ----------------------------------------------------------------------------------------------
# kill and resume
# ----------------------------------------------------------------------------------------------


def _launch(config_file, workdir, env, log):
  # Output goes to a file: a pipe nobody reads while the test polls would block the child.
  with open(log, "a") as out:
    return subprocess.Popen(
        [sys.executable, "-m", "opd_jax.main", f"--config={config_file}",
         f"--config.workdir={workdir}"], cwd=ROOT, env=env, stdout=out,
        stderr=subprocess.STDOUT)


def _finish(proc, log):
  proc.wait(timeout=600)
  text = pathlib.Path(log).read_text()
  assert proc.returncode == 0, text[-3000:]
  return text


def test_sigkill_mid_run_then_resume_ends_bitwise_like_an_uninterrupted_run(tmp_path,
                                                                           tiny_arith_dir):
  config_file = train_helpers.write_config_file(
      tmp_path / "tiny_opd.py", tiny_arith_dir,
      "c.steps = 6\nc.mesh.data = 1\nc.log.samples_every = 0\n"
      "c.loss.estimator = 'sampled_token'")   # the PPO ratio's behaviour log-probs too
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one CPU device
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  _finish(_launch(config_file, straight, env, tmp_path / "straight.log"), tmp_path / "straight.log")

  proc = _launch(config_file, killed, env, tmp_path / "killed.log")
  metrics_file = killed / "metrics.jsonl"
  deadline = time.time() + 600
  # Kill once step 3 is logged and the step-2 checkpoint is final: step 3's line must then be
  # dropped and redone by the resumed run.
  while time.time() < deadline and proc.poll() is None:
    if ((killed / "checkpoints" / "2").is_dir() and metrics_file.exists()
        and len(metrics_file.read_text().splitlines()) >= 3):
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  out = _finish(_launch(config_file, killed, env, tmp_path / "resumed.log"),
                tmp_path / "resumed.log")
  assert "resumed from" in out, out[-3000:]

  assert _strip_timing(_lines(killed / "metrics.jsonl")) == _strip_timing(
      _lines(straight / "metrics.jsonl"))
  from opd_jax import checkpoint  # pylint: disable=import-outside-toplevel
  finals = []
  for workdir in (straight, killed):
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_every=2, keep=3,
                                   async_save=False)
    assert ckpt.latest_step() == 6
    finals.append(_read_state(workdir))
    ckpt.close()
  a, b = finals
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_two_processes_train_like_one_process(tmp_path, tiny_arith_dir):
  # The multi-controller path: two processes of 4 CPU devices each (coordinator on localhost,
  # gloo collectives), one global (data=2, fsdp=2, tensor=2) mesh, each process reading its own
  # half of the prompts, against one process driving all 8 devices. Same metrics, same final
  # state (to float rounding: the cross-process reductions may add in another order).
  import socket  # pylint: disable=import-outside-toplevel
  mesh = "c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2\nc.log.samples_every = 0\n"
  single = train_helpers.write_config_file(tmp_path / "single.py", tiny_arith_dir, mesh)
  multi = train_helpers.write_config_file(tmp_path / "multi.py", tiny_arith_dir,
                                          mesh + "c.mesh.distributed = True\n")
  base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  base["JAX_PLATFORMS"] = "cpu"
  _finish(_launch(single, tmp_path / "one", dict(
      base, XLA_FLAGS="--xla_force_host_platform_device_count=8"), tmp_path / "one.log"),
          tmp_path / "one.log")
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    port = probe.getsockname()[1]
  procs = [_launch(multi, tmp_path / "two", dict(
      base, XLA_FLAGS="--xla_force_host_platform_device_count=4",
      JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(i)), tmp_path / f"two_{i}.log") for i in range(2)]
  for i, proc in enumerate(procs):
    _finish(proc, tmp_path / f"two_{i}.log")
  # Each process packs its own rows (opd_jax.packing), so the rows' layout/ figures depend on
  # the topology; everything computed on them does not.
  one, two = ([{k: v for k, v in r.items() if not k.startswith("layout/")} for r in
               _strip_timing(_lines(tmp_path / w / "metrics.jsonl"))] for w in ("one", "two"))
  assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
  for a, b in zip(one, two):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
  a, b = (_read_state(tmp_path / w, 4) for w in ("one", "two"))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def _read_state(workdir, step=6):
  """The saved state of `step`, restored onto one device whatever topology saved it."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as reader:
    meta = reader.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    return reader.restore(path, target)
