"""Training tasks: each task's prompts (or environment) and frozen teacher, and the one `Batch`
shape every kind of task yields per iteration.

Three sources fill a `Batch`: a dataset's prompts answered by rollouts of the student, a
dataset's reference responses (an estimator that does not sample, e.g. `sft`), and multi-turn
episodes of an environment (opd_jax.environments). The data of step s of task i comes from
(seed + i, the task's own step count s // len(tasks), the process index), so a resumed run
repeats an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax import environments, masking, models, programs, sampling, settings, sharding
from opd_jax.data import order, prompts, registry
from opd_jax.settings import ConfigError, Task, TrainSettings


@dataclasses.dataclass
class Batch:
  """One iteration's rows (global arrays, rows split over the mesh's batch axes).

  prompt / prompt_mask [R, P]: the student's left-padded prompts (one per response row).
  teacher_prompt / teacher_prompt_mask [R, Pt]: the same conversations for the teacher.
  response / response_mask [R, N]: response tokens, right-padded; loss_mask [R, N]: the tokens
    the loss counts (special tokens and environment observations masked out).
  policy_logprobs [R, N]: the sampler's untruncated student log-probs (zeros for references).
  sampled_mask [R, N] or None: the tokens the sampler drew (None: all of response_mask).
  prompt_texts: one per row (samples pages).
  stopped: bool [R] per row on the host, or None (a stop token in the response).
  metrics: the source's own metrics (environment episodes).
  """
  prompt: jax.Array
  prompt_mask: jax.Array
  teacher_prompt: jax.Array
  teacher_prompt_mask: jax.Array
  response: jax.Array
  response_mask: jax.Array
  loss_mask: jax.Array
  policy_logprobs: jax.Array
  sampled_mask: jax.Array | None
  prompt_texts: Sequence[str]
  stopped: np.ndarray | None = None
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)

  def scoring_inputs(self) -> dict:
    """The dict `steps.score` reads."""
    out = {k: getattr(self, k) for k in (
        "prompt", "prompt_mask", "teacher_prompt", "teacher_prompt_mask", "response",
        "response_mask", "loss_mask", "policy_logprobs")}
    return out | ({} if self.sampled_mask is None else {"sampled_mask": self.sampled_mask})

  def arrays(self) -> dict:
    """The token and mask arrays (what the update reads besides the scores)."""
    return {k: getattr(self, k) for k in ("prompt", "prompt_mask", "response", "response_mask",
                                          "loss_mask")}


# `collect(programs, compute_params, step, key) -> Batch`
Collect = Callable[[programs.Programs, Any, int, jax.Array], Batch]


@dataclasses.dataclass
class TaskRuntime:
  """One task's host-side pieces: its name, its frozen teacher and how it collects a batch."""
  index: int
  name: str
  teacher_def: Any
  teacher_params: Any
  teacher_vocab: int
  teacher_tokenizer: Any
  text: bool      # responses are text the teacher re-reads: check they re-tokenise alike
  collect: Collect


def global_rows(mesh, *local: np.ndarray) -> list[jax.Array]:
  """Global arrays whose rows are split over the batch axes, from this process's rows."""
  return [jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, x.ndim), x)
          for x in local]


def student_tokenizer(s: TrainSettings, workdir: pathlib.Path):
  """config.model.tokenizer, else the first dataset task's own tokenizer; runs of the built-in
  game alone use the tiny_arith tokenizer (the game's alphabet)."""
  datasets = [t.data.dataset for t in s.tasks if t.data is not None]
  if s.model.tokenizer or datasets:
    return registry.tokenizer_for(s.model.tokenizer, datasets[0] if datasets else "", workdir)
  if all(t.env.environment == "text_game" for t in s.tasks):
    return registry.tokenizer_for("", "tiny_arith", workdir)
  raise ConfigError("config.model.tokenizer='' is not accepted for a run of environment tasks "
                    "only: set it (or model.path) to the student's tokenizer folder")


