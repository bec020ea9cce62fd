"""Seconds per OPD training iteration on CPU, ours against TRL's DistillationTrainer, on two
workloads; one JSON line.

Shape (the sampler benchmark's): a random ~20M-parameter Qwen2 student (seed 0) and teacher
(seed 1) (vocab 32000, hidden 256, 4 layers, 4 heads / 2 KV heads, MLP 1024), float32; per
iteration 8 prompts x 4 rollouts = 32, prompt 64 tokens, temperature 1, one optimizer update
(opt.minibatch_size = 32). Two workloads (trl_peer.workload):
- "fixed": exactly 128 new tokens (no stop tokens, like TRL's min_new_tokens), top-k 50 +
  top-p 0.9. Ours: LSM (K = 32, fused top-K loss; the headline) and the full-vocabulary reverse
  KL ("full_rkl", the loss TRL computes at beta = 1).
- "variable": a budget of 512 new tokens, top-p 0.9, no top-k, and 411 stop ids (the same ids are
  TRL's eos_token_id list, so TRL pads each batch to its longest completion as it normally
  does): response lengths roughly geometric, mean near 64. Ours: LSM with the trainer's
  defaults (packed rows, the sampler dropping finished rows) and LSM "unpacked" (packing off,
  no compaction: every phase pays for the 512-token budget).

Our side runs the trainer's own compiled programs (`opd_jax.programs.build`) in the order of
`opd_jax.train.run`'s loop, on a one-device mesh: `Programs.rollout` -> `Programs.layout` (the
rows of config.opt.packing) + `Programs.score` -> `Programs.run_update` (the state donated),
with the settings, models and state built the trainer's way; the split rollout / scoring /
update is timed at the same points as the trainer's time/* metrics. Diagnostic passes (every
`log.diagnostics_every` iterations, 10 by default, here 50: the student's scoring pass, its
vocabulary sweep in the LSM update and the post-update KL) do not fall on the timed
iterations. TRL's scoring is the teacher alone and its update holds the student's forward.
Compile time = first iteration - median (XLA's caches are cleared before each
side's first iteration, so the sides before it are warmed up again before the timed rounds);
in the variable workload a new row geometry may compile again later, which then shows in that
round's time.

TRL runs in a child process per workload (benchmarks/trl_peer.py --serve, torch on 2 threads)
on the same weights saved as Hugging Face folders and the same prompt ids. The sides take turns:
a warm-up on each side (TRL one step; ours at least WARMUP iterations, and more, up to
MAX_WARMUP, while the last one still compiled something: in the variable workload new row
geometries and compacted sampler programs keep appearing for a few iterations, as at the start
of any run), then --rounds rounds of [ours A, ours B, one TRL step]; medians over the rounds,
and per-round ratios TRL s / ours s. A round in which our side still met a row geometry or a
sampler program for the first time compiled it then (compiled_in_round: true); it stays in the
median.

The last line's keys: fixed.speedup_vs_trl (TRL median s per step / our LSM median s per
iteration), fixed.speedup_vs_trl_full_rkl; variable.speedup_vs_trl, variable.speedup_vs_unpacked
(our unpacked median / our packed median), variable.mean_response_tokens and
max_response_tokens (our packed side's rollouts, all timed rounds) and trl_mean/max; per side:
s_per_iter, rollout_s, scoring_s, update_s, cpu_s_per_iter, tokens_per_s (response tokens),
compile_s, iter_s, speedup_per_round; load_before / load_after (1-minute load averages) and
valid. A ratio is valid only on an idle machine: when the load before the start is above 1.0
(on 2 cores) the JSON says "valid": false and the script exits with status 3.

Run (about 20 minutes on a 2-core CPU): python benchmarks/bench_train.py [--rounds 3]
  [--workloads fixed,variable]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trl_peer  # noqa: E402  (the shape, the random models and the prompts TRL sees)

from opd_jax import configs, masking, programs, sampling, sharding  # noqa: E402
from opd_jax.settings import TrainSettings  # noqa: E402

MAX_LOAD = 1.0   # the 1-minute load average above which a ratio is not reported as valid
PAUSE_S = 0.2   # between turns, so that one side's idle worker threads have gone to sleep
WARMUP = 3      # untimed iterations per side (the first compiles; others meet more geometries)
MAX_WARMUP = 8  # ... and more while the last one still compiled something, up to this many
ROWS = trl_peer.PROMPTS * trl_peer.COPIES
# Our two sides per workload: (name, estimator, unpacked).
SIDES = {"fixed": (("lsm", "lsm", False), ("full_rkl", "full_rkl", False)),
         "variable": (("lsm", "lsm", False), ("lsm_unpacked", "lsm", True))}


def settings(estimator: str, student: str, teacher: str, workdir: str, workload: dict,
             unpacked: bool = False) -> TrainSettings:
  """The trainer's validated settings for this benchmark (every other field: the default)."""
  c = configs.opd()
  c.workdir = workdir
  c.steps = 1000                       # no timed iteration is the last (a diagnostic one)
  c.log.diagnostics_every = 50         # nor a diagnostic one (at most 2 x 8 + rounds before)
  c.model.path, c.teacher.path = student, teacher
  c.data.dataset = "tiny_arith"        # validated by name only; the prompts are trl_peer's
  c.data.prompts_per_step = trl_peer.PROMPTS
  c.rollout.num_samples = trl_peer.COPIES
  c.rollout.max_new_tokens = workload["new"]
  c.rollout.temperature = trl_peer.TEMPERATURE
  c.rollout.top_p = workload["top_p"]
  c.rollout.top_k = workload["top_k"]
  c.rollout.stop_strings = ()          # stop ids are given to programs.build directly
  c.loss.estimator = estimator
  c.opt.minibatch_size = ROWS          # one optimizer update per iteration, like TRL
  c.opt.lr = 1e-6                      # TRL's default (the time does not depend on it)
  c.mesh.data = 1
  if unpacked:
    c.opt.packing = "off"
    if "compact" in c.rollout:
      c.rollout.compact = False
  return TrainSettings.from_config(c)


