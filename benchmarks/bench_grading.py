"""Throughput of the batch math grader on 10,000 generated responses; prints one JSON line.

A deterministic generator (seeded) mixes easy exact matches (about half), symbolic equivalences
(fractions vs decimals, radicals, polynomials in another form, tuples and sets reordered), non-
matches, responses without an answer, and a few adversarial answers (a power tower that makes
sympy hang until the time limit, unbalanced braces, a 10,000-character answer). Each response is
a short text ending in `\\boxed{...}`, so extraction is timed too. The generator knows which
pairs are equivalent; `label_mismatches` counts the grader's disagreements with it. `rules`
counts the items each rule decided (exact, numeric, math-verify, timeout, ...).

  python benchmarks/bench_grading.py                 # about 10 s on a 2-core CPU
  python benchmarks/bench_grading.py --n=2000 --workers=4 --timeout_s=2
"""

import argparse
import collections
import json
import random

from opd_jax.data import math_grading


def _pair(rng: random.Random) -> tuple[str, str, bool]:
  """(response, reference, equivalent) drawn from the mix."""
  u = rng.random()
  a, b = rng.randint(1, 60), rng.randint(2, 60)
  if u < 0.45:  # easy: the same integer or expression, possibly dressed differently
    ref = str(rng.randint(0, 999))
    pred = rng.choice([ref, f"{ref}.0", f"${ref}$", f"x = {ref}", f"{ref}\\%"])
    return f"So we get \\boxed{{{pred}}}.", ref, True
  if u < 0.65:  # symbolic equivalences
    kind = rng.randrange(5)
    if kind == 0:
      return (f"\\boxed{{{a / 8:g}}}", f"\\frac{{{a}}}{{8}}", True)
    if kind == 1:
      return (f"\\boxed{{{2 * a}\\sqrt{{2}}}}", f"\\sqrt{{{8 * a * a}}}", True)
    if kind == 2:
      return (f"\\boxed{{x^2 + {a + b}x + {a * b}}}", f"(x+{a})(x+{b})", True)
    if kind == 3:
      return (f"\\boxed{{\\left({b}, \\frac{{\\pi}}{{{a}}}\\right)}}",
              f"({b}, \\pi/{a})", True)
    return (f"\\boxed{{\\{{{b}, {a}, -1\\}}}}", f"\\{{-1, {a}, {b}\\}}", True)
  if u < 0.93:  # non-matches
    kind = rng.randrange(5)
    if kind == 0:
      return f"\\boxed{{{a + 1}}}", str(a), False
    if kind == 1:
      return f"\\boxed{{\\frac{{{a}}}{{{b}}}}}", f"{a / b + 0.01:.4f}", False
    if kind == 2:
      return f"\\boxed{{x + {a}}}", f"x - {a}", False
    if kind == 3:
      return f"\\boxed{{({a}, {a + b})}}", f"({a + b}, {a})", False
    return f"\\boxed{{{a}\\sqrt{{3}}}}", f"{a}\\sqrt{{2}}", False
  if u < 0.9995:  # no answer
    return "I could not finish the computation.", str(a), False
  kind = rng.randrange(3)  # adversarial
  if kind == 0:
    return "\\boxed{9^{9^{9^{9}}}}", "2", False
  if kind == 1:
    return "\\boxed{\\frac{1}{2", "0.5", False
  return "\\boxed{" + "1+" * 5000 + "1}", "10001", False


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--n", type=int, default=10_000)
  parser.add_argument("--workers", type=int, default=None)
  parser.add_argument("--timeout_s", type=float, default=5.0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  responses, references, labels = zip(*(_pair(rng) for _ in range(args.n)))
  report = math_grading.grade(responses, references, timeout_s=args.timeout_s,
                              workers=args.workers)
  print(json.dumps({
      "answers": len(responses),
      "seconds": round(report.seconds, 3),
      "answers_per_s": round(len(responses) / report.seconds, 1),
      "timeouts": report.num_timeouts,
      "workers": report.workers,
      "symbolic_comparisons": report.num_symbolic,
      "no_answer": report.num_no_answer,
      "errors": report.num_errors,
      "accuracy": round(report.accuracy, 4),
      "label_mismatches": sum(c != l for c, l in zip(report.correct, labels)),
      "rules": dict(collections.Counter(report.rules)),
  }))


if __name__ == "__main__":
  main()
