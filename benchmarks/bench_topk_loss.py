"""Memory and time of the fused top-K loss from hidden states against materialised logits.

Prints one JSON line. Memory is XLA's compiled temporary-buffer size for loss + gradient with
respect to the student's hidden states and unembedding (lowered and compiled only, nothing runs
at that size): (a) `hidden @ unembed` then `losses.topk_reverse_kl` (teacher logits [N, V] are an
argument, not a temporary), (b) `topk.topk_reverse_kl_from_hidden` with the teacher's TopK. The
teacher side compares `teacher_topk_from_hidden` with `lax.top_k` + logsumexp of materialised
logits. Wall times are measured at a smaller size, (a) and (b) interleaved, best of --repeats.

  python benchmarks/bench_topk_loss.py             # ~5 minutes on a 2-core CPU
  python benchmarks/bench_topk_loss.py --repeats=1 --time_vocab=32768   # quicker
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import losses, topk

OPTIONS = {"lsm": True, "unnormalized": False}  # name -> renormalize


def _losses(k, ct, cv, renormalize):
  """(plain, fused) loss + gradient functions of the same arguments' roles."""
  def plain(h, w, teacher_logits, mask):
    f = lambda h, w: losses.topk_reverse_kl(h @ w, teacher_logits, mask, k=k,
                                            renormalize=renormalize)[0]
    return jax.value_and_grad(f, argnums=(0, 1))(h, w)

  def fused(h, w, teacher, mask):
    f = lambda h, w: topk.topk_reverse_kl_from_hidden(
        h, w, teacher, mask, renormalize=renormalize, chunk_tokens=ct, chunk_vocab=cv)[0]
    return jax.value_and_grad(f, argnums=(0, 1))(h, w)

  return jax.jit(plain), jax.jit(fused)


def _teachers(k, ct, cv):
  def plain(h, w):
    logits = h @ w
    vals, idx = jax.lax.top_k(logits, k)
    return topk.TopK(idx, vals, jax.nn.logsumexp(logits, axis=-1))

  fused = lambda h, w: topk.teacher_topk_from_hidden(h, w, k=k, chunk_tokens=ct, chunk_vocab=cv)
  return jax.jit(plain), jax.jit(fused)


def _memory(fn, *args):
  analysis = fn.lower(*args).compile().memory_analysis()
  return {"temp_bytes": int(analysis.temp_size_in_bytes),
          "output_bytes": int(analysis.output_size_in_bytes)}


def _specs(n, d, v, k):
  s = jax.ShapeDtypeStruct
  f32 = jnp.float32
  teacher = topk.TopK(s((n, k), jnp.int32), s((n, k), f32), s((n,), f32))
  return dict(h=s((n, d), f32), w=s((d, v), f32), logits=s((n, v), f32), teacher=teacher,
              mask=s((n,), bool))


def _best_times(fns, repeats):
  """Best wall time of each (name, thunk), calls interleaved so that load affects all alike."""
  for _, thunk in fns:
    jax.block_until_ready(thunk())  # compile and warm up
  best = {name: float("inf") for name, _ in fns}
  for _ in range(repeats):
    for name, thunk in fns:
      t0 = time.perf_counter()
      jax.block_until_ready(thunk())
      best[name] = min(best[name], time.perf_counter() - t0)
  return best


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768])
  p.add_argument("--dim", type=int, default=1024)
  p.add_argument("--vocab", type=int, default=151936)
  p.add_argument("--k", type=int, default=32)
  p.add_argument("--chunk_tokens", type=int, default=1024)
  p.add_argument("--chunk_vocab", type=int, default=8192)
  p.add_argument("--time_tokens", type=int, default=1024)
  p.add_argument("--time_dim", type=int, default=512)
  p.add_argument("--time_vocab", type=int, default=151936)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  k, ct, cv = a.k, a.chunk_tokens, a.chunk_vocab
  out = {"benchmark": "topk_loss", "backend": jax.default_backend(),
         "device": jax.devices()[0].device_kind, "dim": a.dim, "vocab": a.vocab, "k": k,
         "chunk_tokens": ct, "chunk_vocab": cv, "dxv_floor_bytes": a.dim * a.vocab * 4}

  # ---- memory: compiled temporaries, nothing executed ----
  mem = {}
  for name, renorm in OPTIONS.items():
    plain, fused = _losses(k, ct, cv, renorm)
    rows = {}
    for n in a.tokens:
      s = _specs(n, a.dim, a.vocab, k)
      rows[str(n)] = {"plain": _memory(plain, s["h"], s["w"], s["logits"], s["mask"]),
                      "fused": _memory(fused, s["h"], s["w"], s["teacher"], s["mask"])}
    n0, n1 = str(a.tokens[0]), str(a.tokens[-1])
    rows["plain_over_fused_temp"] = (rows[n0]["plain"]["temp_bytes"]
                                     / rows[n0]["fused"]["temp_bytes"])
    rows["fused_temp_growth"] = (rows[n1]["fused"]["temp_bytes"]
                                 / rows[n0]["fused"]["temp_bytes"])
    mem[name] = rows
  plain_t, fused_t = _teachers(k, ct, cv)
  teacher_mem = {}
  for n in a.tokens:
    s = _specs(n, a.dim, a.vocab, k)
    teacher_mem[str(n)] = {"plain": _memory(plain_t, s["h"], s["w"]),
                           "fused": _memory(fused_t, s["h"], s["w"])}
  n0 = str(a.tokens[0])
  teacher_mem["plain_over_fused_temp"] = (teacher_mem[n0]["plain"]["temp_bytes"]
                                          / teacher_mem[n0]["fused"]["temp_bytes"])
  out["memory"] = mem
  out["teacher_memory"] = teacher_mem

  # ---- wall time at a size this machine runs in seconds ----
  n, d, v = a.time_tokens, a.time_dim, a.time_vocab
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)) * (3.0 / np.sqrt(d)), jnp.float32)
  h_t = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  w_t = jnp.asarray(rng.normal(size=(d, v)) * (4.0 / np.sqrt(d)), jnp.float32)
  mask = jnp.asarray(rng.random(n) < 0.9)
  teacher_logits = jax.jit(jnp.matmul)(h_t, w_t)
  teacher = fused_t(h_t, w_t)
  timing = {"tokens": n, "dim": d, "vocab": v, "repeats": a.repeats}
  for name, renorm in OPTIONS.items():
    plain, fused = _losses(k, ct, cv, renorm)
    best = _best_times([("plain_s", lambda: plain(h, w, teacher_logits, mask)),
                        ("fused_s", lambda: fused(h, w, teacher, mask))], a.repeats)
    timing[name] = dict(best, fused_over_plain=best["fused_s"] / best["plain_s"])
  best = _best_times([("plain_s", lambda: plain_t(h_t, w_t)),
                      ("fused_s", lambda: fused_t(h_t, w_t))], a.repeats)
  timing["teacher"] = dict(best, fused_over_plain=best["fused_s"] / best["plain_s"])
  out["time"] = timing
  print(json.dumps(out))


if __name__ == "__main__":
  main()
