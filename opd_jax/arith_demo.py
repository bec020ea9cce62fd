"""The offline end-to-end demo: distil a small arithmetic teacher into a smaller student.

Steps (all cached in the workdir, so a second run only redoes what is missing):
1. the tiny_arith TFDS dataset and its character tokenizer;
2. a teacher trained by cross-entropy on the reference answers until it solves the validation
   problems, saved as a Hugging Face checkpoint;
3. per seed, a smaller student pre-trained the same way but stopped at a fixed validation
   accuracy, so every method starts from the same point;
4. per seed and method, `opd_jax.train.run`: sampled-token OPD (top-p 1), teacher top-K LSM
   (top-p 0.9) and a ground-truth fine-tuning control, evaluated every `eval.every` iterations
   on the held-out test problems (greedy exact match, and the full-vocabulary reverse KL to the
   teacher on the student's own samples).
Prints a table per method and seed, and saves the learning curves as `curves.png`.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from opd_jax import configs, losses, metrics, models, sampling, settings, train
from opd_jax.data import registry, tiny_arith
from opd_jax.settings import ConfigError

METHODS = {  # name -> (loss.estimator, rollout.top_p)
    "sampled_token": ("sampled_token", 1.0),
    "lsm": ("lsm", 0.9),
    "sft": ("sft", 1.0),
}
# Trainer settings the demo sets for each run itself: the experiment file holds these markers,
# and an override of any of them is refused (it would be ignored). Key -> (marker, what to set).
PER_RUN = {
    "seed": (-1, "config.demo.seeds (one student and one run per method per seed)"),
    "loss.estimator": ("per_method", "config.demo.methods (" + ", ".join(
        f"{m}: {e} at top-p {p}" for m, (e, p) in METHODS.items()) + ")"),
    "rollout.top_p": (-1.0, "config.demo.methods (each method has its rollout top-p)"),
    "smoke": (False, "the demo's own ':smoke' argument"),
    "tasks": ((), "nothing: the demo has one task, its arithmetic dataset"),
}
# Model groups the demo fills from its own pre-training: left at the trainer's defaults.
OWN_MODELS = {"model": "config.demo.student (the student's shape) and demo.student_init_std",
              "teacher": "config.demo.teacher (the teacher's shape) and demo.teacher_init_std"}


def _arrays(examples) -> tuple[np.ndarray, np.ndarray, list[str]]:
  rows = [examples[i] for i in range(len(examples))]
  prompts = np.stack([r["prompt_ids"] for r in rows]).astype(np.int32)
  targets = np.stack([r["target_ids"] for r in rows]).astype(np.int32)
  answers = [r["answer"].decode() if isinstance(r["answer"], bytes) else r["answer"]
             for r in rows]
  return prompts, targets, answers


def _shape_config(shape: ml_collections.ConfigDict, dtype: str = "float32") -> models.ModelConfig:
  return models.ModelConfig(
      model_type="qwen2", vocab_size=len(tiny_arith.VOCAB), hidden_size=shape.hidden_size,
      intermediate_size=shape.intermediate_size, num_layers=shape.num_layers,
      num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
      head_dim=shape.hidden_size // shape.num_heads, qkv_bias=True, max_position_embeddings=64,
      dtype=dtype)


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------


# Evaluation decodes like the rollouts: up to the answer's length, stopping at <eos>, nothing
# banned (a response that emits <pad> is simply wrong).
_DECODE = dict(max_new_tokens=tiny_arith.TARGET_LEN,
               stop_token_ids=(tiny_arith.VOCAB.index(tiny_arith.EOS),))


def greedy_accuracy(model, prompts: np.ndarray, answers: list[str]) -> float:
  """Exact match of greedy responses (digits before <eos>) against the reference answers."""
  mask = np.ones(prompts.shape, bool)
  out = sampling.sample(model, prompts, mask, jax.random.key(0), temperature=0.0, **_DECODE)
  tokens = np.asarray(out.tokens)
  return float(np.mean([tiny_arith.decode_answer(t) == a for t, a in zip(tokens, answers)]))


@functools.partial(jax.jit, static_argnames=("student_def", "teacher_def"))
def _reverse_kl(student_def, student_params, teacher_def, teacher_params, prompts, response,
                response_mask):
  p = prompts.shape[1]
  tokens = jnp.concatenate([prompts, response], axis=1)
  mask = jnp.ones(tokens.shape, bool)
  sl = models.forward(nnx.merge(student_def, student_params), tokens, mask)[:, p - 1:-1]
  tl = models.forward(nnx.merge(teacher_def, teacher_params), tokens, mask)[:, p - 1:-1]
  return losses.full_reverse_kl(sl, tl, response_mask)[0]


def sampled_reverse_kl(model, teacher, prompts: np.ndarray, seed: int) -> float:
  """Full-vocabulary reverse KL (Eq. 4) to the teacher on the student's own samples (T = 1)."""
  mask = np.ones(prompts.shape, bool)
  out = sampling.sample(model, prompts, mask, jax.random.key(seed), temperature=1.0, **_DECODE)
  s_def, s_params = nnx.split(model)
  t_def, t_params = nnx.split(teacher)
  return float(_reverse_kl(s_def, s_params, t_def, t_params, jnp.asarray(prompts), out.tokens,
                           out.mask))


