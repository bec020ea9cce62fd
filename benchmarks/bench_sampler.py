"""Sampler speed vs transformers' PyTorch `generate` on CPU; prints one JSON line.

Same weights (a random ~20M-parameter Qwen2: vocab 32000, hidden 256, 4 layers, 4 heads, 2 KV
heads, MLP 1024), batch 8, prompt 64, 128 new tokens, torch on 2 threads. Settings:
(a) top-k 50 + top-p 0.9 (what `generate(do_sample=True, top_p=0.9)` does by default),
(b) exact top-p 0.9 alone (top_k=0 for transformers). transformers runs in a child process of its
own so that XLA's worker threads never compete with torch's; medians of --repeats calls after a
warm-up call (whose extra time is reported as our compile time).

Run: python benchmarks/bench_sampler.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
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


SETTINGS = (("a_topk50_topp0.9", 50), ("b_topp0.9", 0))


def prompts_and_mask():
  prompts = np.random.default_rng(0).integers(1, 32000, (BATCH, PROMPT)).astype(np.int32)
  return prompts, np.ones((BATCH, PROMPT), bool)


def torch_side(folder, repeats):
  """transformers timings, run in a process of their own (no XLA threads competing)."""
  torch.set_num_threads(2)
  model = transformers.Qwen2ForCausalLM.from_pretrained(folder).eval()
  prompts, mask = prompts_and_mask()
  out = {}
  for name, top_k in SETTINGS:
    def theirs():
      with torch.no_grad():
        return model.generate(
            input_ids=torch.as_tensor(prompts, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long), do_sample=True, top_p=0.9,
            top_k=top_k, temperature=1.0, max_new_tokens=NEW, min_new_tokens=NEW,
            pad_token_id=0, eos_token_id=None)
    seconds, tokens = timed(theirs, repeats)
    assert tokens.shape == (BATCH, PROMPT + NEW)
    out[name] = seconds
  return out


def jax_side(folder, repeats):
  model, _ = models.load_hf_checkpoint(folder)
  prompts, mask = prompts_and_mask()
  out = {}
  for name, top_k in SETTINGS:
    def ours(seed=[0]):  # noqa: B006 - a new seed each call
      seed[0] += 1
      rollout = sampling.sample(model, prompts, mask, jax.random.key(seed[0]),
                                max_new_tokens=NEW, temperature=1.0, top_p=0.9, top_k=top_k)
      return jax.block_until_ready(rollout)
    start = time.perf_counter()
    ours()
    first_call = time.perf_counter() - start
    seconds, rollout = timed(ours, repeats)
    assert int(rollout.mask.sum()) == BATCH * NEW
    out[name] = (seconds, first_call - seconds)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--torch-only", metavar="FOLDER", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.torch_only:
    print(json.dumps(torch_side(args.torch_only, args.repeats)))
    return
  result = {"batch": BATCH, "prompt": PROMPT, "new_tokens": NEW, "torch_threads": 2,
            "jax_backend": jax.default_backend()}
  with tempfile.TemporaryDirectory() as folder:
    _, n_params = hf_model(folder)
    result["params_millions"] = round(n_params / 1e6, 2)
    child = subprocess.run([sys.executable, __file__, "--torch-only", folder, "--repeats",
                            str(args.repeats)], check=True, capture_output=True, text=True)
    theirs = json.loads(child.stdout.strip().splitlines()[-1])
    ours = jax_side(folder, args.repeats)
  for name, _ in SETTINGS:
    seconds, compile_s = ours[name]
    result[name] = {
        "ours_s_per_call": round(seconds, 4), "ours_compile_s": round(compile_s, 2),
        "ours_tokens_per_s": round(BATCH * NEW / seconds, 1),
        "transformers_s_per_call": round(theirs[name], 4),
        "transformers_tokens_per_s": round(BATCH * NEW / theirs[name], 1),
        "speedup": round(theirs[name] / seconds, 2)}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
