"""Toy variance study (paper App. E): two mirror 1-D tasks, REINFORCE teachers, OPD with ĝ_γ.

Run:      python -m opd_jax.main --config=experiments/toy_variance.py --config.workdir=DIR
Per-step: ... --config.teacher_reward=per_step   (teachers trained on −|s_{t+1} − target| per step)
Smoke:    python -m opd_jax.main --config=experiments/toy_variance.py:smoke --config.workdir=DIR
Short:    ':short' is the shortened study the tests assert the expected result on.
Runtime:  full study (3 seeds x 5 γ x 2,000 iterations, teachers and compilation included)
          56 s measured on a 2-core CPU; short 25-35 s; smoke about 15 s (mostly compilation).
Expected: medians over seeds: late variance rises with γ and γ = 1 is >= 5x γ = 0; the early
          peak of γ = 1 is >= 10x γ = 0; γ = 0 ends within 2x the teachers' distance on both
          tasks; γ = 1 ends no closer than γ = 0. Writes summary.csv, same_params.csv and one PNG
          per seed (variance curves, same-parameter variances, state-visitation heatmaps).
"""

from opd_jax import configs


def get_config(arg=None):
  c = configs.base()
  c.experiment = "toy_variance"
  c.seeds = (42, 43, 2026)           # one student per (seed, γ); teachers are trained per seed
  c.gammas = (0.0, 0.25, 0.5, 0.75, 1.0)  # future-reward coupling of ĝ_γ (Eq. 3)
  c.iterations = 2000                # OPD updates, alternating left (odd) / right (even) task
  c.batch = 64                       # trajectories per update (B of App. E.2)
  c.micro_batches = 8                # M of App. E.2
  c.horizon = 20                     # steps per episode
  c.lr = 1e-3                        # student Adam learning rate
  c.hidden = 64                      # MLP width: 3 -> 64 -> 64 -> 2, 4,546 parameters
  c.std_floor = 0.075                # policy std = std_floor + softplus(raw)
  c.max_step = 0.5                   # policy mean = max_step · tanh(raw)
  c.init_std = 0.1                   # the student's initial std
  c.teacher_reward = "final"         # "final": −|s_T − target|; "per_step": −|s_{t+1} − target|
  c.teacher_iterations = 600         # REINFORCE updates per teacher (batch = c.batch)
  c.teacher_lr = 1e-3                # teacher Adam learning rate
  c.teacher_init_std = 0.75          # the teachers' initial std (exploration)
  c.eval_rollouts = 1024             # rollouts per student and task for distances and heatmaps
  c.same_param_batches = 256         # batches for the variance at shared parameters
  c.late_window = 500                # late_var: median over the last this many iterations
  c.early_window = 200               # early_peak_var: max over the first this many iterations
  c.heatmap_gammas = (0.0, 0.5, 1.0)  # γ values that get state-visitation heatmaps
  c.log_every = 200                  # progress line every this many iterations (0: silent)
  c.figure_dpi = 90                  # resolution of the PNG figures
  if arg == "short":
    c.gammas = (0.0, 0.5, 1.0)
    c.iterations, c.teacher_iterations = 600, 400
    c.late_window, c.early_window = 150, 200
    c.eval_rollouts, c.same_param_batches, c.log_every = 512, 16, 100
  elif arg == "smoke":
    c.seeds, c.gammas, c.heatmap_gammas = (42,), (0.0, 1.0), (0.0, 1.0)
    c.iterations, c.teacher_iterations = 40, 40
    c.late_window, c.early_window = 10, 10
    c.eval_rollouts, c.same_param_batches, c.log_every, c.figure_dpi = 64, 2, 20, 60
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; accepted: 'short', 'smoke' or none")
  return c
