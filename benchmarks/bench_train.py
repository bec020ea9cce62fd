"""Seconds per OPD training iteration on CPU, ours against TRL's DistillationTrainer; one JSON line.

Shape (the sampler benchmark's): a random ~20M-parameter Qwen2 student (seed 0) and teacher
(seed 1) (vocab 32000, hidden 256, 4 layers, 4 heads / 2 KV heads, MLP 1024), float32; per
iteration 8 prompts x 4 rollouts = 32, prompt 64 tokens, exactly 128 new tokens (no stop tokens,
like TRL's min_new_tokens), top-k 50 + top-p 0.9 at temperature 1, one optimizer update
(opt.minibatch_size = 32).

Our side runs the trainer's own compiled programs (`opd_jax.programs.build`) in the order of
`opd_jax.train.run`'s loop, on a one-device mesh: `Programs.rollout` -> `Programs.score` (teacher
scoring) -> `Programs.update` (the state donated), with the settings, models and state built the
trainer's way (`TrainSettings.from_config` of `configs.opd()`, `programs.load_model`,
`Programs.init_state`); the split rollout / scoring / update is
timed at the same points as the trainer's time/* metrics. The splits of the two sides hold
different work: our scoring also runs the student (its log-probs before the update and the
top-K diagnostics), and our update ends with one more student forward (the policy/kl_before_after
metric); TRL's scoring is the teacher alone and its update holds the student's forward.
Two estimators, each with its own state: "lsm" (the default: K = 32, fused top-K loss; the
headline) and "full_rkl" (reverse KL over all 32000 entries, the loss TRL computes at beta = 1).
Compile time = first iteration - median; XLA's caches are cleared before each estimator's first
iteration so that both include every phase's compilation (the sampler's too).

TRL runs in a child process (benchmarks/trl_peer.py --serve, torch on 2 threads) on the same
weights saved as Hugging Face folders and the same prompt ids (trl_peer builds its own word-level
tokenizer whose tokens are the ids). The sides take turns: warm-up (first) iteration on each side,
then --rounds rounds of [ours lsm, ours full_rkl, one TRL step], so that a slow spell of a shared
machine hits all; medians over the rounds, and per-round ratios TRL s / ours s.

Keys: speedup_vs_trl (TRL median s per step / our LSM median s per iteration) and
speedup_vs_trl_full_rkl; ours.<estimator>: s_per_iter, rollout_s, scoring_s, update_s,
cpu_s_per_iter and rollout_cpu_s, scoring_cpu_s, update_cpu_s (process CPU time, all threads),
tokens_per_s (32 x 128 / s_per_iter), compile_s, first_iter_s, iter_s (every round),
speedup_vs_trl, speedup_per_round, losses; trl: the same split from its per-step lines plus
trl_peer's summary; load_before / load_after (1-minute load averages: the machine may be shared).

Run (about 15 minutes on a 2-core CPU): python benchmarks/bench_train.py [--rounds 3]
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
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trl_peer  # noqa: E402  (the shape, the random models and the prompts TRL sees)

from opd_jax import configs, masking, programs, sampling, sharding  # noqa: E402
from opd_jax.settings import TrainSettings  # noqa: E402

ESTIMATORS = ("lsm", "full_rkl")     # the first is the headline
PAUSE_S = 0.2   # between turns, so that one side's idle worker threads have gone to sleep
ROWS = trl_peer.PROMPTS * trl_peer.COPIES
TOKENS = ROWS * trl_peer.NEW


def settings(estimator: str, student: str, teacher: str, workdir: str, iterations: int
             ) -> TrainSettings:
  """The trainer's validated settings for this benchmark (every other field: the default)."""
  c = configs.opd()
  c.workdir = workdir
  c.steps = iterations
  c.model.path, c.teacher.path = student, teacher
  c.data.dataset = "tiny_arith"        # validated by name only; the prompts are trl_peer's
  c.data.prompts_per_step = trl_peer.PROMPTS
  c.rollout.num_samples = trl_peer.COPIES
  c.rollout.max_new_tokens = trl_peer.NEW
  c.rollout.temperature = trl_peer.TEMPERATURE
  c.rollout.top_p = trl_peer.TOP_P
  c.rollout.top_k = trl_peer.TOP_K
  c.rollout.stop_strings = ()          # every rollout runs to exactly 128 tokens
  c.loss.estimator = estimator
  c.opt.minibatch_size = ROWS          # one optimizer update per iteration, like TRL
  c.opt.lr = 1e-6                      # TRL's default (the time does not depend on it)
  c.mesh.data = 1
  return TrainSettings.from_config(c)


