"""Exact bias and variance of OPD gradient estimators on enumerable tabular models.

Run:      python -m opd_jax.main --config=experiments/toy_exact.py --config.workdir=DIR
Smoke:    python -m opd_jax.main --config=experiments/toy_exact.py:smoke --config.workdir=DIR
Runtime:  44 s measured on a 2-core CPU (4^10 = 1,048,576 sequences at T = 10); smoke ~5 s.
Expected: ĝ_1 (sequence level) is unbiased; ĝ_0, the full-vocabulary token-level gradient (same
          expectation as ĝ_0, lower variance) and top-K LSM are biased; the variance of ĝ_γ grows
          with γ and with T, faster for larger γ. Writes exact.csv, exponents.csv, toy_exact.png.
"""

from opd_jax import configs


def get_config(arg=None):
  c = configs.base()
  c.experiment = "toy_exact"
  c.seed = 0                         # draws the random student and teacher tables
  c.vocab = 4                        # V
  c.lengths = tuple(range(2, 11))    # T values; all V^T sequences (up to 4^10) are enumerated
  c.student_order = 1                # student logits depend on the previous token (bigram)
  c.teacher_order = 2                # teacher logits on the previous two (student misspecified)
  c.student_scale = 1.0              # std of the student's random logits
  c.teacher_scale = 2.0              # std of the teacher's random logits (more peaked)
  c.gammas = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)  # γ grid of ĝ_γ
  c.ks = (2, 3)                      # teacher top-K sizes (K < V) of the renormalised LSM
  c.mc_samples = 20000               # Monte-Carlo check of the exact expectations (0: skip)
  if arg == "smoke":
    c.vocab, c.lengths, c.gammas, c.ks, c.mc_samples = 3, (2, 3, 4), (0.0, 0.5, 1.0), (2,), 2000
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; accepted: 'smoke' or none")
  return c
