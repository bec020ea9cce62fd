"""Estimator diagnostics: exact estimators read as exact, a biased one as biased, in the trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_helpers
from opd_jax import configs, diagnostics, models, settings, train

V = 24


def _loss(**overrides) -> settings.LossSettings:
  lo = configs.opd().loss
  for k, v in overrides.items():
    lo[k] = v
  return settings.LossSettings.from_config(lo)


def _logits(seed, n=16, scale=2.0):
  return scale * jax.random.normal(jax.random.key(seed), (n, V))


def _compare(loss, teacher=None, n=16):
  s = _logits(0, n)
  t = _logits(1, n) if teacher is None else teacher
  tokens = jax.random.categorical(jax.random.key(2), s)
  mask = jnp.arange(n) % 5 != 4               # a few positions out of the loss
  special = jnp.arange(n) % 4 == 0
  return {k: float(v) for k, v in diagnostics.compare(
      s, t, tokens, mask, jnp.ones(n, bool), special, loss).items()}


def test_full_reverse_kl_is_its_own_reference():
  d = _compare(_loss(estimator="full_rkl"))
  assert d["diag/grad_rel_diff"] == 0.0 and d["diag/loss_gap"] == 0.0
  assert d["diag/grad_cosine"] == pytest.approx(1.0, abs=1e-6)
  assert d["diag/reverse_kl"] > 0.1 and d["diag/positions"] == 13


def test_lsm_with_the_whole_vocabulary_is_exact():
  d = _compare(_loss(estimator="lsm", k=V))
  assert d["diag/grad_rel_diff"] < 1e-5 and abs(d["diag/loss_gap"]) < 1e-5
  assert d["diag/teacher_topk_mass"] == pytest.approx(1.0, abs=1e-6)
  assert d["diag/sampled_outside_topk"] == 0.0


def test_lsm_with_a_small_support_on_a_flat_teacher_is_clearly_biased():
  flat = 0.01 * jax.random.normal(jax.random.key(3), (16, V))
  d = _compare(_loss(estimator="lsm", k=2), teacher=flat)
  assert d["diag/grad_rel_diff"] > 0.5 and d["diag/grad_cosine"] < 0.8
  assert d["diag/teacher_topk_mass"] == pytest.approx(2 / V, abs=0.01)
  assert d["diag/sampled_outside_topk"] > 0.5
  # The same teacher with the whole vocabulary: exact again.
  assert _compare(_loss(estimator="lsm", k=V), teacher=flat)["diag/grad_rel_diff"] < 1e-5


def test_special_token_share_counts_the_special_positions_only():
  n = 8
  s, t = _logits(0, n), _logits(1, n)
  tokens = jnp.zeros(n, jnp.int32)
  kl = np.asarray(jnp.sum(jax.nn.softmax(s) * (jax.nn.log_softmax(s) - jax.nn.log_softmax(t)),
                          -1))
  special = np.arange(n) < 3
  d = diagnostics.compare(s, t, tokens, jnp.ones(n, bool), jnp.ones(n, bool), special,
                          _loss(estimator="full_rkl"))
  assert float(d["diag/special_kl_share"]) == pytest.approx(kl[:3].sum() / kl.sum(), rel=1e-5)


def test_positions_are_drawn_among_response_tokens_without_replacement():
  mask = jnp.zeros((6, 5), bool).at[:, :2].set(True).at[0, :].set(True)   # 15 tokens
  rows, cols, valid = diagnostics.draw_positions(jax.random.key(0), mask, 8)
  assert bool(valid.all()) and bool(mask[rows, cols].all())
  assert len(set(zip(rows.tolist(), cols.tolist()))) == 8
  rows, cols, valid = diagnostics.draw_positions(jax.random.key(0), mask, 20)
  assert int(valid.sum()) == 15


def _pair(seed=0):
  cfg = models.ModelConfig(model_type="qwen2", vocab_size=V, hidden_size=32,
                           intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                           head_dim=8, qkv_bias=True)
  student = models.init_model(cfg, seed=seed, std=0.3)
  teacher = models.init_model(cfg, seed=seed + 1, std=0.3)
  return nnx.split(student), nnx.split(teacher)


def _batch(rows=4, p=6, n=5):
  rng = np.random.default_rng(0)
  prompt = rng.integers(1, V, (rows, p)).astype(np.int32)
  prompt_mask = np.ones((rows, p), bool)
  prompt_mask[0, :2] = False
  response = rng.integers(1, V, (rows, n)).astype(np.int32)
  response_mask = np.ones((rows, n), bool)
  response_mask[1, 3:] = False
  loss_mask = response_mask.copy()
  loss_mask[2, 0] = False
  return {"prompt": prompt, "prompt_mask": prompt_mask, "teacher_prompt": prompt,
          "teacher_prompt_mask": prompt_mask, "response": response,
          "response_mask": response_mask, "loss_mask": loss_mask}


@pytest.mark.parametrize("estimator, k, exact", [("full_rkl", 4, True), ("lsm", V, True),
                                                 ("lsm", 2, False), ("sampled_token", 4, False)])
def test_diagnose_on_models(estimator, k, exact):
  (s_def, s_params), (t_def, t_params) = _pair()
  static = diagnostics.Static(_loss(estimator=estimator, k=k), V, 16, (3,), None)
  d = {k: float(v) for k, v in diagnostics.diagnose(
      s_def, s_params, t_def, t_params, _batch(), jax.random.key(0), static=static).items()}
  assert set(d) == set(diagnostics.METRICS)
  assert all(np.isfinite(v) for v in d.values())
  assert 0 < d["diag/positions"] <= 16 and d["diag/reverse_kl"] > 0
  if exact:
    assert d["diag/grad_rel_diff"] < 1e-5
  else:
    assert d["diag/grad_rel_diff"] > 0.05


def test_diagnose_matches_the_logits_of_a_full_pass():
  """The hidden state read at a drawn position is the one that predicts that response token."""
  (s_def, s_params), (t_def, t_params) = _pair()
  batch = _batch()
  static = diagnostics.Static(_loss(estimator="full_rkl"), V, 8, (), None)
  key = jax.random.key(5)
  rows, cols, _ = diagnostics.draw_positions(key, jnp.asarray(batch["response_mask"]), 8)
  student, teacher = nnx.merge(s_def, s_params), nnx.merge(t_def, t_params)

  def logits(model):
    tokens = np.concatenate([batch["prompt"], batch["response"]], 1)
    mask = np.concatenate([batch["prompt_mask"], np.ones_like(batch["response_mask"])], 1)
    return models.forward(model, tokens, mask)[rows, batch["prompt"].shape[1] - 1 + cols]

  s, t = logits(student), logits(teacher)
  want = diagnostics.compare(s, t, batch["response"][rows, cols],
                             batch["loss_mask"][rows, cols], jnp.ones(8, bool),
                             jnp.zeros(8, bool), static.loss)
  got = diagnostics.diagnose(s_def, s_params, t_def, t_params, batch, key, static=static)
  assert float(got["diag/reverse_kl"]) == pytest.approx(float(want["diag/reverse_kl"]), rel=1e-5)


@pytest.mark.slow   # ~20 s; the fast suite's math_lsm command-line smoke logs diag/ too
def test_trainer_logs_diagnostics_on_diagnostic_iterations(tmp_path, tiny_arith_dir):
  # Rows split 8 ways on the 8 fake devices (the drawn rows are gathered across them).
  c = train_helpers.tiny_config(tmp_path / "w", tiny_arith_dir, **{
      "loss.estimator": "lsm", "steps": 3, "log.diagnostics_every": 2,
      "log.diagnostics_positions": 8, "data.prompts_per_step": 8, "opt.minibatch_size": 8})
  rows = train.run(c, log=lambda _: None)
  assert [sorted(k for k in r if k.startswith("diag/")) for r in rows] == [
      [], sorted(diagnostics.METRICS), sorted(diagnostics.METRICS)]
  assert "time/diagnostics" in rows[1] and rows[1]["diag/positions"] > 0
  c = train_helpers.tiny_config(tmp_path / "w2", tiny_arith_dir, **{
      "steps": 1, "log.diagnostics_positions": 0, "data.prompts_per_step": 8,
      "opt.minibatch_size": 8})
  assert not any(k.startswith("diag/") for r in train.run(c, log=lambda _: None) for k in r)


def test_positions_round_up_to_the_rows_run_at_a_time():
  c = train_helpers.tiny_config("w", "d", **{"log.diagnostics_positions": 5,
                                             "opt.minibatch_size": 8})
  p = type("P", (), {"settings": settings.TrainSettings.from_config(c)})
  assert diagnostics.chunk_for(p) == 8 and diagnostics.positions_for(p) == 8
  c.opt.microbatch_size, c.log.diagnostics_positions = 2, 5
  p = type("P", (), {"settings": settings.TrainSettings.from_config(c)})
  assert diagnostics.chunk_for(p) == 2 and diagnostics.positions_for(p) == 6


def test_rows_run_in_chunks_give_the_same_figures():
  (s_def, s_params), (t_def, t_params) = _pair()
  loss = _loss(estimator="lsm", k=3)
  whole, chunked = (diagnostics.diagnose(
      s_def, s_params, t_def, t_params, _batch(), jax.random.key(1),
      static=diagnostics.Static(loss, V, 16, (3,), None, chunk)) for chunk in (0, 4))
  for k in diagnostics.METRICS:
    assert float(chunked[k]) == pytest.approx(float(whole[k]), rel=1e-5, abs=1e-6), k
