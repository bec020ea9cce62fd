"""The OPD trainer: rollout -> teacher scoring -> update, three compiled phases and a host loop.

`run(config)` trains the student of an experiment config end to end: the mesh from
`config.mesh`, the student and each task's teacher, the state restored from the workdir's latest
checkpoint (else `checkpoint.init`, else the student's Hugging Face weights, else random
weights), then `config.steps` iterations, each on the task `step % len(tasks)` (its dataset's
prompts, or multi-turn episodes of its environment: opd_jax.environments). Every random number
of step s comes from fold_in(key(seed), s) and the prompts of step s from
`data.order.batch_indices(seed, s, process)`, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from opd_jax import (checkpoint, environments, masking, metrics, models, pages, plan,
                     sampling, settings, sharding, steps)
from opd_jax.data import order, prompts, registry
from opd_jax.settings import ConfigError, ModelSource, Task, TrainSettings

Evaluator = Callable[[int, Any], Mapping[str, float]]
TIMING_PREFIXES = ("time/", "perf/")   # wall-clock metrics: the only ones that differ run to run


class NonFiniteError(FloatingPointError):
  """A loss or gradient norm came out NaN or infinite; the state of that step is not saved."""


@dataclasses.dataclass
class TaskRuntime:
  """One task's host-side pieces: its prompts, its encoder and its (frozen) teacher."""
  index: int
  name: str
  examples: Sequence
  encode: Callable[[Mapping], registry.Encoded]
  teacher_def: Any
  teacher_params: Any
  teacher_vocab: int
  teacher_tokenizer: Any
  text: bool             # prompts are text: check that responses re-tokenise alike for the teacher
  env: EnvironmentRuntime | None = None   # an environment task's episodes (else dataset prompts)


@dataclasses.dataclass
class EnvironmentRuntime:
  """An environment task's host-side pieces: one environment per batch row, the renderers."""
  source: settings.EnvironmentSource
  envs: list
  renderer: Any              # the student's texts <-> ids
  teacher_renderer: Any      # the teacher's rendering of an episode's first observation


# ----------------------------------------------------------------------------------------------
# models and tasks
# ----------------------------------------------------------------------------------------------


def model_config_of(source: ModelSource, vocab: int) -> models.ModelConfig:
  """The architecture of a model source (in its parameters' dtype): its config.json, or the
  configured random shape."""
  if source.path:
    hf = json.loads((pathlib.Path(source.path) / "config.json").read_text())
    return source.apply_runtime(models.config_from_hf(hf, dtype=source.precision.param_dtype))
  r = dict(source.random)
  heads = r["num_heads"]
  return source.apply_runtime(models.ModelConfig(
      model_type="qwen2", vocab_size=r["vocab_size"] or vocab, hidden_size=r["hidden_size"],
      intermediate_size=r["intermediate_size"], num_layers=r["num_layers"], num_heads=heads,
      num_kv_heads=r["num_kv_heads"], head_dim=r["hidden_size"] // heads, qkv_bias=True,
      max_position_embeddings=1 << 16, dtype=source.precision.param_dtype))


def load_model(source: ModelSource, vocab: int, *, seed: int, mesh) -> models.Decoder:
  """The model's weights: its Hugging Face folder, or random (seeded) weights of its shape."""
  if source.path:
    dtype = jnp.dtype(source.precision.param_dtype)
    model, _ = models.load_hf_checkpoint(source.path, dtype=dtype, mesh=mesh)
    return models.decoder.with_config(model, source.apply_runtime(model.config))
  return models.init_model(model_config_of(source, vocab), seed=seed, mesh=mesh,
                           std=dict(source.random)["init_std"])


