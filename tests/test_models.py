"""Decoder against transformers' PyTorch Qwen2/Qwen3/Llama, KV-cache decoding, checkpoint I/O."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec
from safetensors.numpy import load_file, save_file

import model_helpers as mh
from opd_jax import models

B, T = 4, 12          # left-padded parity batch: rows padded by 0, 1, 3, 5
P, N = 9, 6           # prompt length and decode steps of the cache test
# How each family's checkpoint is saved: untied/tied output head, single file or sharded.
SETUPS = {
    "qwen2": dict(tie_word_embeddings=False),
    "qwen3": dict(tie_word_embeddings=True),
    "llama": dict(tie_word_embeddings=False, max_shard_size="40KB"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """family -> (folder, torch model, torch logits on the parity batch); built once."""
  tokens, mask = mh.left_padded_batch(0, B, T, 128)
  out = {}
  for family, setup in SETUPS.items():
    folder = tmp_path_factory.mktemp(family)
    torch_model = mh.make_hf_checkpoint(folder, family, seed=1, **setup)
    out[family] = (folder, torch_model, mh.torch_logits(torch_model, tokens, mask))
  return out


@pytest.fixture(scope="module")
def loaded(checkpoints):
  """family -> (model, config) loaded in float32 on one device."""
  return {f: models.load_hf_checkpoint(folder) for f, (folder, _, _) in checkpoints.items()}


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((2, 2, 2), models.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


_forward = nnx.jit(models.forward, static_argnames="return_hidden")


def _batch():
  tokens, mask = mh.left_padded_batch(0, B, T, 128)
  return jnp.asarray(tokens), jnp.asarray(mask), mask


# ----------------------------------------------------------------------------------------------
# parity with transformers
# ----------------------------------------------------------------------------------------------


def test_checkpoints_cover_the_formats(checkpoints):
  assert (checkpoints["llama"][0] / "model.safetensors.index.json").is_file()
  assert (checkpoints["qwen2"][0] / "model.safetensors").is_file()
  with open(checkpoints["qwen3"][0] / "config.json") as f:
    assert json.load(f)["tie_word_embeddings"] is True


@pytest.mark.parametrize("family", mh.FAMILIES)
def test_logits_match_transformers_on_left_padded_batch(family, checkpoints, loaded):
  model, config = loaded[family]
  tokens, mask_j, mask = _batch()
  logits = _forward(model, tokens, mask_j)
  want = checkpoints[family][2]
  assert logits.dtype == jnp.float32 and logits.shape == (B, T, config.vocab_size)
  assert np.abs(want[mask]).max() > 1.0     # the comparison is not between near-zero numbers
  np.testing.assert_allclose(np.asarray(logits)[mask], want[mask], atol=1e-4, rtol=0)
  assert np.all(np.isfinite(np.asarray(logits)))


def test_config_matches_transformers_and_round_trips(checkpoints, loaded):
  for family, (model, config) in loaded.items():
    torch_model = checkpoints[family][1]
    n_torch = sum(p.numel() for p in torch_model.parameters())
    n_ours = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert config.num_params == n_ours == n_torch, family
    assert models.config_from_hf(models.config_to_hf(config)) == config
  assert loaded["llama"][1].rope_scaling == models.RopeScaling(8.0, 1.0, 4.0, 16)
  assert loaded["qwen2"][1].qkv_bias and not loaded["qwen2"][1].o_bias
  assert loaded["qwen3"][1].qk_norm and loaded["qwen3"][1].head_dim == 16


# ----------------------------------------------------------------------------------------------
# hidden states, unembedding, dtype
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])   # untied and tied output head
def test_hidden_states_times_unembedding_give_logits(family, loaded):
  model, config = loaded[family]
  tokens, mask_j, _ = _batch()
  hidden = _forward(model, tokens, mask_j, return_hidden=True)
  w = models.unembedding(model)
  assert hidden.shape == (B, T, config.hidden_size)
  assert w.shape == (config.hidden_size, config.vocab_size)
  if config.tie_word_embeddings:
    np.testing.assert_array_equal(w, model.embed_tokens.embedding[...].T)
  else:
    assert not np.allclose(w, model.embed_tokens.embedding[...].T)
  np.testing.assert_allclose(jnp.einsum("btd,dv->btv", hidden, w),
                             _forward(model, tokens, mask_j), atol=1e-5)
  np.testing.assert_allclose(models.logits_from_hidden(model, hidden),
                             _forward(model, tokens, mask_j), atol=1e-5)


def test_bfloat16_load_keeps_float32_logits(checkpoints, loaded):
  folder, _, want = checkpoints["qwen2"]
  model, config = models.load_hf_checkpoint(folder, dtype=jnp.bfloat16)
  assert config.dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("bfloat16")}
  tokens, mask_j, mask = _batch()
  logits = np.asarray(_forward(model, tokens, mask_j))
  assert logits.dtype == np.float32
  err = np.abs(logits[mask] - want[mask]).max()
  assert err < 0.05 * np.abs(want[mask]).max(), err


# ----------------------------------------------------------------------------------------------
# KV cache: prefill + decode steps == full forward, inside jit / fori_loop with split/merge
# ----------------------------------------------------------------------------------------------


def _prefill_then_decode(graphdef, state, prompts, prompt_mask, continuation):
  """The pattern the sampler uses: model merged inside jit, decode steps in a lax loop."""
  model = nnx.merge(graphdef, state)
  b, p = prompts.shape
  n = continuation.shape[1]
  cache = models.init_cache(model.config, b, p + n)
  prefill_logits, cache = models.prefill(model, prompts, prompt_mask, cache)
  last_hidden, _ = models.prefill(model, prompts, prompt_mask, cache, return_hidden=True)

  def body(i, carry):
    cache, out = carry
    logits, cache = models.decode_step(model, continuation[:, i], cache)
    return cache, out.at[:, i].set(logits)
  out = jnp.zeros((b, n, model.config.vocab_size), jnp.float32)
  cache, out = jax.lax.fori_loop(0, n, body, (cache, out))
  return prefill_logits, last_hidden[:, -1], out, cache


_prefill_then_decode_jit = jax.jit(_prefill_then_decode, static_argnums=0)


def _check_decode_matches_forward(model):
  full_tokens, full_mask = mh.left_padded_batch(3, B, P + N, 128, pads=[0, 2, 5, 8])
  prompts, prompt_mask, continuation = full_tokens[:, :P], full_mask[:, :P], full_tokens[:, P:]
  assert full_mask[:, P:].all()
  want = np.asarray(_forward(model, jnp.asarray(full_tokens), jnp.asarray(full_mask)))
  graphdef, state = nnx.split(model)
  prefill_logits, last_hidden, decoded, cache = _prefill_then_decode_jit(
      graphdef, state, prompts, prompt_mask, continuation)
  np.testing.assert_allclose(np.asarray(prefill_logits)[prompt_mask], want[:, :P][prompt_mask],
                             atol=1e-5, rtol=0)
  np.testing.assert_allclose(models.logits_from_hidden(model, last_hidden), want[:, P - 1],
                             atol=1e-5, rtol=0)
  np.testing.assert_allclose(decoded, want[:, P:], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(cache.valid, full_mask)
  np.testing.assert_array_equal(cache.next_position, full_mask.sum(-1))
  assert int(cache.index) == P + N
  return state


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_prefill_and_decode_steps_equal_full_forward(family, loaded):
  _check_decode_matches_forward(loaded[family][0])


def test_decode_step_with_donated_cache_continues_the_prompt(loaded):
  model, config = loaded["qwen2"]
  tokens, mask_j, _ = _batch()
  want = np.asarray(_forward(model, tokens, mask_j))[:, -1]
  graphdef, state = nnx.split(model)
  prefill = jax.jit(lambda s, t, m, c: models.prefill(nnx.merge(graphdef, s), t, m, c),
                    donate_argnums=3)
  step = jax.jit(lambda s, t, c: models.decode_step(nnx.merge(graphdef, s), t, c),
                 donate_argnums=2)
  cache = models.init_cache(config, B, T)
  _, cache = prefill(state, tokens[:, :-1], mask_j[:, :-1], cache)
  logits, cache = step(state, tokens[:, -1], cache)
  np.testing.assert_allclose(logits, want, atol=1e-5, rtol=0)
  assert int(cache.index) == T


def test_cache_is_a_fixed_shape_pytree(loaded):
  config = loaded["qwen2"][1]
  cache = models.init_cache(config, 3, 7)
  leaves = jax.tree.leaves(cache)
  assert len(leaves) == 2 * config.num_layers + 3     # keys and values per layer, bookkeeping
  assert len(cache.k) == len(cache.v) == config.num_layers
  assert cache.k[0].shape == (3, config.num_kv_heads, 7, config.head_dim)
  assert cache.v[0].shape == (3, config.num_kv_heads, config.head_dim, 7)
  assert cache.k[0].dtype == jnp.float32 and cache.max_len == 7
  assert models.init_cache(config, 3, 7, jnp.bfloat16).v[1].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="max_len"):
    models.init_cache(config, 3, 0)
  grown = models.grow_cache(cache, 10)
  assert grown.k[0].shape[2] == grown.v[0].shape[3] == grown.max_len == 10
  with pytest.raises(ValueError, match="cannot shrink"):
    models.grow_cache(cache, 6)
  with pytest.raises(ValueError, match="tokens must have shape"):
    models.decode_step(loaded["qwen2"][0], jnp.zeros((2,), jnp.int32), cache)


# ----------------------------------------------------------------------------------------------
# sharding
# ----------------------------------------------------------------------------------------------


def test_sharded_load_equals_single_device(checkpoints, loaded, mesh):
  folder = checkpoints["llama"][0]
  model, _ = models.load_hf_checkpoint(folder, mesh=mesh)
  # Layer parameters are stacked over a leading, replicated layer axis.
  q = model.layers.self_attn.q_proj.kernel[...]
  assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 16, 16)
  assert model.embed_tokens.embedding[...].sharding.spec == PartitionSpec(("tensor", "fsdp"), None)
  assert model.layers.mlp.down_proj.kernel[...].sharding.spec == PartitionSpec(
      None, "tensor", "fsdp")
  assert model.norm.weight[...].sharding.spec == PartitionSpec(None)
  params = nnx.state(model, nnx.Param)
  for got, want in zip(jax.tree.leaves(params),
                       jax.tree.leaves(models.model_shardings(params, mesh))):
    assert got.sharding == want
  single = jax.tree.leaves(nnx.state(loaded["llama"][0], nnx.Param))
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), single):
    np.testing.assert_array_equal(a, b)
  tokens, mask_j, mask = _batch()
  np.testing.assert_allclose(np.asarray(_forward(model, tokens, mask_j))[mask],
                             checkpoints["llama"][2][mask], atol=1e-4, rtol=0)
  # Decoding with the sharded model and a cache placed on the mesh gives the same logits.
  state = _check_decode_matches_forward(model)
  assert state["layers"]["mlp"]["up_proj"]["kernel"][...].sharding.spec == PartitionSpec(
      None, "fsdp", "tensor")
  cache = models.init_cache(model.config, 4, 8, mesh=mesh)
  assert cache.k[0].sharding.spec == PartitionSpec(("data", "fsdp"), "tensor", None, None)


def test_init_model_places_parameters_on_the_mesh(mesh):
  config = mh.tiny_model_config()
  model = models.init_model(config, seed=3, mesh=mesh)
  again = models.init_model(config, seed=3)
  v = model.layers.self_attn.v_proj.kernel[...]
  assert v.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
  np.testing.assert_array_equal(v, again.layers.self_attn.v_proj.kernel[...])
  assert model.layers.self_attn.q_proj.bias[...].sharding.spec == PartitionSpec(None, "tensor")
  assert not np.array_equal(v[0], v[1])     # every layer has its own draw
  tokens, mask_j, _ = _batch()
  assert np.all(np.isfinite(np.asarray(_forward(model, tokens, mask_j))))


# ----------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,max_shard_bytes", [("qwen2", 30_000), ("qwen3", 2**30)])
def test_save_then_transformers_load_gives_same_logits(family, max_shard_bytes, checkpoints,
                                                       loaded, tmp_path):
  import transformers  # pylint: disable=import-outside-toplevel
  model, config = loaded[family]
  models.save_hf_checkpoint(model, config, tmp_path, max_shard_bytes=max_shard_bytes)
  sharded = (tmp_path / "model.safetensors.index.json").is_file()
  assert sharded == (max_shard_bytes < 2**30)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager", local_files_only=True)
  tokens, mask = mh.left_padded_batch(0, B, T, 128)
  np.testing.assert_allclose(mh.torch_logits(torch_model, tokens, mask)[mask],
                             checkpoints[family][2][mask], atol=1e-5, rtol=0)
  again, config_again = models.load_hf_checkpoint(tmp_path)
  assert config_again == config
  for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(a, b)


def test_save_rejects_a_config_of_another_architecture(loaded, tmp_path):
  model, config = loaded["qwen2"]
  with pytest.raises(ValueError, match="architecture"):
    models.save_hf_checkpoint(model, dataclasses.replace(config, num_layers=3), tmp_path)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


def _edit_config(folder, **changes):
  config = json.loads((folder / "config.json").read_text())
  config.update(changes)
  (folder / "config.json").write_text(json.dumps(config))


def _edit_tensors(folder, fn):
  tensors = load_file(folder / "model.safetensors")
  fn(tensors)
  save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _truncate(folder):
  data = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(data[:len(data) // 2])


def _corrupt_header(folder):
  data = bytearray((folder / "model.safetensors").read_bytes())
  data[8:40] = b"#" * 32
  (folder / "model.safetensors").write_bytes(bytes(data))


def _wrong_shape(tensors):
  tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)


ERROR_CASES = {
    "no_config": (lambda f: (f / "config.json").unlink(), "has no config.json"),
    "model_type": (lambda f: _edit_config(f, model_type="gpt2"),
                   r"model_type='gpt2' is not supported; supported: llama, qwen2, qwen3"),
    "activation": (lambda f: _edit_config(f, hidden_act="gelu"), "hidden_act='gelu'"),
    "rope_type": (lambda f: _edit_config(f, rope_parameters={"rope_type": "yarn"}),
                  r"rope_type='yarn' is not supported; supported: default, llama3"),
    "no_weights": (lambda f: (f / "model.safetensors").unlink(), "neither model.safetensors"),
    "missing": (lambda f: _edit_tensors(f, lambda t: t.pop("model.norm.weight")),
                r"lacks 1 tensors .*: model\.norm\.weight"),
    "unexpected": (lambda f: _edit_tensors(
        f, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(2, np.float32)})),
                   r"does not use: model\.layers\.0\.extra\.weight"),
    "shape": (lambda f: _edit_tensors(f, _wrong_shape),
              r"tensor model\.layers\.1\.self_attn\.k_proj\.weight .* has shape \(8, 32\), "
              r"expected \(16, 32\)"),
    "truncated": (_truncate, "truncated or corrupt"),
    "corrupt": (_corrupt_header, "truncated or corrupt"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_load_errors_name_the_problem(case, checkpoints, tmp_path):
  folder = tmp_path / "ckpt"
  shutil.copytree(checkpoints["qwen2"][0], folder)
  edit, message = ERROR_CASES[case]
  edit(folder)
  with pytest.raises(models.CheckpointError, match=message):
    models.load_hf_checkpoint(folder)


def test_load_errors_for_folder_index_dtype_and_mesh(checkpoints, tmp_path):
  with pytest.raises(models.CheckpointError, match="does not exist"):
    models.load_hf_checkpoint(tmp_path / "nowhere")
  folder = tmp_path / "ckpt"
  shutil.copytree(checkpoints["llama"][0], folder)
  with pytest.raises(ValueError, match=r"dtype='int32' is not supported"):
    models.load_hf_checkpoint(folder, dtype=jnp.int32)
  explicit = jax.make_mesh((2, 2, 2), models.MESH_AXES, axis_types=(AxisType.Explicit,) * 3)
  with pytest.raises(ValueError, match="not AxisType.Auto"):
    models.load_hf_checkpoint(folder, mesh=explicit)
  wrong_names = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
  with pytest.raises(ValueError, match=r"lack \['data', 'fsdp', 'tensor'\]"):
    models.load_hf_checkpoint(folder, mesh=wrong_names)
  shard = sorted(folder.glob("model-*.safetensors"))[-1]
  shard.unlink()
  with pytest.raises(models.CheckpointError, match=f"refers to missing files: {shard.name}"):
    models.load_hf_checkpoint(folder)


def test_load_skips_rotary_buffers_and_a_tied_head_copy(checkpoints, loaded, tmp_path):
  folder = tmp_path / "ckpt"
  shutil.copytree(checkpoints["qwen3"][0], folder)
  extra = {"lm_head.weight": np.ones((128, 32), np.float32),
           "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}
  _edit_tensors(folder, lambda t: t.update(extra))
  model, _ = models.load_hf_checkpoint(folder)
  np.testing.assert_array_equal(models.unembedding(model), models.unembedding(loaded["qwen3"][0]))


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------


def test_tokenizer_folder_loads_offline_with_chat_template(tmp_path):
  mh.make_tokenizer(tmp_path, vocab_size=300)
  tok = models.load_tokenizer(tmp_path)
  text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                 tokenize=False, add_generation_prompt=True)
  assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
  ids = tok(text)["input_ids"]
  assert max(ids) < len(tok) <= 300
  assert tok.convert_ids_to_tokens(ids[0]) == "<|im_start|>"
  assert tok.decode(ids) == text
  assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
  with pytest.raises(models.CheckpointError, match="no tokenizer.json"):
    models.load_tokenizer(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------


def test_forward_prefill_and_decode_step_reject_bad_tokens_and_masks():
  """Shapes and dtypes are checked always (inside jit too); ids, 0/1 masks and left padding
  when the arrays are concrete."""
  model = models.init_model(mh.tiny_model_config(), seed=0)
  tokens, mask = mh.left_padded_batch(0, B, T, 128)
  big = tokens.copy()
  big[2, 7] = 128
  two = mask.astype(np.int32)
  two[1, 3] = 2
  cases = [
      (big, mask, r"tokens holds ids outside the vocabulary \[0, 128\): 128 at row 2, position 7"),
      (tokens.astype(np.float32), mask, r"tokens must hold integer token ids, got dtype float32"),
      (tokens, mask.astype(np.float32), r"attention_mask must be bool .*got dtype float32"),
      (tokens, two, r"attention_mask must be bool or 0/1, got 2 at row 1, position 3"),
      (tokens, mask[:, :-1], r"attention_mask must have the tokens' shape \(4, 12\)"),
  ]
  cache = models.init_cache(model.config, B, T)
  for bad_tokens, bad_mask, msg in cases:
    with pytest.raises(ValueError, match=msg):
      models.forward(model, bad_tokens, bad_mask)
    with pytest.raises(ValueError, match=msg):
      models.prefill(model, jnp.asarray(bad_tokens), jnp.asarray(bad_mask), cache)
  # Inside jit the values are unknown; dtypes are still checked.
  with pytest.raises(ValueError, match="tokens must hold integer token ids"):
    _forward(model, jnp.asarray(tokens, jnp.float32), jnp.asarray(mask))
  # prefill takes left-padded prompts only, each with a real token.
  right = mask[:, ::-1].copy()
  empty = mask.copy()
  empty[3] = False
  with pytest.raises(ValueError, match=r"attention_mask must be left-padded.*row 1 has a real "
                                       r"token at position 10 followed by padding at 11"):
    models.prefill(model, tokens, right, cache)
  with pytest.raises(ValueError, match=r"every row needs at least one real token.*rows: \[3\]"):
    models.prefill(model, tokens, empty, cache)
  # decode_step: one id per row, in the vocabulary.
  with pytest.raises(ValueError, match=r"tokens holds ids outside the vocabulary \[0, 128\): "
                                       r"-3 at position 1"):
    models.decode_step(model, jnp.array([5, -3, 0, 1]), cache)
  with pytest.raises(ValueError, match="tokens must hold integer token ids, got dtype float32"):
    jax.jit(lambda t: models.decode_step(model, t, cache))(jnp.zeros((B,), jnp.float32))


def test_forward_takes_padding_anywhere_and_integer_masks():
  """forward scores prompt + response batches: padding right of a response, 0/1 int masks."""
  model = models.init_model(mh.tiny_model_config(), seed=0)
  tokens, mask = mh.left_padded_batch(0, B, T, 128)
  right = mask[:, ::-1].copy()
  want = _forward(model, jnp.asarray(tokens), jnp.asarray(right))
  got = models.forward(model, tokens, right.astype(np.int64))
  np.testing.assert_allclose(np.asarray(got)[right], np.asarray(want)[right], atol=1e-5)
