"""opd_jax.steps: the optimizer's schedule, the precision casts and the train state's layout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import model_helpers
from opd_jax import models, settings, sharding, steps


def _opt(**kw):
  fields = dict(minibatch_size=8, lr=1.0, warmup_steps=0, schedule="constant", b1=0.9, b2=0.999,
                eps=1e-8, weight_decay=0.0, grad_clip=None)
  return settings.OptSettings(**{**fields, **kw})


def test_schedule_warms_up_linearly_then_holds_or_decays_to_zero():
  _, constant = steps.make_optimizer(_opt(warmup_steps=4), 10)
  np.testing.assert_allclose([constant(i) for i in (0, 2, 4, 9)], [0.0, 0.5, 1.0, 1.0])
  _, cosine = steps.make_optimizer(_opt(warmup_steps=2, schedule="cosine"), 10)
  np.testing.assert_allclose([cosine(i) for i in (1, 2, 6, 10)], [0.5, 1.0, 0.5, 0.0],
                             atol=1e-6)


def test_gradient_clipping_caps_the_global_norm():
  tx, _ = steps.make_optimizer(_opt(grad_clip=1.0, lr=1e-3), 10)
  params = {"w": jnp.zeros(4)}
  _, state = tx.update({"w": jnp.full(4, 100.0)}, tx.init(params), params)
  # Adam's second moment after one step is (1 - b2) g^2 of the gradient it saw: the clipped one,
  # of global norm 1 (each entry 0.5), not the raw 100s.
  nu = optax.tree_utils.tree_get(state, "nu")
  np.testing.assert_allclose(np.asarray(nu["w"]), (1 - 0.999) * 0.25, rtol=1e-5)


def test_casts_touch_floating_leaves_only():
  params = {"w": jnp.ones(3, jnp.float32), "n": jnp.arange(3)}
  cast = steps.cast_params(params, "bfloat16")
  assert cast["w"].dtype == jnp.bfloat16 and cast["n"].dtype == params["n"].dtype
  assert steps.cast_params(params, None) is params
  mixed = settings.Precision("float32", "bfloat16")
  assert steps.compute_params(params, settings.Precision()) is params   # not mixed: no copy
  assert steps.compute_params(params, mixed)["w"].dtype == jnp.bfloat16
  config = model_helpers.tiny_model_config()
  assert steps.compute_config(config, mixed).dtype == "bfloat16"
  assert steps.compute_config(config, None) is config


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_state_moments_are_laid_out_like_their_parameters(mesh_shape):
  config = model_helpers.tiny_model_config()
  mesh = sharding.make_mesh(*mesh_shape)
  shardings = steps.train_state_shardings(config, _opt(), 10, mesh)
  _, params = steps.split_abstract(config)
  assert shardings.params == models.model_shardings(params, mesh)
  abstract = steps.abstract_state(params, _opt(), 10)
  by_path = dict(jax.tree_util.tree_flatten_with_path(shardings.params)[0])
  for path, s in jax.tree_util.tree_flatten_with_path(shardings.opt_state)[0]:
    suffix = [by_path[path[i:]] for i in range(len(path)) if path[i:] in by_path]
    if suffix:   # Adam's mu and nu of a parameter: its own sharding
      assert s == suffix[0], path
  state = steps.init_state(nnx.split(models.init_model(config, seed=0, mesh=mesh))[1],
                           _opt(), 10, shardings)
  assert int(state.step) == 0
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
      lambda x: (x.shape, x.dtype), abstract)


def test_the_post_update_kl_runs_on_diagnostic_iterations_only():
  """`policy/kl_before_after` is computed on iterations divisible by diagnostics_every and the
  last one (0 elsewhere), and the rest of the update does not depend on it."""
  config = model_helpers.tiny_model_config(vocab_size=32, num_layers=1)
  student = models.init_model(config, seed=0, std=0.3)
  loss = settings.LossSettings("full_rkl", k=4, support="teacher", renormalize=True, tail="none",
                               tail_weight_clip=None, gamma=0.0, ppo_clip=None,
                               advantage_clip=None, chunk_tokens=16, chunk_vocab=16)
  shapes = steps.Shapes(vocab=32, k=4, mesh=None)
  rng = np.random.default_rng(0)
  batch = {"prompt": jnp.asarray(rng.integers(1, 32, (2, 3)), jnp.int32),
           "prompt_mask": jnp.ones((2, 3), bool),
           "response": jnp.asarray(rng.integers(1, 32, (2, 4)), jnp.int32),
           "loss_mask": jnp.ones((2, 4), bool),
           "behavior_logprobs": jnp.full((2, 4), -3.0),
           "teacher_logits": jnp.asarray(rng.normal(size=(2, 4, 32)), jnp.float32)}
  opt = _opt(minibatch_size=2, lr=1e-2)
  runs = {}
  for every in (1, 2):
    update = steps.make_update(config, loss, opt, shapes, 1, 3, None, every)
    state = steps.init_state(nnx.split(student)[1], opt, 3, None)
    kls = []
    for _ in range(3):
      state, m = update(state, batch, jax.random.key(0))
      kls.append(float(m["policy/kl_before_after"]))
    runs[every] = (kls, jax.device_get(state.params))
  assert all(k != 0.0 for k in runs[1][0])
  # diagnostics_every=2 over 3 iterations: iteration 2 and the last one.
  assert runs[2][0][0] == 0.0 and runs[2][0][1:] == runs[1][0][1:]
  jax.tree.map(np.testing.assert_array_equal, runs[1][1], runs[2][1])