def open_task(task: Task, index: int, s: TrainSettings, workdir: pathlib.Path, tokenizer,
              mesh, samples: bool, log: Callable[[str], None] = print) -> TaskRuntime:
  """Loads task `index`'s teacher and data (or environments); `samples`: the estimator trains
  on the student's rollouts (else on the dataset's reference responses); `log`: where the
  count of dropped over-long prompts goes."""
  special_ids = settings.token_ids(tokenizer, s.loss.mask_strings, "loss.mask_strings")
  if task.env is not None:
    return _open_environment_task(task, index, s, tokenizer, mesh, samples, special_ids)
  teacher_tok = registry.tokenizer_for(task.teacher.tokenizer, task.data.dataset, workdir)
  teacher = programs.load_model(task.teacher, len(teacher_tok), seed=s.seed + 1000 + index,
                                mesh=mesh)
  encode = registry.encoder(task.data.dataset, tokenizer, teacher_tok,
                            chat_template=s.data.chat_template,
                            max_prompt_len=s.data.max_prompt_len, template=s.data.template,
                            long_prompts=s.data.long_prompts)
  examples = registry.fitting_prompts(   # over-long prompts: found now, never drawn mid-run
      registry.open_split(task.data, workdir), encode, s.data.max_prompt_len,
      s.data.long_prompts, name=task.name, report=log)
  teacher_def, teacher_params = nnx.split(teacher)
  collect = functools.partial(_collect_rollouts if samples else _collect_references, s=s,
                              index=index, name=task.name, examples=examples, encode=encode,
                              special_ids=special_ids)
  return TaskRuntime(index, task.name, teacher_def, teacher_params, teacher.config.vocab_size,
                     teacher_tok, registry.is_text(task.data.dataset) and samples, collect)


def _open_environment_task(task: Task, index: int, s: TrainSettings, tokenizer, mesh,
                           samples: bool, special_ids: tuple[int, ...]) -> TaskRuntime:
  """An environment task: its teacher, one environment per rollout row, the renderers."""
  if jax.process_count() > 1:
    raise ConfigError(f"config.tasks[{index}].environment={task.env.environment!r}: environment "
                      f"tasks run on one process; this run has {jax.process_count()}")
  if not samples:
    raise ConfigError(f"config.loss.estimator={s.loss.estimator!r} needs reference responses; "
                      f"environment task {task.name!r} has none")
  teacher_tok = (models.load_tokenizer(task.teacher.tokenizer) if task.teacher.tokenizer
                 else tokenizer)
  teacher = programs.load_model(task.teacher, len(teacher_tok), seed=s.seed + 1000 + index,
                                mesh=mesh)
  if s.data.chat_template:
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
  collect = functools.partial(_collect_episodes, s=s, index=index, name=task.name,
                              source=task.env, envs=envs, renderer=renderer,
                              teacher_renderer=teacher_renderer, special_ids=special_ids)
  # Responses hold the student's ids; with a teacher tokenizer of its own, check that they read
  # the same under it (as for text datasets).
  return TaskRuntime(index, task.name, teacher_def, teacher_params, teacher.config.vocab_size,
                     teacher_tok, bool(task.teacher.tokenizer), collect)


# ----------------------------------------------------------------------------------------------
# the three sources of a batch
# ----------------------------------------------------------------------------------------------


def _encoded_prompts(s: TrainSettings, index: int, examples, encode, step: int, rows: int):
  """This process's encoded examples of `step`, and both renderings left-padded to a bucket."""
  idx = order.batch_indices(len(examples), seed=s.seed + index, step=step // len(s.tasks),
                            global_batch=rows, process_index=jax.process_index(),
                            process_count=jax.process_count())
  enc = [encode(examples[int(i)]) for i in idx]
  p_len = sampling.bucket_length(max(len(e.prompt) for e in enc))
  pt_len = sampling.bucket_length(max(len(e.teacher_prompt) for e in enc))
  prompt = prompts.left_pad([e.prompt for e in enc], 0, p_len)
  teacher_prompt = prompts.left_pad([e.teacher_prompt for e in enc], 0, pt_len)
  return enc, prompt, teacher_prompt


def _collect_rollouts(p: programs.Programs, params, step: int, key: jax.Array, *,
                      s: TrainSettings, index: int, name: str, examples, encode,
                      special_ids: tuple[int, ...]) -> Batch:
  """prompts_per_step prompts of the dataset, rollout.num_samples rollouts each."""
  del name
  enc, (prompt, prompt_mask), (t_prompt, t_prompt_mask) = _encoded_prompts(
      s, index, examples, encode, step, s.data.prompts_per_step)
  prompt, prompt_mask = global_rows(p.mesh, prompt, prompt_mask)
  g = s.rollout.num_samples
  rollout = p.rollout(params, prompt, prompt_mask, jax.random.fold_in(key, 0))
  t_prompt, t_prompt_mask = global_rows(p.mesh, np.repeat(t_prompt, g, axis=0),
                                        np.repeat(t_prompt_mask, g, axis=0))
  response = jax.block_until_ready(rollout.tokens)
  return Batch(
      jnp.repeat(prompt, g, axis=0), jnp.repeat(prompt_mask, g, axis=0), t_prompt,
      t_prompt_mask, response, rollout.mask,
      masking.special_token_mask(response, special_ids, rollout.mask), rollout.policy_logprobs,
      None, [str(e.prompt_text) for e in enc for _ in range(g)])


