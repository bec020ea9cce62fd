"""Forward-pass tokens/s of the jitted NNX decoder vs transformers' PyTorch Qwen2 on CPU (JSON)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from opd_jax import models  # noqa: E402

# ~20M parameters: 2 x 8.2M for the untied embedding and output head, 4 x 1.0M for the layers.
QWEN2_20M = dict(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                 max_position_embeddings=4096)


def _median_seconds(fn, iters: int) -> float:
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--torch_threads", type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.torch_threads)
  torch.manual_seed(0)
  # transformers' default attention (sdpa) is its fastest on CPU.
  torch_model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN2_20M)).eval()
  with tempfile.TemporaryDirectory() as folder:
    torch_model.save_pretrained(folder)
    model, config = models.load_hf_checkpoint(folder)

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
  mask = np.ones_like(tokens, dtype=bool)
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, t, m: models.forward(nnx.merge(graphdef, s), t, m))
  tokens_j, mask_j = jnp.asarray(tokens), jnp.asarray(mask)
  start = time.perf_counter()
  ours = jax.block_until_ready(jitted(state, tokens_j, mask_j))
  compile_s = time.perf_counter() - start
  jax_s = _median_seconds(lambda: jax.block_until_ready(jitted(state, tokens_j, mask_j)),
                          args.iters)

  tokens_t, mask_t = torch.as_tensor(tokens.astype(np.int64)), torch.ones_like(
      torch.as_tensor(tokens.astype(np.int64)))
  with torch.inference_mode():
    def run_torch():
      return torch_model(input_ids=tokens_t, attention_mask=mask_t).logits
    theirs = run_torch()                                     # warm-up
    torch_s = _median_seconds(run_torch, args.iters)
  n_tokens = args.batch * args.seq_len
  print(json.dumps({
      "benchmark": "forward", "model": "qwen2", "params": config.num_params,
      "batch": args.batch, "seq_len": args.seq_len, "dtype": "float32",
      "jax_tokens_per_s": round(n_tokens / jax_s, 1),
      "torch_tokens_per_s": round(n_tokens / torch_s, 1),
      "speedup_vs_torch": round(torch_s / jax_s, 3),
      "jax_compile_s": round(compile_s, 2), "torch_threads": args.torch_threads,
      "cpu_count": os.cpu_count(), "jax_device": str(jax.devices()[0]),
      "max_abs_logit_diff": float(np.abs(np.asarray(ours) - theirs.numpy()).max()),
  }))


if __name__ == "__main__":
  main()