# ----------------------------------------------------------------------------------------------
# supervised pre-training (teacher, and the student's starting point)
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"), donate_argnums=(1, 2))
def _ce_step(graphdef, params, opt_state, tokens, tx):
  p = tiny_arith.PROMPT_LEN

  def loss_fn(params):
    logits = models.forward(nnx.merge(graphdef, params), tokens[:, :-1],
                            jnp.ones(tokens[:, :-1].shape, bool))[:, p - 1:]
    return -jnp.mean(losses.token_logprobs(logits, tokens[:, p:]))

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def supervised(config: models.ModelConfig, *, train_data, valid, seed: int, lr: float,
               batch: int, max_steps: int, stop_at: float, check_every: int, log,
               init_std: float = 0.02) -> tuple[models.Decoder, int, float]:
  """Cross-entropy on the reference answers until validation accuracy >= stop_at."""
  prompts, targets, _ = train_data
  tokens = np.concatenate([prompts, targets], axis=1)
  model = models.init_model(config, seed=seed, std=init_std)
  graphdef, params = nnx.split(model)
  tx = optax.adamw(lr, weight_decay=0.0)
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  acc = 0.0
  for step in range(1, max_steps + 1):
    rows = rng.integers(0, len(tokens), batch)
    params, opt_state, loss = _ce_step(graphdef, params, opt_state, jnp.asarray(tokens[rows]),
                                       tx)
    if step % check_every == 0 or step == max_steps:
      acc = greedy_accuracy(nnx.merge(graphdef, params), valid[0], valid[2])
      log(f"  step {step:5d}  loss {float(loss):.4f}  valid exact match {acc:.3f}")
      if acc >= stop_at:
        break
  return nnx.merge(graphdef, params), step, acc


def _cached_model(folder: pathlib.Path, make, log, what: str) -> tuple[models.Decoder, dict]:
  info_file = folder / "pretraining.json"
  if info_file.exists():
    model, _ = models.load_hf_checkpoint(folder)
    info = json.loads(info_file.read_text())
    log(f"{what}: loaded from {folder} (pre-trained earlier: {info['steps']} steps, valid exact "
        f"match {info['valid_accuracy']:.3f})")
    return model, info
  log(f"{what}: cross-entropy on the reference answers until valid exact match >= "
      f"{make.keywords['stop_at']}")
  t = time.perf_counter()
  model, steps_done, acc = make()
  models.save_hf_checkpoint(model, model.config, folder)
  info = {"steps": steps_done, "valid_accuracy": acc, "seconds": time.perf_counter() - t}
  info_file.write_text(json.dumps(info))
  log(f"  saved {folder} ({steps_done} steps, {info['seconds']:.0f} s)")
  return model, info


# ----------------------------------------------------------------------------------------------
# the demo
# ----------------------------------------------------------------------------------------------


