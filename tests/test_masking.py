"""Special-token, vocabulary and entropy masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from opd_jax import masking


def _ref_special_mask(tokens, ids, response_mask, first_only):
  out = response_mask.copy()
  for b in range(tokens.shape[0]):
    for i in ids:
      hits = [t for t in range(tokens.shape[1]) if response_mask[b, t] and tokens[b, t] == i]
      for t in (hits[:1] if first_only else hits):
        out[b, t] = False
  return out


@pytest.mark.parametrize("first_only", [True, False])
def test_special_token_mask_matches_reference(first_only):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 6, size=(4, 12)).astype(np.int32)
  response_mask = rng.random((4, 12)) < 0.8
  ids = [1, 4]
  got = masking.special_token_mask(tokens, ids, response_mask, first_occurrence_only=first_only)
  np.testing.assert_array_equal(got, _ref_special_mask(tokens, ids, response_mask, first_only))


def test_special_token_mask_first_occurrence_example():
  tokens = np.array([[7, 3, 5, 3, 9, 3]])
  resp = np.array([[False, True, True, True, True, True]])   # position 0 is prompt padding
  tokens[0, 0] = 3
  got = masking.special_token_mask(tokens, [3, 9], resp)
  np.testing.assert_array_equal(got, [[False, False, True, True, False, True]])
  assert np.array_equal(masking.special_token_mask(tokens, [], resp), resp)


def test_special_token_mask_jits():
  tokens = jnp.array([[1, 2, 1, 2]])
  resp = jnp.ones((1, 4), bool)
  got = jax.jit(masking.special_token_mask, static_argnames="first_occurrence_only")(
      tokens, jnp.array([2]), resp)
  np.testing.assert_array_equal(got, [[True, False, True, True]])


@pytest.fixture(scope="module")
def tiny_tokenizer():
  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>", "<think>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["think about it, then <think> answer", "x < y and think"] * 20,
                          trainer=trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def test_ids_for_strings_resolves_single_tokens(tiny_tokenizer):
  ids = masking.ids_for_strings(tiny_tokenizer, ["<", "think", "<|im_end|>"])
  assert ids == [tiny_tokenizer.convert_tokens_to_ids(s) for s in ["<", "think", "<|im_end|>"]]
  assert ids[2] == tiny_tokenizer.eos_token_id


def test_ids_for_strings_rejects_multi_token_string(tiny_tokenizer):
  with pytest.raises(ValueError, match="'zqzq' is not a single token"):
    masking.ids_for_strings(tiny_tokenizer, ["<", "zqzq"])


def test_reconcile_vocab_slices_to_shared_range():
  s = jnp.zeros((2, 3, 151936))
  t = jnp.ones((2, 3, 152064))
  s2, t2 = masking.reconcile_vocab(s, t, 151665)
  assert s2.shape == t2.shape == (2, 3, 151665)
  with pytest.raises(ValueError, match="student logits have 151936 .* vocab_size=152000"):
    masking.reconcile_vocab(s, t, 152000)
  with pytest.raises(ValueError, match="every axis but the vocabulary"):
    masking.reconcile_vocab(s, t[:1], 10)


def test_shared_vocab_size_detects_disagreeing_tokenizers(tiny_tokenizer):
  assert masking.shared_vocab_size(tiny_tokenizer, tiny_tokenizer) == len(tiny_tokenizer)

  class Other:
    def get_vocab(self):
      v = dict(tiny_tokenizer.get_vocab())
      v["zzz-extra"] = len(v)
      return v

  with pytest.raises(ValueError, match="tokenizers disagree"):
    masking.shared_vocab_size(tiny_tokenizer, Other())


def test_entropy_top_mask_keeps_highest_entropy_tokens():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 10, 7)) * rng.uniform(0.1, 5, size=(3, 10, 1))
  mask = rng.random((3, 10)) < 0.8
  got = np.asarray(masking.entropy_top_mask(logits, mask, 0.2))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  ent = -(p * np.log(p)).sum(-1)
  n_keep = int(np.ceil(0.2 * mask.sum()))
  assert got.sum() == n_keep and not np.any(got & ~mask)
  assert ent[got].min() >= ent[mask & ~got].max()
  np.testing.assert_array_equal(masking.entropy_top_mask(logits, mask, 1.0), mask)
  with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
    masking.entropy_top_mask(logits, mask, 0.0)
