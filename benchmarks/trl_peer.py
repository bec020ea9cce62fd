"""TRL's on-policy `DistillationTrainer` timed per step on CPU: the peer of bench_train.py.

Runs TRL's own training loop (`trainer.train()`) on a student and a teacher saved as Hugging Face
folders, with the shape of bench_train.py: 8 prompts x 4 copies = 32 rollouts per step, prompt
64 tokens, exactly 128 new tokens (`min_new_tokens` keeps EOS away), top-k 50 + top-p 0.9 at
temperature 1, beta = 1 (TRL's generalised JSD at beta = 1 is the reverse KL(student || teacher)
over the full vocabulary, computed from both models' hidden states and output heads), float32,
torch on 2 threads, one optimizer update per step. TRL has no notion of "4 generations per
prompt" (it generates one completion per dataset row), so each prompt is 4 rows of the dataset.

Prints one JSON line. Each step is timed from `on_step_begin` to `on_step_end` (generation,
loss, backward, clipping, optimizer step) and split into disjoint parts by wrapping TRL's
generation call, both models' backbone forwards, the fused divergence, `accelerator.backward`,
the teacher's output-head projections inside the divergence (its forward and its backward each
project the teacher's head again) and the optimizer step. Wall time and process CPU time (all
threads) are both kept; on a shared, oversubscribed machine both grow with the load (see
_Timers), so compare against our trainer turn by turn (--serve) in the same run. Keys:
  s_per_step, rollout_s, scoring_s, update_s, cpu_s_per_step, rollout_cpu_s, scoring_cpu_s,
    update_cpu_s: medians over the steps after the first (rollout = the student's generate;
    scoring = teacher backbone forward + teacher head projections; update = the rest);
  step_s, step_cpu_s, first_step_s: every step; tokens_per_s: 32 x 128 / s_per_step;
  parts_s, parts_cpu_s: per step, rollout, teacher_forward, teacher_head, student_forward,
    loss_forward (the fused divergence less the teacher head), backward (less the teacher head),
    optimizer, other;
  prompt_len_min/max (64 both), completion_len_min/max (128 both when generation ran to length),
  losses (TRL's logged loss per step), peak_rss_mib, and the settings and versions.
With --serve it takes turns with another benchmark: it writes "ready" once loaded, then runs one
step per line read from stdin and writes one JSON line per step (step, s, cpu_s, rollout_s,
scoring_s, update_s), then the summary line above.

Run as a child process of bench_train.py, or on its own (then it writes random ~20M-parameter
Qwen2 folders with opd_jax first):
  python benchmarks/trl_peer.py --student DIR --teacher DIR --steps 4 [--serve]
  python benchmarks/trl_peer.py --steps 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time

# No network, no experiment trackers: set before transformers / trl are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPTS, COPIES, PROMPT_LEN, NEW = 8, 4, 64, 128
TOP_K, TOP_P, TEMPERATURE = 50, 0.9, 1.0
PAD_ID, EOS_ID = 0, 1    # tokens "<pad>" and "<eos>"; prompts never contain them
# The "variable" workload: a budget of 512 new tokens, top-p 0.9 without top-k, and 411 stop ids
# (<eos> and ids 2..411): on the random models each drawn token stops a response with a
# probability of about 1/64, so lengths are roughly geometric with a mean near 64 (measured and
# reported by bench_train.py). Both sides get the same ids (TRL as its eos_token_id list).
VARIABLE_NEW = 512
VARIABLE_STOP_IDS = (EOS_ID,) + tuple(range(2, 412))


def workload(name: str) -> dict:
  """The generation settings of a workload: "fixed" (exactly NEW tokens, top-k 50 + top-p 0.9)
  or "variable" (up to VARIABLE_NEW tokens, top-p 0.9, stop at VARIABLE_STOP_IDS)."""
  if name == "fixed":
    return {"new": NEW, "top_k": TOP_K, "top_p": TOP_P, "stop_ids": (), "exact": True}
  if name == "variable":
    return {"new": VARIABLE_NEW, "top_k": 0, "top_p": TOP_P, "stop_ids": VARIABLE_STOP_IDS,
            "exact": False}
  raise ValueError(f"workload {name!r}; accepted: fixed, variable")


def qwen2_20m_config():
  """opd_jax config of bench_sampler.py's random ~20M-parameter Qwen2 (vocab 32000)."""
  from opd_jax import models
  return models.ModelConfig(
      model_type="qwen2", vocab_size=32000, hidden_size=256, intermediate_size=1024,
      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, qkv_bias=True,
      max_position_embeddings=1024)


