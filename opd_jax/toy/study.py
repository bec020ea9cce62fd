"""Runner of the toy variance study: teachers, OPD students, evaluation, summary, figures."""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.toy import env, plots, policy, teachers, variance

SUMMARY_COLUMNS = ("gamma", "seed", "late_var", "early_peak_var", "final_dist_left",
                   "final_dist_right", "teacher_dist_left", "teacher_dist_right",
                   "same_var_init", "same_var_trained")


@dataclasses.dataclass(frozen=True)
class ToyStudySettings:
  """Everything the toy study needs, converted once from the ConfigDict."""
  seeds: tuple[int, ...]
  gammas: tuple[float, ...]
  study: variance.StudySettings
  teacher: teachers.TeacherSettings
  eval_rollouts: int
  same_param_batches: int
  late_window: int
  early_window: int
  heatmap_gammas: tuple[float, ...]
  figure_dpi: int

  def __post_init__(self):
    if not self.seeds or not self.gammas:
      raise ValueError(f"seeds and gammas must be non-empty, got {self.seeds}, {self.gammas}")
    if any(not 0.0 <= g <= 1.0 for g in self.gammas):
      raise ValueError(f"gammas must lie in [0, 1], got {self.gammas}")
    missing = [g for g in self.heatmap_gammas if g not in self.gammas]
    if missing:
      raise ValueError(f"heatmap_gammas {missing} are not in gammas {self.gammas}")
    for name in ("late_window", "early_window"):
      if not 1 <= getattr(self, name) <= self.study.iterations:
        raise ValueError(f"{name}={getattr(self, name)} must be in [1, iterations="
                         f"{self.study.iterations}]")

  @classmethod
  def from_config(cls, c) -> "ToyStudySettings":
    spec = policy.PolicySpec(hidden=c.hidden, std_floor=c.std_floor, max_step=c.max_step,
                             init_std=c.init_std)
    return cls(
        seeds=tuple(int(x) for x in c.seeds), gammas=tuple(float(g) for g in c.gammas),
        study=variance.StudySettings(iterations=c.iterations, batch=c.batch,
                                     micro_batches=c.micro_batches, lr=c.lr, horizon=c.horizon,
                                     spec=spec, log_every=c.log_every),
        teacher=teachers.TeacherSettings(
            reward=c.teacher_reward, iterations=c.teacher_iterations, batch=c.batch,
            lr=c.teacher_lr, horizon=c.horizon,
            spec=dataclasses.replace(spec, init_std=c.teacher_init_std)),
        eval_rollouts=c.eval_rollouts, same_param_batches=c.same_param_batches,
        late_window=c.late_window, early_window=c.early_window,
        heatmap_gammas=tuple(float(g) for g in c.heatmap_gammas), figure_dpi=c.figure_dpi)


@dataclasses.dataclass
class StudyResult:
  """What the study measured, as numpy arrays (S seeds, G γ values, I iterations)."""
  settings: ToyStudySettings
  var: np.ndarray                # [I, S, G] App. E.2 variance per iteration (odd: left task)
  batch_dist: np.ndarray         # [I, S, G] mean |s_T − target| of each training batch
  kl: np.ndarray                 # [I, S, G] sequence-level KL estimate of each batch
  positions: np.ndarray          # [S, G, 2, N, T + 1] final students' rollouts
  teacher_positions: np.ndarray  # [S, 2, N, T + 1]
  same_var: np.ndarray           # [2, S, 2, G] points (init, trained), seed, task, γ
  point_names: tuple[str, ...]
  seconds: dict


