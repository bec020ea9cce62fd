"""opd_jax.estimators: the registry, what each estimator needs, and its loss on a mini-batch
against the loss functions it stands for."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_helpers
from opd_jax import estimators, losses, models, settings, steps, topk


def _loss_settings(name, **kw):
  fields = dict(k=4, support="teacher", renormalize=True, tail="none", tail_weight_clip=None,
                gamma=0.0, ppo_clip=0.2, advantage_clip=None, chunk_tokens=16, chunk_vocab=16)
  return settings.LossSettings(name, **{**fields, **kw})


def test_registry_names_and_errors():
  assert estimators.names() == ("lsm", "sampled_token", "full_rkl", "sft")
  with pytest.raises(estimators.EstimatorError, match="config.loss.estimator='kl' is not "
                     "accepted; accepted: lsm, sampled_token, full_rkl, sft"):
    estimators.get("kl")
  with pytest.raises(ValueError, match="registered twice"):
    estimators.register(estimators.LocalSupportMatching)
  assert not estimators.get("sft").samples and estimators.get("sft").score_keys == ()
  assert [n for n in estimators.names() if estimators.get(n).full_teacher_logits] == ["full_rkl"]
  with pytest.raises(estimators.EstimatorError, match="config.loss.k=40 exceeds the shared "
                     "vocabulary of 32"):
    estimators.get("lsm").check(_loss_settings("lsm", k=40), 32)


@pytest.fixture(scope="module")
def minibatch():
  """A tiny student, the hidden states of a [2, 5] response and the teacher's scores."""
  config = model_helpers.tiny_model_config(vocab_size=32, num_layers=1)
  student = models.init_model(config, seed=0, std=0.3)
  teacher = models.init_model(config, seed=1, std=0.3)
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(1, 32, (2, 3)), jnp.int32)
  response = jnp.asarray(rng.integers(1, 32, (2, 5)), jnp.int32)
  mask = jnp.ones((2, 3), bool)
  batch = {"prompt": prompt, "prompt_mask": mask, "teacher_prompt": prompt,
           "teacher_prompt_mask": mask, "response": response,
           "response_mask": jnp.ones((2, 5), bool),
           "loss_mask": jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool),
           "policy_logprobs": jnp.zeros((2, 5))}
  shapes = steps.Shapes(vocab=32, k=4, mesh=None)
  s_def, s_params = nnx.split(student)
  t_def, t_params = nnx.split(teacher)
  scores, _ = steps.score(s_def, s_params, t_def, t_params, batch, shapes=shapes,
                          full_logits=True)
  tokens = jnp.concatenate([prompt, response], axis=1)
  hidden = models.forward(student, tokens, jnp.ones(tokens.shape, bool),
                          return_hidden=True)[:, 2:7]
  logits = models.logits_from_hidden(student, hidden)
  return student, hidden, logits, batch | scores


def test_every_estimator_reads_only_scores_that_scoring_makes(minibatch):
  *_, mb = minibatch
  for name in estimators.names():
    assert set(estimators.get(name).score_keys) <= set(mb), name


def test_losses_are_the_functions_they_stand_for(minibatch):
  student, hidden, logits, mb = minibatch
  mask = mb["loss_mask"]
  want = {
      "lsm": topk.topk_reverse_kl_from_hidden(
          hidden, models.unembedding(student), topk.TopK(
              mb["t_indices"][..., :4], mb["t_logits"][..., :4], mb["t_lse"], mb["t_sampled"]),
          mask, sampled_tokens=mb["response"], behavior_logprobs=mb["behavior_logprobs"],
          chunk_tokens=16, chunk_vocab=16)[0],
      "sampled_token": losses.sampled_token_opd(
          losses.token_logprobs(logits, mb["response"]), mb["teacher_logprobs"], mask,
          behavior_logprobs=mb["behavior_logprobs"], ppo_clip=0.2)[0],
      "full_rkl": losses.full_reverse_kl(logits, mb["teacher_logits"], mask)[0],
      "sft": -jnp.sum(jnp.where(mask, losses.token_logprobs(logits, mb["response"]), 0.0))
             / jnp.sum(mask),
  }
  for name, value in want.items():
    got, aux = estimators.get(name).loss(student, hidden, mb, _loss_settings(name), 32, None)
    np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert "policy/entropy" in aux and "kl/student_entropy" not in aux, name


def test_which_estimators_read_the_students_scores():
  reads = {n: estimators.get(n).reads_student_scores(_loss_settings(n)) for n in
           estimators.names()}
  assert reads == {"lsm": False, "sampled_token": True, "full_rkl": False, "sft": False}
  assert estimators.get("lsm").reads_student_scores(_loss_settings("lsm", tail="ema_pg"))


def test_scoring_without_the_students_pass_keeps_the_teachers_scores(minibatch):
  """Off a diagnostic iteration, an estimator that reads no student scores gets the teacher's
  scores unchanged and the sampler's log-probs as the behaviour log-probs."""
  student, *_, mb = minibatch
  config = model_helpers.tiny_model_config(vocab_size=32, num_layers=1)
  teacher = models.init_model(config, seed=1, std=0.3)
  keys = ("prompt", "prompt_mask", "teacher_prompt", "teacher_prompt_mask", "response",
          "response_mask", "loss_mask")
  batch = {k: mb[k] for k in keys} | {"policy_logprobs": jnp.full((2, 5), -1.5)}
  s_def, s_params = nnx.split(student)
  t_def, t_params = nnx.split(teacher)
  shapes = steps.Shapes(vocab=32, k=4, mesh=None)
  runs = {diagnose: steps.score(s_def, s_params, t_def, t_params, batch, diagnose, shapes=shapes,
                                student_always=False) for diagnose in (True, False)}
  full, _ = steps.score(s_def, s_params, t_def, t_params, batch, shapes=shapes)
  for key in ("teacher_logprobs", "t_indices", "t_logits", "t_lse", "t_sampled"):
    np.testing.assert_array_equal(runs[False][0][key], full[key], err_msg=key)
  for key in full:
    np.testing.assert_array_equal(runs[True][0][key], full[key], err_msg=key)
  np.testing.assert_array_equal(runs[False][0]["behavior_logprobs"], np.full((2, 5), -1.5))
  assert not np.allclose(full["behavior_logprobs"], -1.5)
  assert set(runs[False][1]) == set(runs[True][1])
  np.testing.assert_allclose(runs[False][1]["teacher/topk_mass"],
                             runs[True][1]["teacher/topk_mass"], rtol=1e-6)
