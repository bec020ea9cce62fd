"""llama.cpp GGUF files -> Hugging Face checkpoint folders: de-quantised weights, config, tokenizer."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from opd_jax.models.config import config_from_hf, config_to_hf
from opd_jax.models.hf_io import SINGLE_FILE, CheckpointError

SUPPORTED_ARCHITECTURES = ("llama",)
INSTALL_HINT = "install it with `pip install 'opd_jax[real]'` (or `pip install gguf`)"

# GGUF tensor name (per layer after "blk.{i}.") -> transformers' name (after "model.layers.{i}.").
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_OTHER_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _gguf():
  try:
    import gguf  # pylint: disable=import-outside-toplevel  (an optional extra)
  except ImportError as e:
    raise ImportError(f"reading a GGUF file needs the `gguf` package: {INSTALL_HINT}") from e
  return gguf


def _metadata(reader) -> dict[str, Any]:
  """Every scalar and string field of the file, and the arrays the tokenizer needs."""
  out = {}
  for name, field in reader.fields.items():
    if name.startswith("GGUF."):
      continue
    out[name] = field.contents()
  return out


def hf_tensor_name(gguf_name: str) -> str:
  """transformers' name of a llama GGUF tensor (`blk.3.attn_q.weight` ->
  `model.layers.3.self_attn.q_proj.weight`); CheckpointError for a name it does not know."""
  if gguf_name in _OTHER_TENSORS:
    return _OTHER_TENSORS[gguf_name]
  parts = gguf_name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
    return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
  raise CheckpointError(f"GGUF tensor {gguf_name!r} has no transformers counterpart; known: "
                        f"{', '.join(_OTHER_TENSORS)} and blk.<i>.{{{', '.join(_LAYER_TENSORS)}}}")


def unpermute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's reordering of q/k projection rows ([out, in], `heads` heads).

  llama.cpp's converter permutes each head's rows so that rotary pairs (i, i + H/2) become
  adjacent (i.e. interleaved); transformers rotates halves, so the rows go back. The same as
  transformers' GGUF loader (`_reverse_permute_weights`).
  """
  half = weight.shape[0] // heads // 2
  return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
  """The config.json of a llama GGUF file's metadata (checked by `config_from_hf`)."""
  arch = meta.get("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise CheckpointError(f"GGUF general.architecture={arch!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
  try:
    heads = int(meta[f"{arch}.attention.head_count"])
    hidden = int(meta[f"{arch}.embedding_length"])
    hf = {
        "model_type": "llama",
        "vocab_size": int(meta.get(f"{arch}.vocab_size",
                                   len(meta.get("tokenizer.ggml.tokens", ())))),
        "hidden_size": hidden,
        "intermediate_size": int(meta[f"{arch}.feed_forward_length"]),
        "num_hidden_layers": int(meta[f"{arch}.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta[f"{arch}.context_length"]),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
    }
  except KeyError as e:
    raise CheckpointError(f"GGUF metadata lacks {e}, needed for config.json") from e
  if f"{arch}.rope.scaling.type" in meta:
    raise CheckpointError(f"GGUF {arch}.rope.scaling.type={meta[f'{arch}.rope.scaling.type']!r}: "
                          "rope scaling from GGUF metadata is not supported")
  for key in ("bos", "eos", "padding"):
    if f"tokenizer.ggml.{key}_token_id" in meta:
      name = "pad_token_id" if key == "padding" else f"{key}_token_id"
      hf[name] = int(meta[f"tokenizer.ggml.{key}_token_id"])
  # Round trip through ModelConfig: what is written is what our loader reads back.
  return config_to_hf(config_from_hf(hf))


def save_tokenizer(meta: dict[str, Any], folder: pathlib.Path) -> None:
  """Writes tokenizer.json, tokenizer_config.json and the chat template of the file.

  Uses transformers' own GGUF tokenizer builder (`convert_gguf_tokenizer`) on the metadata read
  by the `gguf` package, so the result is what `AutoTokenizer.from_pretrained(..., gguf_file=)`
  gives, without the PyTorch that transformers' own GGUF reader imports.
  """
  # pylint: disable=import-outside-toplevel  (transformers is slow to import)
  from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
  from transformers.tokenization_utils_tokenizers import TokenizersBackend
  names = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens",
           "scores": "scores", "token_type": "token_type", "merges": "merges",
           "add_space_prefix": "add_prefix_space"}
  tokenizer_dict = {name: meta[f"tokenizer.ggml.{key}"] for key, name in names.items()
                    if f"tokenizer.ggml.{key}" in meta}
  if tokenizer_dict.get("tokenizer_type") != "gpt2":
    raise CheckpointError(f"GGUF tokenizer.ggml.model={tokenizer_dict.get('tokenizer_type')!r} "
                          "is not supported; supported: 'gpt2' (byte-level BPE)")
  backend, _ = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
  tokens = tokenizer_dict["tokens"]
  special = {}
  for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                    ("pad_token", "padding")):
    if f"tokenizer.ggml.{key}_token_id" in meta:
      special[name] = tokens[int(meta[f"tokenizer.ggml.{key}_token_id"])]
  tokenizer = TokenizersBackend(
      tokenizer_object=backend, chat_template=meta.get("tokenizer.chat_template"),
      add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)), **special)
  tokenizer.save_pretrained(str(folder))


def convert_gguf(gguf_path, folder) -> dict[str, Any]:
  """Writes a llama GGUF file as a Hugging Face folder, weights de-quantised to float32.

  Args:
    gguf_path: the .gguf file (any quantisation the `gguf` package de-quantises).
    folder: output folder (created): config.json, model.safetensors, tokenizer files.

  Returns:
    The config.json dict written.

  Raises:
    ImportError without the `gguf` package; CheckpointError for an unreadable file or an
    unsupported architecture, tensor or tokenizer.
  """
  gguf = _gguf()
  path = pathlib.Path(gguf_path)
  if not path.is_file():
    raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
  try:
    reader = gguf.GGUFReader(str(path))
  except (ValueError, OSError) as e:
    raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from e
  meta = _metadata(reader)
  hf = hf_config(meta, {t.name for t in reader.tensors})
  heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
  tensors = {}
  for t in reader.tensors:
    name = hf_tensor_name(t.name)
    x = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    if name.endswith("q_proj.weight"):
      x = unpermute_rotary(x, heads)
    elif name.endswith("k_proj.weight"):
      x = unpermute_rotary(x, kv_heads)
    tensors[name] = np.ascontiguousarray(x)
  out = pathlib.Path(folder)
  out.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
  (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
  save_tokenizer(meta, out)
  return hf