def run_study(s: ToyStudySettings) -> StudyResult:
  """Trains the teachers, distils every (seed, γ) student, and evaluates them."""
  seconds = {}
  start = time.perf_counter()
  keys = jax.vmap(jax.random.key)(jnp.asarray(s.seeds))
  teacher_keys = jax.vmap(lambda k: jax.random.fold_in(k, 100))(keys)
  eval_keys = jax.vmap(lambda k: jax.random.fold_in(k, 200))(keys)
  print(f"[1/3] REINFORCE teachers ({s.teacher.reward} reward, {s.teacher.iterations} "
        f"iterations) for seeds {s.seeds} x tasks {env.TASK_NAMES}", flush=True)
  teacher_params, _ = jax.block_until_ready(teachers.train_teachers(s.teacher, teacher_keys))
  seconds["teachers"] = time.perf_counter() - start
  n_params = policy.num_params(policy.init_params(jax.random.key(0), s.study.spec))
  print(f"      done in {seconds['teachers']:.1f} s\n[2/3] OPD students ({n_params} parameters): "
        f"{len(s.seeds)} seeds x γ {s.gammas}, {s.study.iterations} iterations, one program",
        flush=True)
  t0 = time.perf_counter()
  params0, params, metrics = variance.train_students(s.study, s.gammas, keys, teacher_params)
  metrics = jax.block_until_ready(metrics)
  seconds["students"] = time.perf_counter() - t0
  print(f"      done in {seconds['students']:.1f} s\n[3/3] evaluation: {s.eval_rollouts} "
        f"rollouts per student and task, same-parameter variance over {s.same_param_batches} "
        "batches", flush=True)
  t0 = time.perf_counter()
  g_ref = int(np.argmin(s.gammas))
  trained = jax.tree.map(lambda x: x[:, g_ref], params)
  points = jax.tree.map(lambda a, b: jnp.stack([a, b]), params0, trained)
  gammas = jnp.asarray(s.gammas, jnp.float32)
  same_var = variance.same_parameter_variance(s.study, s.same_param_batches, points, gammas,
                                              teacher_params, eval_keys)
  positions = variance.student_rollouts(s.study, s.eval_rollouts, params, eval_keys)
  teacher_positions = variance.teacher_rollouts(s.study, s.eval_rollouts, teacher_params,
                                                eval_keys)
  jax.block_until_ready((same_var, positions, teacher_positions))
  seconds["evaluation"] = time.perf_counter() - t0
  seconds["total"] = time.perf_counter() - start
  print(f"      done in {seconds['evaluation']:.1f} s", flush=True)
  return StudyResult(settings=s, var=np.asarray(metrics["var"]),
                     batch_dist=np.asarray(metrics["dist"]), kl=np.asarray(metrics["kl"]),
                     positions=np.asarray(positions),
                     teacher_positions=np.asarray(teacher_positions),
                     same_var=np.asarray(same_var),
                     point_names=("init", f"trained γ={s.gammas[g_ref]:g}"), seconds=seconds)


def final_distances(positions: np.ndarray) -> np.ndarray:
  """Mean |s_T − target| over rollouts: [..., 2, N, T + 1] -> [..., 2]."""
  targets = np.asarray(env.TARGETS)
  return np.mean(np.abs(positions[..., -1] - targets[:, None]), axis=-1)


def summary_rows(r: StudyResult) -> list[dict]:
  """One row per (γ, seed) with the SUMMARY_COLUMNS."""
  s = r.settings
  late = np.median(r.var[-s.late_window:], axis=0)
  early = np.max(r.var[:s.early_window], axis=0)
  dist = final_distances(r.positions)            # [S, G, 2]
  tdist = final_distances(r.teacher_positions)   # [S, 2]
  same = np.mean(r.same_var, axis=2)             # [2, S, G]
  rows = []
  for g, gamma in enumerate(s.gammas):
    for i, seed in enumerate(s.seeds):
      rows.append(dict(gamma=gamma, seed=seed, late_var=float(late[i, g]),
                       early_peak_var=float(early[i, g]),
                       final_dist_left=float(dist[i, g, 0]), final_dist_right=float(dist[i, g, 1]),
                       teacher_dist_left=float(tdist[i, 0]), teacher_dist_right=float(tdist[i, 1]),
                       same_var_init=float(same[0, i, g]), same_var_trained=float(same[1, i, g])))
  return rows


def median_rows(rows: list[dict]) -> list[dict]:
  """Medians over seeds of every numeric column, one row per γ."""
  out = []
  for gamma in dict.fromkeys(r["gamma"] for r in rows):
    sub = [r for r in rows if r["gamma"] == gamma]
    out.append({k: (gamma if k == "gamma" else float(np.median([r[k] for r in sub])))
                for k in SUMMARY_COLUMNS if k != "seed"})
  return out


