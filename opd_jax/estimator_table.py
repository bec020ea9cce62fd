"""Estimator comparison table: loss, teacher mass, gradient norm and time per call over K."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from opd_jax import losses


@dataclasses.dataclass(frozen=True)
class TableSettings:
  seed: int
  batch: int
  length: int
  vocab: int
  teacher_scale: float
  student_noise: float
  ks: tuple[int, ...]
  repeats: int

  @classmethod
  def from_config(cls, config) -> "TableSettings":
    return cls(**{f.name: (tuple(config[f.name]) if f.name == "ks" else config[f.name])
                  for f in dataclasses.fields(cls)})


def make_pair(s: TableSettings):
  """A peaked random teacher, a noisy student, and tokens sampled from the student."""
  k1, k2, k3 = jax.random.split(jax.random.key(s.seed), 3)
  shape = (s.batch, s.length, s.vocab)
  teacher = jax.random.normal(k1, shape) * s.teacher_scale
  student = teacher + jax.random.normal(k2, shape) * s.student_noise
  tokens = jax.random.categorical(k3, student)
  mask = jnp.ones(shape[:2], bool).at[:, -s.length // 4:].set(False)  # ragged-length stand-in
  return student, teacher, tokens, mask


def estimators(k: int) -> dict[str, Callable]:
  """name -> f(student_logits, teacher_logits, tokens, mask) -> (loss, aux)."""
  def topk(**kw):
    return lambda s, t, y, m: losses.topk_reverse_kl(s, t, m, k=k, sampled_tokens=y, **kw)

  def sampled(gamma):
    def f(s, t, y, m):
      return losses.sampled_token_opd(losses.token_logprobs(s, y), losses.token_logprobs(t, y),
                                      m, gamma=gamma)
    return f

  return {
      "full reverse KL (Eq. 4)": lambda s, t, y, m: losses.full_reverse_kl(s, t, m),
      "LSM: teacher top-K, renorm": topk(),
      "teacher top-K, no renorm": topk(renormalize=False),
      "student top-K + y, renorm": topk(support="student+sampled"),
      "teacher top-K + y, renorm": topk(support="teacher+sampled"),
      "student head + EMA-PG tail": topk(support="student", renormalize=False, tail="ema_pg"),
      "teacher head + EMA-PG tail": topk(renormalize=False, tail="ema_pg"),
      "sampled-token OPD, gamma=0": sampled(0.0),
      "sampled-token OPD, gamma=1": sampled(1.0),
  }


def _measure(fn: Callable, args, repeats: int) -> tuple[float, dict, float, float]:
  step = jax.jit(jax.value_and_grad(fn, has_aux=True))
  (loss, aux), grad = jax.block_until_ready(step(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(step(*args))
  per_call = (time.perf_counter() - start) / max(repeats, 1)
  return float(loss), aux, float(jnp.linalg.norm(grad)), per_call


def compare(s: TableSettings) -> list[dict]:
  """Rows of the comparison table (one per K and estimator)."""
  args = make_pair(s)
  rows = []
  ks = [k for k in s.ks if k <= s.vocab] + [s.vocab]
  for k in ks:
    for name, fn in estimators(k).items():
      if k != ks[0] and name.startswith(("full", "sampled")):
        continue  # K-independent: shown once
      loss, aux, gnorm, sec = _measure(fn, args, s.repeats)
      mass = aux.get("kl/teacher_mass")
      rows.append(dict(k="-" if name.startswith(("full", "sampled")) else str(k), estimator=name,
                       loss=loss, teacher_mass=None if mass is None else float(mass),
                       grad_norm=gnorm, ms_per_call=1e3 * sec))
  return rows


def format_table(rows: list[dict]) -> str:
  head = f"{'K':>5}  {'estimator':<28} {'loss':>10} {'teacher mass':>13} {'grad norm':>10} {'ms/call':>8}"
  lines = [head, "-" * len(head)]
  for r in rows:
    mass = "-" if r["teacher_mass"] is None else f"{r['teacher_mass']:.4f}"
    lines.append(f"{r['k']:>5}  {r['estimator']:<28} {r['loss']:>10.4f} {mass:>13} "
                 f"{r['grad_norm']:>10.3e} {r['ms_per_call']:>8.2f}")
  return "\n".join(lines)


def run(config) -> list[dict]:
  s = TableSettings.from_config(config)
  print(f"Estimators on a random teacher/student pair: B={s.batch} T={s.length} V={s.vocab} "
        f"({jax.devices()[0].platform}); value_and_grad w.r.t. student logits, jitted; "
        f"gradient norm of the token-mean loss.", flush=True)
  rows = compare(s)
  print(format_table(rows), flush=True)
  return rows
