"""Compile time of the trainer's update step against decoder depth, on CPU (one JSON line).

The update (`opd_jax.steps.make_update`: mini-batched AdamW over a full causal pass, lsm loss) is
lowered and compiled for abstract shapes only (nothing is allocated or run) for a small-width
decoder of each depth. With the layers in one scan the program, and so the compile time, should
not grow with depth (target: 28 layers <= 1.5 x 4 layers).

  python benchmarks/bench_compile.py                       # 4 and 28 layers, ~1 min on 2 cores
  python benchmarks/bench_compile.py --layers=4,28 --remat=full
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from opd_jax import models, settings, steps  # noqa: E402


def _update_inputs(rows: int, prompt: int, response: int, k: int) -> dict:
  """Abstract arrays of one lsm update batch (what the trainer passes after scoring)."""
  s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  return {"prompt": s((rows, prompt), "int32"), "prompt_mask": s((rows, prompt), "bool"),
          "response": s((rows, response), "int32"), "loss_mask": s((rows, response), "bool"),
          "behavior_logprobs": s((rows, response), "float32"),
          "t_indices": s((rows, response, k), "int32"), "t_logits": s((rows, response, k),
                                                                    "float32"),
          "t_lse": s((rows, response), "float32"), "t_sampled": s((rows, response), "float32")}


def compile_seconds(num_layers: int, a: argparse.Namespace) -> dict[str, float]:
  """Seconds to lower and to compile the update of a decoder with `num_layers` layers.

  Wall-clock and this process's CPU time: on a shared machine the CPU time is the steadier one.
  """
  fields = dict(model_type="qwen2", vocab_size=a.vocab, hidden_size=a.hidden,
                intermediate_size=4 * a.hidden, num_layers=num_layers, num_heads=4,
                num_kv_heads=2, head_dim=a.hidden // 4, qkv_bias=True)
  if a.remat != "none":       # (so that the script also measures code without the setting)
    fields["remat"] = a.remat
  config = models.ModelConfig(**fields)
  opt = settings.OptSettings(minibatch_size=a.rows // 2, lr=1e-5, warmup_steps=0,
                             schedule="constant", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                             grad_clip=1.0)
  loss = settings.LossSettings("lsm", k=a.k, support="teacher", renormalize=True, tail="none",
                               tail_weight_clip=None, gamma=0.0, ppo_clip=0.2,
                               advantage_clip=None, chunk_tokens=1024, chunk_vocab=8192)
  shapes = steps.Shapes(vocab=a.vocab, k=a.k, mesh=None)
  _, params = steps.split_abstract(config)
  state = steps.abstract_state(params, opt, 100)
  batch = _update_inputs(a.rows, a.prompt, a.response, a.k)
  jax.clear_caches()
  update = steps.make_update(config, loss, opt, shapes, 2, 100)
  start, cpu_start = time.perf_counter(), time.process_time()
  lowered = update.lower(state, batch, jax.random.key(0))
  mid = time.perf_counter()
  lowered.compile()
  end, cpu_end = time.perf_counter(), time.process_time()
  return {"lower_s": mid - start, "compile_s": end - mid, "total_s": end - start,
          "total_cpu_s": cpu_end - cpu_start}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", default="4,28", help="comma-separated depths; ratio: last/first")
  parser.add_argument("--hidden", type=int, default=64, help="model width D")
  parser.add_argument("--vocab", type=int, default=512)
  parser.add_argument("--rows", type=int, default=8, help="rollouts in the update batch")
  parser.add_argument("--prompt", type=int, default=32)
  parser.add_argument("--response", type=int, default=32)
  parser.add_argument("--k", type=int, default=8, help="teacher top-K of the lsm loss")
  parser.add_argument("--remat", default="none", help="none | dots | full")
  parser.add_argument("--repeats", type=int, default=2, help="best of this many compiles")
  a = parser.parse_args()
  depths = [int(x) for x in a.layers.split(",")]
  compile_seconds(2, a)      # warm-up: first-use costs (lowering rules, backend) not counted
  results = {}
  for n in depths:
    runs = [compile_seconds(n, a) for _ in range(a.repeats)]
    results[n] = {key: min(r[key] for r in runs) for key in runs[0]}
  first, last = results[depths[0]], results[depths[-1]]
  print(json.dumps({
      "benchmark": "update_compile_time", "backend": jax.default_backend(),
      "hidden": a.hidden, "remat": a.remat, "rows": a.rows,
      "tokens": a.prompt + a.response,
      "seconds": {str(n): {k: round(v, 3) for k, v in r.items()} for n, r in results.items()},
      "ratio_total": round(last["total_s"] / first["total_s"], 3),
      "ratio_compile": round(last["compile_s"] / first["compile_s"], 3),
      "ratio_total_cpu": round(last["total_cpu_s"] / first["total_cpu_s"], 3),
  }))


if __name__ == "__main__":
  main()
