"""The memory plan: per-phase memory from XLA's analysis, the JSON line, the trainer's refusal."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import train_helpers
from opd_jax import packing, plan, settings, sharding, steps, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The TINY trainer config, laid out for the 8 fake devices, with a vocabulary of its own (the plan
# reads no tokenizer).
PLAN = {"data.prompts_per_step": 8, "opt.minibatch_size": 8, "data.max_prompt_len": 16,
        "model.random.vocab_size": 14, "teacher.random.vocab_size": 14,
        "model.random.num_layers": 1, "teacher.random.num_layers": 1}


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
  c = train_helpers.tiny_config(tmp_path_factory.mktemp("w"), "unused", **PLAN)
  lines = []
  out = plan.main(c, devices=8, accelerators=["1KB", "h100"], log=lines.append)
  return c, out, lines


def test_last_line_is_one_json_object_with_every_phase(planned):
  _, out, lines = planned
  assert json.loads(lines[-1]) == out
  assert list(out["phases"]) == list(plan.PHASES) and out["devices"] == 8
  for name, p in out["phases"].items():
    assert {"args", "outputs", "temp", "total"} <= set(p), name
    assert min(p["args"], p["outputs"], p["temp"]) > 0, name
    assert p["total"] == p["args"] + p["outputs"] - p["alias"] + p["temp"] + p["resident"]
    assert p["flops"] > 0, name
  # The update donates its state: the new state is written over the old one.
  update = out["phases"]["update"]
  assert 0 < update["alias"] <= update["args"]
  assert out["fits"] == {"1KB": False, "h100": True}
  text = "\n".join(lines)
  assert "does not fit 1KB" in text and "largest buffers of update:" in text
  assert "arg params/layers/mlp/" in text and "arg student/" in text
  assert "buffer %" in text and "fits h100" in text and "resident train state" in text


def test_update_numbers_agree_with_memory_analysis_and_shard_sizes(planned):
  c, out, _ = planned
  c = c.copy_and_resolve_references()
  s = settings.TrainSettings.from_config(c)
  mesh = sharding.make_mesh(*s.mesh.shape)
  config = plan.architecture(s.model, "", "model", None)
  _, params = plan.abstract_model(config, mesh)
  shard = steps.train_state_shardings(config, s.opt, s.steps * s.minibatches, mesh)
  state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                       steps.abstract_state(params, s.opt, s.steps * s.minibatches), shard)
  n, p, k = s.rollout.max_new_tokens, 16, max(s.loss.k, steps.MIN_TEACHER_TOPK)
  # The update runs on packed rows, planned for the largest geometry 16 rollouts can take.
  geo, rows = packing.worst_case("pack", 16, p, p, n, minibatches=s.minibatches,
                                 micro=s.opt.microbatches, ways=8,
                                 microbatch_tokens=s.opt.microbatch_tokens)
  assert s.opt.packing == "pack" and geo.packed and rows % 8 == 0
  c_ = geo.compact
  shapes = {name: spec for name, spec in packing.abstract_arrays(geo, rows).items()
            if name in ("tokens", "segments", "response", "loss_mask", "s_index")}
  # (c_segments too in the trainer's batch: LSM does not read it and jit drops unused inputs.)
  shapes |= {"behavior_logprobs": ((rows, c_), jnp.float32),
             "t_indices": ((rows, c_, k), jnp.int32), "t_logits": ((rows, c_, k), jnp.float32),
             "t_lse": ((rows, c_), jnp.float32), "t_sampled": ((rows, c_), jnp.float32)}
  batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(
      mesh, len(shape))) for name, (shape, dtype) in shapes.items()}
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  update = steps.make_update(config, s.loss, s.opt, steps.Shapes(14, k, mesh), s.minibatches,
                             s.steps * s.minibatches, s.model.precision)
  mem = update.lower(state, batch, key, geo.micro, geo.packed).compile().memory_analysis()
  got = out["phases"]["update"]
  assert (got["args"], got["outputs"], got["alias"], got["temp"]) == (
      mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
      mem.temp_size_in_bytes)
  # By hand: on the data=8 mesh parameters and both AdamW moments are whole on every device
  # (float32), the batch's rows are split 8 ways; only scalars (step, counts, key) remain.
  batch_bytes = sum(jnp.dtype(d).itemsize * (shape[0] // 8) * int(jnp.prod(jnp.array(shape[1:])))
                    for shape, d in shapes.values())
  assert 0 <= got["args"] - (3 * 4 * config.num_params + batch_bytes) <= 64
  # The teacher stays on the device during the update (float32 here, whole on every device).
  teacher = plan.architecture(s.tasks[0].teacher, "", "teacher", 14)
  assert got["resident"] == 4 * teacher.num_params


def test_trainer_refuses_a_run_that_cannot_fit_and_names_the_largest_buffers(tmp_path,
                                                                              tiny_arith_dir):
  # sft: the update is the only program, so the check compiles one.
  c = train_helpers.tiny_config(tmp_path / "w", tiny_arith_dir, **{
      "data.prompts_per_step": 8, "opt.minibatch_size": 8, "data.max_prompt_len": 16,
      "model.random.num_layers": 1, "loss.estimator": "sft", "mesh.accelerator": "50KB"})
  with pytest.raises(plan.DoesNotFit) as info:
    train.run(c, log=lambda _: None)
  text = str(info.value)
  assert "config.mesh.accelerator='50KB': this run cannot fit" in text
  assert "does not fit 50KB" in text and "largest buffers of update:" in text
  assert "arg params/layers/mlp/" in text and " such, e.g. %" in text
  assert "resident teacher 0 parameters" in text
  assert not (tmp_path / "w" / "metrics.jsonl").exists()   # refused before anything ran
  with pytest.raises(settings.ConfigError, match=r"config.mesh.accelerator='h900' is not "
                     r"accepted; accepted: h100, h200, tpu_v5p, tpu_v5e, or a per-device size"):
    settings.TrainSettings.from_config(train_helpers.tiny_config(
        tmp_path, tiny_arith_dir, **{"mesh.accelerator": "h900"}))


def test_named_architectures_and_config_json_files(tmp_path):
  source = settings.ModelSource("", "", "bfloat16", (("vocab_size", 0),), "float32")
  qwen = plan.architecture(source, "qwen2.5-7b-instruct", "model", None)
  assert qwen.num_params == 7_615_616_512 and qwen.dtype == "float32"   # Qwen2.5-7B: 7.62B
  assert plan.architecture(source, "OpenThinker3-7B", "teacher", None) == qwen
  path = tmp_path / "config.json"
  path.write_text(json.dumps(plan.ARCHITECTURES["qwen2.5-1.5b-instruct"]))
  small = plan.architecture(source, str(tmp_path), "model", None)
  assert small == plan.architecture(source, str(path), "model", None)
  assert small.tie_word_embeddings and small.num_params == 1_543_714_304
  # The run's remat and attention choices reach a planned architecture.
  tuned = dataclasses.replace(source, remat="full", attention="blockwise", attention_block=256)
  planned = plan.architecture(tuned, "qwen2.5-7b-instruct", "model", None)
  assert (planned.remat, planned.attention_impl, planned.attention_block_kv) == (
      "full", "blockwise", 256)
  with pytest.raises(ValueError, match=r"config.model.plan_arch='qwen9' is neither a built-in "
                     r"architecture \(qwen2.5-7b-instruct, "):
    plan.architecture(source, "qwen9", "model", None)
  with pytest.raises(ValueError, match=r"config.model: a random shape with vocab_size=0"):
    plan.architecture(source, "", "model", None)


def test_largest_buffers_are_read_from_the_compiled_program():
  x = jax.ShapeDtypeStruct((512, 64), jnp.float32)
  compiled = jax.jit(lambda a: (jnp.sin(a) @ a.T, a[:2])).lower(x).compile()
  (name, size), *rest = plan.hlo_buffers(compiled.as_text())
  assert size == 512 * 512 * 4 and "f32[512,512]" in name and "dot_general" in name, name
  assert all(size < 512 * 512 * 4 for _, size in rest)
  # Arrays of one shape from one operation (a layer's, once per layer) are listed once.
  layers = jax.jit(lambda a: [jnp.sin(a + i) @ a.T for i in range(3)]).lower(x).compile()
  (name, size), *_ = plan.hlo_buffers(layers.as_text())
  assert name.startswith("buffer f32[512,512]") and "3 such" in name, name
  assert size == 512 * 512 * 4
  assert plan.device_bytes(jax.ShapeDtypeStruct(
      (16, 6), jnp.bfloat16, sharding=sharding.batch_sharding(sharding.make_mesh(2, 4, 1), 2))) \
      == 2 * 6 * 2


def test_parse_devices_takes_both_forms_and_refuses_a_bad_value():
  assert plan.parse_devices(["--config=x.py", "--devices", "2"]) == 2
  assert plan.parse_devices(["--devices=4", "--config", "x.py"]) == 4
  assert plan.parse_devices(["--config=x.py"]) == 8
  with pytest.raises(SystemExit, match="--devices='two'"):
    plan.parse_devices(["--devices", "two"])


@pytest.mark.slow
def test_command_line_fakes_the_devices_and_ends_with_the_json_line(tmp_path):
  config_file = train_helpers.write_config_file(
      tmp_path / "tiny.py", tmp_path,
      "c.loss.estimator = 'sft'\nc.model.random.vocab_size = 14\nc.data.max_prompt_len = 16\n"
      "c.teacher.random.vocab_size = 14\nc.data.prompts_per_step = 2\nc.opt.minibatch_size = 2")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "opd_jax.plan", f"--config={config_file}",
                         "--devices", "2", "--accelerator=h100,1KB"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 2 and list(out["phases"]) == ["update"]
  assert out["fits"] == {"h100": True, "1KB": False}
