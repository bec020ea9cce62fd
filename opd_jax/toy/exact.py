"""Exact bias and variance of OPD gradient estimators for tabular autoregressive models.

Student and teacher are stationary n-gram tables (the logits of the next token depend only on
the previous `order` tokens, padded with a BOS symbol), so that one pair of tables defines a
model for every length T and all V^T sequences can be enumerated. Per-sequence gradients of
each estimator come from opd_jax.losses, vmapped over the enumerated sequences; expectations and
variances are then sums weighted by the exact sequence probabilities, in float64.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import losses
from opd_jax.toy import plots

Array = jax.Array

MAX_SEQUENCES = 1 << 20   # enumeration limit on V^T
MAX_TABLE = 1 << 16       # limit on the entries of a table ((V + 1)^order · V)
CHUNK = 1 << 16           # sequences per compiled batch of per-sequence gradients


@dataclasses.dataclass(frozen=True)
class TabularPair:
  """Shapes of a student/teacher pair (hashable: static under jit)."""
  vocab: int = 4            # V
  student_order: int = 1    # the student's next-token logits depend on the last 1 token
  teacher_order: int = 2    # the teacher's on the last 2: the student cannot match it exactly

  def __post_init__(self):
    if self.vocab < 2:
      raise ValueError(f"vocab must be >= 2, got {self.vocab}")
    for name in ("student_order", "teacher_order"):
      order = getattr(self, name)
      if order < 0 or (self.vocab + 1) ** order * self.vocab > MAX_TABLE:
        raise ValueError(f"{name}={order} must be >= 0 with (vocab + 1)^order · vocab <= "
                         f"{MAX_TABLE} table entries (vocab={self.vocab})")

  def table_shape(self, order: int) -> tuple[int, int]:
    return ((self.vocab + 1) ** order, self.vocab)


def init_tables(pair: TabularPair, key: Array, student_scale: float, teacher_scale: float
                ) -> tuple[Array, Array]:
  """Random Gaussian logit tables (student, teacher) with the given standard deviations."""
  ks, kt = jax.random.split(key)
  student = student_scale * jax.random.normal(ks, pair.table_shape(pair.student_order))
  teacher = teacher_scale * jax.random.normal(kt, pair.table_shape(pair.teacher_order))
  return student, teacher


def context_ids(seqs: Array, vocab: int, order: int) -> Array:
  """Row of the order-`order` table used at each position: [N, T] -> [N, T] ints.

  The context of position t is (y_{t-order}, ..., y_{t-1}), with BOS (= vocab) before the start,
  read as a base-(vocab + 1) number.
  """
  n, length = seqs.shape
  padded = jnp.concatenate([jnp.full((n, order), vocab, seqs.dtype), seqs], axis=1)
  ids = jnp.zeros((n, length), jnp.int32)
  for j in range(1, order + 1):  # static: order is a small Python int
    ids = ids + padded[:, order - j:order - j + length].astype(jnp.int32) * (vocab + 1) ** (j - 1)
  return ids


def table_logits(table: Array, seqs: Array, vocab: int, order: int) -> Array:
  """Teacher-forced logits [N, T, V] of a table model on sequences [N, T]."""
  return table[context_ids(seqs, vocab, order)]


def all_sequences(vocab: int, length: int) -> np.ndarray:
  """Every sequence of `length` tokens over `vocab` symbols, [vocab^length, length] int32."""
  if vocab ** length > MAX_SEQUENCES:
    raise ValueError(f"vocab^length = {vocab}^{length} exceeds the enumeration limit "
                     f"{MAX_SEQUENCES}; use a smaller vocab or length")
  digits = np.arange(vocab ** length)[:, None] // vocab ** np.arange(length - 1, -1, -1)
  return (digits % vocab).astype(np.int32)


def objective(pair: TabularPair, student: Array, teacher: Array, seqs: Array) -> Array:
  """J(θ) = KL(π_θ ‖ q) = Σ_y π_θ(y) Σ_t log(π_θ(y_t|c_t) / q(y_t|c_t)), summed over `seqs`.

  Written with jax.nn.log_softmax (not opd_jax.losses, which computes in float32) so that it runs
  in float64 under `jax.enable_x64`; `seqs` must be every sequence of its length.
  """
  def logp(table, order):
    logits = table_logits(table, seqs, pair.vocab, order)
    return jnp.take_along_axis(jax.nn.log_softmax(logits), seqs[..., None], axis=-1)[..., 0]

  lp = logp(student, pair.student_order)
  ratio = jnp.sum(lp - logp(teacher, pair.teacher_order), axis=-1)
  return jnp.sum(jnp.exp(jnp.sum(lp, axis=-1)) * ratio)


def exact_reference(pair: TabularPair, student: Array, teacher: Array, length: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Sequence probabilities π_θ(y) [V^T] and ∇_θ J [θ.size], both in float64.

  ∇J comes from automatic differentiation of the enumerated objective: it does not use the
  reward-to-go identity that the estimators rely on.
  """
  with jax.enable_x64(True):
    seqs = jnp.asarray(all_sequences(pair.vocab, length))
    st = jnp.asarray(np.asarray(student), jnp.float64)
    te = jnp.asarray(np.asarray(teacher), jnp.float64)
    logits = table_logits(st, seqs, pair.vocab, pair.student_order)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), seqs[..., None], axis=-1)[..., 0]
    probs = np.exp(np.asarray(jnp.sum(logp, axis=-1), np.float64))
    grad = jax.grad(objective, argnums=1)(pair, st, te, seqs)
    return probs, np.asarray(grad, np.float64).ravel()


