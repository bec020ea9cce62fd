"""opd_jax.packing: trimmed and packed rows give the scores, losses, metrics and updates of the
unpacked batch, for every estimator, on one device and on the (2, 2, 2) mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax import estimators, models, packing, settings, sharding, steps

V, R, P, PT, N = 24, 8, 6, 9, 10
CONFIG = models.ModelConfig(model_type="qwen2", vocab_size=V, hidden_size=32,
                            intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=8, qkv_bias=True, max_position_embeddings=64)
SCORE_KEYS = ("behavior_logprobs", "teacher_logprobs", "t_indices", "t_logits", "t_lse",
              "t_sampled", "teacher_logits")


def _batch(seed=0):
  """Left-padded prompts of several lengths, a teacher rendering of other lengths, responses of
  1..N tokens, an environment-like loss mask with holes and observation tokens not sampled."""
  rng = np.random.default_rng(seed)
  lengths = np.array([1, 10, 3, 7, 2, 10, 5, 4])
  p_len, t_len = rng.integers(2, P + 1, R), rng.integers(2, PT + 1, R)
  cols = np.arange(N)[None, :]
  response_mask = cols < lengths[:, None]
  observation = response_mask & (rng.random((R, N)) < 0.2)
  return {
      "prompt": rng.integers(1, V, (R, P)).astype(np.int32),
      "prompt_mask": np.arange(P)[None, :] >= (P - p_len)[:, None],
      "teacher_prompt": rng.integers(1, V, (R, PT)).astype(np.int32),
      "teacher_prompt_mask": np.arange(PT)[None, :] >= (PT - t_len)[:, None],
      "response": np.where(response_mask, rng.integers(1, V, (R, N)), 0).astype(np.int32),
      "response_mask": response_mask,
      "loss_mask": response_mask & ~observation,
      "sampled_mask": response_mask & ~observation,
      "policy_logprobs": np.where(response_mask, -rng.random((R, N)), 0).astype(np.float32)}


def _loss(name, **kw):
  fields = dict(k=4, support="teacher", renormalize=True, tail="none", tail_weight_clip=None,
                gamma=0.0, ppo_clip=0.2, advantage_clip=None, chunk_tokens=16, chunk_vocab=16)
  return settings.LossSettings(name, **{**fields, **kw})


OPT = settings.OptSettings(minibatch_size=R // 2, lr=1e-2, warmup_steps=0, schedule="constant",
                           b1=0.9, b2=0.999, eps=1e-3, weight_decay=0.0, grad_clip=1.0)


def test_pack_places_each_sequence_and_unpacks_back():
  batch = _batch()
  lay = packing.pack("pack", batch, minibatches=2, micro=1, ways=1, microbatch_tokens=20)
  geo, a = lay.geometry, lay.arrays
  assert geo.packed and geo.width == 16 and geo.micro >= 2
  assert np.bincount(lay.row).max() >= 2      # rows shared by several sequences
  lengths = packing.response_lengths(batch["response_mask"])
  np.testing.assert_array_equal(lay.length, lengths)
  for i in range(R):
    g, o, n = lay.row[i], lay.offset[i], lay.length[i]
    assert g % 2 == i % 2                     # its mini-batch's rows
    seg = a["c_segments"][g, o]
    prompt = batch["prompt"][i][batch["prompt_mask"][i]]
    cols = np.flatnonzero(a["segments"][g] == seg)
    np.testing.assert_array_equal(a["tokens"][g, cols],
                                  np.concatenate([prompt, batch["response"][i, :n]]))
    # The hidden state before each response token is the one that predicts it.
    np.testing.assert_array_equal(a["s_index"][g, o:o + n], cols[len(prompt) - 1:-1])
    np.testing.assert_array_equal(a["tokens"][g, a["s_index"][g, o:o + n] + 1],
                                  batch["response"][i, :n])
    np.testing.assert_array_equal(a["t_tokens"][g, a["t_index"][g, o:o + n] + 1],
                                  batch["response"][i, :n])
  # A micro-batch's rows hold at most the token budget (one device here).
  per_micro = a["segments"].reshape(-1, geo.micro * 2, geo.width)   # [q, (j, m), W]
  assert (per_micro > 0).sum(axis=(0, 2)).max() <= 20
  np.testing.assert_array_equal(lay.unpack(a["response"]), batch["response"] * (
      np.arange(N)[None] < lengths[:, None]))
  off = packing.pack("off", batch, minibatches=2, micro=1, ways=1)
  assert off.geometry == packing.Geometry(P + N, PT + N, N, 2, 1, False)
  np.testing.assert_array_equal(off.arrays["tokens"], np.concatenate(
      [batch["prompt"], batch["response"]], axis=1))


def test_buckets_and_modes():
  assert [packing.bucket(n) for n in (1, 16, 17, 100, 1000)] == [16, 16, 32, 128, 1024]
  assert packing.bucket(100, limit=90) == 90
  with pytest.raises(ValueError, match="config.opt.packing='zip' is not accepted"):
    packing.plan_rows("zip", _batch(), minibatches=1, micro=1, ways=1, microbatch_tokens=0)
  # A budget of 40 response columns, the longest response 10: "trim" keeps 16 of them.
  wide = {k: np.pad(v, ((0, 0), (0, 30))) if v.shape[1] == N else v
          for k, v in _batch().items()}
  trim = packing.pack("trim", wide, minibatches=2, micro=1, ways=1)
  assert trim.geometry == packing.Geometry(P + 16, PT + 16, 16, 2, 1, False)
  np.testing.assert_array_equal(trim.arrays["response"], wide["response"][:, :16])


def _place(arrays, mesh):
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in arrays.items()}
  return {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in arrays.items()}


def _run(mode, estimator, mesh, *, micro_tokens=20, loss_kw=None):
  """Scores (in the [R, N] layout), scoring metrics, update metrics and new parameters."""
  loss = _loss(estimator, **(loss_kw or {}))
  est = estimators.get(estimator)
  ways = 1 if mesh is None else sharding.batch_divisor(mesh)
  lay = packing.pack(mode, _batch(), minibatches=2, micro=1, ways=ways,
                     microbatch_tokens=micro_tokens)
  geo = lay.geometry
  rows = _place(lay.arrays, mesh)
  shapes = steps.Shapes(vocab=V, k=4, mesh=mesh)
  student = models.init_model(CONFIG, seed=0, mesh=mesh, std=0.3)
  teacher = models.init_model(CONFIG, seed=1, mesh=mesh, std=0.3)
  s_def, s_params = nnx.split(student)
  t_def, t_params = nnx.split(teacher)
  scores, score_metrics = steps.score(s_def, s_params, t_def, t_params, rows, shapes=shapes,
                                      full_logits=est.full_teacher_logits, minibatches=2,
                                      packed=geo.packed)
  keys = ("tokens", "segments", "response", "loss_mask", "s_index", "c_segments")
  inputs = {k: rows[k] for k in keys if k in rows} | {k: scores[k] for k in est.score_keys}
  shard = None if mesh is None else steps.train_state_shardings(CONFIG, OPT, 10, mesh)
  state = steps.init_state(s_params, OPT, 10, shard)
  update = steps.make_update(CONFIG, loss, OPT, shapes, 2, 10)
  state, update_metrics = update(state, inputs, jax.random.key(0), geo.micro, geo.packed)
  host = {k: lay.unpack(np.asarray(jax.device_get(v))) for k, v in scores.items()
          if k in SCORE_KEYS}
  return (host, jax.device_get(score_metrics), jax.device_get(update_metrics),
          jax.device_get(state.params), geo)


def _compare(a, b, mask):
  scores_a, sm_a, um_a, params_a, _ = a
  scores_b, sm_b, um_b, params_b, _ = b
  for k in scores_a:
    m = mask.reshape(mask.shape + (1,) * (scores_a[k].ndim - 2))
    np.testing.assert_allclose(np.where(m, scores_a[k], 0), np.where(m, scores_b[k], 0),
                               rtol=2e-5, atol=2e-5, err_msg=k)
  for k in set(sm_a) | set(sm_b):
    np.testing.assert_allclose(sm_a[k], sm_b[k], rtol=1e-4, atol=1e-5, err_msg=k)
  assert set(um_a) == set(um_b)
  for k in um_a:
    np.testing.assert_allclose(um_a[k], um_b[k], rtol=1e-4, atol=1e-5, err_msg=k)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               params_a, params_b)


@pytest.mark.parametrize("estimator,loss_kw", [
    ("lsm", None), ("sampled_token", {"gamma": 0.9}),
    pytest.param("full_rkl", None, marks=pytest.mark.slow),
    pytest.param("sft", None, marks=pytest.mark.slow),
    pytest.param("lsm", {"tail": "ema_pg"}, marks=pytest.mark.slow)])
def test_every_estimator_is_the_same_on_trimmed_and_packed_rows(estimator, loss_kw):
  mask = _batch()["response_mask"]
  off = _run("off", estimator, None, loss_kw=loss_kw)
  for mode in ("trim", "pack"):
    got = _run(mode, estimator, None, loss_kw=loss_kw)
    _compare(off, got, mask)
  assert got[-1].packed and got[-1].micro > 1        # several micro-batches were accumulated


@pytest.mark.parametrize("estimator", ["lsm", pytest.param("sampled_token",
                                                            marks=pytest.mark.slow)])
def test_packed_rows_on_the_2x2x2_mesh_match_one_device(estimator):
  mask = _batch()["response_mask"]
  mesh = sharding.make_mesh(2, 2, 2)
  one = _run("off", estimator, None, loss_kw={"gamma": 0.5})
  _compare(one, _run("pack", estimator, mesh, micro_tokens=16, loss_kw={"gamma": 0.5}), mask)


def test_reward_to_go_stays_within_each_packed_sequence():
  from opd_jax import losses   # pylint: disable=import-outside-toplevel
  r = jnp.asarray([[1.0, 2.0, 3.0, 4.0, 5.0, 0.0]])
  m = jnp.asarray([[1, 1, 1, 1, 1, 0]], bool)
  seg = jnp.asarray([[1, 1, 2, 2, 2, 0]])
  got = losses.reward_to_go(r, m, 0.5, seg)
  want = [[1 + 0.5 * 2, 2, 3 + 0.5 * 4 + 0.25 * 5, 4 + 0.5 * 5, 5, 0]]
  np.testing.assert_allclose(got, want)


def test_settings_accept_the_modes_and_refuse_others():
  from opd_jax import configs   # pylint: disable=import-outside-toplevel
  c = configs.opd()
  assert c.opt.packing == "pack" and c.opt.microbatch_tokens == 0
  with pytest.raises(settings.ConfigError, match="config.opt.packing"):
    settings.OptSettings.from_config(dict(c.opt) | {"packing": "zip"}, 64, "x")
  assert dataclasses.replace(OPT, packing="trim").packing == "trim"


def test_micro_batches_hold_the_budget_and_few_empty_rows():
  # 40 rows needed, 8 per device-micro-batch by the budget (8 x 64 tokens), 2 devices: 4
  # micro-batches (a power of two) of 5 rows per device -> 6 (the next of 1, 2, 3, 4, 6, 8).
  assert packing.micro_rows(40, 64, 8, 64, 2, 0) == (4, 12)
  assert packing.micro_rows(5, 64, 8, 64, 1, 0) == (1, 6)
  assert packing.micro_rows(3, 64, 8, 64, 1, 128) == (2, 2)   # 2 rows of 64 per 128 tokens
  for need in range(1, 50):
    micro, rows = packing.micro_rows(need, 16, 4, 16, 2, 0)
    assert micro * rows >= need and rows <= 8 and micro * rows <= max(2 * need, 8)