def _open_task(task: Task, index: int, s: TrainSettings, workdir: pathlib.Path, tokenizer,
               mesh) -> TaskRuntime:
  if task.env is not None:
    return _open_environment_task(task, index, s, tokenizer, mesh)
  teacher_tok = registry.tokenizer_for(task.teacher.tokenizer, task.data.dataset, workdir)
  teacher = load_model(task.teacher, len(teacher_tok), seed=s.seed + 1000 + index, mesh=mesh)
  examples = registry.open_split(task.data, workdir)
  encode = registry.encoder(task.data.dataset, tokenizer, teacher_tok,
                            chat_template=s.chat_template, max_prompt_len=s.max_prompt_len)
  teacher_def, teacher_params = nnx.split(teacher)
  return TaskRuntime(index, task.name, examples, encode, teacher_def, teacher_params,
                     teacher.config.vocab_size, teacher_tok, registry.is_text(task.data.dataset))


def _student_tokenizer(s: TrainSettings, workdir: pathlib.Path):
  """config.model.tokenizer, else the first dataset task's own tokenizer; runs of the built-in
  game alone use the tiny_arith tokenizer (the game's alphabet)."""
  datasets = [t.data.dataset for t in s.tasks if t.data is not None]
  if s.model.tokenizer or datasets:
    return registry.tokenizer_for(s.model.tokenizer, datasets[0] if datasets else "", workdir)
  if all(t.env.environment == "text_game" for t in s.tasks):
    return registry.tokenizer_for("", "tiny_arith", workdir)
  raise ConfigError("config.model.tokenizer='' is not accepted for a run of environment tasks "
                    "only: set it (or model.path) to the student's tokenizer folder")


def _open_environment_task(task: Task, index: int, s: TrainSettings, tokenizer,
                           mesh) -> TaskRuntime:
  """An environment task: its teacher, one environment per rollout row, the renderers."""
  if jax.process_count() > 1:
    raise ConfigError(f"config.tasks[{index}].environment={task.env.environment!r}: environment "
                      f"tasks run on one process; this run has {jax.process_count()}")
  if s.loss.estimator == "sft":
    raise ConfigError(f"config.loss.estimator='sft' needs reference responses; environment task "
                      f"{task.name!r} has none")
  teacher_tok = (models.load_tokenizer(task.teacher.tokenizer) if task.teacher.tokenizer
                 else tokenizer)
  teacher = load_model(task.teacher, len(teacher_tok), seed=s.seed + 1000 + index, mesh=mesh)
  if s.chat_template:
    # The teacher's renderer only renders the first observation (its prompt): the rest of an
    # episode is the student's ids, with the student's end-of-turn marker.
    system = task.env.system_prompt or None
    turn_end = environments.chat_turn_end(tokenizer, s.rollout.stop_strings)
    renderer, teacher_renderer = (environments.ChatRenderer(tok, turn_end, system)
                                  for tok in (tokenizer, teacher_tok))
  else:
    renderer, teacher_renderer = (environments.PlainRenderer(tok)
                                  for tok in (tokenizer, teacher_tok))
  envs = environments.make(task.env.environment, task.env.config, s.rollouts_per_step)
  teacher_def, teacher_params = nnx.split(teacher)
  # Responses hold the student's ids; with a teacher tokenizer of its own, check that they read
  # the same under it (as for text datasets).
  return TaskRuntime(index, task.name, (), None, teacher_def, teacher_params,
                     teacher.config.vocab_size, teacher_tok, bool(task.teacher.tokenizer),
                     EnvironmentRuntime(task.env, envs, renderer, teacher_renderer))


def _check_layout(s: TrainSettings, mesh, vocab: int) -> None:
  """Batch sizes against the mesh and processes, K against the vocabulary."""
  ways = sharding.batch_divisor(mesh)
  if s.opt.minibatch_size % ways:
    raise ConfigError(f"config.opt.minibatch_size={s.opt.minibatch_size} must be a multiple "
                      f"of the mesh's batch ways data*fsdp={ways} (mesh {dict(mesh.shape)})")
  if s.opt.microbatch_size % ways:
    raise ConfigError(f"config.opt.microbatch_size={s.opt.microbatch_size} must be a multiple "
                      f"of the mesh's batch ways data*fsdp={ways} (mesh {dict(mesh.shape)}), so "
                      "that every device has rows in every micro-batch")
  if s.prompts_per_step % ways:
    raise ConfigError(f"config.data.prompts_per_step={s.prompts_per_step} must be a multiple "
                      f"of the mesh's batch ways data*fsdp={ways} (the prompts are split over "
                      "them before sampling)")
  if s.prompts_per_step % jax.process_count():
    raise ConfigError(f"config.data.prompts_per_step={s.prompts_per_step} must be a multiple "
                      f"of the process count {jax.process_count()}")
  if s.loss.estimator == "lsm" and s.loss.k > vocab:
    raise ConfigError(f"config.loss.k={s.loss.k} exceeds the shared vocabulary of {vocab} "
                      "tokens; accepted: 1 <= k <= vocabulary size")


