"""NNX decoder for the Llama 3 / Qwen2 / Qwen3 families, KV-cache decoding, HF checkpoint I/O."""

from opd_jax.models import attention
from opd_jax.models.cache import KVCache, decode_step, grow_cache, init_cache, prefill
from opd_jax.models.config import (SUPPORTED_MODEL_TYPES, ModelConfig, RopeScaling, config_from_hf,
                                   config_to_hf)
from opd_jax.models.decoder import (DECODE_ROW_AXES, Decoder, constrain_rows, forward,
                                    logits_from_hidden, unembedding, unstack_layers, with_config)
from opd_jax.models.hf_io import (CheckpointError, check_folder, drop_layers, load_hf_checkpoint,
                                  load_tokenizer, save_hf_checkpoint)
from opd_jax.models.partitioning import (MESH_AXES, init_model, is_stacked, model_shardings,
                                         param_partition_spec)

__all__ = [
    "CheckpointError", "DECODE_ROW_AXES", "Decoder", "KVCache", "MESH_AXES", "ModelConfig",
    "RopeScaling", "SUPPORTED_MODEL_TYPES", "attention", "check_folder", "config_from_hf",
    "config_to_hf",
    "constrain_rows", "decode_step", "drop_layers", "forward", "grow_cache", "init_cache",
    "init_model", "is_stacked", "load_hf_checkpoint", "load_tokenizer", "logits_from_hidden",
    "model_shardings", "param_partition_spec", "prefill", "save_hf_checkpoint", "unembedding",
    "unstack_layers", "with_config",
]