def opd_config(config: ml_collections.ConfigDict, method: str, seed: int,
               student: pathlib.Path, teacher: pathlib.Path, workdir: pathlib.Path
               ) -> ml_collections.ConfigDict:
  """The trainer config of one (method, seed) run: the experiment's settings minus `demo`."""
  c = ml_collections.ConfigDict(config.to_dict())
  del c["demo"]
  c.experiment = "opd"
  c.seed = seed
  c.workdir = str(workdir / "runs" / f"{method}_seed{seed}")
  c.data.data_dir = str(registry.data_dir(config.data, workdir))
  c.model.path = c.model.tokenizer = str(student)
  c.teacher.path = c.teacher.tokenizer = str(teacher)
  c.loss.estimator, c.rollout.top_p = METHODS[method]
  return c


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses trainer settings the demo sets per run (an override would be ignored)."""
  if not config.workdir:
    raise ConfigError("config.workdir is required (the demo caches its teacher and students)")
  unknown = sorted(set(config.demo.methods) - set(METHODS))
  if unknown:
    raise ConfigError(f"config.demo.methods has {unknown}; accepted: {', '.join(METHODS)}")
  flat = settings.plain(config)
  for key, (marker, instead) in PER_RUN.items():
    value = functools.reduce(lambda d, k: d[k], key.split("."), flat)
    if value != marker and not (isinstance(marker, tuple) and not value):
      raise ConfigError(f"config.{key}={value!r} is not used by the demo: it sets this for each "
                        f"run itself; set {instead} instead")
  defaults = settings.plain(configs.model_fields())
  unused = [("path",), ("tokenizer",)] + [("random", k) for k in defaults["random"]]
  for group, instead in OWN_MODELS.items():
    for key in unused:
      value = functools.reduce(lambda d, k: d[k], key, flat[group])
      if value != functools.reduce(lambda d, k: d[k], key, defaults):
        raise ConfigError(f"config.{group}.{'.'.join(key)}={value!r} is not used by the demo: "
                          f"it trains its own {group} ({instead})")


def _evaluations(run_dir: pathlib.Path) -> tuple[dict[int, dict], dict[int, float]]:
  """A run's evaluations {step: {accuracy, reverse_kl}} and gradient norms, from its metrics."""
  evals, grad = {}, {}
  for row in metrics.read_metrics(run_dir):
    if "eval/accuracy" in row:
      evals[row["step"]] = {"accuracy": row["eval/accuracy"],
                            "reverse_kl": row["eval/reverse_kl"]}
    if "opt/grad_norm" in row:
      grad[row["step"]] = row["opt/grad_norm"]
  return evals, grad


def run(config: ml_collections.ConfigDict) -> dict:
  """Runs the demo (see the module docstring); returns {method: {seed: {step: evaluation}}}.

  Every run's evaluations are read back from its workdir's metrics, so a second demo in the same
  workdir prints the same tables without training, and a demo killed at any point and restarted
  ends with the results of an uninterrupted one (the trainer resumes exactly).
  """
  check_config(config)
  d = config.demo
  workdir = pathlib.Path(config.workdir)
  log = print
  t_start = time.perf_counter()
  tfds_dir = registry.data_dir(config.data, workdir)
  train_data = _arrays(tiny_arith.load(tfds_dir, "train"))
  valid = _arrays(tiny_arith.load(tfds_dir, "valid"))
  test = _arrays(tiny_arith.load(tfds_dir, "test"))
  tiny_arith.make_tokenizer(workdir / "tokenizer")
  log(f"data: {len(train_data[0])} train / {len(valid[0])} valid / {len(test[0])} test problems")

  pretrain = functools.partial(supervised, train_data=train_data, valid=valid, lr=d.lr,
                               batch=d.batch, check_every=d.check_every, log=log)
  teacher_dir = workdir / "teacher"
  teacher, t_info = _cached_model(teacher_dir, functools.partial(
      pretrain, _shape_config(d.teacher), seed=d.teacher_seed, max_steps=d.teacher_max_steps,
      stop_at=d.teacher_accuracy, init_std=d.teacher_init_std), log, "teacher")
  tiny_arith.make_tokenizer(teacher_dir)
  results, table = {}, []
  for seed in d.seeds:
    student_dir = workdir / f"student_seed{seed}"
    _cached_model(student_dir, functools.partial(
        pretrain, _shape_config(d.student), seed=seed, max_steps=d.student_max_steps,
        stop_at=d.student_accuracy, init_std=d.student_init_std), log, f"student seed {seed}")
    tiny_arith.make_tokenizer(student_dir)
    for method in d.methods:

      def evaluator(step, model, seed=seed):
        # The trainer's parameters may be split over a mesh; the demo's model is tiny, so the
        # evaluation runs it on one device (and its 500-row batches need no mesh divisibility).
        model = jax.device_put(model, jax.devices()[0])
        return {"accuracy": greedy_accuracy(model, test[0], test[2]),
                "reverse_kl": sampled_reverse_kl(model, teacher, test[0], seed + step)}

      t = time.perf_counter()
      run_config = opd_config(config, method, seed, student_dir, teacher_dir, workdir)
      train.run(run_config, evaluator=evaluator,
                log=lambda m, method=method, seed=seed: log(f"  {method} seed {seed}: {m}"))
      evals, grad = _evaluations(pathlib.Path(run_config.workdir))
      expected = set(range(0, config.steps, config.eval.every)) | {config.steps}
      if set(evals) != expected:
        raise RuntimeError(f"{run_config.workdir}/metrics.jsonl holds evaluations at steps "
                           f"{sorted(evals)}, expected {sorted(expected)}: delete that folder to "
                           "rerun it")
      for step, ev in sorted(evals.items()):
        table.append((method, seed, step, ev["accuracy"], ev["reverse_kl"],
                      grad.get(step)))   # no update (and no gradient) at step 0
      results.setdefault(method, {})[seed] = evals
      log(f"  {method:13s} seed {seed}: exact match {evals[min(evals)]['accuracy']:.3f} -> "
          f"{evals[max(evals)]['accuracy']:.3f} ({time.perf_counter() - t:.0f} s)")
  _print_table(table, t_info, log)
  summary = summarize(results)
  _print_summary(summary, log)
  _plot(results, workdir / "curves.png")
  (workdir / "results.json").write_text(metrics.strict_json(
      {"teacher": t_info, "table": table, "summary": summary,
       "seconds": time.perf_counter() - t_start}))
  log(f"total {time.perf_counter() - t_start:.0f} s; curves in {workdir / 'curves.png'}")
  return results


