"""The compiled sampler against transformers' generate and the model's own forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_helpers as mh
from opd_jax import models, sampling, sampling_rules

N_NEW = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  folder = tmp_path_factory.mktemp("qwen2")
  torch_model = mh.make_hf_checkpoint(folder, "qwen2", seed=3)
  model, _ = models.load_hf_checkpoint(folder)
  return torch_model, model, folder


@pytest.fixture(scope="module")
def prompts():
  return mh.left_padded_batch(1, 4, 9, 128, pads=[0, 3, 5, 8])


def _sample(model, tokens, mask, seed=0, **kw):
  kw.setdefault("max_new_tokens", N_NEW)
  return sampling.sample(model, tokens, mask, jax.random.key(seed), **kw)


@pytest.mark.parametrize("min_segment", [sampling.MIN_SEGMENT, 2])
def test_greedy_equals_transformers_generate(checkpoint, prompts, monkeypatch, min_segment):
  """Also with the decode loop cut into 4 segments of 2 steps, the KV cache grown in between."""
  import torch
  monkeypatch.setattr(sampling, "MIN_SEGMENT", min_segment)
  assert len(sampling._segment_ends(N_NEW)) == (1 if min_segment > N_NEW else 4)
  torch_model, model, _ = checkpoint
  tokens, mask = prompts
  with torch.no_grad():
    want = torch_model.generate(
        input_ids=torch.as_tensor(tokens, dtype=torch.long),
        attention_mask=torch.as_tensor(mask, dtype=torch.long), do_sample=False,
        max_new_tokens=N_NEW, min_new_tokens=N_NEW, pad_token_id=0, eos_token_id=None)
  want = want[:, tokens.shape[1]:].numpy()
  got = _sample(model, tokens, mask, temperature=0.0)
  np.testing.assert_array_equal(got.tokens, want)
  assert np.all(got.mask) and np.all(np.asarray(got.sample_logprobs) == 0.0)


def test_policy_logprobs_match_full_forward_and_top1_is_greedy(checkpoint, prompts):
  _, model, _ = checkpoint
  tokens, mask = prompts
  out = _sample(model, tokens, mask, seed=5, top_p=0.7)
  full = np.concatenate([tokens, np.asarray(out.tokens)], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(out.mask)], axis=1)
  logp = jax.nn.log_softmax(models.forward(model, full, full_mask), axis=-1)
  p = tokens.shape[1]
  want = np.take_along_axis(np.asarray(logp[:, p - 1:-1]), np.asarray(out.tokens)[..., None],
                            -1)[..., 0]
  np.testing.assert_allclose(out.policy_logprobs, want, atol=1e-4)
  # Truncation renormalises: the sampled distribution puts at least as much mass on the token.
  assert np.all(np.asarray(out.sample_logprobs) >= np.asarray(out.policy_logprobs) - 1e-5)
  top1 = _sample(model, tokens, mask, seed=9, top_p=1e-6)
  greedy = _sample(model, tokens, mask, temperature=0.0)
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)
  np.testing.assert_allclose(top1.sample_logprobs, 0.0, atol=1e-6)


def test_same_seed_same_rollout_and_rows_are_independent(checkpoint, prompts):
  _, model, _ = checkpoint
  tokens, mask = prompts
  a = _sample(model, tokens, mask, seed=1)
  b = _sample(model, tokens, mask, seed=1)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  c = _sample(model, tokens, mask, seed=2)
  assert not np.array_equal(a.tokens, c.tokens)
  other = tokens.copy()
  other[1:, -2:] = (other[1:, -2:] + 7) % 128            # change every prompt but the first
  d = _sample(model, other, mask, seed=1)
  np.testing.assert_array_equal(d.tokens[0], a.tokens[0])
  np.testing.assert_array_equal(d.policy_logprobs[0], a.policy_logprobs[0])
  assert not np.array_equal(d.tokens[1:], a.tokens[1:])


def test_new_prompts_of_one_bucket_and_new_top_p_do_not_recompile(checkpoint, prompts):
  _, model, _ = checkpoint
  tokens, mask = prompts
  _sample(model, tokens, mask, top_p=0.9)
  before = sampling.compiled_programs()
  for i, top_p in enumerate((0.5, 0.8, 1.0)):
    length = 10 + 2 * i                                 # 10, 12, 14: all in the 16 bucket
    t, m = mh.left_padded_batch(i, 4, length, 128)
    _sample(model, t, m, seed=i, top_p=top_p, temperature=0.5 + i)
  assert sampling.compiled_programs() == before
  assert sampling.bucket_length(9) == 16 and sampling.bucket_length(17) == 32
  assert sampling.bucket_length(9, [12, 24]) == 12


def test_groups_bans_and_stop_tokens(checkpoint, prompts):
  _, model, _ = checkpoint
  tokens, mask = prompts
  greedy = np.asarray(_sample(model, tokens, mask, temperature=0.0).tokens)
  banned = tuple(sorted(set(greedy[:, 0].tolist())))     # every row's greedy first token
  stop = tuple(sorted(set(greedy[:, 3].tolist()) - set(banned)))
  g = 3
  out = _sample(model, tokens, mask, seed=4, num_samples=g, banned_token_ids=banned,
                stop_token_ids=stop, top_k=20)
  toks, m = np.asarray(out.tokens), np.asarray(out.mask)
  assert toks.shape == (4 * g, N_NEW)
  assert not np.isin(toks[m], banned).any()
  for row in range(4 * g):
    hits = np.flatnonzero(np.isin(toks[row], stop) & m[row])
    end = hits[0] + 1 if hits.size else N_NEW
    assert m[row, :end].all() and not m[row, end:].any()
    assert (toks[row, end:] == 0).all()
    assert np.all(np.asarray(out.policy_logprobs)[row, end:] == 0.0)
  # Rows b*G .. b*G+G-1 share prompt b: greedy groups are G copies of the single greedy rollout.
  grouped = _sample(model, tokens, mask, temperature=0.0, num_samples=g, banned_token_ids=banned,
                    stop_token_ids=stop, top_k=20)
  single = np.repeat(np.asarray(_sample(model, tokens, mask, temperature=0.0,
                                        banned_token_ids=banned).tokens), g, axis=0)
  gm = np.asarray(grouped.mask)
  np.testing.assert_array_equal(np.asarray(grouped.tokens)[gm], single[gm])


def test_sharded_batch_matches_single_device(checkpoint, monkeypatch):
  """Rows sharded over the mesh, decode loop in two segments (cache grown on the mesh)."""
  _, model, folder = checkpoint
  tokens, mask = mh.left_padded_batch(2, 8, 9, 128)
  mesh = jax.make_mesh((4, 1, 2), models.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  sharded, _ = models.load_hf_checkpoint(folder, mesh=mesh)
  ref = _sample(model, tokens, mask, seed=3)
  monkeypatch.setattr(sampling, "MIN_SEGMENT", 4)
  assert len(sampling._segment_ends(N_NEW)) == 2
  out = _sample(sharded, tokens, mask, seed=3, mesh=mesh)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.policy_logprobs, ref.policy_logprobs, atol=1e-5)
  assert len(out.tokens.sharding.device_set) == 8


def test_bad_arguments_raise(checkpoint, prompts):
  _, model, _ = checkpoint
  tokens, mask = prompts
  empty = mask.copy()
  empty[2] = False
  cases = [
      (dict(prompt_mask=empty), "empty rows: \\[2\\]"),
      (dict(top_p=0.0), "top_p must be in \\(0, 1\\]"),
      (dict(top_p=1.5), "top_p must be in \\(0, 1\\]"),
      (dict(temperature=-1.0), "temperature must be >= 0"),
      (dict(banned_token_ids=(5, 128)), "banned_token_ids \\[128\\] are outside"),
      (dict(banned_token_ids=tuple(range(128))), "bans all 128 tokens"),
      (dict(stop_token_ids=(-1,)), "stop_token_ids \\[-1\\] are outside"),
      (dict(banned_token_ids=(3, 4), stop_token_ids=(4,)), "stop_token_ids \\[4\\] are also"),
      (dict(max_new_tokens=0), "max_new_tokens"),
      (dict(num_samples=0), "num_samples"),
  ]
  for kw, msg in cases:
    m = kw.pop("prompt_mask", mask)
    with pytest.raises(ValueError, match=msg):
      _sample(model, tokens, m, **kw)


def _bad_prompts(tokens, mask):
  """(prompts, prompt_mask, message) that the README rules out, one problem each."""
  right = mask[:, ::-1].copy()                          # right padding: rows 1..3 end in padding
  holes = mask.copy()
  holes[0, 4] = False                                   # a gap inside row 0's prompt
  too_big, negative, two = tokens.copy(), tokens.copy(), mask.astype(np.int32)
  too_big[1, 6] = 128                                   # the vocabulary is [0, 128)
  negative[2, 1] = -1                                   # a padding slot, still embedded
  two[3, 8] = 2
  return [
      (tokens, right, r"prompt_mask must be left-padded.*row 1 has a real token at position 5 "
                      r"followed by padding at 6"),
      (tokens, holes, r"prompt_mask must be left-padded.*row 0 has a real token at position 3 "
                      r"followed by padding at 4"),
      (too_big, mask, r"prompts holds ids outside the vocabulary \[0, 128\): 128 at row 1, "
                      r"position 6"),
      (negative, mask, r"-1 at row 2, position 1.*padding positions too"),
      (tokens.astype(np.float32), mask, r"prompts must hold integer token ids, got dtype float32"),
      (tokens, mask.astype(np.float32), r"prompt_mask must be bool .*got dtype float32.*0/1"),
      (tokens, two, r"prompt_mask must be bool or 0/1, got 2 at row 3, position 8"),
      (tokens, mask[:, 1:], r"prompt_mask must have the prompts' shape \(4, 9\), got \(4, 8\)"),
      (tokens[0], mask[0], r"prompts must have shape \[B, T\].*got \(9,\)"),
  ]


def test_prompts_that_break_the_input_rules_raise(checkpoint, prompts):
  """Right padding, holes, ids outside the vocabulary, float ids or masks: a ValueError each."""
  _, model, _ = checkpoint
  tokens, mask = prompts
  for bad_tokens, bad_mask, msg in _bad_prompts(tokens, mask):
    for convert in (np.asarray, jnp.asarray):            # numpy and jax arrays alike
      with pytest.raises(ValueError, match=msg):
        _sample(model, convert(bad_tokens), convert(bad_mask))
  with pytest.raises(ValueError, match="topk_impl must be None .* got 'sort'"):
    _sample(model, tokens, mask, topk_impl="sort")
  # Inside jit only the values are unknown: shapes and dtypes are still checked.
  traced = jax.jit(lambda t: _sample(model, t, mask))
  with pytest.raises(ValueError, match="prompts must hold integer token ids"):
    traced(jnp.asarray(tokens, jnp.float32))


def test_integer_masks_and_int64_ids_give_the_bool_int32_rollout(checkpoint, prompts):
  """What tokenizers return (int64 ids, 0/1 masks, as lists too) is accepted as it is."""
  _, model, _ = checkpoint
  tokens, mask = prompts
  want = _sample(model, tokens, mask, seed=6)
  got = _sample(model, tokens.astype(np.int64).tolist(), mask.astype(np.int64).tolist(), seed=6)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.policy_logprobs, want.policy_logprobs)


@pytest.mark.slow
def test_every_top_k_algorithm_gives_the_same_rollout():
  """A vocabulary wide enough for the blocked top-k to take its block path for the 64 top-p
  candidates. At this model's flatness they decide a 0.5 nucleus at the first step, but not a
  0.95 one (the bisection runs). Top-k itself is compared on both paths in test_sampling_rules."""
  vocab = 4 * sampling_rules.TOP_P_CANDIDATES * sampling_rules.TOP_K_BLOCKS[0]
  model = models.init_model(mh.tiny_model_config(vocab_size=vocab), seed=1, std=0.5)
  tokens, mask = mh.left_padded_batch(4, 3, 7, vocab)
  for top_p in (0.5, 0.95):                                   # one program per algorithm
    kw = dict(seed=8, num_samples=2, top_p=top_p)
    want = _sample(model, tokens, mask, topk_impl="lax", **kw)
    got = _sample(model, tokens, mask, topk_impl="blocked", **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.sample_logprobs, want.sample_logprobs, atol=1e-6)
    assert np.mean(np.asarray(want.sample_logprobs) < -1e-3) > 0.5    # not a greedy rollout
  default = "blocked" if jax.default_backend() == "cpu" else "lax"
  before = sampling.compiled_programs()
  _sample(model, tokens, mask, topk_impl=default, **kw)
  _sample(model, tokens, mask, topk_impl=None, **kw)            # the same compiled program
  assert sampling.compiled_programs() == before


@pytest.mark.slow  # keeps `make test` under 10 minutes; `make test-all` runs it
def test_segmented_decode_loop_gives_the_same_rollout(checkpoint, prompts, monkeypatch):
  _, model, _ = checkpoint
  tokens, mask = prompts
  kw = dict(seed=4, top_p=0.9, top_k=20, num_samples=2)
  stop = int(_sample(model, tokens, mask, **kw).tokens[0, 2])     # row 0 stops at step 2
  whole = _sample(model, tokens, mask, stop_token_ids=(stop,), **kw)
  monkeypatch.setattr(sampling, "MIN_SEGMENT", 3)
  assert sampling._segment_ends(N_NEW) == (4, 8)
  cut = _sample(model, tokens, mask, stop_token_ids=(stop,), **kw)
  assert not np.asarray(whole.mask)[0, 3:].any()
  np.testing.assert_array_equal(cut.tokens, whole.tokens)
  np.testing.assert_array_equal(cut.mask, whole.mask)
  np.testing.assert_allclose(cut.policy_logprobs, whole.policy_logprobs, atol=1e-5)
  np.testing.assert_allclose(cut.sample_logprobs, whole.sample_logprobs, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
  """A random tiny model (no checkpoint) and 4 prompts; G = 4 gives 16 rows."""
  model = models.init_model(mh.tiny_model_config(), seed=1, std=0.5)
  return model, mh.left_padded_batch(4, 4, 7, 128)


def _compare(a, b, atol=1e-5):
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.mask, b.mask)
  np.testing.assert_allclose(a.sample_logprobs, b.sample_logprobs, atol=atol)
  np.testing.assert_allclose(a.policy_logprobs, b.policy_logprobs, atol=atol)


# Every 9th id stops a row: responses of 1 to ~30 tokens under the tiny random model.
_VARIABLE = dict(max_new_tokens=48, num_samples=4, top_p=0.9,
                 stop_token_ids=tuple(range(0, 128, 9)))


def test_compaction_keeps_every_rows_tokens(tiny, monkeypatch):
  """Finished rows dropped into ever smaller buckets (the cache grown in between, the loop in 4
  segments): the same rollout as the one program over all rows."""
  model, (tokens, mask) = tiny
  monkeypatch.setattr(sampling, "MIN_SEGMENT", 8)
  assert sampling._segment_ends(48) == (12, 24, 36, 48)
  plain = _sample(model, tokens, mask, seed=3, compact=False, **_VARIABLE)
  assert sampling.last_schedule() == []
  lengths = np.asarray(plain.mask).sum(axis=1)
  assert lengths.min() < 12 < lengths.max() < 48          # rows end in different segments
  out = _sample(model, tokens, mask, seed=3, **_VARIABLE)
  _compare(out, plain)
  plan = sampling.last_schedule()
  rows = [d["rows"] for d in plan]
  assert rows[0] == 16 and rows == sorted(rows, reverse=True) and rows[-1] < 4
  assert len({d["cache_len"] for d in plan}) > 1          # grown between segments too
  assert plan[-1]["active"] == 0 and plan[-1]["stop"] == lengths.max()
  for d in plan:                                          # each bucket held its unfinished rows
    assert d["rows"] >= np.sum(lengths > d["start"])
    # Buckets of at most 16 / COMPACT_FULL_CACHE = 2 rows: the whole budget's cache at once.
    small = d["rows"] * sampling.COMPACT_FULL_CACHE <= 16
    assert d["cache_len"] == 16 + (48 if small else sampling._segment_ends(48)[
        np.searchsorted(sampling._segment_ends(48), d["start"], side="right")])
  assert any(d["rows"] <= 2 for d in plan) and any(d["rows"] > 2 for d in plan)
  assert sampling._row_buckets(16) == (1, 2, 4, 8, 16)
  assert sampling._row_buckets(24, 4) == (4, 8, 12, 24)


@pytest.mark.slow   # ~20 s; the one-device compaction test stays in the fast suite
def test_compaction_on_the_mesh_keeps_buckets_divisible(tiny):
  """Rows over data x fsdp = 4 ways of a (2, 2, 2) mesh: buckets of 16, 8, 4 rows."""
  model, (tokens, mask) = tiny
  mesh = jax.make_mesh((2, 2, 2), models.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  sharded = models.init_model(mh.tiny_model_config(), seed=1, std=0.5, mesh=mesh)
  plain = _sample(sharded, tokens, mask, seed=3, compact=False, mesh=mesh, **_VARIABLE)
  out = _sample(sharded, tokens, mask, seed=3, mesh=mesh, **_VARIABLE)
  _compare(out, plain)
  rows = [d["rows"] for d in sampling.last_schedule()]
  assert rows[0] == 16 and rows[-1] == 4 and all(r % 4 == 0 for r in rows)
  assert len(out.tokens.sharding.device_set) == 8
  _compare(out, _sample(model, tokens, mask, seed=3, **_VARIABLE), atol=1e-4)  # one device


@pytest.mark.slow   # ~14 s
def test_compaction_with_rows_that_never_stop_or_all_stop_at_once(tiny, monkeypatch):
  model, (tokens, mask) = tiny
  monkeypatch.setattr(sampling, "MIN_SEGMENT", 8)
  kw = dict(max_new_tokens=24, num_samples=4)
  out = _sample(model, tokens, mask, seed=5, **kw)                  # no stop tokens
  assert np.all(out.mask)
  assert [(d["rows"], d["stop"]) for d in sampling.last_schedule()] == [(16, 8), (16, 16), (16, 24)]
  _compare(out, _sample(model, tokens, mask, seed=5, compact=False, **kw))
  kw["stop_token_ids"] = tuple(range(128))                          # every token stops
  out = _sample(model, tokens, mask, seed=5, **kw)
  assert np.all(out.mask[:, 0]) and not np.any(out.mask[:, 1:])
  assert sampling.last_schedule() == [dict(rows=16, cache_len=16 + 8, start=0, stop=1,
                                           active=0)]
  _compare(out, _sample(model, tokens, mask, seed=5, compact=False, **kw))


def test_vocab_size_samples_and_normalises_over_the_shared_vocabulary_only(checkpoint, prompts):
  """An embedding padded past the real tokens (vocab_size < rows): both log-probs over the first
  vocab_size logits, as the trainer's scorer computes them; padding rows are never drawn."""
  _, model, _ = checkpoint
  tokens, mask = prompts
  rows, vocab = model.config.vocab_size, 100
  assert rows > vocab
  out = _sample(model, tokens, mask, seed=5, top_p=0.95, vocab_size=vocab,
                banned_token_ids=[rows - 1])    # a ban past the vocabulary is moot
  assert np.asarray(out.tokens).max() < vocab
  full = np.concatenate([tokens, np.asarray(out.tokens)], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(out.mask)], axis=1)
  logits = models.forward(model, full, full_mask)
  p = tokens.shape[1]
  for width, close in ((vocab, True), (rows, False)):
    logp = np.asarray(jax.nn.log_softmax(logits[..., :width], axis=-1))[:, p - 1:-1]
    want = np.take_along_axis(logp, np.asarray(out.tokens)[..., None], -1)[..., 0]
    # Over the shared vocabulary: equal; over every embedding row: the mismatch the trainer had.
    assert np.allclose(out.policy_logprobs, want, atol=1e-4) == close
  with pytest.raises(ValueError, match=r"vocab_size must be an int in \[1, 128\]"):
    _sample(model, tokens, mask, vocab_size=rows + 1)
  with pytest.raises(ValueError, match="outside the sampled vocabulary"):
    _sample(model, tokens, mask, vocab_size=vocab, stop_token_ids=[vocab + 3])
