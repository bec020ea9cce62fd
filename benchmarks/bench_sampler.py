"""Sampler speed vs transformers' PyTorch `generate` on CPU; prints one JSON line.

Same weights (a random ~20M-parameter Qwen2: vocab 32000, hidden 256, 4 layers, 4 heads, 2 KV
heads, MLP 1024), batch 8, prompt 64, 128 new tokens, torch on 2 threads. Settings:
(a) top-k 50 + top-p 0.9 (what `generate(do_sample=True, top_p=0.9)` does by default),
(b) exact top-p 0.9 alone (top_k=0 for transformers).

Run: python benchmarks/bench_sampler.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from opd_jax import models, sampling

BATCH, PROMPT, NEW = 8, 64, 128


def hf_model(folder):
  config = transformers.Qwen2Config(
      vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
      attn_implementation="sdpa")
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(config).eval()
  model.save_pretrained(folder)
  return model, sum(p.numel() for p in model.parameters())


def timed(fn, repeats):
  out = fn()                              # warm-up / compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  torch.set_num_threads(2)
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, 32000, (BATCH, PROMPT)).astype(np.int32)
  mask = np.ones((BATCH, PROMPT), bool)
  result = {"batch": BATCH, "prompt": PROMPT, "new_tokens": NEW, "torch_threads": 2,
            "jax_backend": jax.default_backend()}
  with tempfile.TemporaryDirectory() as folder:
    torch_model, n_params = hf_model(folder)
    model, _ = models.load_hf_checkpoint(folder)
  result["params_millions"] = round(n_params / 1e6, 2)
  for name, top_k in (("a_topk50_topp0.9", 50), ("b_topp0.9", 0)):
    def ours(seed=[0]):  # noqa: B006 - a new seed each call
      seed[0] += 1
      out = sampling.sample(model, prompts, mask, jax.random.key(seed[0]), max_new_tokens=NEW,
                            temperature=1.0, top_p=0.9, top_k=top_k)
      return jax.block_until_ready(out)
    start = time.perf_counter()
    ours()
    first_call = time.perf_counter() - start
    ours_s, out = timed(ours, args.repeats)
    assert int(out.mask.sum()) == BATCH * NEW

    def theirs():
      with torch.no_grad():
        return torch_model.generate(
            input_ids=torch.as_tensor(prompts, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long), do_sample=True, top_p=0.9,
            top_k=top_k, temperature=1.0, max_new_tokens=NEW, min_new_tokens=NEW,
            pad_token_id=0, eos_token_id=None)
    theirs_s, _ = timed(theirs, args.repeats)
    result[name] = {
        "ours_s_per_call": round(ours_s, 4), "ours_compile_s": round(first_call - ours_s, 2),
        "ours_tokens_per_s": round(BATCH * NEW / ours_s, 1),
        "transformers_s_per_call": round(theirs_s, 4),
        "transformers_tokens_per_s": round(BATCH * NEW / theirs_s, 1),
        "speedup": round(theirs_s / ours_s, 2)}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
