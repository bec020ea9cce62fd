"""Mixed precision: float32 parameters and AdamW moments, bfloat16 compute, bfloat16 teachers."""

import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_helpers
from opd_jax import configs, estimators, models, programs, settings, sharding, steps, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAPER = ("math_lsm", "math_lsm_mask", "math_sampled_opd", "math_sampled_opd_mask", "ablation_k",
         "ablation_support", "ablation_top_p", "multitask_lsm", "multitask_sampled_opd")
CONFIG = models.ModelConfig(model_type="qwen2", vocab_size=16, hidden_size=32,
                            intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                            head_dim=8, qkv_bias=True, max_position_embeddings=64)


def _load(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _dtypes(tree):
  return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_policy_of_the_paper_configs_and_of_the_defaults():
  for name in PAPER:
    c = _load(name)
    c.workdir = "w"
    for task in c.tasks:
      task.data.dataset = task.data.dataset or "tiny_arith"   # the placeholder second task
    s = settings.TrainSettings.from_config(c)
    assert s.model.precision == settings.Precision("float32", "bfloat16"), name
    assert {t.teacher.precision for t in s.tasks} == {settings.Precision("bfloat16",
                                                                         "bfloat16")}, name
  c = configs.opd()
  c.workdir, c.data.dataset = "w", "tiny_arith"
  s = settings.TrainSettings.from_config(c)
  assert s.model.precision == settings.Precision("float32", "float32")
  assert not s.model.precision.mixed and settings.Precision("float32", "bfloat16").mixed


@pytest.mark.parametrize("overrides, match", [
    ({"model.dtype": "bf16"}, r"config.model.dtype='bf16' is not accepted; accepted: float32, "
                              r"bfloat16"),
    ({"model.param_dtype": "fp32"}, r"config.model.param_dtype='fp32' is not accepted; "
                                    r"accepted: '' \(= model.dtype\), float32, bfloat16"),
    ({"teacher.param_dtype": "float32", "teacher.dtype": "bfloat16"},
     r"config.teacher.param_dtype='float32' .*a teacher is never updated"),
])
def test_bad_dtypes_are_refused_with_the_setting_named(tmp_path, overrides, match):
  c = train_helpers.tiny_config(tmp_path / "w", tmp_path / "tfds", **overrides)
  with pytest.raises(settings.ConfigError, match=match):
    settings.TrainSettings.from_config(c)
  with pytest.raises(settings.ConfigError, match=r"Precision.compute_dtype='float64' .*accepted"):
    settings.Precision("float32", "float64")


def _batch(mesh):
  """A synthetic rollout batch of 16 rows (8 prompt tokens, up to 6 response tokens)."""
  rng = np.random.default_rng(0)
  rows, p, n = 16, 8, 6
  prompt = rng.integers(2, 16, (rows, p)).astype(np.int32)
  mask = np.arange(n)[None, :] < rng.integers(1, n + 1, (rows, 1))
  batch = {"prompt": prompt, "prompt_mask": np.ones((rows, p), bool),
           "response": rng.integers(2, 16, (rows, n)).astype(np.int32), "response_mask": mask,
           "loss_mask": mask, "teacher_prompt": prompt,
           "teacher_prompt_mask": np.ones((rows, p), bool),
           "policy_logprobs": np.zeros((rows, n), np.float32)}
  return {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}


# Both slow (about 20 s each): `make test-all` runs them; `make test` stays under 10 minutes.
@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["lsm", "sampled_token"])
def test_bfloat16_compute_update_is_close_to_float32_and_keeps_float32_state(estimator):
  mesh = sharding.make_mesh(1, 2, 1, devices=jax.devices()[:2])   # parameters sharded (fsdp)
  opt = settings.OptSettings(minibatch_size=8, lr=1e-2, warmup_steps=0, schedule="constant",
                             b1=0.9, b2=0.999, eps=1e-3, weight_decay=0.01, grad_clip=1.0)
  loss = settings.LossSettings(estimator, k=4, support="teacher", renormalize=True, tail="none",
                               tail_weight_clip=None, gamma=0.0, ppo_clip=0.2,
                               advantage_clip=None, chunk_tokens=1024, chunk_vocab=8192)
  placed = _batch(mesh)
  shapes = steps.Shapes(vocab=16, k=4, mesh=mesh)
  params = nnx.split(models.init_model(CONFIG, seed=0, mesh=mesh, std=0.3))[1]
  t_def, t_params = nnx.split(models.init_model(dataclasses.replace(CONFIG, dtype="bfloat16"),
                                                seed=1, mesh=mesh, std=0.3))
  before = jax.device_get(params)
  shard = steps.train_state_shardings(CONFIG, opt, 10, mesh)
  out = {}
  for name, precision in (("f32", None), ("bf16", settings.Precision("float32", "bfloat16"))):
    # As the trainer does: the scoring (behaviour log-probs) runs on the compute copy.
    s_def = steps.split_abstract(steps.compute_config(CONFIG, precision))[0]
    scores, _ = steps.score(s_def, steps.compute_params(params, precision), t_def, t_params,
                            placed, shapes=shapes,
                            full_logits=estimators.get(estimator).full_teacher_logits)
    ubatch = {k: placed[k] for k in ("prompt", "prompt_mask", "response", "loss_mask")}
    ubatch |= {k: scores[k] for k in estimators.get(estimator).score_keys}
    state = steps.init_state(params, opt, 10, shard)
    update = steps.make_update(CONFIG, loss, opt, shapes, 2, 10, precision)
    # The lowered update really computes in bfloat16 (its matrix products take bf16 operands).
    assert ("bf16" in update.lower(state, ubatch, jax.random.key(0)).as_text()) == (
        name == "bf16"), name
    new, metrics = update(state, ubatch, jax.random.key(0))
    out[name] = (jax.device_get(new.params), jax.device_get(metrics))
    assert _dtypes(new.params) == {"float32"} and _dtypes(new.opt_state) == {"float32"}, name
  (p32, m32), (p16, m16) = out["f32"], out["bf16"]
  if estimator == "lsm":
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=3e-2, atol=3e-3)
  else:
    # The sampled-token loss is a mean of log-ratios (student - teacher, each about -2.8 here):
    # bfloat16 rounding of the logits (8 bits of mantissa) moves each by ~1e-2.
    np.testing.assert_allclose(m16["loss"], m32["loss"], atol=5e-2)
  np.testing.assert_allclose(m16["opt/grad_norm"], m32["opt/grad_norm"], rtol=0.1)
  # Both runs moved the float32 master weights by about the same step.
  d32 = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), p32, before)
  d16 = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), p16, before)
  flat32 = np.concatenate([x.ravel() for x in jax.tree.leaves(d32)])
  flat16 = np.concatenate([x.ravel() for x in jax.tree.leaves(d16)])
  assert np.abs(flat32).max() > 1e-3
  cos = flat32 @ flat16 / np.linalg.norm(flat32) / np.linalg.norm(flat16)
  assert cos > 0.95, cos


