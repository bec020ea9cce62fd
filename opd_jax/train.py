"""The OPD trainer: rollout -> teacher scoring -> update, three compiled phases and a host loop.

`run(config)` trains the student of an experiment config end to end: the mesh from
`config.mesh`, the student and each task's teacher, the state restored from the workdir's latest
checkpoint (else `checkpoint.init`, else the student's Hugging Face weights, else random
weights), then `config.steps` iterations, each on the task `step % len(tasks)` (its dataset's
prompts, or multi-turn episodes of its environment: opd_jax.environments). Every random number
of step s comes from fold_in(key(seed), s) and the prompts of step s from
`data.order.batch_indices(seed, s, process)`, so a resumed run repeats an uninterrupted one.

The loop is collect -> score -> update -> report; evaluation, sample pages, metrics lines, the
progress line and checkpoints are periodic actions called after each iteration.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from opd_jax import (check, checkpoint, diagnostics, metrics, packing, pages, plan, plot,
                     programs, settings, sharding, steps, tasks)
from opd_jax.data import prompts
from opd_jax.settings import ConfigError, TrainSettings

Evaluator = Callable[[int, Any], Mapping[str, float]]
TIMING_PREFIXES = ("time/", "perf/")   # wall-clock metrics: the only ones that differ run to run


class NonFiniteError(FloatingPointError):
  """A loss or gradient norm came out NaN or infinite; the state of that step is not saved."""


# ----------------------------------------------------------------------------------------------
# set-up
# ----------------------------------------------------------------------------------------------


def _check_layout(s: TrainSettings, mesh, p_vocab: int, estimator) -> None:
  """Batch sizes against the mesh and processes, the estimator's own settings."""
  ways = sharding.batch_divisor(mesh)
  for name, value, why in (
      ("opt.minibatch_size", s.opt.minibatch_size, ""),
      ("opt.microbatch_size", s.opt.microbatch_size,
       ", so that every device has rows in every micro-batch"),
      ("data.prompts_per_step", s.data.prompts_per_step, " (the prompts are split over them before "
       "sampling)")):
    if value % ways:
      raise ConfigError(f"config.{name}={value} must be a multiple of the mesh's batch ways "
                        f"data*fsdp={ways} (mesh {dict(mesh.shape)}){why}")
  if s.data.prompts_per_step % jax.process_count():
    raise ConfigError(f"config.data.prompts_per_step={s.data.prompts_per_step} must be a multiple "
                      f"of the process count {jax.process_count()}")
  try:
    estimator.check(s.loss, p_vocab)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def setup(s: TrainSettings, log: Callable[[str], None]
          ) -> tuple[programs.Programs, list[tasks.TaskRuntime], Any]:
  """The run's programs, its tasks (teachers loaded) and the student's tokenizer."""
  from opd_jax import estimators  # pylint: disable=import-outside-toplevel
  mesh = s.mesh.make()
  workdir = pathlib.Path(s.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  estimator = estimators.get(s.loss.estimator)
  tokenizer = tasks.student_tokenizer(s, workdir)
  student_config = programs.model_config_of(s.model, len(tokenizer))
  check.startup(s, tokenizer, student_config.vocab_size, workdir, log)  # FAIL: Incompatible
  opened = [tasks.open_task(t, i, s, workdir, tokenizer, mesh, estimator.samples, log=log)
            for i, t in enumerate(s.tasks)]
  vocab = min([len(tokenizer), student_config.vocab_size] + [t.teacher_vocab for t in opened])
  _check_layout(s, mesh, vocab, estimator)
  p = programs.build(
      s, student_config, vocab, mesh,
      banned_ids=settings.token_ids(tokenizer, s.rollout.banned_strings, "rollout.banned_strings"),
      stop_ids=settings.token_ids(tokenizer, s.rollout.stop_strings, "rollout.stop_strings"))
  if s.mesh.accelerator:  # the three programs' memory per device, before any weights of the student
    plan.check_run(p, [(t.teacher_def, t.teacher_params) for t in opened], log=log)
  return p, opened, tokenizer


def _initial_state(p: programs.Programs, ckpt: checkpoint.Checkpointer, log
                   ) -> tuple[steps.TrainState, int]:
  """Resume order: this workdir's latest checkpoint > checkpoint.init > HF weights > random."""
  s = p.settings
  latest = ckpt.latest_step()
  if latest is not None:
    state, _ = ckpt.restore(latest, p.abstract_state)
    if latest >= s.steps:
      log(f"already complete: {ckpt.directory}/{latest} holds step {latest} of {s.steps}")
    else:
      log(f"resumed from step {latest} of {s.steps} ({ckpt.directory}/{latest})")
    return state, latest
  if s.checkpoint.init:
    try:
      restored, _, step = checkpoint.restore(
          s.checkpoint.init, p.abstract_state, step=s.checkpoint.init_step,
          name="config.checkpoint.init")
    except ValueError as e:
      raise ConfigError(str(e)) from e
    log(f"started from {s.checkpoint.init} step {step} (parameters only)")
    params = restored.params
  else:
    model = programs.load_model(s.model, p.vocab, seed=s.seed, mesh=p.mesh)
    params = nnx.split(model)[1]
    log(f"started from {s.model.path or 'random weights'}")
  return p.init_state(params), 0


# ----------------------------------------------------------------------------------------------
# one iteration
# ----------------------------------------------------------------------------------------------


def _score(p: programs.Programs, task: tasks.TaskRuntime, params, rows: dict,
           geometry: packing.Geometry, done: int) -> tuple[dict, dict[str, float]]:
  """The teacher's scores of the batch's rows (none for an estimator that reads none)."""
  if not p.estimator.samples:
    return {}, {}
  scores, values = p.score(params, task.teacher_def, task.teacher_params, rows, geometry,
                           p.diagnostic(done))
  values = jax.device_get(values)
  jax.block_until_ready(scores)
  return scores, values


def _finite_or_raise(step: int, values: Mapping[str, float]) -> None:
  for name in ("loss", "opt/grad_norm"):
    v = values.get(name)
    if v is not None and not math.isfinite(v):
      raise NonFiniteError(f"step {step}: {name} = {v}; the run stops here and no checkpoint "
                           "of this state is written (the last saved one is intact)")


def _layout_metrics(lay: packing.Layout) -> dict[str, float]:
  """How much of the student rows the passes ran on are padding (this process's rows)."""
  real = np.count_nonzero(lay.arrays["segments"])
  return {"layout/padding_fraction": 1.0 - real / max(lay.arrays["segments"].size, 1),
          "layout/row_tokens": float(lay.geometry.width)}


def _host_metrics(p: programs.Programs, task: tasks.TaskRuntime, tokenizer,
                  batch: tasks.Batch) -> tuple[dict[str, float], int]:
  """Lengths, truncation, the re-tokenisation audit and the source's own metrics; and the
  number of response tokens."""
  host_mask, host_response = sharding.to_host(batch.response_mask), sharding.to_host(
      batch.response)
  values = {}
  if task.text:
    # The teacher scores the student's token ids: they must read as the same tokens under
    # the teacher's tokenizer (a ValueError above data.retokenize_max_fraction).
    ids = prompts.unpad(host_response, host_mask)
    values.update(prompts.check_retokenization(
        ids, prompts.retokenize(ids, tokenizer, task.teacher_tokenizer),
        p.settings.data.retokenize_max_fraction).metrics())
  values.update(batch.metrics)
  stopped = (batch.stopped if batch.stopped is not None
             else np.isin(host_response, p.stop_ids).any(axis=1))
  lengths = host_mask.sum(axis=1)
  return values | {
      "rollout/length_mean": float(lengths.mean()), "rollout/length_max": float(lengths.max()),
      "rollout/truncated_fraction": float(np.mean((lengths == host_mask.shape[1]) & ~stopped))
  }, int(host_mask.sum())


def _report(values: dict, tokens: int, times: list[float], task: tasks.TaskRuntime, step: int,
            multitask: bool) -> dict[str, float]:
  """The iteration's metrics: finite-checked, timed, prefixed by task in multi-task runs."""
  values = {k: float(v) for k, v in values.items()}
  _finite_or_raise(step, values)
  t0, t1, t2, t3 = times
  values.update({"time/rollout": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2,
                 "time/step": t3 - t0, "perf/tokens_per_s": tokens / (t3 - t0)})
  if multitask:
    values = {f"task/{task.name}/{k}": v for k, v in values.items()} | {
        "loss": values["loss"], "task_index": float(task.index)}
  return values


# ----------------------------------------------------------------------------------------------
# periodic actions
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Actions:
  """What happens between iterations: evaluation, sample pages, metrics, progress, checkpoints."""
  p: programs.Programs
  evaluator: Evaluator | None
  writer: metrics.MetricsWriter
  ckpt: checkpoint.Checkpointer
  progress: metrics.Progress | None
  tokenizer: Any
  primary: bool

  def due(self, every: int, done: int) -> bool:
    return bool(every) and (done % every == 0 or done == self.p.settings.steps)

  def evaluate(self, step: int, params) -> dict[str, float]:
    """The evaluator's values at `step`, under "eval/" ({} without an evaluator)."""
    if self.evaluator is None:
      return {}
    out = self.evaluator(step, self.p.student(self.p.compute_params(params)))
    return {f"eval/{k}": float(v) for k, v in out.items()}

  def page_inputs(self, done: int, batch: tasks.Batch, scores: dict, lay: packing.Layout
                  ) -> tuple[dict, dict] | None:
    """Host copies of this process's rows for the samples page of iteration `done`, taken
    before the update (process 0 writes the page once the step is finite); the scores back in
    the [R, N] response layout."""
    s = self.p.settings
    if not (self.p.estimator.samples and s.log.samples_every and done % s.log.samples_every == 0):
      return None
    keys = ("teacher_logprobs", "behavior_logprobs", "t_indices", "t_logits", "t_lse")
    return ({k: sharding.local_rows(getattr(batch, k)) for k in
             ("response", "response_mask", "loss_mask")},
            {k: lay.unpack(sharding.local_rows(scores[k])) for k in keys})

  def after(self, done: int, state: steps.TrainState, values: dict,
            page: tuple[dict, dict] | None, texts) -> dict:
    """Runs every action due after iteration `done`; returns the values with evaluations."""
    s = self.p.settings
    if self.evaluator is not None and self.due(s.eval_every, done):
      values.update(self.evaluate(done, state.params))
    if page is not None and self.primary:
      pages.write_samples_page(pathlib.Path(s.workdir) / "samples" / f"step_{done}.html",
                               self.tokenizer, *page, s.log.samples_count, texts,
                               title=f"{pathlib.Path(s.workdir).name}: rollouts of step {done}")
    if self.due(s.log.every, done) or any(k.startswith("eval/") for k in values):
      self.writer.write(done, values)
    if self.progress is not None:
      self.progress.update(done, values)
    if self.ckpt.should_save(done) or done == s.steps:
      self.ckpt.save(done, state, {"step": done, "seed": s.seed}, force=done == s.steps)
    return values


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, *, evaluator: Evaluator | None = None,
        log: Callable[[str], None] = print) -> list[dict]:
  """Trains the student of `config` (see the module docstring); returns this run's metrics.

  Args:
    config: an `opd_jax.configs.opd()`-shaped ConfigDict (validated here, before compiling).
    evaluator: optional `evaluator(step, student_model) -> {name: value}`, called at step 0 (on
      a fresh run), every `config.eval.every` iterations and at the end; its values are logged
      with the step's metrics under "eval/".
    log: where progress messages go (process 0 only).

  Returns:
    The metrics of the iterations this call ran, one dict per iteration.
  """
  s = TrainSettings.from_config(config)
  sharding.initialize_distributed(s.mesh.distributed)
  primary = jax.process_index() == 0
  say = log if primary else (lambda _: None)
  p, task_list, tokenizer = setup(s, say)
  wandb = (metrics.WandbSettings(s.log.wandb, s.log.wandb_mode, config=settings.plain(config))
           if s.log.wandb else None)
  writer = metrics.MetricsWriter(s.workdir, tensorboard=s.log.tensorboard, primary=primary,
                                 wandb=wandb)
  writer.write_config(settings.plain(config))
  ckpt = checkpoint.Checkpointer(pathlib.Path(s.workdir) / "checkpoints",
                                 save_every=s.checkpoint.every, keep=s.checkpoint.keep,
                                 async_save=s.checkpoint.async_save)
  state, start = _initial_state(p, ckpt, say)
  # Rows after the restored step were logged by the interrupted run; a fresh start (no
  # checkpoint yet) logs everything again, its step-0 evaluation included.
  writer.truncate_after(start if start else -1)
  progress = metrics.Progress(s.steps, start_step=start) if primary else None
  actions = Actions(p, evaluator, writer, ckpt, progress, tokenizer, primary)
  if start == 0 and s.eval_every and (first := actions.evaluate(0, state.params)):
    writer.write(0, first)
  root, history = jax.random.key(s.seed), []
  try:
    for step in range(start, s.steps):
      task, key = task_list[step % len(task_list)], jax.random.fold_in(root, step)
      times = [time.perf_counter()]
      params = p.compute_params(state.params) if p.estimator.samples else None
      batch = task.collect(p, params, step, key)
      times.append(time.perf_counter())
      lay, rows = p.layout(batch.scoring_inputs())
      scores, values = _score(p, task, params, rows, lay.geometry, step + 1)
      values |= diagnostics.maybe_run(p, tokenizer, task, params, state, batch, key, step + 1)
      times.append(time.perf_counter())
      page = actions.page_inputs(step + 1, batch, scores, lay)
      del params  # the compute copy is not needed (nor kept in memory) during the update
      state, update_metrics = p.run_update(state, p.update_inputs(rows, scores), key,
                                           lay.geometry)
      # On-policy: the next rollout needs these parameters, so reading the metrics now costs no
      # overlap; it lets a non-finite step stop the run before anything of it is saved.
      values = p.drop_diagnostics(values | jax.device_get(update_metrics), step + 1)
      times.append(time.perf_counter())
      host, tokens = _host_metrics(p, task, tokenizer, batch)
      host |= _layout_metrics(lay)
      values = _report(values | host, tokens, times, task, step + 1, len(task_list) > 1)
      values = actions.after(step + 1, state, values, page, batch.prompt_texts)
      history.append({"step": step + 1, **values})
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
    if progress is not None:
      progress.close()
  if primary and s.log.plot and history:   # the curves of a run that trained (opd_jax.plot)
    plot.after_run(s.workdir, say)
  return history
