"""No hidden replication on the (data=2, fsdp=2, tensor=2) mesh: rollout, teacher scoring and the
update compile without XLA re-sharding a tensor by replicating it whole."""

import os
import pathlib
import subprocess
import sys
import textwrap

# XLA's SPMD partitioner prints this (a C++ log line on stderr, not a Python warning) when it can
# only re-shard an operand by materialising it whole on every device.
WARNING = "Involuntary full rematerialization"

# Runs the three phases of one OPD step on tiny random models, printing a marker before each on
# stderr. The teacher ties its embedding (its unembedding is the embedding's transpose) and
# scores with blockwise attention over several blocks; the student uses the einsum.
_PHASES = textwrap.dedent("""
    import dataclasses
    import sys

    import jax
    import numpy as np
    from flax import nnx
    from opd_jax import models, sampling, sharding, steps
    from opd_jax.settings import LossSettings, OptSettings

    def say(phase):
      print(f"=== {phase}", file=sys.stderr, flush=True)

    mesh = sharding.make_mesh(2, 2, 2)
    config = models.ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=32,
                                intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                                head_dim=8, qkv_bias=True)
    tied = dataclasses.replace(config, tie_word_embeddings=True, attention_impl="blockwise",
                               attention_block_q=8, attention_block_kv=8)
    student = models.init_model(config, mesh=mesh, seed=0)
    teacher = models.init_model(tied, mesh=mesh, seed=1)
    rng = np.random.default_rng(0)
    b, p, n = 8, 16, 4
    mask = np.arange(p)[None] >= np.arange(b)[:, None]                 # left padding
    prompt = np.where(mask, rng.integers(1, 128, (b, p)), 0).astype(np.int32)
    response = rng.integers(1, 128, (b, n)).astype(np.int32)
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))

    say("rollout")
    rollout = sampling.sample(student, put(prompt), put(mask), jax.random.key(0),
                              max_new_tokens=n, mesh=mesh)
    jax.block_until_ready(rollout.tokens)

    say("scoring")
    shapes = steps.Shapes(vocab=128, k=4, mesh=mesh)
    batch = {"prompt": put(prompt), "prompt_mask": put(mask), "response": put(response),
             "response_mask": put(np.ones((b, n), bool)), "loss_mask": put(np.ones((b, n), bool))}
    s_def, s_params = nnx.split(student)
    t_def, t_params = nnx.split(teacher)
    scores, _ = steps.score(
        s_def, s_params, t_def, t_params,
        batch | {"teacher_prompt": batch["prompt"], "teacher_prompt_mask": batch["prompt_mask"],
                 "policy_logprobs": put(np.zeros((b, n), np.float32))},
        shapes=shapes)
    jax.block_until_ready(scores)

    say("update")
    loss = LossSettings("lsm", 4, "teacher", True, "none", None, 0.0, None, None, 1024, 8192)
    opt = OptSettings(4, 1e-3, 0, "constant", 0.9, 0.999, 1e-8, 0.0, 1.0)
    update = steps.make_update(config, loss, opt, shapes, 2, 4)
    state = steps.init_state(s_params, opt, 4, steps.train_state_shardings(config, opt, 4, mesh))
    inputs = {k: batch[k] for k in ("prompt", "prompt_mask", "response", "loss_mask")}
    inputs |= {k: scores[k] for k in ("behavior_logprobs", "t_indices", "t_logits", "t_lse",
                                      "t_sampled")}
    state, metrics = update(state, inputs, jax.random.key(0))
    jax.block_until_ready(metrics)
    say("done")
""")


def _phases_with(text: str) -> list[str]:
  """The phases whose stderr section contains `text`."""
  found, phase = [], None
  for line in text.splitlines():
    if line.startswith("=== "):
      phase = line[4:].strip()
    elif WARNING in line and phase not in found:
      found.append(phase)
  return found


def test_no_phase_replicates_a_tensor_to_reshard_it(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path),
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", _PHASES], capture_output=True, text=True, env=env,
                        cwd=root, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "=== done" in proc.stderr, proc.stderr[-4000:]
  bad = _phases_with(proc.stderr)
  lines = [line[:400] for line in proc.stderr.splitlines() if WARNING in line]
  assert not bad, f"phases {bad} re-shard by full rematerialization:\n" + "\n".join(lines)


def test_the_check_sees_the_warning_where_it_is():
  log = "=== rollout\nW spmd_partitioner.cc] [SPMD] Involuntary full rematerialization. x\n" \
        "=== scoring\n=== update\nW [SPMD] Involuntary full rematerialization.\n=== done\n"
  assert _phases_with(log) == ["rollout", "update"]
  assert _phases_with("=== rollout\n=== done\n") == []