def _print_table(table, t_info, log) -> None:
  log(f"\nteacher: valid exact match {t_info['valid_accuracy']:.3f} after {t_info['steps']} steps")
  log(f"{'method':>14s} {'seed':>5s} {'step':>5s} {'exact match':>12s} {'reverse KL':>11s} "
      f"{'grad norm':>10s}")
  for method, seed, step, acc, kl, grad in table:
    shown = f"{grad:10.3f}" if grad is not None else f"{'-':>10s}"
    log(f"{method:>14s} {seed:5d} {step:5d} {acc:12.3f} {kl:11.4f} {shown}")


def summarize(results: dict) -> dict:
  """Per method: mean exact match and reverse KL over seeds at each evaluated step and the gain
  (last minus first evaluation) of each seed; per step, the OPD method with the best mean."""
  out = {"methods": {}, "leader": {}}
  for method, per_seed in results.items():
    steps_ = sorted(set.intersection(*(set(e) for e in per_seed.values())))
    out["methods"][method] = {
        "mean_accuracy": {s: float(np.mean([e[s]["accuracy"] for e in per_seed.values()]))
                          for s in steps_},
        "mean_reverse_kl": {s: float(np.mean([e[s]["reverse_kl"] for e in per_seed.values()]))
                            for s in steps_},
        "gain": {seed: e[max(e)]["accuracy"] - e[min(e)]["accuracy"]
                 for seed, e in per_seed.items()},
    }
  # The leader among the distillation methods (the fine-tuning control is not a contender).
  opd = {m: v for m, v in out["methods"].items() if m != "sft"}
  for step in sorted({s for m in opd.values() for s in m["mean_accuracy"]}):
    scores = {m: v["mean_accuracy"][step] for m, v in opd.items() if step in v["mean_accuracy"]}
    best = max(scores.values())
    leaders = sorted(m for m, a in scores.items() if a == best)
    out["leader"][step] = leaders[0] if len(leaders) == 1 else "tie: " + ", ".join(leaders)
  return out


def _print_summary(summary: dict, log) -> None:
  methods = summary["methods"]
  steps_ = sorted(summary["leader"])
  log("\nmean over seeds: exact match (reverse KL)")
  log(f"{'method':>14s} " + " ".join(f"{'step ' + str(s):>15s}" for s in steps_))
  for method, v in methods.items():
    cells = [f"{v['mean_accuracy'][s]:.3f} ({v['mean_reverse_kl'][s]:.3f})"
             if s in v["mean_accuracy"] else "-" for s in steps_]
    log(f"{method:>14s} " + " ".join(f"{c:>15s}" for c in cells))
  log("best mean exact match among the OPD methods: " + ", ".join(f"step {s}: {m}" for s, m in
                                              summary["leader"].items()))
  log("gain in exact match (last - first evaluation): " + "; ".join(
      f"{m} " + ", ".join(f"seed {seed} {g:+.3f}" for seed, g in v["gain"].items())
      for m, v in methods.items()))


def _plot(results: dict, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  colours = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green")))
  for method, per_seed in results.items():
    for i, (seed, evals) in enumerate(sorted(per_seed.items())):
      steps_ = sorted(evals)
      for ax, key in zip(axes, ("accuracy", "reverse_kl")):
        ax.plot(steps_, [evals[s][key] for s in steps_], marker="o", color=colours[method],
                linestyle=("-", "--", ":")[i % 3], label=f"{method}, seed {seed}")
  axes[0].set(xlabel="OPD iteration", ylabel="exact match on 500 test problems",
              title="accuracy")
  axes[1].set(xlabel="OPD iteration", ylabel="reverse KL to the teacher (nats / token)",
              title="full-vocabulary reverse KL", yscale="log")
  axes[0].legend(fontsize=7, handlelength=3.5)   # long enough to show each seed's dashes
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