class OurTrainer:
  """One estimator's student state and the trainer's three compiled phases, one iteration a call."""

  def __init__(self, s: TrainSettings, mesh, prompt_ids: np.ndarray):
    self.s, self.mesh = s, mesh
    vocab = trl_peer.qwen2_20m_config().vocab_size
    self.p = programs.build(s, programs.model_config_of(s.model, vocab), vocab, mesh)
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

  def _rows(self, *xs):
    # tasks.global_rows on one process: the rows split over the mesh's batch axes.
    return [jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim)) for x in xs]

  def iteration(self) -> dict[str, float]:
    """One rollout -> scoring -> update, timed like `train.run`'s time/* metrics."""
    s, g = self.s, self.s.rollout.num_samples
    t0, c0 = time.perf_counter(), time.process_time()
    key = jax.random.fold_in(self.root, self.step)
    prompt_np, mask_np = self.prompt_np, np.ones(self.prompt_np.shape, bool)
    prompt, prompt_mask = self._rows(prompt_np, mask_np)
    rollout = self.p.rollout(self.state.params, prompt, prompt_mask, jax.random.fold_in(key, 0))
    t_prompt, t_prompt_mask = (np.repeat(x, g, axis=0) for x in (prompt_np, mask_np))
    prompt, prompt_mask = (jnp.repeat(x, g, axis=0) for x in (prompt, prompt_mask))
    response, response_mask = rollout.tokens, rollout.mask
    t_prompt, t_prompt_mask = self._rows(t_prompt, t_prompt_mask)
    response = jax.block_until_ready(response)
    t1, c1 = time.perf_counter(), time.process_time()

    loss_mask = masking.special_token_mask(response, (), response_mask)
    batch = {"prompt": prompt, "prompt_mask": prompt_mask, "response": response,
             "response_mask": response_mask, "loss_mask": loss_mask}
    scores, score_metrics = self.p.score(
        self.state.params, self.teacher_def, self.teacher_params,
        batch | {"teacher_prompt": t_prompt, "teacher_prompt_mask": t_prompt_mask,
                 "policy_logprobs": rollout.policy_logprobs})
    jax.device_get(score_metrics)
    jax.block_until_ready(scores)
    t2, c2 = time.perf_counter(), time.process_time()

    self.state, update_metrics = self.p.update(self.state, self.p.update_inputs(batch, scores),
                                               key)
    values = jax.device_get(update_metrics)
    t3, c3 = time.perf_counter(), time.process_time()
    self.step += 1
    generated = int(np.asarray(response_mask).sum())
    if generated != TOKENS:
      raise RuntimeError(f"{s.loss.estimator}: {generated} response tokens, expected {TOKENS}")
    if not np.isfinite(values["loss"]):
      raise FloatingPointError(f"{s.loss.estimator}: loss {values['loss']} at step {self.step}")
    self.losses.append(float(values["loss"]))
    return {"s": t3 - t0, "rollout_s": t1 - t0, "scoring_s": t2 - t1, "update_s": t3 - t2,
            "cpu_s": c3 - c0, "rollout_cpu_s": c1 - c0, "scoring_cpu_s": c2 - c1,
            "update_cpu_s": c3 - c2}