def estimator_names(gammas, ks) -> list[str]:
  return ([f"gamma={g:g}" for g in gammas] + ["full_vocab"] + [f"lsm_k={k}" for k in ks])


@jax.jit(static_argnames=("pair", "ks"))
def per_sequence_gradients(pair: TabularPair, student: Array, teacher: Array, seqs: Array,
                           gammas: Array, ks: tuple[int, ...]) -> Array:
  """Each estimator's gradient w.r.t. the student table, for every sequence taken alone.

  Estimators (batch of one sequence, summed over its T tokens): ĝ_γ of Eq. 3 for each γ (through
  losses.sampled_token_opd), the full-vocabulary token-level gradient Σ_t ∇ KL(π(·|c_t) ‖ q(·|c_t))
  (losses.full_reverse_kl) and the renormalised teacher top-K LSM gradient (losses.topk_reverse_kl)
  for each K. The losses are token-means, hence the factor T.

  Args:
    pair: shapes.
    student: [(V+1)^n, V] student logit table (the parameters θ).
    teacher: teacher logit table.
    seqs: [N, T] sequences.
    gammas: [G] γ grid.
    ks: top-K sizes, each < V.

  Returns:
    [E, N, P] gradients, E = G + 1 + len(ks) estimators in `estimator_names` order, P = θ.size.
  """
  length = seqs.shape[1]
  mask = jnp.ones((1, length), bool)

  def logits(table, y, order):
    return table_logits(table, y[None], pair.vocab, order)

  def one(y):
    t_logits = logits(teacher, y, pair.teacher_order)
    logq = losses.token_logprobs(t_logits, y[None])

    def sampled(theta, gamma):
      logp = losses.token_logprobs(logits(theta, y, pair.student_order), y[None])
      return length * losses.sampled_token_opd(logp, logq, mask, gamma=gamma)[0]

    def full(theta):
      return length * losses.full_reverse_kl(logits(theta, y, pair.student_order), t_logits,
                                             mask)[0]

    def lsm(theta, k):
      return length * losses.topk_reverse_kl(logits(theta, y, pair.student_order), t_logits,
                                             mask, k=k)[0]

    grads = [jax.vmap(jax.grad(sampled), in_axes=(None, 0))(student, gammas),
             jax.grad(full)(student)[None]]
    grads += [jax.grad(lsm)(student, k)[None] for k in ks]
    return jnp.concatenate([g.reshape(g.shape[0], -1) for g in grads], axis=0)

  return jnp.swapaxes(jax.vmap(one)(seqs), 0, 1)


@jax.jit(static_argnames=("pair", "n", "length"))
def sample_sequences(pair: TabularPair, student: Array, key: Array, n: int, length: int
                     ) -> Array:
  """Ancestral samples from the student, [n, length] int32 (for Monte-Carlo checks)."""
  order, vocab = pair.student_order, pair.vocab
  powers = jnp.asarray([(vocab + 1) ** (order - 1 - i) for i in range(order)], jnp.int32)

  def step(history, k):
    ctx = jnp.sum(history * powers[None, :], axis=-1) if order else jnp.zeros((n,), jnp.int32)
    token = jax.random.categorical(k, student[ctx]).astype(jnp.int32)
    history = jnp.concatenate([history[:, 1:], token[:, None]], axis=1) if order else history
    return history, token

  history = jnp.full((n, order), vocab, jnp.int32)
  _, tokens = jax.lax.scan(step, history, jax.random.split(key, length))
  return tokens.T