# ----------------------------------------------------------------------------------------------
# activations split by rows on an fsdp mesh (compiled for abstract inputs: nothing runs)
# ----------------------------------------------------------------------------------------------


def _abstract(mesh, tree):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _rows(mesh, shape, dtype):
  import jax  # pylint: disable=import-outside-toplevel
  from opd_jax import sharding  # pylint: disable=import-outside-toplevel
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))


def _update_temp(mesh, config, rows, p, n):
  """Per-device temporaries of the compiled update (one mini-batch of `rows`)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from opd_jax import models, steps  # pylint: disable=import-outside-toplevel
  from opd_jax.settings import LossSettings, OptSettings  # pylint: disable=import-outside-toplevel
  loss = LossSettings("sft", 4, "teacher", True, "none", None, 0.0, None, None, 1024, 8192)
  opt = OptSettings(rows, 1e-3, 0, "constant", 0.9, 0.999, 1e-8, 0.0, 1.0)
  shapes = steps.Shapes(vocab=config.vocab_size, k=4, mesh=mesh)
  _, params = steps.split_abstract(config)
  shard = steps.train_state_shardings(config, opt, 4, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       steps.abstract_state(params, opt, 4), shard)
  batch = {"prompt": _rows(mesh, (rows, p), jnp.int32), "prompt_mask": _rows(mesh, (rows, p), bool),
           "response": _rows(mesh, (rows, n), jnp.int32),
           "loss_mask": _rows(mesh, (rows, n), bool)}
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  update = steps.make_update(config, loss, opt, shapes, 1, 4)
  return update.lower(state, batch, key).compile().memory_analysis().temp_size_in_bytes


def test_full_pass_activations_split_by_rows_over_fsdp():
  # MLP activations (16 rows x 128 tokens x 1024 x 4 B = 8 MB each) dwarf the weights (~0.5 MB):
  # split by rows over fsdp = 8, a device holds about an eighth of them. When the partitioner
  # followed the weights' fsdp split instead, every device computed every row (ratio ~1).
  import jax  # pylint: disable=import-outside-toplevel
  from opd_jax import models, sharding  # pylint: disable=import-outside-toplevel
  config = models.ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=64,
                              intermediate_size=1024, num_layers=1, num_heads=4, num_kv_heads=2,
                              head_dim=16)
  one = _update_temp(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), config, 16, 64, 64)
  eight = _update_temp(sharding.make_mesh(1, 8, 1), config, 16, 64, 64)
  assert eight < 0.3 * one, (eight, one)


def test_decoding_on_an_fsdp_mesh_never_gathers_the_weights():
  # Decode steps multiply each device's slice of the weights with the hidden states (whole over
  # fsdp) and sum the partial products. Had they split the hidden states by rows over fsdp, every
  # step would need whole weights, and XLA hoists those gathers out of the decode loops: the
  # loops then carry whole weight matrices, the whole model on every device (28 layers of 7B:
  # tens of GB). The prefill, by rows, gathers each layer's weights as training does.
  import re  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from opd_jax import models, plan, sampling, sharding  # pylint: disable=import-outside-toplevel
  config = models.ModelConfig(model_type="qwen2", vocab_size=4096, hidden_size=256,
                              intermediate_size=2048, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=64)
  mesh = sharding.make_mesh(1, 8, 1)
  graphdef, params = plan.abstract_model(config, mesh)
  # Every weight matrix's whole per-layer shape, as HLO writes it (f32[256,2048]).
  whole = set()
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    shape = x.shape[1:] if models.is_stacked(tuple(getattr(k, "key", k) for k in path)) \
        else x.shape
    if len(shape) == 2:
      whole.add(f"f32[{shape[0]},{shape[1]}]")

  def rollout(params, prompts, mask, rng):
    return sampling.sample(nnx.merge(graphdef, params), prompts, mask, rng, max_new_tokens=8,
                           mesh=mesh)

  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  text = jax.jit(rollout).lower(params, _rows(mesh, (8, 8), jnp.int32),
                                _rows(mesh, (8, 8), bool), key).compile().as_text()
  loops = [line.split(" while(")[0] for line in text.splitlines() if " while(" in line]
  assert loops, "no decode loop found in the compiled rollout"
  carried = {s for line in loops for s in re.findall(r"[a-z0-9]+\[[0-9,]*\]", line)}
  assert any(f"f32[{256 // 8},2048]" == s for s in carried), sorted(carried)  # slices are there
  assert not carried & whole, f"decode loops carry whole weights: {sorted(carried & whole)}"