# ----------------------------------------------------------------------------------------------
# state
# ----------------------------------------------------------------------------------------------


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _initial_state(s: TrainSettings, config: models.ModelConfig, vocab: int, ckpt, mesh,
                   total_updates: int, log) -> tuple[steps.TrainState, int]:
  """Resume order: this workdir's latest checkpoint > checkpoint.init > HF weights > random."""
  shard = steps.train_state_shardings(config, s.opt, total_updates, mesh)
  _, params_abstract = steps.split_abstract(config)
  abstract = _with_shardings(steps.abstract_state(params_abstract, s.opt, total_updates), shard)
  latest = ckpt.latest_step()
  if latest is not None:
    state, _ = ckpt.restore(latest, abstract)
    if latest >= s.steps:
      log(f"already complete: {ckpt.directory}/{latest} holds step {latest} of {s.steps}")
    else:
      log(f"resumed from step {latest} of {s.steps} ({ckpt.directory}/{latest})")
    return state, latest
  if s.checkpoint_init:
    try:
      restored, _, step = checkpoint.restore(
          s.checkpoint_init, abstract, step=s.checkpoint_init_step,
          name="config.checkpoint.init")
    except ValueError as e:
      raise ConfigError(str(e)) from e
    log(f"started from {s.checkpoint_init} step {step} (parameters only)")
    params = restored.params
  else:
    model = load_model(s.model, vocab, seed=s.seed, mesh=mesh)
    params = nnx.split(model)[1]
    log(f"started from {s.model.path or 'random weights'}")
  return steps.init_state(params, s.opt, total_updates, shard), 0


# ----------------------------------------------------------------------------------------------
# one iteration's host work
# ----------------------------------------------------------------------------------------------


def _global_rows(mesh, *local: np.ndarray) -> list[jax.Array]:
  """Global arrays whose rows are split over the batch axes, from this process's rows."""
  return [jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, x.ndim), x)
          for x in local]