@dataclasses.dataclass(frozen=True)
class ExactSettings:
  """Settings of the exact study, converted once from the ConfigDict."""
  seed: int
  pair: TabularPair
  lengths: tuple[int, ...]
  gammas: tuple[float, ...]
  ks: tuple[int, ...]
  student_scale: float
  teacher_scale: float
  mc_samples: int

  def __post_init__(self):
    if not self.lengths or min(self.lengths) < 1:
      raise ValueError(f"lengths must be a non-empty tuple of ints >= 1, got {self.lengths}")
    too_long = [t for t in self.lengths if self.pair.vocab ** t > MAX_SEQUENCES]
    if too_long:
      raise ValueError(f"lengths {too_long} give more than {MAX_SEQUENCES} sequences at "
                       f"vocab={self.pair.vocab}; accepted: vocab^T <= {MAX_SEQUENCES}")
    if any(not 0.0 <= g <= 1.0 for g in self.gammas):
      raise ValueError(f"gammas must lie in [0, 1], got {self.gammas}")
    if any(not 1 <= k < self.pair.vocab for k in self.ks):
      raise ValueError(f"ks must satisfy 1 <= K < vocab = {self.pair.vocab}, got {self.ks}")

  @classmethod
  def from_config(cls, c) -> "ExactSettings":
    return cls(seed=int(c.seed),
               pair=TabularPair(vocab=c.vocab, student_order=c.student_order,
                                teacher_order=c.teacher_order),
               lengths=tuple(int(t) for t in c.lengths), gammas=tuple(float(g) for g in c.gammas),
               ks=tuple(int(k) for k in c.ks), student_scale=float(c.student_scale),
               teacher_scale=float(c.teacher_scale), mc_samples=int(c.mc_samples))


