"""The sampler with and without compaction (finished rows dropped) at a variable workload.

Response lengths roughly geometric with mean ~64 under a 512-token budget: a random
20.3M-parameter Qwen2 (the sampler and trainer benchmarks' shape: vocab 32000, hidden 256,
4 layers, 4 heads / 2 KV heads, MLP 1024, float32, N(0, 0.02) weights), 8 prompts of 64 tokens x
4 samples = 32 rows, temperature 1, top-p 0.9, top-k 0, and --stop_ids stop tokens (a fixed
random set, not in the prompts): the random model's next-token distribution is nearly flat, so
P(stop) per step is about stop_ids / 32000 / 0.9 (1/64 at 450; the JSON reports the measured
mean and max length). Each round draws one key and samples it both ways and compares the
tokens and masks (same_tokens; rows_with_other_tokens counts rows that differ anywhere) and,
where all agree, the log-probs. A last uncompacted call on the first quarter of the prompts
counts the rows that differ from the full batch's by the batch size alone. A compacted call that compiled a new program (a row bucket or
cache length not met before) is run again and timed again. Prints one JSON line: medians over
--repeats rounds, the speed-up, the lengths, the programs and the 1-minute load average before
and after (the machine may be shared).

Run: python benchmarks/bench_sampler_compact.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from opd_jax import models, sampling  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--samples", type=int, default=4)
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--max_new_tokens", type=int, default=512)
  parser.add_argument("--stop_ids", type=int, default=450)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--min_rows", type=int, default=sampling.COMPACT_MIN_ROWS,
                      help="the smallest row bucket (sampling.COMPACT_MIN_ROWS)")
  parser.add_argument("--full_cache", type=int, default=sampling.COMPACT_FULL_CACHE,
                      help="buckets of at most rows / this take the whole budget's cache "
                           "(sampling.COMPACT_FULL_CACHE; a huge value: never)")
  args = parser.parse_args()
  sampling.COMPACT_MIN_ROWS = args.min_rows
  sampling.COMPACT_FULL_CACHE = args.full_cache
  result = {"load_before": round(os.getloadavg()[0], 2), "jax_backend": jax.default_backend(),
            "rows": args.prompts * args.samples, "prompt": args.prompt_len,
            "max_new_tokens": args.max_new_tokens, "stop_ids": args.stop_ids,
            "min_rows": args.min_rows, "full_cache": args.full_cache,
            "rounds": args.repeats}
  config = models.ModelConfig(model_type="qwen2", vocab_size=args.vocab, hidden_size=256,
                              intermediate_size=1024, num_layers=args.layers, num_heads=4,
                              num_kv_heads=2, head_dim=64, qkv_bias=True)
  model = models.init_model(config, seed=1, std=0.02)
  rng = np.random.default_rng(0)
  order = rng.permutation(args.vocab)
  stop, rest = order[:args.stop_ids], order[args.stop_ids:]
  prompts = rng.choice(rest, (args.prompts, args.prompt_len)).astype(np.int32)
  mask = np.ones_like(prompts, bool)
  kw = dict(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=0.9, top_k=0,
            stop_token_ids=tuple(int(i) for i in stop), num_samples=args.samples)

  def call(seed, compact):
    before = sampling.compiled_programs()
    start = time.perf_counter()
    out = jax.block_until_ready(sampling.sample(model, prompts, mask, jax.random.key(seed),
                                                compact=compact, **kw))
    return out, time.perf_counter() - start, sampling.compiled_programs() - before

  first = {}
  for compact in (False, True):                     # compilation, reported separately
    _, first[compact], _ = call(0, compact)
  times = {False: [], True: []}
  lengths, schedules, same_rows = [], [], []
  for seed in range(1, args.repeats + 1):
    plain, t_plain, _ = call(seed, False)
    out, t, compiled = call(seed, True)
    while compiled:                                  # a new bucket or cache length: time again
      out, t, compiled = call(seed, True)
    schedules.append([(d["rows"], d["stop"]) for d in sampling.last_schedule()])
    same = np.all((np.asarray(out.tokens) == np.asarray(plain.tokens))
                  & (np.asarray(out.mask) == np.asarray(plain.mask)), axis=1)
    same_rows.append(same)
    if same.all():
      for name in ("sample_logprobs", "policy_logprobs"):
        np.testing.assert_allclose(getattr(out, name), getattr(plain, name), atol=1e-4)
    times[False].append(t_plain)
    times[True].append(t)
    lengths.append(np.asarray(plain.mask).sum(axis=1))
  # The same rows without compaction in a batch of a quarter of the prompts (their random draws
  # are the same): rows that differ here differ by the batch size alone (matrix products round
  # differently at another row count), not by compaction.
  part = max(1, args.prompts // 4)
  sub = sampling.sample(model, prompts[:part], mask[:part], jax.random.key(args.repeats),
                        compact=False, **kw)
  n = part * args.samples
  result["plain_quarter_batch_rows_with_other_tokens"] = int(np.sum(np.any(
      (np.asarray(sub.tokens) != np.asarray(plain.tokens)[:n])
      | (np.asarray(sub.mask) != np.asarray(plain.mask)[:n]), axis=1)))
  result["plain_quarter_batch_rows"] = n
  lengths = np.concatenate(lengths)
  plain_s, compact_s = (statistics.median(times[c]) for c in (False, True))
  result.update(
      plain_s=round(plain_s, 3), compact_s=round(compact_s, 3),
      speedup=round(plain_s / compact_s, 2),
      speedup_per_round=[round(a / b, 2) for a, b in zip(times[False], times[True])],
      plain_first_s=round(first[False], 2), compact_first_s=round(first[True], 2),
      mean_len=round(float(lengths.mean()), 1), max_len=int(lengths.max()),
      budget_hits=int((lengths == args.max_new_tokens).sum()),
      schedule_last_round=schedules[-1], compiled_programs=sampling.compiled_programs(),
      same_tokens=bool(np.all(same_rows)),
      rows_with_other_tokens=int(np.sum(~np.concatenate(same_rows))),
      load_after=round(os.getloadavg()[0], 2))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