class TrlPeer:
  """trl_peer.py --serve in a child process: one TRL step per `step()` call."""

  def __init__(self, student: str, teacher: str, iterations: int, log_path: str):
    self.log_path = log_path
    self.log = open(log_path, "w")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    self.child = subprocess.Popen(
        [sys.executable, trl_peer.__file__, "--serve", "--student", student, "--teacher",
         teacher, "--steps", str(iterations), "--threads", "2"],
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  if args.rounds < 1:
    parser.error(f"--rounds={args.rounds}: accepted: an int >= 1")
  iterations = 1 + args.rounds
  r = lambda x, n=3: round(float(x), n)
  result = {"rollouts": ROWS, "prompts": trl_peer.PROMPTS,
            "generations_per_prompt": trl_peer.COPIES, "prompt_len": trl_peer.PROMPT_LEN,
            "new_tokens": trl_peer.NEW, "top_k": trl_peer.TOP_K, "top_p": trl_peer.TOP_P,
            "temperature": trl_peer.TEMPERATURE, "dtype": "float32", "updates_per_iter": 1,
            "rounds": args.rounds, "jax_version": jax.__version__,
            "jax_backend": jax.default_backend(), "torch_threads": 2,
            "load_before": r(os.getloadavg()[0], 2)}
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  vocab = trl_peer.qwen2_20m_config().vocab_size
  # trl_peer's prompt strings are its ids written out, each prompt COPIES times in a row.
  prompt_ids = np.array([[int(t) for t in p.split()]
                         for p in trl_peer.prompt_strings(vocab)[::trl_peer.COPIES]])
  with tempfile.TemporaryDirectory(prefix="bench_train_") as folder:
    student, teacher = trl_peer.write_random_models(folder)
    peer = TrlPeer(student, teacher, iterations, os.path.join(folder, "trl_peer.log"))
    try:
      trl_times = [peer.step()]                       # TRL's warm-up, alone
      ours, first, times = {}, {}, {e: [] for e in ESTIMATORS}
      for estimator in ESTIMATORS:
        s = settings(estimator, student, teacher, os.path.join(folder, estimator), iterations)
        ours[estimator] = OurTrainer(s, mesh, prompt_ids)
        jax.clear_caches()                            # its first iteration compiles everything
        traces = sampling.compiled_programs()
        first[estimator] = ours[estimator].iteration()
        if sampling.compiled_programs() != traces + 1:
          raise RuntimeError(f"{estimator}: the sampler was not recompiled in its first iteration")
      for _ in range(args.rounds):
        for estimator in ESTIMATORS:
          time.sleep(PAUSE_S)
          times[estimator].append(ours[estimator].iteration())
        time.sleep(PAUSE_S)
        trl_times.append(peer.step())
      summary = peer.finish()
    except BaseException:
      peer.child.kill()
      raise
  result["load_after"] = r(os.getloadavg()[0], 2)
  result["params_millions"] = summary["params_millions"]

  trl = _median_split([{k: t[k] for k in ("s", "rollout_s", "scoring_s", "update_s", "cpu_s")}
                       for t in trl_times[1:]])
  trl_rounds = [t["s"] for t in trl_times[1:]]
  out = {}
  for estimator in ESTIMATORS:
    med = _median_split(times[estimator])
    rounds = [t["s"] for t in times[estimator]]
    out[estimator] = {
        "s_per_iter": r(med["s"]), "rollout_s": r(med["rollout_s"]),
        "scoring_s": r(med["scoring_s"]), "update_s": r(med["update_s"]),
        "cpu_s_per_iter": r(med["cpu_s"]),
        **{f"{k}_cpu_s": r(med[f"{k}_cpu_s"]) for k in ("rollout", "scoring", "update")},
        "tokens_per_s": r(TOKENS / med["s"], 1),
        "compile_s": r(first[estimator]["s"] - med["s"], 2),
        "first_iter_s": r(first[estimator]["s"]),
        "first_iter_split_s": {k: r(v) for k, v in first[estimator].items()},
        "iter_s": [r(x) for x in rounds],
        "speedup_vs_trl": r(trl["s"] / med["s"], 2),
        "speedup_per_round": [r(t / o, 2) for o, t in zip(rounds, trl_rounds)],
        "losses": [r(x, 6) for x in ours[estimator].losses]}
  head = out[ESTIMATORS[0]]
  result |= {
      "estimator": ESTIMATORS[0], "k": ours[ESTIMATORS[0]].s.loss.k,
      "s_per_iter": head["s_per_iter"], "rollout_s": head["rollout_s"],
      "scoring_s": head["scoring_s"], "update_s": head["update_s"],
      "tokens_per_s": head["tokens_per_s"], "compile_s": head["compile_s"],
      "speedup_vs_trl": head["speedup_vs_trl"],
      "speedup_vs_trl_full_rkl": out["full_rkl"]["speedup_vs_trl"],
      "ours": out,
      "trl": {"s_per_step": r(trl["s"]), "rollout_s": r(trl["rollout_s"]),
              "scoring_s": r(trl["scoring_s"]), "update_s": r(trl["update_s"]),
              "cpu_s_per_step": r(trl["cpu_s"]), "tokens_per_s": r(TOKENS / trl["s"], 1),
              "first_step_s": r(trl_times[0]["s"]), "step_s": [r(x) for x in trl_rounds],
              "summary": summary}}
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
