"""Decoder configuration: a frozen dataclass, converted from and to Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
# Rematerialisation of each decoder layer under differentiation: "none" keeps every activation
# for the backward pass, "dots" keeps only the outputs of the layer's weight matmuls (attention
# scores and everything elementwise are recomputed), "full" keeps only the layer's input.
REMAT_POLICIES = ("none", "dots", "full")
# ModelConfig.attention_impl values (what each means: opd_jax.models.attention).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# config.json keys that this module interprets; every other key is carried through unchanged
# (token ids, generation defaults, ...) so that a saved checkpoint keeps them.
_CONSUMED = {
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
    "attention_bias", "mlp_bias", "tie_word_embeddings", "use_sliding_window", "layer_types",
    "dtype", "torch_dtype", "transformers_version",
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3 rotary frequency scaling (rope_type "llama3")."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of one decoder; hashable, so jitted code can take it as a static argument."""
  model_type: str                   # one of SUPPORTED_MODEL_TYPES
  vocab_size: int
  hidden_size: int                  # D
  intermediate_size: int            # SwiGLU width F
  num_layers: int
  num_heads: int                    # query heads N
  num_kv_heads: int                 # key/value heads K (grouped-query attention, N % K == 0)
  head_dim: int                     # H
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 32768
  qkv_bias: bool = False            # Qwen2: True
  o_bias: bool = False              # Llama attention_bias puts a bias on o_proj too
  mlp_bias: bool = False
  qk_norm: bool = False             # Qwen3: RMSNorm over the head dimension of q and k
  tie_word_embeddings: bool = False
  dtype: str = "float32"            # parameter and compute dtype; logits are always float32
  hf_extra_json: str = "{}"         # config.json keys carried through untouched (sorted JSON)
  # Runtime choices, not architecture: never written to config.json.
  remat: str = "none"               # one of REMAT_POLICIES, applied to every layer
  # Runtime choices, never written to config.json (see opd_jax.models.attention):
  attention_impl: str = "auto"      # auto | xla | blockwise | cudnn | splash
  attention_block_q: int = 512      # blockwise attention: query rows per block
  attention_block_kv: int = 512     # blockwise attention: keys per block

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type={self.model_type!r} is not supported; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r} is not a rematerialisation policy; accepted: "
                       f"{', '.join(REMAT_POLICIES)}")
    if self.dtype not in SUPPORTED_DTYPES:
      raise ValueError(f"dtype={self.dtype!r} is not supported; supported: "
                       f"{', '.join(SUPPORTED_DTYPES)}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention_impl={self.attention_impl!r} is not supported; supported: "
                       f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    for name in ("attention_block_q", "attention_block_kv"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")

  @property
  def num_params(self) -> int:
    """Number of parameters (embedding and output head counted once when tied)."""
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    q, kv = self.num_heads * h, self.num_kv_heads * h
    attn = d * q + 2 * d * kv + q * d
    attn += (q + 2 * kv) * self.qkv_bias + d * self.o_bias + 2 * h * self.qk_norm
    mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
    per_layer = attn + mlp + 2 * d
    head = 0 if self.tie_word_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * per_layer + d + head


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """Reads the rotary settings from both the transformers >= 5 and the older config.json form."""
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if not isinstance(params, dict):
    raise ValueError(f"config.json rope_parameters must be a JSON object, got {params!r}")
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ValueError(f"config.json rope_type={rope_type!r} is not supported; supported: "
                     f"{', '.join(SUPPORTED_ROPE_TYPES)}")
  if rope_type == "default":
    return theta, None
  try:
    scaling = RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings"))))
  except (KeyError, TypeError) as e:
    raise ValueError(f"config.json llama3 rope scaling lacks or mistypes {e}; needs factor, "
                     "low_freq_factor, high_freq_factor, original_max_position_embeddings") from e
  return theta, scaling


def config_from_hf(hf: dict[str, Any], *, dtype: str = "float32") -> ModelConfig:
  """Builds a ModelConfig from the parsed config.json of a Hugging Face checkpoint.

  Args:
    hf: the parsed config.json.
    dtype: parameter and compute dtype name ("float32", "bfloat16" or "float16").

  Returns:
    The ModelConfig. Raises ValueError naming the offending key for anything unsupported.
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"config.json model_type={model_type!r} is not supported; supported: "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"config.json hidden_act={act!r} is not supported; supported: 'silu'")
  layer_types = hf.get("layer_types") or []
  if hf.get("use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
    raise ValueError("config.json enables sliding-window attention (use_sliding_window / "
                     "layer_types); only full attention is supported")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads"):
    if key not in hf:
      raise ValueError(f"config.json lacks the required key {key!r}")
  heads = int(hf["num_attention_heads"])
  default_head_dim = 128 if model_type == "qwen3" else int(hf["hidden_size"]) // heads
  theta, scaling = _rope_from_hf(hf)
  attention_bias = bool(hf.get("attention_bias", False))
  extra = {k: v for k, v in hf.items() if k not in _CONSUMED}
  return ModelConfig(
      model_type=model_type,
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      intermediate_size=int(hf["intermediate_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or default_head_dim),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
      qkv_bias=True if model_type == "qwen2" else attention_bias,
      o_bias=False if model_type == "qwen2" else attention_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
      qk_norm=model_type == "qwen3",
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      dtype=dtype,
      hf_extra_json=json.dumps(extra, sort_keys=True))


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """The config.json dict that transformers reads back into the same architecture."""
  if config.model_type == "qwen2" and (not config.qkv_bias or config.o_bias or config.mlp_bias):
    raise ValueError("a qwen2 config must have qkv_bias=True, o_bias=False, mlp_bias=False "
                     "to be expressible in config.json")
  if config.model_type != "qwen2" and config.qkv_bias != config.o_bias:
    raise ValueError(f"a {config.model_type} config must have qkv_bias == o_bias "
                     "(config.json attention_bias covers both)")
  if config.qk_norm != (config.model_type == "qwen3"):
    raise ValueError("qk_norm must be True exactly for model_type 'qwen3'")
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.rope_scaling is not None:
    rope = {"rope_type": "llama3", "rope_theta": config.rope_theta,
            **dataclasses.asdict(config.rope_scaling)}
  hf = json.loads(config.hf_extra_json)
  hf.update({
      "architectures": [_ARCHITECTURES[config.model_type]],
      "model_type": config.model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_parameters": rope,
      "max_position_embeddings": config.max_position_embeddings,
      "tie_word_embeddings": config.tie_word_embeddings,
      "dtype": config.dtype,
  })
  if config.model_type != "qwen2":
    hf["attention_bias"] = config.qkv_bias
  if config.model_type == "llama":
    hf["mlp_bias"] = config.mlp_bias
  return hf
