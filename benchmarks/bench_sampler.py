"""Sampler speed vs transformers' PyTorch `generate` on CPU; prints one JSON line.

Same weights (a random ~20M-parameter Qwen2: vocab 32000, hidden 256, 4 layers, 4 heads, 2 KV
heads, MLP 1024), batch 8, prompt 64, 128 new tokens, torch on 2 threads, both sides pinned to
the same 2 cores (`_turns.pin_cores`). Settings:
(a) top-k 50 + top-p 0.9 (what `generate(do_sample=True, top_p=0.9)` does by default),
(b) exact top-p 0.9 alone (top_k=0 for transformers). transformers runs in a child process of its
own so that XLA's worker threads never compete with torch's. After a warm-up call on each side
(ours includes compilation, reported separately), the two sides take turns, one call each per
setting and round, so that a slow spell of a shared machine hits both; medians over --repeats
rounds.

Run: python benchmarks/bench_sampler.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import _turns

THREADS = 2
CORES = _turns.pin_cores(THREADS)            # before JAX starts its CPU client and thread pool
os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the comparison is CPU against CPU

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from opd_jax import models, sampling  # noqa: E402

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


SETTINGS = (("a_topk50_topp0.9", 50), ("b_topp0.9", 0))


def prompts_and_mask():
  prompts = np.random.default_rng(0).integers(1, 32000, (BATCH, PROMPT)).astype(np.int32)
  return prompts, np.ones((BATCH, PROMPT), bool)


def torch_server(folder):
  """Child process: answers each setting name read from stdin with the seconds of one call."""
  torch.set_num_threads(THREADS)
  model = transformers.Qwen2ForCausalLM.from_pretrained(folder).eval()
  prompts, mask = prompts_and_mask()

  def call(top_k):
    with torch.no_grad():
      tokens = model.generate(
          input_ids=torch.as_tensor(prompts, dtype=torch.long),
          attention_mask=torch.as_tensor(mask, dtype=torch.long), do_sample=True, top_p=0.9,
          top_k=top_k, temperature=1.0, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
          eos_token_id=None)
    assert tokens.shape == (BATCH, PROMPT + NEW)
  _turns.serve({name: lambda top_k=top_k: call(top_k) for name, top_k in SETTINGS})


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(_turns.SERVER_FLAG, metavar="FOLDER", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.torch_server:
    torch_server(args.torch_server)
    return
  result = {"batch": BATCH, "prompt": PROMPT, "new_tokens": NEW, "torch_threads": THREADS,
            "cores": CORES,
            "jax_backend": jax.default_backend(), "rounds": args.repeats}
  with tempfile.TemporaryDirectory() as folder:
    _, n_params = hf_model(folder)
    result["params_millions"] = round(n_params / 1e6, 2)
    worker = _turns.Worker([__file__, _turns.SERVER_FLAG, folder])
    with worker:
      model, _ = models.load_hf_checkpoint(folder)
      prompts, mask = prompts_and_mask()
      seeds = iter(range(1, 1_000_000))

      def ours(top_k):
        rollout = sampling.sample(model, prompts, mask, jax.random.key(next(seeds)),
                                  max_new_tokens=NEW, temperature=1.0, top_p=0.9, top_k=top_k)
        assert int(jax.block_until_ready(rollout).mask.sum()) == BATCH * NEW

      calls = {name: lambda top_k=top_k: ours(top_k) for name, top_k in SETTINGS}
      worker.wait_ready()                  # its warm-up done: nothing competes
      first = {name: _turns.seconds(call) for name, call in calls.items()}
      times = _turns.take_turns(calls, worker, args.repeats)
  for name, _ in SETTINGS:
    result[name] = _turns.summary(*times[name], BATCH * NEW, first_s=first[name])
  print(json.dumps(result))


if __name__ == "__main__":
  main()