def _right_pad(seqs: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
  tokens, mask = prompts.left_pad([np.asarray(x)[::-1] for x in seqs], 0, length)
  return tokens[:, ::-1].copy(), mask[:, ::-1].copy()


def _prompt_batch(task: TaskRuntime, s: TrainSettings, step: int, rows: int):
  """This process's encoded prompts of `step` (the task's own step count orders its data)."""
  idx = order.batch_indices(len(task.examples), seed=s.seed + task.index,
                            step=step // len(s.tasks), global_batch=rows,
                            process_index=jax.process_index(),
                            process_count=jax.process_count())
  return [task.encode(task.examples[int(i)]) for i in idx]


def _environment_rollout(task: TaskRuntime, s: TrainSettings, step: int, model, rng, mesh,
                         banned: tuple[int, ...], stop_ids: tuple[int, ...], vocab: int):
  """One iteration's episodes of an environment task: (episodes, teacher prompt, its mask).

  prompts_per_step games, each played by rollout.num_samples episodes (like G rollouts of a
  prompt); the games of an iteration come from (seed, task, the task's own step count).
  """
  env = task.env
  g = s.rollout.num_samples
  seeds = environments.episode_seeds(s.seed + task.index, step // len(s.tasks),
                                     s.rollouts_per_step, g)
  limits = environments.EpisodeSettings(
      max_turns=env.source.max_turns, turn_tokens=env.source.turn_tokens,
      episode_tokens=env.source.episode_tokens or s.rollout.max_new_tokens,
      temperature=s.rollout.temperature, top_p=s.rollout.top_p, top_k=s.rollout.top_k,
      banned_token_ids=banned, stop_token_ids=stop_ids)
  episodes = environments.rollout(
      model, env.envs, seeds, env.renderer, rng, limits, mesh=mesh,
      row_multiple=sharding.batch_divisor(mesh), max_prompt_len=s.max_prompt_len)
  # Observations are encoded, not sampled: their ids must lie in the vocabulary the student
  # and the teacher share (the sampler's bans keep the student's own tokens there).
  outside = episodes.response[episodes.response_mask] >= vocab
  if outside.any():
    raise ValueError(f"task {task.name!r}: an observation encodes to token id "
                     f"{int(episodes.response[episodes.response_mask][outside][0])}, outside the "
                     f"{vocab} ids the student and the teacher share")
  t_ids = [env.teacher_renderer.prompt(t) for t in episodes.prompt_texts]
  t_prompt, t_prompt_mask = prompts.left_pad(
      t_ids, 0, sampling.bucket_length(max(len(x) for x in t_ids)))
  return episodes, t_prompt, t_prompt_mask


def _finite_or_raise(step: int, values: Mapping[str, float]) -> None:
  for name in ("loss", "opt/grad_norm"):
    v = values.get(name)
    if v is not None and not math.isfinite(v):
      raise NonFiniteError(f"step {step}: {name} = {v}; the run stops here and no checkpoint "
                           "of this state is written (the last saved one is intact)")


def _rollout_metrics(response_mask: np.ndarray, budget: int, stopped: np.ndarray
                     ) -> dict[str, float]:
  lengths = response_mask.sum(axis=1)
  return {"rollout/length_mean": float(lengths.mean()), "rollout/length_max": float(lengths.max()),
          "rollout/truncated_fraction": float(np.mean((lengths == budget) & ~stopped))}


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
  sharding.initialize_distributed(s.distributed)
  primary = jax.process_index() == 0
  say = log if primary else (lambda _: None)
  mesh = sharding.make_mesh(*s.mesh)
  workdir = pathlib.Path(s.workdir)
  workdir.mkdir(parents=True, exist_ok=True)

  tokenizer = _student_tokenizer(s, workdir)
  student_config = model_config_of(s.model, len(tokenizer))
  tasks = [_open_task(t, i, s, workdir, tokenizer, mesh) for i, t in enumerate(s.tasks)]
  vocab = min([len(tokenizer), student_config.vocab_size] + [t.teacher_vocab for t in tasks])
  _check_layout(s, mesh, vocab)
  if s.accelerator:  # the three programs' memory per device, before any weights of the student
    plan.check_run(s, student_config, [(t.teacher_def, t.teacher_params) for t in tasks], vocab,
                   mesh, log=say)
  # Rows past the shared vocabulary are padding of some embedding: never sample them.
  banned = tuple(masking.ids_for_strings(tokenizer, s.rollout.banned_strings)) + tuple(
      range(vocab, student_config.vocab_size))
  stop_ids = tuple(masking.ids_for_strings(tokenizer, s.rollout.stop_strings))
  special_ids = masking.ids_for_strings(tokenizer, s.mask_strings)

  total_updates = s.steps * s.minibatches
  writer = metrics.MetricsWriter(workdir, tensorboard=s.tensorboard, primary=primary)
  writer.write_config(settings.plain(config))
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_every=s.checkpoint_every,
                                 keep=s.checkpoint_keep, async_save=s.checkpoint_async)
  state, start = _initial_state(s, student_config, vocab, ckpt, mesh, total_updates, say)
  # Rows after the restored step were logged by the interrupted run; a fresh start (no
  # checkpoint yet) logs everything again, its step-0 evaluation included.
  writer.truncate_after(start if start else -1)
  # Sampling, scoring and evaluation run on a compute-dtype copy of the parameters (the same
  # arrays when the precision is not mixed); the update casts inside its loss.
  precision = s.model.precision
  graphdef, _ = steps.split_abstract(steps.compute_config(student_config, precision))
  shapes = steps.Shapes(vocab=vocab, k=max(s.loss.k, steps.MIN_TEACHER_TOPK), mesh=mesh)
  update = steps.make_update(student_config, s.loss, s.opt, shapes, s.minibatches, total_updates,
                             precision)
  root = jax.random.key(s.seed)
  sft = s.loss.estimator == "sft"
  rows = s.rollouts_per_step if sft else s.prompts_per_step
  progress = metrics.Progress(s.steps, start_step=start) if primary else None
  history = []

  def evaluate(step: int) -> dict[str, float]:
    if evaluator is None:
      return {}
    out = evaluator(step, nnx.merge(graphdef, steps.compute_params(state.params, precision)))
    return {f"eval/{k}": float(v) for k, v in out.items()}

  pending_eval = evaluate(0) if start == 0 and s.eval_every else {}
  if pending_eval:
    writer.write(0, pending_eval)
  try:
    for step in range(start, s.steps):
      t0 = time.perf_counter()
      task = tasks[step % len(tasks)]
      student = None if sft else steps.compute_params(state.params, precision)
      key = jax.random.fold_in(root, step)
      episodes = None
      if task.env is None:
        enc = _prompt_batch(task, s, step, rows)
        p_len = sampling.bucket_length(max(len(e.prompt) for e in enc))
        pt_len = sampling.bucket_length(max(len(e.teacher_prompt) for e in enc))
        prompt, prompt_mask = prompts.left_pad([e.prompt for e in enc], 0, p_len)
        t_prompt, t_prompt_mask = prompts.left_pad([e.teacher_prompt for e in enc], 0, pt_len)
      if task.env is not None:
        episodes, t_prompt, t_prompt_mask = _environment_rollout(
            task, s, step, nnx.merge(graphdef, student), jax.random.fold_in(key, 0), mesh,
            banned, stop_ids, vocab)
        prompt, prompt_mask, response, response_mask, student_mask, policy_lp = _global_rows(
            mesh, episodes.prompt, episodes.prompt_mask, episodes.response,
            episodes.response_mask, episodes.loss_mask, episodes.policy_logprobs)
      elif sft:
        if any(e.target is None for e in enc):
          raise ConfigError(f"config.loss.estimator='sft' needs reference responses; dataset "
                            f"{task.name!r} has none")
        response, response_mask = _right_pad([e.target for e in enc], s.rollout.max_new_tokens)
        prompt, prompt_mask, response, response_mask = _global_rows(
            mesh, prompt, prompt_mask, response, response_mask)
        policy_lp = jnp.zeros(response.shape, jnp.float32)
      else:
        prompt, prompt_mask = _global_rows(mesh, prompt, prompt_mask)
        g = s.rollout.num_samples
        rollout = sampling.sample(
            nnx.merge(graphdef, student), prompt, prompt_mask, jax.random.fold_in(key, 0),
            max_new_tokens=s.rollout.max_new_tokens, temperature=s.rollout.temperature,
            top_p=s.rollout.top_p, top_k=s.rollout.top_k, banned_token_ids=banned,
            stop_token_ids=stop_ids, num_samples=g, mesh=mesh)
        t_prompt = np.repeat(t_prompt, g, axis=0)
        t_prompt_mask = np.repeat(t_prompt_mask, g, axis=0)
        prompt, prompt_mask = (jnp.repeat(x, g, axis=0) for x in (prompt, prompt_mask))
        response, response_mask = rollout.tokens, rollout.mask
        policy_lp = rollout.policy_logprobs
      t_prompt, t_prompt_mask = _global_rows(mesh, t_prompt, t_prompt_mask)
      response = jax.block_until_ready(response)
      t1 = time.perf_counter()

      # An episode's observation tokens are in the response (context) but never in the loss.
      loss_mask = masking.special_token_mask(
          response, special_ids, response_mask if episodes is None else student_mask)
      batch = {"prompt": prompt, "prompt_mask": prompt_mask, "response": response,
               "response_mask": response_mask, "loss_mask": loss_mask}
      sampled = {} if episodes is None else {"sampled_mask": student_mask}
      values: dict[str, float] = {}
      scores = {}
      if not sft:
        scores, score_metrics = steps.score(
            graphdef, student, task.teacher_def, task.teacher_params,
            batch | {"teacher_prompt": t_prompt, "teacher_prompt_mask": t_prompt_mask,
                     "policy_logprobs": policy_lp} | sampled,
            shapes=shapes, estimator=s.loss.estimator, minibatches=s.score_parts)
        values.update(jax.device_get(score_metrics))
      jax.block_until_ready(scores)
      t2 = time.perf_counter()

      ubatch = {k: batch[k] for k in ("prompt", "prompt_mask", "response", "loss_mask")}
      ubatch |= _update_inputs(s.loss.estimator, scores)
      # Every process gathers (a collective on several hosts); process 0 writes the page.
      if samples_due := (not sft and s.samples_every
                         and (step + 1) % s.samples_every == 0):
        # The page is written once the step is known to be finite.
        page_batch = {k: sharding.to_host(batch[k])
                      for k in ("response", "response_mask", "loss_mask")}
        page_scores = {k: sharding.to_host(scores[k]) for k in (
            "teacher_logprobs", "behavior_logprobs", "t_indices", "t_logits", "t_lse")}
      del student  # the compute copy is not needed (nor kept in memory) during the update
      state, update_metrics = update(state, ubatch, key)
      # On-policy: the next rollout needs these parameters, so reading the metrics now costs no
      # overlap; it lets a non-finite step stop the run before anything of it is saved.
      values.update(jax.device_get(update_metrics))
      t3 = time.perf_counter()
      host_mask, host_response = sharding.to_host(response_mask), sharding.to_host(response)
      stopped = np.isin(host_response, stop_ids).any(axis=1)
      if task.text and not sft:
        # The teacher scores the student's token ids: they must read as the same tokens under
        # the teacher's tokenizer (a ValueError above data.retokenize_max_fraction).
        ids = prompts.unpad(host_response, host_mask)
        values.update(prompts.check_retokenization(
            ids, prompts.retokenize(ids, tokenizer, task.teacher_tokenizer),
            s.retokenize_max_fraction).metrics())
      if episodes is not None:
        stopped = episodes.ended != environments.BUDGET
        values.update(episodes.metrics())
      values.update(_rollout_metrics(host_mask, host_mask.shape[1], stopped))
      values = {k: float(v) for k, v in values.items()}
      _finite_or_raise(step + 1, values)
      values.update({"time/rollout": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2,
                     "time/step": t3 - t0, "perf/tokens_per_s": host_mask.sum() / (t3 - t0)})
      if len(tasks) > 1:
        values = {f"task/{task.name}/{k}": v for k, v in values.items()} | {
            "loss": values["loss"], "task_index": float(task.index)}
      done = step + 1
      if evaluator is not None and s.eval_every and (done % s.eval_every == 0
                                                      or done == s.steps):
        values.update(evaluate(done))
      if samples_due and primary:
        texts = (episodes.prompt_texts if episodes is not None else
                 [str(e.prompt_text) for e in enc for _ in range(s.rollout.num_samples)])
        pages.write_samples_page(workdir / "samples" / f"step_{done}.html", tokenizer,
                                 page_batch, page_scores, s.samples_count, texts)
      if done % s.log_every == 0 or done == s.steps or any(k.startswith("eval/")
                                                            for k in values):
        writer.write(done, values)
      history.append({"step": done, **values})
      if progress is not None:
        progress.update(done, values)
      if ckpt.should_save(done) or done == s.steps:
        ckpt.save(done, state, {"step": done, "seed": s.seed}, force=done == s.steps)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
    if progress is not None:
      progress.close()
  return history


def _update_inputs(estimator: str, scores: dict) -> dict:
  """The score arrays the configured estimator's update reads."""
  if estimator == "sft":
    return {}
  out = {"behavior_logprobs": scores["behavior_logprobs"]}
  if estimator == "lsm":
    out |= {k: scores[k] for k in ("t_indices", "t_logits", "t_lse", "t_sampled")}
  elif estimator == "sampled_token":
    out["teacher_logprobs"] = scores["teacher_logprobs"]
  else:
    out["teacher_logits"] = scores["teacher_logits"]
  return out
