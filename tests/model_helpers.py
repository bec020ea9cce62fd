"""Test helpers: tiny random transformers checkpoints, tokenizer folders and left-padded batches.

Other test modules import these (`import model_helpers`). torch and transformers are imported
inside the functions that need them, so a test that only wants a ModelConfig does not pay for it.
"""

from __future__ import annotations


import numpy as np

from opd_jax import smoke
from opd_jax.models import ModelConfig

FAMILIES = ("qwen2", "qwen3", "llama")

# Small, but with every feature on: grouped-query attention (4 query / 2 kv heads), Qwen3's
# head_dim != hidden/heads, and a Llama 3 rope scaling whose wavelength bands (4 and 16 tokens)
# put the 4 rotary frequencies of head_dim 8 in all three regimes (kept, smoothed, divided).
_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-6)
_FAMILY = {
    "qwen2": dict(rope_theta=10000.0),
    "qwen3": dict(head_dim=16, rope_theta=1000000.0),
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}),
}
SPECIAL_TOKENS = smoke.SPECIAL_TOKENS


def tiny_hf_config(family: str, **overrides):
  """A transformers config of `family` (qwen2, qwen3, llama), eager attention, tiny sizes."""
  import transformers  # pylint: disable=import-outside-toplevel
  classes = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
             "llama": transformers.LlamaConfig}
  if family not in classes:
    raise ValueError(f"family={family!r}; accepted: {FAMILIES}")
  kwargs = {**_COMMON, **_FAMILY[family], **overrides}
  rope_theta = kwargs.pop("rope_theta", None)
  if rope_theta is not None:
    kwargs.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": rope_theta})
  return classes[family](attn_implementation="eager", **kwargs)


def make_hf_checkpoint(folder, family: str, *, seed: int = 0, max_shard_size=None, **overrides):
  """Builds a random transformers model, saves it to `folder` and returns it (eval mode).

  Weights are N(0, 0.2) and every norm scale / bias is perturbed away from its 1 / 0 default, so
  that a forgotten bias or norm changes the logits.

  Args:
    folder: output folder.
    family: "qwen2", "qwen3" or "llama".
    seed: torch seed.
    max_shard_size: e.g. "20KB" for a sharded checkpoint with model.safetensors.index.json.
    **overrides: transformers config fields (tie_word_embeddings=True, vocab_size=..., ...).

  Returns:
    The torch model.
  """
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  config = tiny_hf_config(family, **overrides)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  with torch.no_grad():
    for name, p in model.named_parameters():
      offset = 1.0 if name.endswith("norm.weight") else 0.0
      p.copy_(offset + 0.2 * torch.randn_like(p))
  model.eval()
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(str(folder), **kwargs)
  return model


def positions(mask: np.ndarray) -> np.ndarray:
  """Per-row rotary positions of a left-padded batch (what opd_jax.models uses)."""
  return np.maximum(np.cumsum(mask.astype(np.int64), axis=-1) - 1, 0)


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """float32 logits [B, T, V] of a transformers model with per-row positions."""
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(np.asarray(tokens, np.int64)),
                attention_mask=torch.as_tensor(np.asarray(mask, np.int64)),
                position_ids=torch.as_tensor(positions(mask)))
  return out.logits.float().numpy()


def left_padded_batch(seed: int, batch: int, length: int, vocab_size: int,
                      pads=None) -> tuple[np.ndarray, np.ndarray]:
  """Random int32 tokens [B, T] and a bool mask whose row b starts with pads[b] padding slots.

  Args:
    seed: numpy seed.
    batch, length, vocab_size: shape and token range.
    pads: left-padding length of each row; default 0, 1, 3, ... (row 0 unpadded).

  Returns:
    (tokens, mask); padding slots hold token 0.
  """
  rng = np.random.default_rng(seed)
  pads = list(pads) if pads is not None else [min(2 * b - (b > 0), length - 1)
                                               for b in range(batch)]
  mask = np.arange(length)[None, :] >= np.asarray(pads)[:, None]
  tokens = np.where(mask, rng.integers(1, vocab_size, (batch, length)), 0).astype(np.int32)
  return tokens, mask


def tiny_model_config(**overrides) -> ModelConfig:
  """A tiny Qwen2-style ModelConfig for tests that do not need a checkpoint (opd_jax.models
  .init_model(config) gives a random model)."""
  fields = dict(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
  return ModelConfig(**{**fields, **overrides})


def make_tokenizer(folder, *, vocab_size: int = 300):
  """The package's ChatML byte-level BPE (opd_jax.smoke.make_chatml_tokenizer) saved to
  `folder`: chat template and the special tokens <|endoftext|>, <|im_start|>, <|im_end|>."""
  return smoke.make_chatml_tokenizer(folder, vocab_size=vocab_size)
