"""Sampling rules: exact truncated distributions, chi-square tests, bans, greedy, fast path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from opd_jax import sampling_rules as rules

N_SAMPLES = 20_000
# Every test whose result goes through a top-k runs on each top-k algorithm, with vocabularies
# wide enough for the blocked one to take its block path (>= 4 blocks per kept entry).
IMPLS = rules.TOPK_IMPLS
WIDE = 4 * rules.TOP_P_CANDIDATES * rules.TOP_K_BLOCKS[0]   # top-p candidates go blockwise too


def _blocked_path_runs(vocab, k):
  return -(-vocab // rules.TOP_K_BLOCKS[0]) >= 4 * k


def _exact_truncated(logits, top_k=0, top_p=1.0, temperature=1.0, banned=()):
  """Reference: sort the vocabulary in numpy and apply the textbook definitions."""
  x = np.asarray(logits, np.float64).copy()
  x[list(banned)] = -np.inf
  x = x / temperature
  if top_k:
    keep = np.argsort(-x, kind="stable")[:top_k]          # exactly k, ties to lower ids
    x = np.where(np.isin(np.arange(x.size), keep), x, -np.inf)
  p = np.exp(x - x.max())
  p /= p.sum()
  if top_p < 1.0:
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    last_kept = p[order[before < top_p]].min()
    p = np.where(p >= last_kept, p, 0.0)        # tokens tied with the last kept one stay
    p = p / p.sum()
  return p


@functools.partial(jax.jit,
                   static_argnames=("top_k", "n", "banned", "candidates", "topk_impl"))
def _draw(logits, seed, top_p, temperature, *, top_k, n, banned=(), candidates=64,
          topk_impl=None):
  """n draws from one row of logits, 1000 rows at a time (a [n, V] copy would be large)."""
  u = jax.random.uniform(jax.random.key(seed), (n // 1000, 1000))
  rows = jnp.broadcast_to(logits, (1000,) + logits.shape)
  tokens, logps = jax.lax.map(
      lambda u: rules.draw(rows, u, temperature=temperature, top_k=top_k, top_p=top_p,
                           banned_ids=banned, candidates=candidates, topk_impl=topk_impl), u)
  return tokens.reshape(n), logps.reshape(n)


# One compiled program per static setting (eager calls would compile op by op).
_jit_draw = jax.jit(rules.draw, static_argnames=("top_k", "banned_ids", "candidates", "topk_impl"))


def _check_samples(tokens, logps, probs):
  tokens, logps = np.asarray(tokens), np.asarray(logps)
  counts = np.bincount(tokens, minlength=probs.size)
  support = probs > 0
  assert counts[~support].sum() == 0, "sampled a token outside the truncated support"
  np.testing.assert_allclose(logps, np.log(probs[tokens]), atol=1e-5)
  expected = probs[support] * tokens.size
  assert stats.chisquare(counts[support], expected).pvalue > 1e-3


def _spread(values, vocab, seed):
  """`values` at random ids of a vocabulary of -inf logits (so that many blocks are empty)."""
  x = np.full(vocab, -np.inf, np.float32)
  x[np.sort(np.random.default_rng(seed).choice(vocab, len(values), replace=False))] = values
  return x


def _tied_at_rank(values, rank):
  """values with the (rank+1)-th largest set equal to the rank-th: a top-`rank` cut is a tie."""
  values = values.copy()
  order = np.argsort(-values)
  values[order[rank]] = values[order[rank - 1]]
  return values


# 50 finite logits, the 10th and 11th largest tied, among -inf everywhere else.
LOGITS = _spread(_tied_at_rank(np.random.default_rng(0).normal(size=50).astype(np.float32) * 2.0,
                               10), WIDE, seed=1)


@pytest.mark.parametrize("topk_impl", IMPLS)
@pytest.mark.parametrize("top_k,top_p,temperature", [
    (0, 1.0, 1.0), (0, 0.9, 1.0), (0, 0.5, 0.7), (10, 1.0, 1.0), (10, 0.8, 1.3), (0, 0.999, 1.0)])
def test_empirical_distribution_matches_exact_truncation(top_k, top_p, temperature, topk_impl):
  assert _blocked_path_runs(WIDE, top_k or rules.TOP_P_CANDIDATES)
  tokens, logps = _draw(LOGITS, 1, top_p, temperature, top_k=top_k, n=N_SAMPLES,
                        topk_impl=topk_impl)
  want = _exact_truncated(LOGITS, top_k, top_p, temperature)
  if top_k and top_p == 1.0:
    assert np.count_nonzero(want) == top_k                   # the tie was broken, not kept
  _check_samples(tokens, logps, want)


@pytest.mark.parametrize("topk_impl", IMPLS)
def test_exact_fallback_when_candidates_do_not_cover_p(topk_impl):
  """A flat distribution over 3000 tokens is not covered by 16 candidates: the bisection runs."""
  logits = (np.random.default_rng(2).normal(size=3000) * 0.3).astype(np.float32)
  assert _blocked_path_runs(3000, 16)
  tokens, logps = _draw(logits, 3, 0.9, 1.0, top_k=0, n=N_SAMPLES, candidates=16,
                        topk_impl=topk_impl)
  want = _exact_truncated(logits, top_p=0.9)
  assert np.count_nonzero(want) > 16
  tokens = np.asarray(tokens)
  assert np.all(want[tokens] > 0)
  np.testing.assert_allclose(logps, np.log(want[tokens]), atol=1e-5)
  # Coarse chi-square over 20 bins of equal expected mass (3000 categories are too many cells).
  order = np.argsort(-want)
  bins = np.minimum((np.cumsum(want[order]) * 20).astype(int), 19)
  bin_of = np.empty(3000, int)
  bin_of[order] = bins
  counts = np.bincount(bin_of[tokens], minlength=20)
  expected = np.bincount(bins, weights=want[order], minlength=20) * tokens.size
  assert stats.chisquare(counts, expected).pvalue > 1e-3


@pytest.mark.parametrize("topk_impl", IMPLS)
def test_fast_path_and_full_sort_pick_the_same_token_for_the_same_uniform(topk_impl):
  rng = np.random.default_rng(4)
  assert _blocked_path_runs(500, 4)
  for scale in (0.05, 1.0, 6.0):
    logits = jnp.asarray(rng.normal(size=(256, 500)) * scale, jnp.float32)
    u = jax.random.uniform(jax.random.key(5), (256,))
    for p in (0.3, 0.95):
      few = _jit_draw(logits, u, top_p=p, candidates=4, topk_impl=topk_impl)
      full = _jit_draw(logits, u, top_p=p, candidates=500, topk_impl=topk_impl)
      np.testing.assert_array_equal(few[0], full[0])
      np.testing.assert_allclose(few[1], full[1], atol=1e-5)


@pytest.mark.parametrize("topk_impl", IMPLS)
def test_a_rows_sample_does_not_depend_on_the_other_rows(topk_impl):
  peaked = np.random.default_rng(6).normal(size=300).astype(np.float32) * 5
  flat = np.zeros(300, np.float32)                      # forces the bisection for the batch
  u = jnp.array([0.37, 0.81])
  assert _blocked_path_runs(300, 2)
  draw = functools.partial(_jit_draw, top_p=0.9, candidates=2, topk_impl=topk_impl)
  alone = draw(jnp.stack([peaked, peaked]), u)[0]
  mixed = draw(jnp.stack([peaked, flat]), u)[0]
  assert alone[0] == mixed[0]


def test_top_p_keeps_the_token_that_crosses_the_threshold():
  logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
  u = jnp.linspace(0.0, 0.999, 1000)

  def support(p):
    return set(np.asarray(rules.draw(jnp.broadcast_to(logits, (1000, 4)), u, top_p=p)[0]))
  assert support(0.6) == {0, 1}                         # 0.5 < 0.6 <= 0.8
  assert support(0.5) == {0}
  assert support(1.0) == {0, 1, 2, 3}


@pytest.mark.parametrize("topk_impl", IMPLS)
def test_top1_equals_greedy_and_temperature_zero_is_greedy(topk_impl):
  logits = jax.random.normal(jax.random.key(3), (16, WIDE))
  u = jax.random.uniform(jax.random.key(4), (16,))
  want = rules.greedy(logits)
  draw = functools.partial(_jit_draw, topk_impl=topk_impl)
  np.testing.assert_array_equal(draw(logits, u, top_k=1)[0], want)
  np.testing.assert_array_equal(draw(logits, u, top_p=1e-6)[0], want)
  tok, logp = draw(logits, u, temperature=0.0)
  np.testing.assert_array_equal(tok, want)
  assert np.all(np.asarray(logp) == 0.0)
  np.testing.assert_array_equal(
      rules.sample(logits, jax.random.key(1), top_k=1, topk_impl=topk_impl), want)


@pytest.mark.parametrize("topk_impl", IMPLS)
def test_banned_tokens_are_never_sampled(topk_impl):
  logits = _spread(np.random.default_rng(8).normal(size=20).astype(np.float32), WIDE, seed=2)
  live = np.flatnonzero(np.isfinite(logits))
  banned = (int(live[3]), int(live[7]))
  logits[banned[0]] = 10.0                             # the favourite token is banned
  tokens, logps = _draw(logits, 7, 0.9, 1.0, top_k=5, n=5000, banned=banned,
                        topk_impl=topk_impl)
  assert not np.isin(np.asarray(tokens), banned).any()
  _check_samples(tokens, logps, _exact_truncated(logits, 5, 0.9, banned=banned))


@functools.partial(jax.jit, static_argnames=("k", "blocks"))
def _blocked_top_k(x, *, k, blocks):
  return rules._top_k(x, k, blocks), jax.lax.top_k(x, k)


@pytest.mark.parametrize("vocab,k,blocks", [
    (32000, 50, rules.TOP_K_BLOCKS), (8001, 20, (32, 8)), (5000, 3, (7,)), (6000, 1, (64, 4))])
def test_blocked_top_k_is_exactly_lax_top_k(vocab, k, blocks):
  """Same values and ids as lax.top_k, ties to lower ids, with -inf entries and ragged blocks."""
  rng = np.random.default_rng(vocab)
  # Few distinct values, so the k-th value is tied across blocks; one row mostly -inf.
  x = rng.integers(0, 6, size=(6, vocab)).astype(np.float32)
  x[1] = rng.normal(size=vocab)
  x[2, rng.random(vocab) < 0.999] = -np.inf
  x[3, :] = -np.inf
  x[4, -k:] = 9.0                                      # the winners sit in the ragged last block
  assert -(-vocab // blocks[0]) >= 4 * k, "the blocked path must run"
  (vals, ids), (want_vals, want_ids) = _blocked_top_k(jnp.asarray(x), k=k, blocks=blocks)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(vals, want_vals)


def test_greedy_takes_the_lowest_id_among_ties():
  logits = jnp.array([[0.0, 2.0, 1.0, 2.0], [-jnp.inf] * 4, [3.0, 3.0, 3.0, 3.0],
                      [0.0, jnp.nan, 5.0, jnp.nan]])
  np.testing.assert_array_equal(rules.greedy(logits), [1, 0, 0, 1])
  np.testing.assert_array_equal(rules.greedy(logits), jnp.argmax(logits, axis=-1))
  x = jax.random.normal(jax.random.key(0), (8, 32000))
  np.testing.assert_array_equal(rules.greedy(x), jnp.argmax(x, axis=-1))


def test_draw_above_is_the_inverse_cdf_in_token_order():
  """Block-wise search == float64 inverse CDF over kept tokens (ragged last block, gaps)."""
  rng = np.random.default_rng(9)
  vocab = 3 * rules.DRAW_BLOCK + 37
  x = rng.normal(size=(1, vocab)).astype(np.float32)
  x[0, : rules.DRAW_BLOCK] = -np.inf                   # a whole block without mass
  threshold = np.float32(np.quantile(x[0, rules.DRAW_BLOCK:], 0.6))
  lse = np.log(np.sum(np.exp(x[0].astype(np.float64))))
  u = np.linspace(0.0, 1.0, 4001, endpoint=False)
  tokens, logps = rules._draw_above(jnp.broadcast_to(x, (u.size, vocab)),
                                    jnp.full((u.size,), lse, jnp.float32),
                                    jnp.full((u.size,), threshold), jnp.asarray(u, jnp.float32))
  w = np.where(x[0] >= threshold, np.exp(x[0].astype(np.float64) - lse), 0.0)
  cum = np.cumsum(w) / w.sum()
  want = np.searchsorted(cum, u, side="right")
  away = np.min(np.abs(u[:, None] - cum[None, w > 0]), axis=1) > 1e-5   # not at a boundary
  assert away.mean() > 0.9
  np.testing.assert_array_equal(np.asarray(tokens)[away], want[away])
  assert np.all(w[np.asarray(tokens)] > 0) and np.all(np.diff(np.asarray(tokens)) >= 0)
  np.testing.assert_allclose(logps, np.log(w[np.asarray(tokens)] / w.sum()), atol=1e-5)


@pytest.mark.parametrize("topk_impl", IMPLS)
def test_rows_without_mass_still_get_a_valid_token_id(topk_impl):
  """NaN logits (a broken model) must not produce negative ids that index the embedding."""
  x = np.random.default_rng(3).normal(size=(3, WIDE)).astype(np.float32)
  x[1, 7] = np.nan
  x[2] = np.nan
  u = jnp.array([0.3, 0.5, 0.9])
  for top_k in (0, 5):
    tokens, logps = _jit_draw(jnp.asarray(x), u, top_k=top_k, top_p=0.9, topk_impl=topk_impl)
    assert np.all((np.asarray(tokens) >= 0) & (np.asarray(tokens) < WIDE)), tokens
    nan = np.isnan(np.asarray(logps))
    assert not nan[0] and nan[2]
    # Row 1's single NaN: lax.top_k ranks it first, so the top-k draw's log-prob is NaN; the
    # blocked top-k may leave it out (see sampling_rules._top_k). Without top-k the full-row
    # logsumexp is NaN on both.
    if topk_impl == "lax" or not top_k:
      assert nan[1]


def _count_top_k_ops(topk_impl, **settings):
  jaxpr = jax.make_jaxpr(functools.partial(rules.draw, topk_impl=topk_impl, **settings))(
      jnp.zeros((2, WIDE)), jnp.zeros((2,)))
  return str(jaxpr).count("top_k[")


def test_topk_impl_chooses_the_algorithm_and_none_picks_by_backend():
  for settings in (dict(top_k=10), dict(top_p=0.9)):
    lax_ops = _count_top_k_ops("lax", **settings)
    assert lax_ops == 1
    assert _count_top_k_ops("blocked", **settings) == 1 + len(rules.TOP_K_BLOCKS)
    default = "blocked" if jax.default_backend() == "cpu" else "lax"
    assert _count_top_k_ops(None, **settings) == _count_top_k_ops(default, **settings)
  assert rules.resolve_topk_impl(None) == default
  assert rules.resolve_topk_impl("lax") == "lax"
  with pytest.raises(ValueError, match="topk_impl must be None .* or one of .*'blocked'.* got "
                                       "'sort'"):
    rules.draw(jnp.zeros((2, 8)), jnp.zeros((2,)), topk_impl="sort")
