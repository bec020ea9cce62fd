"""Figures and CSV files of the toy studies (matplotlib, Agg backend)."""

from __future__ import annotations

import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colors  # noqa: E402

from opd_jax.toy import env  # noqa: E402

HEATMAP_BINS = 60  # position bins of the state-visitation heatmaps


def write_csv(path: str, rows: list[dict]) -> None:
  """Rows of dicts (same keys) as a CSV file with a header."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def _rolling_median(x: np.ndarray, window: int) -> np.ndarray:
  if len(x) < window:
    return x
  pad = window // 2
  padded = np.pad(x, pad, mode="edge")
  view = np.lib.stride_tricks.sliding_window_view(padded, window)
  return np.median(view, axis=-1)[:len(x)]


def _gamma_colors(gammas) -> list:
  cmap = plt.get_cmap("viridis")
  return [cmap(0.9 * i / max(len(gammas) - 1, 1)) for i in range(len(gammas))]


def _heatmap(ax, positions: np.ndarray, task: int, title: str, lim: float):
  """Visitation frequency of (time, position) over rollouts [N, T + 1], square-root colour scale.

  Returns the image, for a colour bar.
  """
  n, steps = positions.shape
  bins = np.linspace(-lim, lim, HEATMAP_BINS + 1)
  counts = np.stack([np.histogram(positions[:, t], bins=bins)[0] for t in range(steps)], axis=1)
  image = ax.imshow(counts / n, origin="lower", aspect="auto", cmap="magma",
                    norm=colors.PowerNorm(0.5, vmin=0.0, vmax=1.0),
                    extent=(-0.5, steps - 0.5, -lim, lim), interpolation="nearest")
  ax.axhline(env.TARGETS[task], color="cyan", ls="--", lw=1, label="this task's target")
  ax.axhline(env.TARGETS[1 - task], color="white", ls=":", lw=0.8, label="other task's target")
  ax.set_title(title, fontsize=9)
  ax.set_xlabel("time step t (steps)", fontsize=8)
  ax.set_ylabel("position s_t (state units)", fontsize=8)
  ax.tick_params(labelsize=7)
  return image


def seed_figure(path: str, *, seed: int, gammas, var_IxG: np.ndarray,
                positions_Gx2xNxT: np.ndarray, final_dist_Gx2: np.ndarray,
                teacher_dist_2: np.ndarray, same_var_Px2xG: np.ndarray, point_names,
                heat_gammas, dpi: int = 90, window: int = 25) -> None:
  """One seed's figure: variance curves per task and γ, same-parameter variances, heatmaps.

  Args:
    path: PNG file to write.
    seed: the seed (titles only).
    gammas: the γ grid [G].
    var_IxG: App. E.2 variance of every iteration (odd iterations: left task).
    positions_Gx2xNxT: final students' rollouts s_0..s_T per γ and task.
    final_dist_Gx2: mean |s_T − target| of those rollouts.
    teacher_dist_2: the teachers' mean |s_T − target|.
    same_var_Px2xG: variance at shared parameters (points x task x γ).
    point_names: names of the shared-parameter points.
    heat_gammas: the γ values that get heatmaps (each must be in `gammas`).
    dpi: resolution.
    window: rolling-median window (in iterations of one task) drawn over the raw curves.
  """
  gammas = [float(g) for g in gammas]
  cols = _gamma_colors(gammas)
  ncol = max(3, len(heat_gammas))
  # Constrained layout leaves room for the heatmaps' shared colour bar (tight_layout cannot).
  fig, axes = plt.subplots(3, ncol, figsize=(4.4 * ncol, 10.5), squeeze=False,
                           layout="constrained")
  for task in (0, 1):
    ax = axes[0, task]
    series = var_IxG[task::2]
    its = np.arange(task, var_IxG.shape[0], 2) + 1
    for g, c, y in zip(gammas, cols, series.T):
      ax.plot(its, y, color=c, alpha=0.15, lw=0.5)
      ax.plot(its, _rolling_median(y, window), color=c, lw=1.6, label=f"γ={g:g}")
    ax.set_yscale("log")
    ax.set_title(f"{env.TASK_NAMES[task]} task: gradient variance (App. E.2)", fontsize=9)
    ax.set_xlabel("OPD iteration (updates, both tasks counted)", fontsize=8)
    ax.set_ylabel("variance (1/M) Σ‖g_m − ḡ‖² (log scale)", fontsize=8)
    ax.tick_params(labelsize=7)
  axes[0, 0].legend(fontsize=7, ncol=2, title="thin: raw, bold: rolling median",
                    title_fontsize=7)
  ax = axes[0, 2]
  styles = ("-", "--", ":", "-.")
  for p, name in enumerate(point_names):
    for task in (0, 1):
      ax.plot(gammas, same_var_Px2xG[p, task], marker="o", ms=3, ls=styles[p % 4],
              color=("tab:blue", "tab:red")[task], label=f"{name}, {env.TASK_NAMES[task]}")
  ax.set_yscale("log")
  ax.set_xlabel("γ (future-reward coupling)", fontsize=8)
  ax.set_ylabel("variance (1/M) Σ‖g_m − ḡ‖² (log scale)", fontsize=8)
  ax.set_title("variance of each ĝ_γ at the same parameters", fontsize=9)
  ax.legend(fontsize=7)
  ax.tick_params(labelsize=7)
  for extra in range(3, ncol):
    axes[0, extra].axis("off")
  lim = max(6.0, float(np.percentile(np.abs(positions_Gx2xNxT), 99.5)))
  image = None
  for j, hg in enumerate(heat_gammas):
    g = gammas.index(float(hg))
    for task in (0, 1):
      image = _heatmap(axes[1 + task, j], positions_Gx2xNxT[g, task], task,
                       f"γ={hg:g}, {env.TASK_NAMES[task]} task: |s_T−target| = "
                       f"{final_dist_Gx2[g, task]:.2f} (teacher {teacher_dist_2[task]:.2f})", lim)
  axes[1, 0].legend(fontsize=7, loc="upper right", facecolor="black", labelcolor="white")
  for j in range(len(heat_gammas), ncol):
    axes[1, j].axis("off")
    axes[2, j].axis("off")
  if image is not None:  # every heatmap shares the colour scale (PowerNorm, vmin 0, vmax 1)
    bar = fig.colorbar(image, ax=axes[1:, :len(heat_gammas)], shrink=0.8, pad=0.01)
    bar.set_label(f"fraction of rollouts per position bin (width {2 * lim / HEATMAP_BINS:.2f}; "
                  "square-root scale)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
  fig.suptitle(f"Toy variance study (App. E), seed {seed}: gradient variance per task and γ; "
               "state visitation of the final students (sqrt scale)", fontsize=11)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def exact_figure(path: str, rows: list[dict], fits: list[dict], dpi: int = 90) -> None:
  """Log-log variance and bias against T with fitted exponents, and both against γ at the largest T.

  Args:
    path: PNG file to write.
    rows: exact.exact_rows output for every T.
    fits: exact.exponents output.
    dpi: resolution.
  """
  names = list(dict.fromkeys(r["estimator"] for r in rows))
  fit = {f["estimator"]: f for f in fits}
  lengths = np.array(sorted({r["T"] for r in rows}), np.float64)
  by = {(r["T"], r["estimator"]): r for r in rows}
  gam_names = [n for n in names if n.startswith("gamma=")]
  cols = dict(zip(gam_names, _gamma_colors(gam_names)))
  cols.update({n: c for n, c in zip([n for n in names if n not in cols],
                                    ("tab:red", "tab:orange", "tab:brown", "tab:pink"))})
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
  for ax, what in zip(axes[:2], ("variance", "bias")):
    for name in names:
      y = np.array([by[int(t), name][what] for t in lengths])
      exponent = fit[name][f"{what}_exponent"]
      if what == "bias" and np.isnan(exponent):
        continue  # unbiased: nothing to draw on a log axis
      note = " = γ=0 in expectation" if what == "bias" and name == "full_vocab" else ""
      ax.plot(lengths, y, marker="o", ms=3, color=cols[name],
              ls="--" if note else "-", label=f"{name} (slope {exponent:.2f}){note}")
    if what == "variance":
      for power, name in ((2, gam_names[0]), (4, gam_names[-1])):
        y0 = by[int(lengths[0]), name]["variance"]
        ax.plot(lengths, y0 * (lengths / lengths[0]) ** power, color="gray",
                ls="--" if power == 2 else ":", lw=1, label=f"O(T^{power}) bound shape")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(int(t)) for t in lengths])
    ax.minorticks_off()
    ax.set_xlabel("sequence length T (tokens, log scale; slopes fitted over every T)",
                  fontsize=9)
    ax.set_ylabel("tr Cov[g] (log scale)" if what == "variance" else "‖E[g] − ∇J‖ (log scale)",
                  fontsize=9)
    ax.set_title(f"exact {what} ({'tr Cov[g]' if what == 'variance' else '‖E[g] − ∇J‖'})",
                 fontsize=10)
    ax.legend(fontsize=7)
  ax = axes[2]
  t_max = int(lengths[-1])
  gs = [float(n.split("=")[1]) for n in gam_names]
  ax.plot(gs, [by[t_max, n]["variance"] for n in gam_names], marker="o", color="tab:blue")
  ax.set_yscale("log")
  ax.set_ylabel("variance tr Cov[g] (log)", color="tab:blue", fontsize=9)
  ax.set_xlabel("γ (future-reward coupling)", fontsize=9)
  twin = ax.twinx()
  twin.plot(gs, [by[t_max, n]["bias"] for n in gam_names], marker="s", color="tab:orange")
  twin.set_ylabel("bias ‖E[g] − ∇J‖ (linear)", color="tab:orange", fontsize=9)
  twin.set_ylim(bottom=0.0)
  ax.set_title(f"ĝ_γ at T = {t_max}: bias falls to 0, variance rises with γ", fontsize=10)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
