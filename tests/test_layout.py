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
        shapes=shapes, estimator="lsm")
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
