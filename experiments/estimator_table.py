"""Estimator comparison on a fixed random teacher/student pair (`make estimators`).

Run:      python -m opd_jax.main --config=experiments/estimator_table.py
Smoke:    python -m opd_jax.main --config=experiments/estimator_table.py:smoke
Runtime:  about 30 s on a 2-core CPU (compile included); smoke: a few seconds.
Expected: a table over K in (16, 32, 48, V); renormalised teacher top-K at K = V equals the full
          reverse KL; teacher mass covered grows with K.
"""

from opd_jax import configs


def get_config(arg=None):
  c = configs.base()
  c.experiment = "estimator_table"
  c.seed = 0
  c.batch = 8              # sequences in the batch
  c.length = 64            # tokens per sequence
  c.vocab = 1024           # vocabulary size V
  c.teacher_scale = 4.0    # std of teacher logits (larger = more peaked teacher)
  c.student_noise = 1.5    # std of the student's deviation from the teacher's logits
  c.ks = (16, 32, 48)      # top-K sizes compared; V is always added
  c.repeats = 20           # timed calls per estimator after compilation
  if arg == "smoke":
    c.batch, c.length, c.vocab, c.ks, c.repeats = 2, 8, 64, (16, 32, 48), 2
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; accepted: 'smoke' or none")
  return c