def expected_result(rows: list[dict]) -> list[tuple[str, bool]]:
  """The paper's findings as checks on the medians over seeds: (statement, holds)."""
  med = median_rows(rows)
  by_gamma = sorted(med, key=lambda m: m["gamma"])
  lo, hi = by_gamma[0], by_gamma[-1]
  late = [m["late_var"] for m in by_gamma]
  near = all(lo[f"final_dist_{t}"] <= 2 * lo[f"teacher_dist_{t}"] for t in env.TASK_NAMES)
  return [
      ("late variance rises with γ", bool(np.all(np.diff(late) > 0))),
      (f"late variance γ={hi['gamma']:g} >= 5x γ={lo['gamma']:g} "
       f"({hi['late_var'] / lo['late_var']:.1f}x)", hi["late_var"] >= 5 * lo["late_var"]),
      (f"early peak γ={hi['gamma']:g} >= 10x γ={lo['gamma']:g} "
       f"({hi['early_peak_var'] / lo['early_peak_var']:.1f}x)",
       hi["early_peak_var"] >= 10 * lo["early_peak_var"]),
      (f"γ={lo['gamma']:g} ends within 2x the teachers' distance on both tasks", near),
      (f"γ={hi['gamma']:g} ends no closer than γ={lo['gamma']:g} (both tasks)",
       all(hi[f"final_dist_{t}"] >= lo[f"final_dist_{t}"] for t in env.TASK_NAMES)),
  ]


def format_summary(rows: list[dict], point_names=("init", "trained")) -> str:
  cols = ("late_var", "early_peak_var", "final_dist_left", "final_dist_right", "same_var_init",
          "same_var_trained")
  heads = ("late var", "early peak", "dist left", "dist right", f"var@{point_names[0]}",
           f"var@{point_names[1]}")
  head = f"{'γ':>5} {'seed':>5}" + "".join(f"{h:>17}" for h in heads)
  lines = [head, "-" * len(head)]

  def line(r, seed):
    return f"{r['gamma']:>5g} {seed:>5}" + "".join(
        f"{r[c]:>17.3e}" if "var" in c else f"{r[c]:>17.3f}" for c in cols)

  lines += [line(r, r["seed"]) for r in rows]
  lines += ["-" * len(head)] + [line(m, "med") for m in median_rows(rows)]
  t = median_rows(rows)[0]
  lines.append(f"teachers (median over seeds): dist left {t['teacher_dist_left']:.3f}, "
               f"dist right {t['teacher_dist_right']:.3f}")
  return "\n".join(lines)


def run(config) -> tuple[StudyResult, list[dict]]:
  """Runner of experiments/toy_variance.py: prints the table, writes CSVs and figures."""
  s = ToyStudySettings.from_config(config)
  result = run_study(s)
  rows = summary_rows(result)
  print(f"\nSummary (late var: median over the last {s.late_window} iterations; early peak: "
        f"max over the first {s.early_window}; dist: mean |s_T − target| over "
        f"{s.eval_rollouts} rollouts):", flush=True)
  print(format_summary(rows, result.point_names))
  print("\nExpected result (medians over seeds):")
  for statement, holds in expected_result(rows):
    print(f"  [{'x' if holds else ' '}] {statement}")
  if config.workdir:
    write_outputs(config.workdir, result, rows)
  print(f"total {result.seconds['total']:.1f} s (teachers {result.seconds['teachers']:.1f}, "
        f"students {result.seconds['students']:.1f}, evaluation "
        f"{result.seconds['evaluation']:.1f})", flush=True)
  return result, rows


def write_outputs(workdir: str, r: StudyResult, rows: list[dict]) -> list[str]:
  """summary.csv, same_params.csv and one PNG per seed in `workdir`; returns the PNG paths."""
  s = r.settings
  os.makedirs(workdir, exist_ok=True)
  plots.write_csv(os.path.join(workdir, "summary.csv"), rows)
  same = [dict(point=name, seed=seed, task=task, gamma=gamma, var=float(r.same_var[p, i, t, g]))
          for p, name in enumerate(r.point_names) for i, seed in enumerate(s.seeds)
          for t, task in enumerate(env.TASK_NAMES) for g, gamma in enumerate(s.gammas)]
  plots.write_csv(os.path.join(workdir, "same_params.csv"), same)
  dist = final_distances(r.positions)
  tdist = final_distances(r.teacher_positions)
  paths = []
  for i, seed in enumerate(s.seeds):
    path = os.path.join(workdir, f"toy_variance_seed{seed}.png")
    plots.seed_figure(path, seed=seed, gammas=s.gammas, var_IxG=r.var[:, i],
                      positions_Gx2xNxT=r.positions[i], final_dist_Gx2=dist[i],
                      teacher_dist_2=tdist[i], same_var_Px2xG=r.same_var[:, i],
                      point_names=r.point_names, heat_gammas=s.heatmap_gammas,
                      dpi=s.figure_dpi)
    paths.append(path)
  print(f"wrote summary.csv, same_params.csv and {len(paths)} figure(s) to {workdir}", flush=True)
  return paths
