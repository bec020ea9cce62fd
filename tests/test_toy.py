"""Toy studies: the continuous App. E reproduction (shortened) and the exact tabular study."""

import importlib.util
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import main
from opd_jax.toy import env, exact, policy, study, variance

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# ----------------------------------------------------------------------------------------------
# exact tabular study
# ----------------------------------------------------------------------------------------------

PAIR = exact.TabularPair(vocab=3, student_order=1, teacher_order=2)
LENGTH = 4
GAMMAS = (0.0, 0.5, 1.0)
KS = (2,)


@pytest.fixture(scope="module")
def tables():
  return exact.init_tables(PAIR, jax.random.key(3), 1.0, 2.0)


@pytest.fixture(scope="module")
def moments(tables):
  return exact.exact_moments(PAIR, *tables, LENGTH, GAMMAS, KS)


def _context(prefix, order, vocab):
  padded = (vocab,) * order + tuple(prefix)
  digits = padded[len(padded) - order:]
  return sum(d * (vocab + 1) ** (order - 1 - i) for i, d in enumerate(digits))


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - x.max() - np.log(np.sum(np.exp(x - x.max())))


def dropped_coupling_reference(student, teacher, vocab, length, s_order, t_order):
  """E[Σ_t Σ_{t'>t} r_{t'} s_t] (App. D.1) by a recursion over the prefix tree, in float64.

  With W(c) = E[Σ of the rewards still to come | prefix c] (W = 0 at full length), the dropped
  terms are Σ_t Σ_{c_t} P(c_t) Σ_v π(v|c_t) ∇log π(v|c_t) W(c_t ⊕ v), and for a softmax table
  ∇_θ log π(v|c) is e_v − π(·|c) on the table row of c's context.
  """
  student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
  future = {}
  for t in range(length, -1, -1):
    for prefix in itertools.product(range(vocab), repeat=t):
      if t == length:
        future[prefix] = 0.0
        continue
      logp = _log_softmax(student[_context(prefix, s_order, vocab)])
      logq = _log_softmax(teacher[_context(prefix, t_order, vocab)])
      future[prefix] = sum(np.exp(logp[v]) * (logp[v] - logq[v] + future[prefix + (v,)])
                           for v in range(vocab))
  coupling = np.zeros_like(student)
  for t in range(length):
    for prefix in itertools.product(range(vocab), repeat=t):
      row = _context(prefix, s_order, vocab)
      prob_prefix = 1.0
      for j, y in enumerate(prefix):
        prob_prefix *= np.exp(_log_softmax(student[_context(prefix[:j], s_order, vocab)])[y])
      pi = np.exp(_log_softmax(student[row]))
      for v in range(vocab):
        score = -pi.copy()
        score[v] += 1.0
        coupling[row] += prob_prefix * pi[v] * future[prefix + (v,)] * score
  return coupling.ravel()


def test_gamma_one_is_exactly_unbiased(moments):
  grad_j, means, _ = moments
  names = exact.estimator_names(GAMMAS, KS)
  g1 = means[names.index("gamma=1")]
  assert np.linalg.norm(grad_j) > 0.1
  np.testing.assert_allclose(g1, grad_j, atol=1e-5 * np.linalg.norm(grad_j))
  for name in ("gamma=0", "gamma=0.5", "full_vocab", "lsm_k=2"):  # ... and the others are not
    assert np.linalg.norm(means[names.index(name)] - grad_j) > 1e-2 * np.linalg.norm(grad_j)


def test_gamma_zero_bias_is_the_dropped_coupling(tables, moments):
  grad_j, means, _ = moments
  names = exact.estimator_names(GAMMAS, KS)
  coupling = dropped_coupling_reference(*tables, PAIR.vocab, LENGTH, PAIR.student_order,
                                        PAIR.teacher_order)
  bias = means[names.index("gamma=0")] - grad_j
  assert np.linalg.norm(coupling) > 0.1
  np.testing.assert_allclose(bias, -coupling, atol=1e-5 * np.linalg.norm(coupling))


def test_full_vocab_is_rao_blackwellised_gamma_zero(moments):
  _, means, variances = moments
  names = exact.estimator_names(GAMMAS, KS)
  g0, full = names.index("gamma=0"), names.index("full_vocab")
  np.testing.assert_allclose(means[full], means[g0], atol=1e-5 * np.linalg.norm(means[g0]))
  assert variances[full] < variances[g0]
  v = [variances[names.index(f"gamma={g:g}")] for g in GAMMAS]
  assert v == sorted(v) and v[-1] > 1.5 * v[0]