def test_compute_copy_casts_and_keeps_shardings_teacher_loads_in_bfloat16(tmp_path):
  mesh = sharding.make_mesh(1, 4, 2)
  params = nnx.split(models.init_model(CONFIG, seed=0, mesh=mesh))[1]
  mixed = settings.Precision("float32", "bfloat16")
  copy = steps.compute_params(params, mixed)
  assert _dtypes(copy) == {"bfloat16"}
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(copy)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))
  assert steps.compute_params(params, settings.Precision()) is params
  assert steps.compute_config(CONFIG, mixed).dtype == "bfloat16"
  c = train_helpers.tiny_config(tmp_path, tmp_path, **{"teacher.dtype": "bfloat16",
                                                      "teacher.random.vocab_size": 16})
  teacher = settings.TrainSettings.from_config(c).tasks[0].teacher
  model = programs.load_model(teacher, 16, seed=0, mesh=mesh)
  assert _dtypes(nnx.state(model)) == {"bfloat16"}


@pytest.mark.slow
def test_trainer_keeps_float32_state_while_computing_in_bfloat16(tmp_path, tiny_arith_dir):
  c = train_helpers.tiny_config(tmp_path / "w", tiny_arith_dir, **{
      "model.dtype": "bfloat16", "model.param_dtype": "float32", "teacher.dtype": "bfloat16",
      "steps": 2, "checkpoint.every": 2, "data.prompts_per_step": 8, "opt.minibatch_size": 8,
      "mesh.data": 1, "mesh.fsdp": 8, "log.samples_every": 0})
  history = train.run(c, log=lambda _: None)
  assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
  from opd_jax import checkpoint  # pylint: disable=import-outside-toplevel
  s = settings.TrainSettings.from_config(c)
  config = programs.model_config_of(s.model, 14)
  assert config.dtype == "float32"
  ckpt = checkpoint.Checkpointer(tmp_path / "w" / "checkpoints", save_every=1, keep=3,
                                 async_save=False)
  shard = steps.train_state_shardings(config, s.opt, 2, sharding.make_mesh(1, 8, 1))
  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          steps.abstract_state(steps.split_abstract(config)[1], s.opt, 2), shard)
  state, _ = ckpt.restore(2, abstract)
  ckpt.close()
  assert _dtypes(state.params) == {"float32"} and _dtypes(state.opt_state) == {"float32"}