def _right_pad(seqs: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
  tokens, mask = prompts.left_pad([np.asarray(x)[::-1] for x in seqs], 0, length)
  return tokens[:, ::-1].copy(), mask[:, ::-1].copy()


def _collect_references(p: programs.Programs, params, step: int, key: jax.Array, *,
                        s: TrainSettings, index: int, name: str, examples, encode,
                        special_ids: tuple[int, ...]) -> Batch:
  """rollouts_per_step examples of the dataset with their reference responses (no sampling)."""
  del params, key
  enc, (prompt, prompt_mask), (t_prompt, t_prompt_mask) = _encoded_prompts(
      s, index, examples, encode, step, s.rollouts_per_step)
  if any(e.target is None for e in enc):
    raise ConfigError(f"config.loss.estimator={s.loss.estimator!r} needs reference responses; "
                      f"dataset {name!r} has none")
  response, response_mask = _right_pad([e.target for e in enc], s.rollout.max_new_tokens)
  prompt, prompt_mask, response, response_mask, t_prompt, t_prompt_mask = global_rows(
      p.mesh, prompt, prompt_mask, response, response_mask, t_prompt, t_prompt_mask)
  response = jax.block_until_ready(response)
  return Batch(prompt, prompt_mask, t_prompt, t_prompt_mask, response, response_mask,
               masking.special_token_mask(response, special_ids, response_mask),
               jnp.zeros(response.shape, jnp.float32), None,
               [str(e.prompt_text) for e in enc])


def _collect_episodes(p: programs.Programs, params, step: int, key: jax.Array, *,
                      s: TrainSettings, index: int, name: str, source, envs, renderer,
                      teacher_renderer, special_ids: tuple[int, ...]) -> Batch:
  """prompts_per_step games, each played by rollout.num_samples episodes (like G rollouts of a
  prompt); the games of an iteration come from (seed, task, the task's own step count)."""
  seeds = environments.episode_seeds(s.seed + index, step // len(s.tasks), s.rollouts_per_step,
                                     s.rollout.num_samples)
  limits = environments.EpisodeSettings(
      max_turns=source.max_turns, turn_tokens=source.turn_tokens,
      episode_tokens=source.episode_tokens or s.rollout.max_new_tokens,
      temperature=s.rollout.temperature, top_p=s.rollout.top_p, top_k=s.rollout.top_k,
      banned_token_ids=p.banned_ids, stop_token_ids=p.stop_ids, vocab_size=p.vocab)
  episodes = environments.rollout(
      p.student(params), envs, seeds, renderer, jax.random.fold_in(key, 0), limits, mesh=p.mesh,
      row_multiple=sharding.batch_divisor(p.mesh), max_prompt_len=s.data.max_prompt_len)
  # Observations are encoded, not sampled: their ids must lie in the vocabulary the student
  # and the teacher share (the sampler's bans keep the student's own tokens there).
  outside = episodes.response[episodes.response_mask] >= p.vocab
  if outside.any():
    raise ValueError(f"task {name!r}: an observation encodes to token id "
                     f"{int(episodes.response[episodes.response_mask][outside][0])}, outside the "
                     f"{p.vocab} ids the student and the teacher share")
  t_ids = [teacher_renderer.prompt(t) for t in episodes.prompt_texts]
  t_prompt, t_prompt_mask = prompts.left_pad(
      t_ids, 0, sampling.bucket_length(max(len(x) for x in t_ids)))
  prompt, prompt_mask, response, response_mask, student_mask, policy_lp = global_rows(
      p.mesh, episodes.prompt, episodes.prompt_mask, episodes.response, episodes.response_mask,
      episodes.loss_mask, episodes.policy_logprobs)
  t_prompt, t_prompt_mask = global_rows(p.mesh, t_prompt, t_prompt_mask)
  response = jax.block_until_ready(response)
  # An episode's observation tokens are in the response (context) but never in the loss.
  return Batch(prompt, prompt_mask, t_prompt, t_prompt_mask, response, response_mask,
               masking.special_token_mask(response, special_ids, student_mask), policy_lp,
               student_mask, list(episodes.prompt_texts),
               stopped=episodes.ended != environments.BUDGET, metrics=episodes.metrics())