def test_monte_carlo_mean_and_variance_agree_with_exact(tables, moments):
  _, means, variances = moments
  s = exact.ExactSettings(seed=5, pair=PAIR, lengths=(LENGTH,), gammas=GAMMAS, ks=KS,
                          student_scale=1.0, teacher_scale=2.0, mc_samples=20000)
  z = exact.monte_carlo_check(s, *tables, LENGTH)
  assert set(z) == set(exact.estimator_names(GAMMAS, KS))
  assert max(z.values()) < 4.5, z  # over 7 coordinates x 5 estimators, |z| > 4.5 is ~1e-4 likely
  samples = exact.sample_sequences(PAIR, tables[0], jax.random.key(9), 20000, LENGTH)
  grads = np.asarray(exact.per_sequence_gradients(PAIR, *tables, samples,
                                                  jnp.asarray(GAMMAS), KS), np.float64)
  mc_var = np.sum(grads.var(axis=1, ddof=1), axis=-1)
  np.testing.assert_allclose(mc_var, variances, rtol=0.1)
  # and a shifted expectation is detected: the check can fail
  assert np.max(np.abs(grads.mean(axis=1) - means - 0.1)
                / (grads.std(axis=1) / np.sqrt(grads.shape[1]) + 1e-12)) > 4.5


def test_sampler_matches_enumerated_probabilities(tables):
  weights, _ = exact.exact_reference(PAIR, *tables, 3)
  samples = np.asarray(exact.sample_sequences(PAIR, tables[0], jax.random.key(1), 30000, 3))
  ids = samples @ (PAIR.vocab ** np.arange(2, -1, -1))
  freq = np.bincount(ids, minlength=PAIR.vocab ** 3) / len(ids)
  tolerance = 5 * np.sqrt(weights * (1 - weights) / len(ids)) + 1e-4
  assert np.all(np.abs(freq - weights) <= tolerance), (freq, weights)


def test_exponent_fit_recovers_a_power_law():
  lengths = np.arange(2, 9)
  assert exact.fit_exponent(lengths, 3.0 * lengths ** 2.5) == pytest.approx(2.5)
  assert np.isnan(exact.fit_exponent(lengths, np.zeros(7)))


def test_exact_settings_reject_bad_values():
  with pytest.raises(ValueError, match="ks"):
    exact.ExactSettings(seed=0, pair=PAIR, lengths=(2,), gammas=(0.0,), ks=(3,),
                        student_scale=1.0, teacher_scale=1.0, mc_samples=0)
  with pytest.raises(ValueError, match="lengths"):
    exact.ExactSettings(seed=0, pair=PAIR, lengths=(30,), gammas=(0.0,), ks=(2,),
                        student_scale=1.0, teacher_scale=1.0, mc_samples=0)
  with pytest.raises(ValueError, match="teacher_order"):
    exact.TabularPair(vocab=4, teacher_order=9)


@pytest.mark.slow  # keeps `make test` under 10 minutes; `make test-all` runs it
def test_exact_runner_smoke(tmp_path, capsys):
  config = load_config("toy_exact", "smoke")
  config.workdir = str(tmp_path)
  rows, fits = main.run_experiment(config)
  out = capsys.readouterr().out
  assert "var exponent" in out and "Monte-Carlo check" in out
  assert {f["estimator"] for f in fits} == {"gamma=0", "gamma=0.5", "gamma=1", "full_vocab",
                                            "lsm_k=2"}
  for name in ("exact.csv", "exponents.csv", "toy_exact.png"):
    assert (tmp_path / name).stat().st_size > 0
  g1 = [r for r in rows if r["estimator"] == "gamma=1"]
  assert len(g1) == 3 and all(r["rel_bias"] < 1e-5 for r in g1)


# ----------------------------------------------------------------------------------------------
# continuous study (App. E)
# ----------------------------------------------------------------------------------------------

SPEC = policy.PolicySpec()


def test_policy_has_about_4k_parameters_and_respects_its_bounds():
  params = policy.init_params(jax.random.key(0), SPEC)
  assert policy.num_params(params) == 3 * 64 + 64 + 64 * 64 + 64 + 64 * 2 + 2
  obs = jax.random.normal(jax.random.key(1), (50, 3)) * 10.0
  mean, std = policy.apply(params, obs, SPEC)
  assert np.all(np.abs(mean) <= SPEC.max_step) and np.all(std >= SPEC.std_floor)
  np.testing.assert_allclose(policy.apply(params, jnp.zeros((1, 3)), SPEC)[1], SPEC.init_std,
                             rtol=1e-4)
  with pytest.raises(ValueError, match="init_std"):
    policy.PolicySpec(std_floor=0.2, init_std=0.1)


def test_rollout_follows_the_transition():
  params = policy.init_params(jax.random.key(0), SPEC)
  for task in (env.LEFT, env.RIGHT):
    traj = env.rollout(lambda o: policy.apply(params, o, SPEC), task, jax.random.key(2), 5, 20)
    assert traj.positions.shape == (5, 21) and traj.obs.shape == (5, 20, 3)
    np.testing.assert_allclose(traj.positions[:, 0], env.STARTS[task])
    np.testing.assert_allclose(np.diff(traj.positions, axis=1), traj.actions, atol=1e-5)
    np.testing.assert_allclose(traj.obs[..., 1], traj.positions[:, :-1])
    np.testing.assert_allclose(traj.obs[0, :, 2], np.arange(20) / 20)
    np.testing.assert_allclose(traj.obs[..., 0], 2.0 * task - 1.0)


