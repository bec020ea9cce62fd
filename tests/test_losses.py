"""Estimators against brute-force numpy references, gradient identities and properties."""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from opd_jax import losses

B, T, V = 2, 3, 11


def _inputs(seed, b=B, t=T, v=V, scale=2.0):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(b, t, v)) * scale
  te = rng.normal(size=(b, t, v)) * scale
  mask = rng.random((b, t)) < 0.75
  mask[0, 0] = True
  y = rng.integers(0, v, size=(b, t))
  return s.astype(np.float32), te.astype(np.float32), mask, y.astype(np.int32)


# Compiled once per option set and shared by all tests.
@functools.partial(jax.jit, static_argnames=("k", "support", "renormalize", "tail", "clip"))
def _topk(s, t, mask, y=None, blp=None, *, k, support="teacher", renormalize=True, tail="none",
          clip=None):
  return losses.topk_reverse_kl(s, t, mask, k=k, support=support, renormalize=renormalize,
                                tail=tail, sampled_tokens=y, behavior_logprobs=blp,
                                tail_weight_clip=clip)


_full = jax.jit(losses.full_reverse_kl)
_full_grad = jax.jit(jax.grad(lambda s, t, m: losses.full_reverse_kl(s, t, m)[0]))


# ----------------------------------------------------------------------------------------------
# values against numpy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_token_logprobs_matches_numpy(seed):
  s, _, _, y = _inputs(seed)
  got = losses.token_logprobs(jnp.asarray(s, jnp.bfloat16).astype(jnp.float32), y)
  want = np.take_along_axis(ref.log_softmax(np.asarray(jnp.asarray(s, jnp.bfloat16),
                                                       np.float64)), y[..., None], -1)[..., 0]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_reverse_kl_matches_numpy(seed):
  s, t, mask, _ = _inputs(seed)
  loss, aux = _full(s, t, mask)
  np.testing.assert_allclose(loss, ref.full_reverse_kl(s, t, mask), rtol=1e-5, atol=1e-6)
  assert aux["kl/num_tokens"] == mask.sum()


