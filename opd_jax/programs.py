"""The trainer's compiled programs, built once from the settings: shared by train, plan, evaluate.

`build(settings, student_config, vocab, mesh)` gives a `Programs` bundle: the run's estimator and
static shapes, the sharded abstract train state (for restores and the memory plan), and the three
phases as callables: `rollout` (the compiled sampler with the run's rollout settings), `score`
(teacher scoring) and `update`. The trainer runs exactly these programs and the plan compiles
exactly these, on abstract inputs. Model sources (a config's architecture and weights) live here
too, below both.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from opd_jax import estimators, models, packing, sampling, sharding, steps
from opd_jax.settings import ModelSource, TrainSettings

PyTree = Any


# ----------------------------------------------------------------------------------------------
# model sources
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


# ----------------------------------------------------------------------------------------------
# the programs
# ----------------------------------------------------------------------------------------------


def _with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


@dataclasses.dataclass(frozen=True)
class Programs:
  """One run's compiled phases and the facts they are compiled for.

  settings: the run's settings.
  student_config: the student's architecture in its parameters' dtype.
  vocab: the vocabulary the student shares with every teacher.
  mesh: the (data, fsdp, tensor) mesh.
  estimator: the configured estimator object.
  shapes: the static facts keying the scoring and update programs.
  total_updates: optimizer steps over the whole run.
  graphdef: the compute-dtype graphdef the sampler, the scoring and evaluations run.
  state_shardings / abstract_state: the TrainState's shardings, and its ShapeDtypeStructs in them.
  banned_ids / stop_ids: token ids the rollouts never sample / that end a response.
  update: `update(state, batch, key) -> (state, metrics)` (jitted, the state donated).
  """
  settings: TrainSettings
  student_config: models.ModelConfig
  vocab: int
  mesh: Mesh
  estimator: estimators.Estimator
  shapes: steps.Shapes
  total_updates: int
  graphdef: Any
  state_shardings: steps.TrainState
  abstract_state: steps.TrainState
  banned_ids: tuple[int, ...]
  stop_ids: tuple[int, ...]
  update: Callable

  def compute_params(self, params: PyTree) -> PyTree:
    """The parameters sampling and scoring run on (a compute-dtype copy when mixed)."""
    return steps.compute_params(params, self.settings.model.precision)

  def student(self, params: PyTree) -> models.Decoder:
    """The student model of compute-dtype `params` (see `compute_params`)."""
    return nnx.merge(self.graphdef, params)

  def rollout(self, params: PyTree, prompt, prompt_mask, rng) -> sampling.Rollout:
    """`rollout.num_samples` responses per prompt from the student of compute `params`."""
    r = self.settings.rollout
    return sampling.sample(
        self.student(params), prompt, prompt_mask, rng, max_new_tokens=r.max_new_tokens,
        temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
        banned_token_ids=self.banned_ids, stop_token_ids=self.stop_ids,
        num_samples=r.num_samples, mesh=self.mesh, compact=r.compact, vocab_size=self.vocab)

  def layout(self, batch: dict) -> tuple[packing.Layout, dict]:
    """A batch (global arrays: tasks.Batch.scoring_inputs()) in the rows of
    `config.opt.packing`: this process's host layout, and the rows as global arrays."""
    o = self.settings.opt
    local = {k: sharding.local_rows(v) for k, v in batch.items()}
    ways = sharding.batch_divisor(self.mesh) // jax.process_count()
    lay = packing.pack(o.packing, local, minibatches=self.settings.minibatches,
                       micro=o.microbatches, ways=max(ways, 1),
                       microbatch_tokens=o.microbatch_tokens)
    keys = sorted(lay.arrays)
    arrays = [lay.arrays[k] for k in keys]
    if self.mesh is not None:
      arrays = [jax.make_array_from_process_local_data(
          sharding.batch_sharding(self.mesh, x.ndim), x) for x in arrays]
    return lay, dict(zip(keys, arrays))

  def score(self, params: PyTree, teacher_def, teacher_params, rows: dict,
            geometry: packing.Geometry, diagnose: bool = True) -> tuple[dict, dict]:
    """Teacher scoring of a batch's rows (steps.score) with the run's estimator and parts; the
    student's own pass runs when the estimator reads it or `diagnose` is true."""
    return steps.score(self.graphdef, params, teacher_def, teacher_params, rows, diagnose,
                       shapes=self.shapes, full_logits=self.estimator.full_teacher_logits,
                       minibatches=self.settings.score_parts,
                       student_always=self.estimator.reads_student_scores(self.settings.loss),
                       packed=geometry.packed)

  def update_inputs(self, rows: dict, scores: dict) -> dict:
    """The arrays the update reads: the rows' tokens and masks, the estimator's scores."""
    keys = ("tokens", "segments", "response", "loss_mask", "s_index", "c_segments")
    out = {k: rows[k] for k in keys if k in rows}   # the last two: packed rows only
    return out | {k: scores[k] for k in self.estimator.score_keys}

  def run_update(self, state: steps.TrainState, inputs: dict, key,
                 geometry: packing.Geometry) -> tuple[steps.TrainState, dict]:
    """The update of one iteration on rows of `geometry`."""
    return self.update(state, inputs, key, geometry.micro, geometry.packed)

  def diagnostic(self, done: int) -> bool:
    """Whether iteration `done` (1-based) runs the diagnostic passes."""
    every = self.settings.log.diagnostics_every
    return bool(every) and (done % every == 0 or done == self.settings.steps)

  def drop_diagnostics(self, values: dict, done: int) -> dict:
    """`values` without the diagnostic metrics iteration `done` did not compute."""
    if self.diagnostic(done):
      return values
    skip = set(steps.UPDATE_DIAGNOSTIC_METRICS) | set(
        self.estimator.diagnostic_metrics(self.settings.loss))
    if not self.estimator.reads_student_scores(self.settings.loss):
      skip |= set(steps.STUDENT_PASS_METRICS)
    return {k: v for k, v in values.items() if k not in skip}

  def init_state(self, params: PyTree) -> steps.TrainState:
    """A fresh TrainState around `params`, created in the state's shardings."""
    s = self.settings
    return steps.init_state(params, s.opt, self.total_updates, self.state_shardings)