class OurTrainer:
  """One side's student state and the trainer's compiled phases, one iteration a call."""

  def __init__(self, s: TrainSettings, mesh, prompt_ids: np.ndarray, workload: dict):
    self.s, self.mesh, self.workload = s, mesh, workload
    vocab = trl_peer.qwen2_20m_config().vocab_size
    self.p = programs.build(s, programs.model_config_of(s.model, vocab), vocab, mesh,
                            stop_ids=tuple(workload["stop_ids"]))
    teacher = programs.load_model(s.tasks[0].teacher, vocab, seed=1, mesh=mesh)
    self.teacher_def, self.teacher_params = nnx.split(teacher)
    student = programs.load_model(s.model, vocab, seed=0, mesh=mesh)
    self.state = self.p.init_state(nnx.split(student)[1])
    # All prompts are 64 tokens, a bucket length: left-padding to sampling.bucket_length adds none.
    p_len = sampling.bucket_length(prompt_ids.shape[1])
    if p_len != prompt_ids.shape[1]:
      raise ValueError(f"prompt length {prompt_ids.shape[1]} is not a bucket length ({p_len})")
    self.prompt_np = prompt_ids.astype(np.int32)
    self.root = jax.random.key(s.seed)
    self.step = 0
    self.losses: list[float] = []
    self.lengths: list[np.ndarray] = []

  def _rows(self, *xs):
    # tasks.global_rows on one process: the rows split over the mesh's batch axes.
    return [jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim)) for x in xs]

  def iteration(self) -> dict[str, float]:
    """One rollout -> layout + scoring -> update, timed like `train.run`'s time/* metrics."""
    s, g, p = self.s, self.s.rollout.num_samples, self.p
    t0, c0 = time.perf_counter(), time.process_time()
    key = jax.random.fold_in(self.root, self.step)
    prompt_np, mask_np = self.prompt_np, np.ones(self.prompt_np.shape, bool)
    prompt, prompt_mask = self._rows(prompt_np, mask_np)
    rollout = p.rollout(self.state.params, prompt, prompt_mask, jax.random.fold_in(key, 0))
    rows_prompt, rows_mask = (np.repeat(x, g, axis=0) for x in (prompt_np, mask_np))
    prompt, prompt_mask = self._rows(rows_prompt, rows_mask)
    response, response_mask = rollout.tokens, rollout.mask
    response = jax.block_until_ready(response)
    t1, c1 = time.perf_counter(), time.process_time()

    loss_mask = masking.special_token_mask(response, (), response_mask)
    batch = {"prompt": prompt, "prompt_mask": prompt_mask, "teacher_prompt": prompt,
             "teacher_prompt_mask": prompt_mask, "response": response,
             "response_mask": response_mask, "loss_mask": loss_mask,
             "policy_logprobs": rollout.policy_logprobs}
    lay, rows = p.layout(batch)
    scores, score_metrics = p.score(self.state.params, self.teacher_def, self.teacher_params,
                                    rows, lay.geometry, p.diagnostic(self.step + 1))
    jax.device_get(score_metrics)
    jax.block_until_ready(scores)
    t2, c2 = time.perf_counter(), time.process_time()

    self.state, update_metrics = p.run_update(self.state, p.update_inputs(rows, scores), key,
                                              lay.geometry)
    values = jax.device_get(update_metrics)
    t3, c3 = time.perf_counter(), time.process_time()
    self.step += 1
    lengths = np.asarray(response_mask).sum(axis=1)
    if self.workload["exact"] and int(lengths.sum()) != ROWS * self.workload["new"]:
      raise RuntimeError(f"{s.loss.estimator}: {int(lengths.sum())} response tokens, expected "
                         f"{ROWS * self.workload['new']}")
    if not np.isfinite(values["loss"]):
      raise FloatingPointError(f"{s.loss.estimator}: loss {values['loss']} at step {self.step}")
    self.losses.append(float(values["loss"]))
    self.lengths.append(lengths)
    return {"s": t3 - t0, "rollout_s": t1 - t0, "scoring_s": t2 - t1, "update_s": t3 - t2,
            "cpu_s": c3 - c0, "rollout_cpu_s": c1 - c0, "scoring_cpu_s": c2 - c1,
            "update_cpu_s": c3 - c2, "tokens": int(lengths.sum()),
            "row_tokens": lay.geometry.width, "rows": int(lay.arrays["tokens"].shape[0]),
            "geometry": (lay.geometry, lay.arrays["tokens"].shape[0])}