VARIANTS = [
    dict(support="teacher", renormalize=True, tail="none"),            # the method
    dict(support="student+sampled", renormalize=True, tail="none"),    # App. G.3 variant 2
    dict(support="teacher+sampled", renormalize=True, tail="none"),    # variant 3
    dict(support="student", renormalize=False, tail="ema_pg"),         # variant 4
    dict(support="teacher", renormalize=False, tail="ema_pg"),         # variant 5
    dict(support="teacher", renormalize=False, tail="none"),           # un-renormalised top-K
    dict(support="student", renormalize=True, tail="none"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
@pytest.mark.parametrize("k", [1, 4])
def test_topk_variants_match_numpy(variant, k):
  s, t, mask, y = _inputs(10 + k)
  loss, aux = _topk(s, t, mask, y, k=k, **variant)
  want = ref.topk_reverse_kl(s, t, mask, k, y=y, **variant)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  assert aux["kl/num_tokens"] == mask.sum()


def test_ema_pg_tail_with_behaviour_weight_and_clip_matches_numpy():
  s, t, mask, y = _inputs(7)
  rng = np.random.default_rng(7)
  behavior = (np.take_along_axis(ref.log_softmax(s), y[..., None], -1)[..., 0]
              + rng.normal(size=y.shape)).astype(np.float32)
  for clip in (None, 1.5):
    loss, aux = _topk(s, t, mask, y, behavior, k=3, support="teacher", renormalize=False,
                      tail="ema_pg", clip=clip)
    want = ref.topk_reverse_kl(s, t, mask, 3, support="teacher", renormalize=False,
                               tail="ema_pg", y=y, behavior=behavior, clip=clip)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    assert 0.0 <= aux["kl/tail_fraction"] <= 1.0


def test_k_equal_vocab_renormalised_equals_full_reverse_kl():
  s, t, mask, _ = _inputs(3)
  full, _ = _full(s, t, mask)
  topv, aux = _topk(s, t, mask, k=V)
  np.testing.assert_allclose(topv, full, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(aux["kl/teacher_mass"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(aux["kl/overlap"], 1.0)          # K·K > V: membership-table path
  _, aux = _topk(s, t, mask, k=6)
  want = np.mean([len(set(ref.topk_indices(s[i, j], 6)) & set(ref.topk_indices(t[i, j], 6))) / 6
                  for i in range(B) for j in range(T) if mask[i, j]])
  np.testing.assert_allclose(aux["kl/overlap"], want, rtol=1e-6)
  g_full = _full_grad(s, t, mask)
  g_top = jax.grad(lambda x: losses.topk_reverse_kl(x, t, mask, k=V)[0])(s)
  np.testing.assert_allclose(g_top, g_full, atol=1e-6)


def test_aux_diagnostics_match_numpy():
  s, t, mask, y = _inputs(4)
  k = 3
  _, aux = _topk(s, t, mask, y, k=k)
  lp, lq = ref.log_softmax(s), ref.log_softmax(t)
  tmass, smass, overlap, ent, gap = (np.zeros(mask.shape) for _ in range(5))
  for i in range(B):
    for j in range(T):
      sup = ref.topk_indices(t[i, j], k)
      tmass[i, j] = np.exp(lq[i, j, sup]).sum()
      smass[i, j] = np.exp(lp[i, j, sup]).sum()
      overlap[i, j] = len(set(sup) & set(ref.topk_indices(s[i, j], k))) / k
      ent[i, j] = -(np.exp(lp[i, j]) * lp[i, j]).sum()
      gap[i, j] = lq[i, j, y[i, j]] - lp[i, j, y[i, j]]
  for name, want in [("teacher_mass", tmass), ("student_mass", smass), ("overlap", overlap),
                     ("student_entropy", ent), ("logp_gap", gap)]:
    np.testing.assert_allclose(aux[f"kl/{name}"], ref.token_mean(want, mask)[0], rtol=1e-5,
                               atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------


def test_lsm_gradient_is_zero_outside_support_and_matches_closed_form():
  s, t, mask, _ = _inputs(5)
  k = 4
  g = np.asarray(jax.grad(lambda x: losses.topk_reverse_kl(x, t, mask, k=k)[0])(s))
  n = mask.sum()
  for i in range(B):
    for j in range(T):
      sup = ref.topk_indices(t[i, j], k)
      outside = np.setdiff1d(np.arange(V), sup)
      assert np.all(g[i, j, outside] == 0.0)
      if not mask[i, j]:
        assert np.all(g[i, j] == 0.0)
        continue
      lp, lq = ref.log_softmax(s[i, j, sup]), ref.log_softmax(t[i, j, sup])
      ell = ref.kl(lp, lq)
      want = np.exp(lp) * (lp - lq - ell) / n    # d/dz Σ p̂ log(p̂/q̂) = p̂ (log p̂/q̂ − ℓ)
      np.testing.assert_allclose(g[i, j, sup], want, atol=1e-6)


def test_teacher_gets_no_gradient():
  s, t, mask, y = _inputs(6)
  for variant in VARIANTS:
    g = jax.grad(lambda te: _topk(s, te, mask, y, k=3, **variant)[0])(t)
    assert np.all(np.asarray(g) == 0.0), variant
  assert np.all(np.asarray(jax.grad(lambda te: _full(s, te, mask)[0])(t)) == 0.0)


@pytest.mark.slow  # keeps `make test` under 10 minutes; `make test-all` runs it
def test_ema_pg_expected_gradient_identity():
  """E_{y~π}[∇(head + tail)] = ∇ L_full + ∇ π(S), exactly, at one prefix.

  The head's self-term adds the gradient of the student's mass on S, which the sampled-token tail
  does not cancel; this pins the implemented formula (docs/method.md, EMA-PG head/tail).
  """
  rng = np.random.default_rng(11)
  s = rng.normal(size=(1, 1, V)).astype(np.float32)
  t = rng.normal(size=(1, 1, V)).astype(np.float32)
  mask = np.ones((1, 1), bool)
  k = 3

  def per_y(x, y):
    return losses.topk_reverse_kl(x, t, mask, k=k, renormalize=False, tail="ema_pg",
                                  sampled_tokens=y.reshape(1, 1))[0]

  grads = jax.vmap(jax.grad(per_y), in_axes=(None, 0))(s, jnp.arange(V))
  probs = np.exp(ref.log_softmax(s[0, 0]))
  expected = np.einsum("y,yabv->abv", probs, np.asarray(grads, np.float64))
  sup = ref.topk_indices(t[0, 0], k)
  mass_grad = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x)[..., jnp.array(sup)]))(s)
  np.testing.assert_allclose(expected, _full_grad(s, t, mask) + mass_grad, atol=1e-5)


def test_sampled_token_gradient_equals_discounted_score_function_sum():
  """jax.grad of the surrogate = (1/N) Σ_t (Σ_{t'≥t} γ^{t'−t} r_{t'}) s_t for a softmax policy."""
  rng = np.random.default_rng(0)
  b, tt, v = 4, 5, 6
  theta = rng.normal(size=(tt, v)).astype(np.float32)          # tabular policy, one row per t
  teacher = rng.normal(size=(tt, v)).astype(np.float32)
  y = rng.integers(0, v, size=(b, tt)).astype(np.int32)
  mask = rng.random((b, tt)) < 0.8
  lq = np.take_along_axis(np.broadcast_to(ref.log_softmax(teacher), (b, tt, v)),
                          y[..., None], -1)[..., 0]

  def loss(th, gamma):
    lp = losses.token_logprobs(jnp.broadcast_to(th, (b, tt, v)), y)
    return losses.sampled_token_opd(lp, lq, mask, gamma=gamma)[0]

  grad_fn = jax.jit(jax.grad(loss))
  p = np.exp(ref.log_softmax(theta))
  lp = np.log(p[np.arange(tt)[None, :], y])
  r = lp - lq
  n = mask.sum()
  for gamma in (0.0, 0.5, 1.0):
    want = np.zeros((tt, v))
    for i in range(b):
      for t_ in range(tt):
        if not mask[i, t_]:
          continue
        ret = sum(gamma ** (u - t_) * r[i, u] for u in range(t_, tt) if mask[i, u])
        score = -p[t_].copy()
        score[y[i, t_]] += 1.0
        want[t_] += ret * score / n
    np.testing.assert_allclose(grad_fn(theta, gamma), want, atol=1e-5, err_msg=f"gamma={gamma}")


def test_sampled_token_logprob_gradient_is_masked_return_over_n():
  rng = np.random.default_rng(1)
  lp = rng.normal(size=(3, 7)).astype(np.float32) - 2
  lq = rng.normal(size=(3, 7)).astype(np.float32) - 2
  mask = rng.random((3, 7)) < 0.7
  for gamma in (0.0, 0.3, 1.0):
    g = jax.grad(lambda x: losses.sampled_token_opd(x, lq, mask, gamma=gamma)[0])(lp)
    want = ref.reward_to_go(lp - lq, mask, gamma) / mask.sum()
    np.testing.assert_allclose(g, np.where(mask, want, 0.0), atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.9, 1.0])
def test_reward_to_go_matches_double_sum(gamma):
  rng = np.random.default_rng(2)
  r = rng.normal(size=(3, 9))
  mask = rng.random((3, 9)) < 0.7
  np.testing.assert_allclose(losses.reward_to_go(r, mask, gamma),
                             ref.reward_to_go(r, mask, gamma), atol=1e-5)


def test_reward_to_go_accepts_traced_gamma_under_vmap():
  r = np.arange(12, dtype=np.float32).reshape(2, 6)
  mask = np.ones((2, 6), bool)
  gammas = jnp.array([0.0, 0.5, 1.0])
  out = jax.jit(jax.vmap(losses.reward_to_go, in_axes=(None, None, 0)))(r, mask, gammas)
  for i, g in enumerate([0.0, 0.5, 1.0]):
    np.testing.assert_allclose(out[i], ref.reward_to_go(r, mask, g), rtol=1e-6)


def test_ppo_clip_and_behaviour_ratio():
  rng = np.random.default_rng(3)
  lp = rng.normal(size=(2, 5)).astype(np.float32) - 1
  lb = lp + rng.normal(size=(2, 5)).astype(np.float32) * 0.5
  lq = rng.normal(size=(2, 5)).astype(np.float32) - 1
  mask = np.ones((2, 5), bool)
  eps = 0.2
  loss, aux = losses.sampled_token_opd(lp, lq, mask, behavior_logprobs=lb, ppo_clip=eps)
  ratio = np.exp(lp - lb)
  adv = -(lb - lq)                                     # A = −(log π_old − log q)
  want = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv).mean()
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  clipped = (np.clip(ratio, 1 - eps, 1 + eps) * adv < ratio * adv).mean()
  np.testing.assert_allclose(aux["opd/clip_fraction"], clipped, rtol=1e-6)
  # Advantage clip bounds the returns.
  _, aux = losses.sampled_token_opd(lp, lq - 50.0, mask, gamma=1.0, advantage_clip=5.0)
  assert aux["opd/return_mean"] == pytest.approx(5.0)


# ----------------------------------------------------------------------------------------------
# masking, dtypes and numerical safety
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # keeps `make test` under 10 minutes; `make test-all` runs it
def test_masked_positions_contribute_exactly_zero_even_with_nan_logits():
  s, t, mask, y = _inputs(8)
  mask[1, :] = False
  s_bad, t_bad = s.copy(), t.copy()
  s_bad[1] = np.nan
  t_bad[1] = -np.inf
  for variant in VARIANTS:
    kw = dict(k=3, **variant)
    clean = _topk(s, t, mask, y, **kw)[0]
    bad = _topk(s_bad, t_bad, mask, y, **kw)[0]
    np.testing.assert_array_equal(clean, bad)
    g = jax.grad(lambda x: _topk(x, t_bad, mask, y, **kw)[0])(s_bad)
    assert np.all(np.asarray(g)[1] == 0.0) and np.all(np.isfinite(g)), variant
  g = jax.grad(lambda x: _full(x, t_bad, mask)[0])(s_bad)
  assert np.all(np.asarray(g)[1] == 0.0) and np.all(np.isfinite(g))


def _estimators(s, t, mask, y, jit):
  """name -> loss of every estimator on these logits, eager or jitted."""
  topk = _topk if jit else _topk.__wrapped__
  full = _full if jit else losses.full_reverse_kl
  opd = jax.jit(losses.sampled_token_opd, static_argnames=("ppo_clip",)) if jit else (
      losses.sampled_token_opd)
  out = {"full": full(s, t, mask)[0]}
  for variant in VARIANTS:
    out["-".join(map(str, variant.values()))] = topk(s, t, mask, y, k=3, **variant)[0]
  out["ema_pg+behaviour"] = topk(s, t, mask, y, np.full(mask.shape, -2.0, np.float32), k=3,
                                 renormalize=False, tail="ema_pg", clip=1.5)[0]
  lp, lq = losses.token_logprobs(s, y), losses.token_logprobs(t, y)
  out["sampled_token_opd"] = opd(lp, lq, mask, gamma=0.5)[0]
  out["sampled_token_opd+ppo"] = opd(lp, lq, mask, behavior_logprobs=lp, ppo_clip=0.2)[0]
  return out


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("who,vocab_slot", [("student", 0), ("student", 7), ("teacher", 0),
                                            ("teacher", 7)])
def test_nan_logit_at_a_counted_position_makes_every_loss_nan(jit, who, vocab_slot):
  # A NaN is bad input: the loss must say so (NaN), not turn it into a finite number. The slot is
  # the sampled token (0) or another one, inside or outside the top-K depending on the row.
  s, t, mask, y = _inputs(16)
  y[0, 1] = 0
  mask[0, 1] = True
  (s if who == "student" else t)[0, 1, vocab_slot] = np.nan
  for name, loss in _estimators(s, t, mask, y, jit).items():
    assert np.isnan(loss), name  # sampled_token_opd: a NaN row gives a NaN token log-prob


def test_nan_sampled_logprob_at_a_counted_position_makes_sampled_token_opd_nan():
  lp = np.full((2, 3), -1.0, np.float32)
  mask = np.ones((2, 3), bool)
  for arg in ("student", "teacher", "behaviour"):
    bad = lp.copy()
    bad[1, 2] = np.nan
    kw = dict(behavior_logprobs=bad if arg == "behaviour" else lp)
    loss, _ = losses.sampled_token_opd(bad if arg == "student" else lp,
                                       bad if arg == "teacher" else lp, mask, gamma=0.5, **kw)
    assert np.isnan(loss), arg


def test_nan_logits_at_masked_positions_change_nothing():
  s, t, mask, y = _inputs(17)
  mask[1, 2] = False
  mask[0, 0] = True
  s_bad, t_bad = s.copy(), t.copy()
  s_bad[1, 2, 4] = np.nan
  t_bad[1, 2, :] = np.nan
  y_bad = y.copy()
  y_bad[1, 2] = -5  # out-of-range ids at masked positions are garbage too
  for jit in (False, True):
    clean, bad = _estimators(s, t, mask, y, jit), _estimators(s_bad, t_bad, mask, y_bad, jit)
    for name in clean:
      assert np.isfinite(bad[name]), name
      np.testing.assert_array_equal(bad[name], clean[name], err_msg=name)
  g = jax.grad(lambda x: losses.sampled_token_opd(x, losses.token_logprobs(t_bad, y), mask,
                                                  gamma=1.0)[0])(losses.token_logprobs(s_bad, y))
  assert np.all(np.asarray(g)[1, 2] == 0.0) and np.all(np.isfinite(g))


def test_teacher_minus_inf_where_the_student_has_mass_costs_the_floor():
  s, t, mask, _ = _inputs(18)
  mask[:] = False
  mask[0, 0] = True
  t[0, 0, 2] = -np.inf  # the teacher rules token 2 out; the student gives it mass p
  p = np.exp(ref.log_softmax(s[0, 0]))[2]
  t_ok = t.copy()
  t_ok[0, 0, 2] = 0.0
  for loss in (_full(s, t, mask)[0], _topk(s, t, mask, k=V)[0]):
    assert np.isfinite(loss)
    # The -inf term p · (log p − log q) with log q floored at LOGP_FLOOR dominates everything.
    np.testing.assert_allclose(loss, -p * losses.LOGP_FLOOR, rtol=1e-3)


def test_fully_masked_batch_gives_zero_loss():
  s, t, _, y = _inputs(9)
  mask = np.zeros((B, T), bool)
  assert float(_full(s, t, mask)[0]) == 0.0
  assert float(_topk(s, t, mask, y, k=2)[0]) == 0.0
  assert float(losses.sampled_token_opd(s[..., 0], t[..., 0], mask)[0]) == 0.0


def test_bfloat16_inputs_compute_in_float32():
  s, t, mask, y = _inputs(12)
  sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  loss, _ = losses.topk_reverse_kl(sb, tb, mask, k=4)
  assert loss.dtype == jnp.float32
  want = ref.topk_reverse_kl(np.asarray(sb, np.float64), np.asarray(tb, np.float64), mask, 4)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  loss, _ = losses.full_reverse_kl(sb, tb, mask)
  assert loss.dtype == jnp.float32
  lp = losses.token_logprobs(sb, y).astype(jnp.bfloat16)
  loss, _ = losses.sampled_token_opd(lp, lp, mask, gamma=0.5)
  assert loss.dtype == jnp.float32


@pytest.mark.parametrize("b,t", [(1, 1), pytest.param(1, 5, marks=pytest.mark.slow),
                                 pytest.param(3, 1, marks=pytest.mark.slow)])
def test_any_batch_and_length_at_least_one(b, t):
  s, te, mask, y = _inputs(13, b=b, t=t)
  mask[:] = True
  assert np.isfinite(losses.full_reverse_kl(s, te, mask)[0])
  np.testing.assert_allclose(losses.topk_reverse_kl(s, te, mask, k=2)[0],
                             ref.topk_reverse_kl(s, te, mask, 2), rtol=1e-5)
  assert np.isfinite(losses.sampled_token_opd(s[..., 0], te[..., 0], mask, gamma=1.0)[0])


def test_shared_minus_inf_vocab_entries_are_ignored_exactly():
  s, t, mask, y = _inputs(14)
  s[..., -3:] = -np.inf
  t[..., -3:] = -np.inf
  want = ref.full_reverse_kl(s[..., :-3], t[..., :-3], mask)
  np.testing.assert_allclose(_full(s, t, mask)[0], want, rtol=1e-5)
  np.testing.assert_allclose(_topk(s, t, mask, k=V)[0], want, rtol=1e-5)


logit_rows = hnp.arrays(np.float32, (2, 2, 7),
                        elements=st.floats(-30, 30, width=32, allow_nan=False))


@given(logit_rows, logit_rows, st.integers(1, 7))
def test_property_kl_nonnegative_and_zero_on_self(s, t, k):
  mask = np.ones((2, 2), bool)
  assert float(_full(s, t, mask)[0]) >= -1e-6
  assert float(_topk(s, t, mask, k=k)[0]) >= -1e-6
  assert abs(float(_full(s, s, mask)[0])) < 1e-5
  assert abs(float(_topk(s, s, mask, k=k)[0])) < 1e-5


@given(logit_rows, logit_rows, st.floats(-100, 100, width=32), st.integers(1, 7))
def test_property_invariant_to_constant_shift_of_a_row(s, t, c, k):
  mask = np.ones((2, 2), bool)
  s2 = s.copy()
  s2[1, 0] += c
  t2 = t.copy()
  t2[0, 1] -= c
  np.testing.assert_allclose(_full(s2, t2, mask)[0], _full(s, t, mask)[0], atol=2e-4)
  np.testing.assert_allclose(_topk(s2, t2, mask, k=k)[0], _topk(s, t, mask, k=k)[0], atol=2e-4)


extreme = st.sampled_from([-np.inf, -1e4, 1e4, 0.0, 1.0, -1.0])


@functools.partial(jax.jit, static_argnames=("vi",))
def _values_and_grads(s, t, y, mask, vi):
  fns = [lambda x: _full(x, t, mask)[0],
         lambda x: _topk(x, t, mask, y, k=3, **VARIANTS[vi])[0],
         lambda x: losses.sampled_token_opd(losses.token_logprobs(x, y),
                                            losses.token_logprobs(t, y), mask, gamma=0.5)[0]]
  return [jax.value_and_grad(fn)(s) for fn in fns]


@pytest.mark.slow
@given(hnp.arrays(np.float32, (2, 2, 7), elements=extreme),
       hnp.arrays(np.float32, (2, 2, 7), elements=extreme),
       hnp.arrays(np.int32, (2, 2), elements=st.integers(0, 6)),
       st.sampled_from(range(len(VARIANTS))))
def test_property_finite_loss_and_grad_under_inf_and_huge_logits(s, t, y, vi):
  # Every row keeps at least one finite logit (a distribution must exist).
  s[..., 0] = np.where(np.isfinite(s[..., 0]), s[..., 0], 0.0)
  t[..., 0] = np.where(np.isfinite(t[..., 0]), t[..., 0], 0.0)
  mask = np.array([[True, True], [True, False]])
  for val, g in _values_and_grads(s, t, y, mask, vi):
    assert np.isfinite(val) and np.all(np.isfinite(g))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
  s, t, mask, y = _inputs(15)
  with pytest.raises(ValueError, match=r"k must be .*\[1, vocab size = 11\]"):
    losses.topk_reverse_kl(s, t, mask, k=0)
  with pytest.raises(ValueError, match="got 12"):
    losses.topk_reverse_kl(s, t, mask, k=12)
  with pytest.raises(ValueError, match=r"student \(2, 3, 11\) and teacher \(2, 3, 10\)"):
    losses.topk_reverse_kl(s, t[..., :10], mask)
  with pytest.raises(ValueError, match=r"student \(2, 3, 11\) and teacher \(2, 3, 10\)"):
    losses.full_reverse_kl(s, t[..., :10], mask)
  with pytest.raises(ValueError, match="teacher, student, teacher\\+sampled, student\\+sampled"):
    losses.topk_reverse_kl(s, t, mask, k=3, support="both")
  with pytest.raises(ValueError, match="none, ema_pg"):
    losses.topk_reverse_kl(s, t, mask, k=3, tail="pg")
  with pytest.raises(ValueError, match="needs sampled_tokens"):
    losses.topk_reverse_kl(s, t, mask, k=3, tail="ema_pg", renormalize=False)
  with pytest.raises(ValueError, match="needs sampled_tokens"):
    losses.topk_reverse_kl(s, t, mask, k=3, support="teacher+sampled")
  with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
    losses.sampled_token_opd(s[..., 0], t[..., 0], mask, gamma=1.5)
  with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
    losses.reward_to_go(s[..., 0], mask, -0.1)
  with pytest.raises(ValueError, match="mask must have"):
    losses.full_reverse_kl(s, t, mask[:, :2])
  with pytest.raises(ValueError, match="ppo_clip"):
    losses.sampled_token_opd(s[..., 0], t[..., 0], mask, ppo_clip=1.5)
  shape_error = r"mask must have shape \(2, 3\) \(student_logprobs' shape\), got \(2, 2\)"
  with pytest.raises(ValueError, match=shape_error):
    losses.sampled_token_opd(s[..., 0], t[..., 0], mask[:, :2])
  with pytest.raises(ValueError, match=r"behavior_logprobs must have shape \(2, 3\)"):
    losses.sampled_token_opd(s[..., 0], t[..., 0], mask, behavior_logprobs=s[:1, :, 0])


@pytest.mark.parametrize("call,match", [
    (lambda s, t, m, y: losses.token_logprobs(s, y.astype(np.float32)),
     "tokens must have an integer dtype"),
    (lambda s, t, m, y: losses.token_logprobs(s.astype(np.int32), y),
     "logits must have a floating dtype"),
    (lambda s, t, m, y: losses.topk_reverse_kl(s, t, m, k=3, sampled_tokens=y.astype(float)),
     "sampled_tokens must have an integer dtype"),
    (lambda s, t, m, y: losses.topk_reverse_kl(s, t, m, k=3, sampled_tokens=y[:, :2]),
     r"sampled_tokens must have shape \(2, 3\) \(the mask's shape\), got \(2, 2\)"),
    (lambda s, t, m, y: losses.topk_reverse_kl(s, t, m.astype(np.float32), k=3),
     r"mask must have dtype bool \(or integer, nonzero = in the loss\), got float32"),
    (lambda s, t, m, y: losses.full_reverse_kl(s.astype(np.int32), t, m),
     "student_logits must have a floating dtype"),
    (lambda s, t, m, y: losses.topk_reverse_kl(s, t, m, k=3.0), "k must be an int"),
    (lambda s, t, m, y: losses.topk_reverse_kl(s, t, m, k=3, renormalize=None),
     "renormalize must be True or False"),
    (lambda s, t, m, y: losses.topk_reverse_kl(s, t, m, k=3, tail="ema_pg", sampled_tokens=y,
                                               tail_weight_clip=-1.0),
     r"tail_weight_clip must be > 0 or None, got -1.0"),
    (lambda s, t, m, y: losses.sampled_token_opd(s[..., 0], t[..., 0].astype(np.int32), m),
     "teacher_logprobs must have a floating dtype"),
    (lambda s, t, m, y: losses.reward_to_go(s[..., 0], m.astype(np.float32), 0.5),
     "mask must have dtype bool"),
])
def test_bad_dtypes_and_shapes_name_the_argument(call, match):
  s, t, mask, y = _inputs(15)
  with pytest.raises(ValueError, match=match):
    call(s, t, mask, y)


def test_integer_masks_are_accepted_as_nonzero_in_the_loss():
  s, t, mask, y = _inputs(19)
  np.testing.assert_array_equal(losses.topk_reverse_kl(s, t, mask.astype(np.int32), k=3)[0],
                                losses.topk_reverse_kl(s, t, mask, k=3)[0])


def test_options_traced_under_jit_say_how_to_make_them_static():
  s, t, mask, y = _inputs(15)
  with pytest.raises(ValueError, match=r"k must be a static.*static_argnames=\('k',\)"):
    jax.jit(lambda s, k: losses.topk_reverse_kl(s, t, mask, k=k))(s, 3)
  with pytest.raises(ValueError, match=r"renormalize must be a static.*\('renormalize',\)"):
    jax.jit(lambda s, r: losses.topk_reverse_kl(s, t, mask, k=3, renormalize=r))(s, True)
  with pytest.raises(ValueError, match=r"tail_weight_clip must be a static.*tail_weight_clip"):
    jax.jit(lambda s, c: losses.topk_reverse_kl(s, t, mask, k=3, tail="ema_pg", sampled_tokens=y,
                                                tail_weight_clip=c))(s, 2.0)
  for name in ("ppo_clip", "advantage_clip"):
    with pytest.raises(ValueError, match=rf"{name} must be a static.*\('{name}',\)"):
      jax.jit(lambda x, c: losses.sampled_token_opd(x, x, mask, **{name: c}))(s[..., 0], 0.2)
  # gamma may be traced (a documented feature, e.g. a vmapped grid of γ).
  jax.jit(lambda x, g: losses.sampled_token_opd(x, x, mask, gamma=g))(s[..., 0], 0.5)