def build(s: TrainSettings, student_config: models.ModelConfig, vocab: int, mesh: Mesh, *,
          banned_ids: tuple[int, ...] = (), stop_ids: tuple[int, ...] = ()) -> Programs:
  """The programs of a run (nothing is compiled or allocated until they are called).

  Args:
    s: the run's settings.
    student_config: the student's architecture in its parameters' dtype.
    vocab: the vocabulary shared by the student and every teacher.
    mesh: the mesh.
    banned_ids / stop_ids: the rollouts' banned and stop token ids. The embedding rows past
      `vocab` are always banned (padding of some embedding).

  Returns:
    The Programs bundle.
  """
  estimator = estimators.get(s.loss.estimator)
  precision = s.model.precision
  total_updates = s.steps * s.minibatches
  shapes = steps.Shapes(vocab=vocab, k=max(s.loss.k, steps.MIN_TEACHER_TOPK), mesh=mesh)
  shardings = steps.train_state_shardings(student_config, s.opt, total_updates, mesh)
  _, params_abstract = steps.split_abstract(student_config)
  abstract = _with_shardings(steps.abstract_state(params_abstract, s.opt, total_updates),
                             shardings)
  graphdef, _ = steps.split_abstract(steps.compute_config(student_config, precision))
  padding = tuple(range(vocab, student_config.vocab_size))
  update = steps.make_update(student_config, s.loss, s.opt, shapes, s.minibatches, total_updates,
                             precision, s.log.diagnostics_every)
  return Programs(s, student_config, vocab, mesh, estimator, shapes, total_updates, graphdef,
                  shardings, abstract, tuple(banned_ids) + padding, tuple(stop_ids), update)