def write_random_models(folder: str) -> tuple[str, str]:
  """Saves a random student (seed 0) and teacher (seed 1) of `qwen2_20m_config()` with opd_jax.

  Args:
    folder: parent folder; "student" and "teacher" are created inside.

  Returns:
    (student folder, teacher folder).
  """
  from opd_jax import models
  config = qwen2_20m_config()
  paths = []
  for name, seed in (("student", 0), ("teacher", 1)):
    path = os.path.join(folder, name)
    models.save_hf_checkpoint(models.init_model(config, seed=seed), config, path)
    paths.append(path)
  return paths[0], paths[1]


def make_tokenizer(vocab_size: int):
  """A word-level tokenizer whose token for id i >= 2 is the string str(i), split on whitespace.

  TRL tokenizes prompt strings itself; with this tokenizer a prompt string is just its ids
  written out, so the token ids (and their count) are exactly the ones we choose. Ids 0 and 1
  are "<pad>" and "<eos>": special tokens are matched inside the text before splitting, so
  they must not be digit strings.

  Args:
    vocab_size: the models' vocabulary size.

  Returns:
    A left-padding `PreTrainedTokenizerFast` that adds no special tokens.
  """
  import tokenizers
  import transformers
  vocab = {"<pad>": PAD_ID, "<eos>": EOS_ID, **{str(i): i for i in range(2, vocab_size)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>",
      padding_side="left")


def prompt_strings(vocab_size: int, seed: int = 0) -> list[str]:
  """PROMPTS random prompts of PROMPT_LEN ids in [2, vocab_size), each repeated COPIES times."""
  ids = np.random.default_rng(seed).integers(2, vocab_size, (PROMPTS, PROMPT_LEN))
  return [" ".join(map(str, row)) for row in ids for _ in range(COPIES)]


class _Timers:
  """Exclusive wall and process-CPU time per named section (a nested section's is not its parent's).

  CPU time (all of the process's threads) is kept besides wall time: it does not count the time
  slices a shared machine gives to other processes, though it does count torch's OpenMP threads
  spinning at barriers while their partner waits for a core, so neither is clean under load.
  """

  def __init__(self):
    self.totals: dict[str, np.ndarray] = {}   # name -> [wall s, cpu s]
    self._stack: list[list] = []    # [name, start [wall, cpu], time spent in children]

  @property
  def current(self):
    return self._stack[-1][0] if self._stack else None

  @staticmethod
  def _now():
    return np.array([time.perf_counter(), time.process_time()])

  def begin(self, name):
    self._stack.append([name, self._now(), np.zeros(2)])

  def end(self, name) -> np.ndarray:
    top, start, children = self._stack.pop()
    if top != name:
      raise RuntimeError(f"timer section {name!r} ended inside {top!r}")
    elapsed = self._now() - start
    self.totals[name] = self.totals.get(name, 0.0) + elapsed - children
    if self._stack:
      self._stack[-1][2] += elapsed
    return elapsed

  def wrap(self, name, fn):
    def wrapped(*args, **kwargs):
      self.begin(name)
      try:
        return fn(*args, **kwargs)
      finally:
        self.end(name)
    return wrapped

  def take(self) -> dict[str, np.ndarray]:
    totals, self.totals = self.totals, {}
    return totals


def _hook_backbone(module, timers, name, when):
  """Times `module`'s forward calls as section `name` while `when()` holds."""
  active = []

  def pre(*_):
    active.append(when())
    if active[-1]:
      timers.begin(name)

  def post(*_):
    if active.pop():
      timers.end(name)

  module.register_forward_pre_hook(pre)
  module.register_forward_hook(post)


NAMES = ("rollout", "teacher_forward", "teacher_head", "student_forward", "loss_forward",
         "backward", "optimizer", "other")


def _split(parts: dict[str, np.ndarray], step: np.ndarray) -> dict[str, np.ndarray]:
  """rollout / scoring / update [wall, cpu] seconds of one step's disjoint parts."""
  rollout = parts["rollout"]
  scoring = parts["teacher_forward"] + parts["teacher_head"]
  return {"rollout": rollout, "scoring": scoring, "update": step - rollout - scoring}


def run(student: str, teacher: str, *, steps: int = 4, threads: int = 2,
        gradient_checkpointing: bool = False, learning_rate: float = 1e-6, seed: int = 0,
        serve=None, workload_name: str = "fixed") -> dict:
  """Trains the student against the teacher for `steps` steps of TRL's loop and times each step.

  Args:
    student: Hugging Face folder of the student (a causal LM).
    teacher: Hugging Face folder of the teacher (same vocabulary).
    steps: optimizer steps (each one generation of 32 rollouts and one update); >= 2, since the
      first step (warm-up) is left out of the medians.
    threads: torch intra-op threads.
    gradient_checkpointing: TRL's default is True (recomputes the student's layers in the
      backward); off by default here, since the 20M models fit easily and it only costs time.
    learning_rate: AdamW learning rate (TRL's default 1e-6).
    seed: seed of TRL's trainer (sampling) and of the prompts.
    serve: None, or (lines_in, out) for turn-taking with another benchmark: "ready" is written
      to `out` once everything is loaded, each step waits for a line from `lines_in` (an
      iterator; running out of lines stops with an error) and writes that step's JSON line to
      `out` when it is done.
    workload_name: "fixed" or "variable" (see `workload`).

  Returns:
    The JSON-ready result dict (keys in the module docstring).
  """
  if steps < 2:
    raise ValueError(f"steps={steps} must be >= 2: the first step is warm-up, left out of medians")
  work = workload(workload_name)
  torch.set_num_threads(threads)
  import datasets
  import transformers
  import trl
  from trl.kernels import chunked_divergence
  from trl.trainer import distillation_trainer

  load = dict(dtype=torch.float32, attn_implementation="sdpa")
  student_model = transformers.AutoModelForCausalLM.from_pretrained(student, **load)
  teacher_model = transformers.AutoModelForCausalLM.from_pretrained(teacher, **load).eval()
  vocab = student_model.config.vocab_size
  tokenizer = make_tokenizer(vocab)
  if work["stop_ids"]:
    # TRL stops generation at, and masks the loss after, every id of the model's eos list.
    student_model.generation_config.eos_token_id = list(work["stop_ids"])
  dataset = datasets.Dataset.from_dict({"prompt": prompt_strings(vocab, seed)})

  timers = _Timers()
  step_s, parts, prompt_lengths, lengths = [], [], [], []

  def emit(line):
    serve[1].write(line + "\n")
    serve[1].flush()

  class StepTimes(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      if serve is not None and next(serve[0], None) is None:
        raise RuntimeError(f"trl_peer: input ended before step {len(step_s) + 1} of {steps}")
      timers.take()
      timers.begin("step")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
      timers.begin("optimizer")

    def on_optimizer_step(self, args, state, control, **kwargs):
      timers.end("optimizer")

    def on_step_end(self, args, state, control, **kwargs):
      step_s.append(timers.end("step"))
      part = timers.take()
      part["other"] = part.pop("step")  # the step's own time: clipping, scheduler, batching, ...
      parts.append(part)
      if serve is not None:
        split = _split({name: part.get(name, np.zeros(2)) for name in NAMES}, step_s[-1])
        emit(json.dumps({"step": len(step_s), "s": round(float(step_s[-1][0]), 3),
                         "cpu_s": round(float(step_s[-1][1]), 3),
                         **{f"{k}_s": round(float(v[0]), 3) for k, v in split.items()}}))

  output_dir = tempfile.mkdtemp(prefix="trl_peer_")
  patched = [(distillation_trainer, "_chunked_divergence_loss"), (chunked_divergence, "_project")]
  originals = [getattr(module, name) for module, name in patched]
  try:
    config = trl.DistillationConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=PROMPTS * COPIES,
        gradient_accumulation_steps=1, learning_rate=learning_rate, beta=1.0,
        temperature=TEMPERATURE, top_k=work["top_k"], top_p=work["top_p"],
        max_completion_length=work["new"],
        generation_kwargs={"min_new_tokens": NEW} if work["exact"] else {}, bf16=False,
        use_cpu=True,
        gradient_checkpointing=gradient_checkpointing, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, shuffle_dataset=False, dataloader_num_workers=0,
        seed=seed, disable_dropout=True)
    trainer = trl.DistillationTrainer(
        model=student_model, teacher_model=teacher_model, args=config, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[StepTimes()])

    generate = trainer._generate_single_turn

    def rollout(prompt_ids, *args, **kwargs):
      completion_ids = generate(prompt_ids, *args, **kwargs)
      prompt_lengths.extend(len(ids) for ids in prompt_ids)
      lengths.extend(len(ids) for ids in completion_ids)
      return completion_ids
    trainer._generate_single_turn = timers.wrap("rollout", rollout)
    _hook_backbone(trainer.teacher_model.base_model, timers, "teacher_forward", lambda: True)
    # generate() runs the student's backbone too; that time is the rollout's
    _hook_backbone(student_model.base_model, timers, "student_forward",
                   lambda: timers.current != "rollout")
    distillation_trainer._chunked_divergence_loss = timers.wrap("loss_forward", originals[0])
    trainer.accelerator.backward = timers.wrap("backward", trainer.accelerator.backward)
    teacher_head = trainer.teacher_model.get_output_embeddings().weight.data_ptr()
    project, project_teacher = originals[1], timers.wrap("teacher_head", originals[1])

    def project_timed(tile, hidden, weight, *args):
      # the fused divergence projects the teacher's head in its forward and again in its backward
      return (project_teacher if weight.data_ptr() == teacher_head else project)(
          tile, hidden, weight, *args)
    chunked_divergence._project = project_timed

    if serve is not None:
      emit("ready")
    # transformers prints its logs to stdout, which is reserved for our JSON lines
    with contextlib.redirect_stdout(sys.stderr):
      trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
  finally:
    for (module, name), original in zip(patched, originals):
      setattr(module, name, original)
    shutil.rmtree(output_dir, ignore_errors=True)

  if len(step_s) != steps:
    raise RuntimeError(f"timed {len(step_s)} steps, expected {steps}")
  per_step = {name: np.array([part.get(name, np.zeros(2)) for part in parts]) for name in NAMES}
  per_step["step"] = np.array(step_s)
  # Medians over the steps after the first, in wall ([..., 0]) and CPU ([..., 1]) seconds.
  med = {name: np.median(x[1:], axis=0) for name, x in per_step.items()}
  split = _split(med, med["step"])
  r = lambda x: round(float(x), 3)
  return {
      "trainer": "trl.DistillationTrainer", "trl_version": trl.__version__,
      "torch_version": torch.__version__, "transformers_version": transformers.__version__,
      "beta": 1.0, "rollouts": PROMPTS * COPIES, "prompts": PROMPTS,
      "generations_per_prompt": COPIES, "prompt_len": PROMPT_LEN, "workload": workload_name,
      "new_tokens": work["new"], "stop_ids": len(work["stop_ids"]),
      "top_k": work["top_k"], "top_p": work["top_p"], "temperature": TEMPERATURE,
      "torch_threads": threads,
      "gradient_checkpointing": gradient_checkpointing, "steps": steps,
      "params_millions": round(sum(p.numel() for p in student_model.parameters()) / 1e6, 2),
      "step_s": [r(x) for x in per_step["step"][:, 0]],
      "s_per_step": r(med["step"][0]), "first_step_s": r(per_step["step"][0, 0]),
      **{f"{name}_s": r(x[0]) for name, x in split.items()},
      "tokens_per_s": round(PROMPTS * COPIES * NEW / float(med["step"][0]), 1),
      "parts_s": {name: [r(x) for x in per_step[name][:, 0]] for name in NAMES},
      "step_cpu_s": [r(x) for x in per_step["step"][:, 1]],
      "cpu_s_per_step": r(med["step"][1]),
      **{f"{name}_cpu_s": r(x[1]) for name, x in split.items()},
      "parts_cpu_s": {name: [r(x) for x in per_step[name][:, 1]] for name in NAMES},
      "prompt_len_min": min(prompt_lengths), "prompt_len_max": max(prompt_lengths),
      "completion_len_min": min(lengths), "completion_len_max": max(lengths),
      "completion_len_mean": round(float(np.mean(lengths)), 1),
      "losses": [round(loss, 6) for loss in losses],
      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--student", help="student HF folder (default: random 20M Qwen2)")
  parser.add_argument("--teacher", help="teacher HF folder (default: random 20M Qwen2)")
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--gradient-checkpointing", action="store_true",
                      help="TRL's default; off here unless given")
  parser.add_argument("--learning-rate", type=float, default=1e-6)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workload", choices=("fixed", "variable"), default="fixed")
  parser.add_argument("--serve", action="store_true",
                      help="turn-taking: 'ready', then one step per stdin line, one JSON line each")
  args = parser.parse_args()
  if (args.student is None) != (args.teacher is None):
    parser.error("give both --student and --teacher, or neither")
  options = dict(steps=args.steps, threads=args.threads, seed=args.seed,
                 gradient_checkpointing=args.gradient_checkpointing,
                 learning_rate=args.learning_rate, workload_name=args.workload,
                 serve=(iter(sys.stdin), sys.stdout) if args.serve else None)
  if args.student is not None:
    result = run(args.student, args.teacher, **options)
  else:
    with tempfile.TemporaryDirectory() as folder:
      result = run(*write_random_models(folder), **options)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  sys.exit(main())