def test_opd_surrogate_gradient_is_the_discounted_estimator():
  rng = np.random.default_rng(0)
  logp, logq = rng.normal(size=(2, 3, 6)).astype(np.float32)
  for gamma in (0.0, 0.5, 1.0):
    grad = jax.grad(lambda lp: variance.opd_surrogate(lp, logq, gamma)[0])(jnp.asarray(logp))
    r = logp - logq
    expected = np.zeros_like(r)
    for t in range(6):
      expected[:, t] = sum(gamma ** (u - t) * r[:, u] for u in range(t, 6))
    np.testing.assert_allclose(grad, expected / 3, rtol=1e-5, atol=1e-6)


def test_microbatch_variance_is_app_e2():
  rng = np.random.default_rng(1)
  grads = {"w": rng.normal(size=(8, 4, 2)), "b": rng.normal(size=(8, 2))}
  flat = np.concatenate([grads["w"].reshape(8, -1), grads["b"]], axis=1)
  expected = np.mean(np.sum((flat - flat.mean(0)) ** 2, axis=1))
  assert float(variance.microbatch_variance(grads)) == pytest.approx(expected, rel=1e-5)


def test_settings_reject_bad_values():
  with pytest.raises(ValueError, match="teacher reward 'dense'"):
    config = load_config("toy_variance", "smoke")
    config.teacher_reward = "dense"
    study.ToyStudySettings.from_config(config)
  with pytest.raises(ValueError, match="micro_batches"):
    variance.StudySettings(batch=60, micro_batches=8)
  config = load_config("toy_variance", "smoke")
  config.heatmap_gammas = (0.5,)
  with pytest.raises(ValueError, match="heatmap_gammas"):
    study.ToyStudySettings.from_config(config)
  with pytest.raises(ValueError, match="accepted: 'short', 'smoke'"):
    load_config("toy_variance", "long")


@pytest.fixture(scope="module")
def short_study(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("toy_short")
  config = load_config("toy_variance", "short")
  config.workdir = str(workdir)
  result, rows = main.run_experiment(config)
  return workdir, config, result


@pytest.mark.slow  # keeps `make test` under 10 minutes; `make test-all` runs it
def test_short_study_reproduces_the_paper(short_study):
  """The expected result, recomputed here from summary.csv (medians over seeds)."""
  workdir, config, _ = short_study
  with open(workdir / "summary.csv") as f:
    header, *lines = [line.strip().split(",") for line in f]
  for column in ("gamma", "seed", "late_var", "early_peak_var", "final_dist_left",
                 "final_dist_right", "teacher_dist_left", "teacher_dist_right"):
    assert column in header
  table = np.asarray(lines, np.float64)
  col = {name: table[:, i] for i, name in enumerate(header)}
  assert len(table) == len(config.seeds) * len(config.gammas)
  gammas = sorted(set(col["gamma"]))

  def med(name, gamma):
    return np.median(col[name][col["gamma"] == gamma])

  late = [med("late_var", g) for g in gammas]
  assert all(a < b for a, b in zip(late, late[1:])), late
  assert late[-1] >= 5 * late[0]
  assert med("early_peak_var", 1.0) >= 10 * med("early_peak_var", 0.0)
  for task in ("left", "right"):
    assert med(f"final_dist_{task}", 0.0) <= 2 * med(f"teacher_dist_{task}", 0.0)
    assert med(f"final_dist_{task}", 1.0) >= med(f"final_dist_{task}", 0.0)
  # at the same (initial) parameters the estimator's own variance also rises with γ
  same = [med("same_var_init", g) for g in gammas]
  assert all(a < b for a, b in zip(same, same[1:])), same


@pytest.mark.slow  # shares the short study's fixture (about 40 s)
def test_short_study_outputs(short_study):
  workdir, config, result = short_study
  for seed in config.seeds:
    assert (workdir / f"toy_variance_seed{seed}.png").stat().st_size > 10_000
  assert (workdir / "same_params.csv").stat().st_size > 0
  n_iter, n_seed, n_gamma = result.var.shape
  assert (n_iter, n_seed, n_gamma) == (config.iterations, len(config.seeds), len(config.gammas))
  assert np.all(np.isfinite(result.var)) and np.all(result.var > 0)
  assert result.positions.shape == (n_seed, n_gamma, 2, config.eval_rollouts, config.horizon + 1)
  rows = study.summary_rows(result)
  assert all(ok for _, ok in study.expected_result(rows))