class TrlPeer:
  """trl_peer.py --serve in a child process: one TRL step per `step()` call."""

  def __init__(self, student: str, teacher: str, iterations: int, log_path: str,
               workload: str):
    self.log_path = log_path
    self.log = open(log_path, "w")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    self.child = subprocess.Popen(
        [sys.executable, trl_peer.__file__, "--serve", "--student", student, "--teacher",
         teacher, "--steps", str(iterations), "--threads", "2", "--workload", workload],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
    self._expect("ready")

  def _line(self) -> str:
    line = self.child.stdout.readline()
    if not line:
      code = self.child.wait()
      self.log.flush()
      with open(self.log_path) as f:
        tail = f.read()[-3000:]
      raise RuntimeError(f"trl_peer ended (exit code {code}); its stderr ends with:\n{tail}")
    return line.strip()

  def _expect(self, text):
    line = self._line()
    if line != text:
      raise RuntimeError(f"trl_peer wrote {line!r}, expected {text!r}")

  def step(self) -> dict[str, float]:
    self.child.stdin.write("step\n")
    self.child.stdin.flush()
    return json.loads(self._line())

  def finish(self) -> dict:
    self.child.stdin.close()
    summary = json.loads(self._line())
    self.child.wait()
    self.log.close()
    return summary


def _median_split(times: list[dict]) -> dict[str, float]:
  return {k: statistics.median(t[k] for t in times) for k in times[0]}


def _r(x, n=3):
  return round(float(x), n)


def run_workload(name: str, student: str, teacher: str, folder: str, rounds: int,
                 prompt_ids: np.ndarray) -> dict:
  """Both of our sides and TRL, turn by turn, on one workload."""
  work = trl_peer.workload(name)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  peer = TrlPeer(student, teacher, 1 + rounds, os.path.join(folder, f"trl_{name}.log"), name)
  try:
    trl_times = [peer.step()]                       # TRL's warm-up, alone
    ours, first, seen, warm = {}, {}, {}, {}
    times = {side: [] for side, _, _ in SIDES[name]}

    def warm_up(side, at_least):
      """Untimed iterations until one compiles nothing (at least `at_least`, at most
      MAX_WARMUP): the row geometries and compacted sampler programs a run meets first."""
      seen[side] = set()
      for n in range(1, MAX_WARMUP + 1):
        traces = sampling.compiled_programs()
        geometry = ours[side].iteration()["geometry"]
        compiled = geometry not in seen[side] or sampling.compiled_programs() != traces
        seen[side].add(geometry)
        warm[side] = warm.get(side, 0) + 1
        if n >= at_least and not compiled:
          break

    for side, estimator, unpacked in SIDES[name]:
      s = settings(estimator, student, teacher, os.path.join(folder, name, side), work, unpacked)
      ours[side] = OurTrainer(s, mesh, prompt_ids, work)
      jax.clear_caches()                            # its first iteration compiles everything
      first[side] = ours[side].iteration()
      warm[side] = 1
      warm_up(side, WARMUP - 1)
    # The later sides' jax.clear_caches() dropped the earlier sides' programs: compile them again
    # (untimed) before the timed rounds.
    for side, _, _ in SIDES[name][:-1]:
      warm_up(side, 2)
    for _ in range(rounds):
      for side, _, _ in SIDES[name]:
        time.sleep(PAUSE_S)
        traces = sampling.compiled_programs()
        t = ours[side].iteration()
        # A new row geometry, or a sampler program (compaction: one per row bucket and cache
        # length met) traced in this round: it compiled now.
        t["compiled"] = (t["geometry"] not in seen[side]
                         or sampling.compiled_programs() != traces)
        seen[side].add(t["geometry"])
        times[side].append(t)
      time.sleep(PAUSE_S)
      trl_times.append(peer.step())
    summary = peer.finish()
  except BaseException:
    peer.child.kill()
    raise
  trl = _median_split([{k: t[k] for k in ("s", "rollout_s", "scoring_s", "update_s", "cpu_s")}
                       for t in trl_times[1:]])
  trl_rounds = [t["s"] for t in trl_times[1:]]
  out = {}
  for side, estimator, unpacked in SIDES[name]:
    med = _median_split([{k: v for k, v in t.items() if k != "geometry"} for t in times[side]])
    rounds_s = [t["s"] for t in times[side]]
    steady = [t["s"] for t in times[side] if not t["compiled"]]
    tokens = sum(t["tokens"] for t in times[side])
    out[side] = {
        "estimator": estimator, "packing": "off" if unpacked else ours[side].s.opt.packing,
        "s_per_iter": _r(med["s"]), "rollout_s": _r(med["rollout_s"]),
        "scoring_s": _r(med["scoring_s"]), "update_s": _r(med["update_s"]),
        "cpu_s_per_iter": _r(med["cpu_s"]),
        **{f"{k}_cpu_s": _r(med[f"{k}_cpu_s"]) for k in ("rollout", "scoring", "update")},
        "tokens_per_s": _r(tokens / sum(rounds_s), 1),
        "compile_s": _r(first[side]["s"] - med["s"], 2), "first_iter_s": _r(first[side]["s"]),
        "iter_s": [_r(x) for x in rounds_s], "warmup_iterations": warm[side],
        "row_tokens": [t["row_tokens"] for t in times[side]],
        "rows": [t["rows"] for t in times[side]],
        "compiled_in_round": [t["compiled"] for t in times[side]],
        "speedup_vs_trl": _r(trl["s"] / med["s"], 2),
        # The rounds that compiled nothing (a long run's steady state), when there are any.
        "steady_s_per_iter": _r(statistics.median(steady)) if steady else None,
        "steady_rounds": len(steady),
        "speedup_per_round": [_r(t / o, 2) for o, t in zip(rounds_s, trl_rounds)],
        "losses": [_r(x, 6) for x in ours[side].losses]}
  result = {"workload": name, "new_tokens": work["new"], "top_k": work["top_k"],
            "top_p": work["top_p"], "stop_ids": len(work["stop_ids"]), "ours": out,
            "trl": {"s_per_step": _r(trl["s"]), "rollout_s": _r(trl["rollout_s"]),
                    "scoring_s": _r(trl["scoring_s"]), "update_s": _r(trl["update_s"]),
                    "cpu_s_per_step": _r(trl["cpu_s"]), "first_step_s": _r(trl_times[0]["s"]),
                    "step_s": [_r(x) for x in trl_rounds], "summary": summary}}
  a, b = (side for side, _, _ in SIDES[name])
  result["speedup_vs_trl"] = out[a]["speedup_vs_trl"]
  if name == "fixed":
    result["speedup_vs_trl_full_rkl"] = out[b]["speedup_vs_trl"]
  else:
    lengths = np.concatenate(ours[a].lengths[warm[a]:])  # the timed rounds
    if out[a]["steady_s_per_iter"] and out[b]["steady_s_per_iter"]:
      result["steady_speedup_vs_trl"] = _r(trl["s"] / out[a]["steady_s_per_iter"], 2)
      result["steady_speedup_vs_unpacked"] = _r(
          out[b]["steady_s_per_iter"] / out[a]["steady_s_per_iter"], 2)
    result |= {"speedup_vs_unpacked": _r(out[b]["s_per_iter"] / out[a]["s_per_iter"], 2),
               "mean_response_tokens": _r(lengths.mean(), 1),
               "max_response_tokens": int(lengths.max()),
               "trl_mean_response_tokens": summary["completion_len_mean"],
               "trl_max_response_tokens": summary["completion_len_max"]}
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--workloads", default="fixed,variable")
  args = parser.parse_args()
  if args.rounds < 1:
    parser.error(f"--rounds={args.rounds}: accepted: an int >= 1")
  names = args.workloads.split(",")
  for name in names:
    if name not in SIDES:
      parser.error(f"--workloads: {name!r}; accepted: fixed, variable")
  result = {"rollouts": ROWS, "prompts": trl_peer.PROMPTS,
            "generations_per_prompt": trl_peer.COPIES, "prompt_len": trl_peer.PROMPT_LEN,
            "temperature": trl_peer.TEMPERATURE, "dtype": "float32", "updates_per_iter": 1,
            "rounds": args.rounds, "jax_version": jax.__version__,
            "jax_backend": jax.default_backend(), "torch_threads": 2,
            "load_before": _r(os.getloadavg()[0], 2)}
  vocab = trl_peer.qwen2_20m_config().vocab_size
  # trl_peer's prompt strings are its ids written out, each prompt COPIES times in a row.
  prompt_ids = np.array([[int(t) for t in p.split()]
                         for p in trl_peer.prompt_strings(vocab)[::trl_peer.COPIES]])
  with tempfile.TemporaryDirectory(prefix="bench_train_") as folder:
    student, teacher = trl_peer.write_random_models(folder)
    for name in names:
      result[name] = run_workload(name, student, teacher, folder, args.rounds, prompt_ids)
  result["load_after"] = _r(os.getloadavg()[0], 2)
  result["valid"] = result["load_before"] <= MAX_LOAD
  if not result["valid"]:
    result["invalid_because"] = (f"the 1-minute load average was {result['load_before']} before "
                                 f"the start (> {MAX_LOAD}): the ratios are not a result")
  print(json.dumps(result), flush=True)
  return 0 if result["valid"] else 3


if __name__ == "__main__":
  sys.exit(main())