def exact_moments(pair: TabularPair, student: Array, teacher: Array, length: int,
                  gammas: tuple[float, ...], ks: tuple[int, ...]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Exact ∇J and, per estimator, E[g] and tr Cov[g] under the student, by enumeration.

  Args:
    pair: shapes.
    student: student logit table θ.
    teacher: teacher logit table.
    length: T (all V^T sequences are enumerated).
    gammas: γ grid of ĝ_γ.
    ks: top-K sizes of the LSM estimator.

  Returns:
    (∇J [P], E[g] [E, P], tr Cov[g] [E]) in float64, estimators in `estimator_names` order.
  """
  seqs = all_sequences(pair.vocab, length)
  weights, grad_j = exact_reference(pair, student, teacher, length)
  gammas = jnp.asarray(gammas, jnp.float32)
  # Chunks of sequences bound the memory; sums are shifted by the first chunk's mean so that
  # Var = E‖g − c‖² − ‖E[g] − c‖² does not cancel catastrophically.
  shift = shifted_sum = shifted_sq = None
  for lo in range(0, len(seqs), CHUNK):
    chunk, w = seqs[lo:lo + CHUNK], weights[lo:lo + CHUNK]
    if len(chunk) < CHUNK and lo:  # pad the last chunk to the compiled shape, with weight 0
      chunk = np.concatenate([chunk, np.zeros((CHUNK - len(chunk), length), chunk.dtype)])
      w = np.concatenate([w, np.zeros(CHUNK - len(w))])
    g = np.asarray(per_sequence_gradients(pair, student, teacher, jnp.asarray(chunk), gammas,
                                          ks), np.float64)
    if shift is None:
      shift = np.einsum("n,enp->ep", w, g) / w.sum()
      shifted_sum, shifted_sq = np.zeros_like(shift), np.zeros(len(shift))
    centred = g - shift[:, None, :]
    shifted_sum += np.einsum("n,enp->ep", w, centred)
    shifted_sq += np.einsum("n,en->e", w, np.sum(np.square(centred), axis=-1))
  means = shift + shifted_sum
  return grad_j, means, shifted_sq - np.sum(np.square(shifted_sum), axis=-1)


def exact_rows(s: ExactSettings, student: Array, teacher: Array, length: int) -> list[dict]:
  """Exact bias ‖E[ĝ] − ∇J‖ and variance tr Cov[ĝ] of every estimator at one length T."""
  grad_j, means, variances = exact_moments(s.pair, student, teacher, length, s.gammas, s.ks)
  norm = float(np.linalg.norm(grad_j))
  rows = []
  for name, mean, var in zip(estimator_names(s.gammas, s.ks), means, variances):
    bias = float(np.linalg.norm(mean - grad_j))
    rows.append(dict(T=length, estimator=name, bias=bias, rel_bias=bias / max(norm, 1e-30),
                     variance=float(var), grad_norm=norm))
  return rows


def fit_exponent(lengths, values) -> float:
  """Least-squares slope of log(value) against log(T); NaN when fewer than 2 positive values."""
  x = np.log(np.asarray(lengths, np.float64))
  y = np.asarray(values, np.float64)
  ok = y > 0
  if ok.sum() < 2:
    return float("nan")
  return float(np.polyfit(x[ok], np.log(y[ok]), 1)[0])


def exponents(rows: list[dict], rel_tol: float = 1e-4, tail: int = 4) -> list[dict]:
  """Growth exponents in T of the variance and of the bias, per estimator.

  Each is fitted over every T and over the largest `tail` values of T (closer to the asymptotic
  rate). A bias exponent is NaN for an unbiased estimator (relative bias below `rel_tol` at
  every T), e.g. γ = 1.
  """
  out = []
  for name in dict.fromkeys(r["estimator"] for r in rows):
    sub = sorted((r for r in rows if r["estimator"] == name), key=lambda r: r["T"])
    biased = max(r["rel_bias"] for r in sub) > rel_tol
    fit = {}
    for what in ("variance", "bias"):
      for suffix, part in (("", sub), ("_tail", sub[-tail:])):
        values = [r[what] for r in part] if (what == "variance" or biased) else []
        fit[f"{what}_exponent{suffix}"] = (fit_exponent([r["T"] for r in part], values)
                                           if values else float("nan"))
    out.append(dict(estimator=name, **fit))
  return out


def monte_carlo_check(s: ExactSettings, student: Array, teacher: Array, length: int
                      ) -> dict[str, float]:
  """Largest |z| = |MC mean − exact mean| / standard error over the coordinates, per estimator."""
  _, means, _ = exact_moments(s.pair, student, teacher, length, s.gammas, s.ks)
  samples = sample_sequences(s.pair, student, jax.random.key(s.seed + 1), s.mc_samples, length)
  mc = np.asarray(per_sequence_gradients(s.pair, student, teacher, samples,
                                         jnp.asarray(s.gammas, jnp.float32), s.ks), np.float64)
  out = {}
  for name, mean, g_mc in zip(estimator_names(s.gammas, s.ks), means, mc):
    se = g_mc.std(axis=0, ddof=1) / np.sqrt(g_mc.shape[0])
    live = se > 0
    out[name] = float(np.max(np.abs(g_mc.mean(axis=0) - mean)[live] / se[live]))
  return out


def format_tables(rows: list[dict], fits: list[dict]) -> str:
  names = list(dict.fromkeys(r["estimator"] for r in rows))
  lengths = sorted({r["T"] for r in rows})
  by = {(r["T"], r["estimator"]): r for r in rows}
  lines = []
  for what in ("bias", "variance"):
    head = f"{what + ' ‖E[g]−∇J‖' if what == 'bias' else 'variance tr Cov[g]':<22}" + "".join(
        f"{'T=' + str(t):>11}" for t in lengths)
    lines += [head, "-" * len(head)]
    for name in names:
      lines.append(f"{name:<22}" + "".join(f"{by[t, name][what]:>11.3e}" for t in lengths))
    lines.append("")
  lines.append(f"growth exponents in T (all T | largest {min(4, len(lengths))} T); the paper's "
               "worst-case bounds: Var O(T^2) token level, O(T^4) sequence level")
  lines.append(f"{'estimator':<22}{'var exponent':>20}{'bias exponent':>24}")

  def pair(a, b):
    return "unbiased" if np.isnan(a) else f"{a:.2f} | {b:.2f}"

  for f in fits:
    lines.append(f"{f['estimator']:<22}"
                 f"{pair(f['variance_exponent'], f['variance_exponent_tail']):>20}"
                 f"{pair(f['bias_exponent'], f['bias_exponent_tail']):>24}")
  return "\n".join(lines)


def run(config) -> tuple[list[dict], list[dict]]:
  """Runner of experiments/toy_exact.py: tables, CSVs and the log-log figure in the workdir."""
  s = ExactSettings.from_config(config)
  start = time.perf_counter()
  student, teacher = init_tables(s.pair, jax.random.key(s.seed), s.student_scale,
                                 s.teacher_scale)
  print(f"Exact study: V={s.pair.vocab}, student order {s.pair.student_order}, teacher order "
        f"{s.pair.teacher_order}, {student.size} student parameters, T in {s.lengths}", flush=True)
  rows = []
  for length in s.lengths:
    rows += exact_rows(s, student, teacher, length)
    print(f"  T={length}: {s.pair.vocab ** length} sequences enumerated "
          f"({time.perf_counter() - start:.1f} s)", flush=True)
  fits = exponents(rows)
  print(format_tables(rows, fits), flush=True)
  if s.mc_samples:
    z = monte_carlo_check(s, student, teacher, s.lengths[0])
    print(f"Monte-Carlo check at T={s.lengths[0]} ({s.mc_samples} samples): largest "
          f"|MC mean − exact mean| / standard error = {max(z.values()):.2f}", flush=True)
  if config.workdir:
    os.makedirs(config.workdir, exist_ok=True)
    plots.write_csv(os.path.join(config.workdir, "exact.csv"), rows)
    plots.write_csv(os.path.join(config.workdir, "exponents.csv"), fits)
    path = os.path.join(config.workdir, "toy_exact.png")
    plots.exact_figure(path, rows, fits)
    print(f"wrote exact.csv, exponents.csv, toy_exact.png to {config.workdir}", flush=True)
  print(f"total {time.perf_counter() - start:.1f} s", flush=True)
  return rows, fits

