"""The trainer's compiled phases: teacher scoring (no gradient) and the update (mini-batched AdamW).

Both are pure functions of arrays and frozen settings. The rollout phase is `sampling.sample`.
Rows are split over the mesh's batch axes. The passes read a batch in the rows of
`opd_jax.packing`: student rows tokens / segments [R, W], teacher rows t_tokens / t_segments
[R, Wt], and the per-token arrays in the compact layout [R, C] (response, masks, scores). With
one sequence per row (`packed=False`: packing "off" or "trim") a row is [prompt (left-padded to
P) | response] and response token t is predicted by the hidden state at P - 1 + t; packed rows
(`packed=True`) hold several sequences and name those positions in s_index / t_index [R, C]. A
batch of prompt / prompt_mask / teacher_prompt / teacher_prompt_mask and [R, N] response arrays
(`as_rows`) is the unpacked layout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from opd_jax import estimators, models, sharding, topk
from opd_jax.settings import LossSettings, OptSettings, Precision

Array = jax.Array
PyTree = Any
# The teacher's top entries kept per position: the loss's K, and at least 3 for the samples page.
MIN_TEACHER_TOPK = 3


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds: the student's parameters, the optimizer state, iterations done."""
  params: PyTree
  opt_state: PyTree
  step: Array


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Static facts about one run's tensors (hashable: keys the compiled programs)."""
  vocab: int               # shared vocabulary of student and teacher (ids >= vocab never count)
  k: int                   # teacher top entries kept by scoring (>= the loss's K)
  mesh: Mesh | None


def make_optimizer(opt: OptSettings, total_updates: int) -> tuple[optax.GradientTransformation,
                                                                  optax.Schedule]:
  """AdamW with global-norm clipping and a warm-up + constant / cosine schedule."""
  warm = optax.linear_schedule(0.0, opt.lr, opt.warmup_steps) if opt.warmup_steps else None
  rest = max(total_updates - opt.warmup_steps, 1)
  after = (optax.cosine_decay_schedule(opt.lr, rest) if opt.schedule == "cosine"
           else optax.constant_schedule(opt.lr))
  schedule = (optax.join_schedules([warm, after], [opt.warmup_steps]) if warm is not None
              else after)
  parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip else []
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay))
  return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------


def as_rows(batch: dict) -> dict:
  """A batch of [R, P] prompts and [R, N] responses in the unpacked rows the passes read (the
  identity on a batch that already has them): student rows [prompt | response], teacher rows
  [teacher_prompt | response]. Response positions count as real tokens even after a row's stop:
  causality keeps what follows a response out of everything before it."""
  if "tokens" in batch:
    return batch
  out = {k: v for k, v in batch.items() if k not in (
      "prompt", "prompt_mask", "teacher_prompt", "teacher_prompt_mask")}
  ones = jnp.ones(batch["response"].shape, jnp.int32)
  for side, prompt in (("", "prompt"), ("t_", "teacher_prompt")):
    if prompt in batch:
      out[side + "tokens"] = jnp.concatenate([batch[prompt], batch["response"]], axis=1)
      out[side + "segments"] = jnp.concatenate(
          [batch[prompt + "_mask"].astype(jnp.int32), ones], axis=1)
  return out


def _response_hidden(model, tokens: Array, segments: Array, index: Array | None, n: int,
                     packed: bool) -> Array:
  """[R, n, D] hidden states that predict each compact token (one full causal pass): the last
  n positions but one of each row, or (packed rows) the positions `index` names."""
  if not packed:
    hidden = models.forward(model, tokens, segments > 0, return_hidden=True)
    width = tokens.shape[1]
    return hidden[:, width - n - 1:width - 1]
  hidden = models.forward(model, tokens, segments > 0, return_hidden=True, segment_ids=segments)
  return jnp.take_along_axis(hidden, index[..., None], axis=1)


def _stats(model, hidden: Array, response: Array, shapes: Shapes, k: int) -> topk.TopK:
  """Top-k, logsumexp and sampled-token logit over the shared vocabulary, never [R, N, V]."""
  unembed = models.unembedding(model)[:, :shapes.vocab]
  return topk.teacher_topk_from_hidden(hidden, unembed, k=k, sampled_tokens=response,
                                       mesh=shapes.mesh)


def compute_config(config: models.ModelConfig, precision: Precision | None
                   ) -> models.ModelConfig:
  """The architecture of the compute copy: `config` with the compute dtype (None: unchanged)."""
  if precision is None or config.dtype == precision.compute_dtype:
    return config
  return dataclasses.replace(config, dtype=precision.compute_dtype)


def cast_params(params: PyTree, dtype: str | None) -> PyTree:
  """Floating-point leaves cast to `dtype` (traceable; the identity when dtype is None)."""
  if dtype is None:
    return params
  target = jnp.dtype(dtype)
  return jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x, params)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _cast_jit(params: PyTree, dtype: str) -> PyTree:
  return cast_params(params, dtype)


def compute_params(params: PyTree, precision: Precision | None) -> PyTree:
  """The parameters the sampler and the scoring run on: a compute-dtype copy when the policy is
  mixed (same shardings; freed by the caller before the update), else `params` themselves."""
  if precision is None or not precision.mixed:
    return params
  return _cast_jit(params, precision.compute_dtype)


def _token_mean(x: Array, mask: Array) -> Array:
  return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _constrain_rows(x: Array, mesh: Mesh | None) -> Array:
  if mesh is None or x.ndim == 0:
    return x
  return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh, x.ndim))


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------


def _split_rows(x: Array, parts: int) -> Array:
  """[R, ...] -> [parts, R / parts, ...], row i to part i % parts (each device keeps its rows)."""
  return jnp.swapaxes(x.reshape((x.shape[0] // parts, parts) + x.shape[1:]), 0, 1)


def _join_rows(x: Array) -> Array:
  """The inverse of `_split_rows`."""
  return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _score_rows(student, teacher, batch: dict, shapes: Shapes, full_logits: bool,
                student_pass: bool, packed: bool) -> dict:
  """Per-token scores of some rows: both models' top-k statistics, never [R, N, V]. Without
  `student_pass` the student's log-probs are the sampler's ("policy_logprobs", the same
  distribution) and its top-k indices are -1."""
  batch = jax.tree.map(lambda x: _constrain_rows(x, shapes.mesh), batch)
  resp, rmask = batch["response"], batch["response_mask"]
  n = resp.shape[1]
  t_hidden = _response_hidden(teacher, batch["t_tokens"], batch["t_segments"],
                              batch.get("t_index"), n, packed)
  t = _stats(teacher, t_hidden, resp, shapes, shapes.k)
  if student_pass:
    s_hidden = _response_hidden(student, batch["tokens"], batch["segments"],
                                batch.get("s_index"), n, packed)
    s = _stats(student, s_hidden, resp, shapes, shapes.k)
    behavior, s_indices = s.sampled_logits - s.logsumexp, s.indices
  else:
    behavior, s_indices = batch["policy_logprobs"], jnp.full_like(t.indices, -1)
  scores = {"behavior_logprobs": jnp.where(rmask, behavior, 0.0),
            "teacher_logprobs": jnp.where(rmask, t.sampled_logits - t.logsumexp, 0.0),
            "t_indices": t.indices, "t_logits": t.logits, "t_lse": t.logsumexp,
            "t_sampled": t.sampled_logits, "s_indices": s_indices}
  if full_logits:
    scores["teacher_logits"] = models.logits_from_hidden(teacher, t_hidden)[..., :shapes.vocab]
  return scores


# Metrics of the scoring phase that need the student's own pass: logged on diagnostic
# iterations only when the estimator does not read the student's scores.
STUDENT_PASS_METRICS = ("teacher/topk_overlap", "rollout/logprob_mismatch_max",
                        "rollout/logprob_mismatch_mean")


@functools.partial(jax.jit, static_argnames=("student_def", "teacher_def", "shapes",
                                             "full_logits", "minibatches", "student_always",
                                             "packed"))
def score(student_def, student_params, teacher_def, teacher_params, batch: dict,
          diagnose: Array | bool = True, *, shapes: Shapes, full_logits: bool = False,
          minibatches: int = 1, student_always: bool = True, packed: bool = False
          ) -> tuple[dict, dict]:
  """Teacher scoring of a rollout batch, plus the student's own log-probs before the update.

  Args:
    student_def, student_params: the student (graphdef and parameters; no gradient).
    teacher_def, teacher_params: the teacher (never donated).
    batch: the rows (module docstring; `as_rows` of prompt / prompt_mask [R, P],
      teacher_prompt / teacher_prompt_mask [R, Pt] (the same conversation rendered for the
      teacher) and response arrays), and per token [R, C]: response / response_mask /
      loss_mask, policy_logprobs (the sampler's untruncated student log-probs); optional
      sampled_mask, the tokens the sampler drew (default response_mask; an environment
      episode's observation tokens are real response tokens the sampler did not draw).
    shapes: static vocabulary, top-k and mesh.
    full_logits: also return the teacher's [R, N, V] logits ("teacher_logits"; only for an
      estimator that reads them, `Estimator.full_teacher_logits`).
    minibatches: score the rows in this many strided parts, one after the other (a divisor of
      R; the update's mini-batches), so that activations of R / minibatches rows are live at a
      time. The scores do not depend on it.
    diagnose: (traced bool) run the student's pass (used unless `student_always`).
    packed: rows hold several sequences (`opd_jax.packing`, mode "pack").
    student_always: the student's pass runs whatever `diagnose` (the estimator reads its
      log-probs). Otherwise it runs only when `diagnose` is true (a `lax.cond`: one program);
      else "behavior_logprobs" are the sampler's `policy_logprobs` and the `STUDENT_PASS_METRICS`
      are meaningless (the trainer does not log them).

  Returns:
    (scores, metrics): per-token arrays for the update and the samples page, and scalar
    diagnostics (teacher−student gap, teacher top-K mass, sampled tokens outside the teacher's
    top-K, student/teacher top-K overlap, sampler-vs-trainer log-prob mismatch).
  """
  with sharding.traced_under(shapes.mesh):
    student, teacher = (nnx.merge(student_def, student_params),
                        nnx.merge(teacher_def, teacher_params))
    batch = as_rows(batch)
    run = functools.partial(_score, student, teacher, batch, shapes, full_logits, minibatches,
                            packed=packed)
    if student_always:
      return run(student_pass=True)
    return jax.lax.cond(diagnose, lambda: run(student_pass=True),
                        lambda: run(student_pass=False))


def _score(student, teacher, batch: dict, shapes: Shapes, full_logits: bool, minibatches: int,
           *, student_pass: bool, packed: bool) -> tuple[dict, dict]:
  resp = batch["response"]
  rmask, lmask = batch["response_mask"], batch["loss_mask"]
  keys = ("tokens", "segments", "t_tokens", "t_segments", "response", "response_mask",
          "policy_logprobs") + (("s_index", "t_index") if packed else ())
  rows = {k: batch[k] for k in keys}

  def part(mb):
    return _score_rows(student, teacher, mb, shapes, full_logits, student_pass, packed)

  if minibatches == 1:
    scores = part(rows)
  else:
    per_part = jax.lax.map(part, jax.tree.map(lambda x: _split_rows(x, minibatches), rows))
    scores = jax.tree.map(lambda x: _constrain_rows(_join_rows(x), shapes.mesh), per_part)
  s_indices = scores.pop("s_indices")
  behavior, teacher_lp = scores["behavior_logprobs"], scores["teacher_logprobs"]
  t_indices = scores["t_indices"]
  inside = jnp.any(t_indices == resp[..., None], axis=-1)
  overlap = jnp.mean(jnp.any(s_indices[..., :, None] == t_indices[..., None, :], axis=-1), -1)
  sampled = batch.get("sampled_mask", rmask)
  mismatch = jnp.abs(batch["policy_logprobs"] - behavior)
  metrics = {
      "teacher/logp_gap": _token_mean(teacher_lp - behavior, lmask),
      "teacher/topk_mass": _token_mean(
          jnp.sum(jnp.exp(scores["t_logits"] - scores["t_lse"][..., None]), -1), lmask),
      "teacher/sampled_outside_topk": _token_mean(~inside, lmask),
      "teacher/topk_overlap": _token_mean(overlap, lmask),
      "rollout/logprob_mismatch_max": jnp.max(jnp.where(sampled, mismatch, 0.0)),
      "rollout/logprob_mismatch_mean": _token_mean(mismatch, sampled),
  }
  return scores, metrics


# ----------------------------------------------------------------------------------------------
# update
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Update:
  """The update's pieces: the estimator's loss on a (micro-)batch, its gradient accumulated
  over micro-batches, one AdamW step per mini-batch, and the KL to the sampling policy."""
  estimator: estimators.Estimator
  loss: LossSettings
  shapes: Shapes
  graphdef: Any
  cast_to: str | None
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  minibatches: int
  micro: int
  steps: int                # iterations of the run (the last one is a diagnostic iteration)
  diagnostics_every: int    # the post-update KL runs on iterations divisible by it (0: never)
  packed: bool = False      # rows hold several sequences (opd_jax.packing)

  def model(self, params: PyTree):
    return nnx.merge(self.graphdef, cast_params(params, self.cast_to))

  def constrain(self, tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: _constrain_rows(x, self.shapes.mesh), tree)

  def hidden(self, model, mb: dict) -> Array:
    return _response_hidden(model, mb["tokens"], mb["segments"], mb.get("s_index"),
                            mb["response"].shape[1], self.packed)

  def loss_fn(self, params: PyTree, mb: dict, diagnose) -> tuple[Array, dict]:
    model = self.model(params)
    return self.estimator.loss(model, self.hidden(model, mb), mb, self.loss, self.shapes.vocab,
                               self.shapes.mesh, diagnose=diagnose)

  def grads(self, params: PyTree, mb: dict, diagnose):
    """((loss, aux), grads) of a mini-batch's token-mean loss, one micro-batch at a time."""
    grad_fn = functools.partial(jax.value_and_grad(self.loss_fn, has_aux=True),
                                diagnose=diagnose)
    if self.micro == 1:
      return grad_fn(params, mb)
    parts = jax.tree.map(lambda x: _split_rows(x, self.micro), mb)
    total = jnp.maximum(jnp.sum(mb["loss_mask"]), 1).astype(jnp.float32)

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                         jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], parts)))

    def add(acc, part):
      (value_sum, aux_sum), grad_sum = acc
      count = jnp.sum(part["loss_mask"])
      # A micro-batch without loss tokens (packed rows' padding micro-batches) is skipped.
      (value, aux), grads = jax.lax.cond(count > 0, lambda: grad_fn(params, self.constrain(part)),
                                         lambda: zeros)
      share = count.astype(jnp.float32) / total
      # Token counts add up; every other diagnostic is a token mean, weighted like the loss.
      aux_sum = {k: aux_sum[k] + (v if k.endswith("/num_tokens") else share * v)
                 for k, v in aux.items()}
      grad_sum = jax.tree.map(lambda a, g: a + share * g, grad_sum, grads)
      return ((value_sum + share * value, aux_sum), grad_sum), None

    return jax.lax.scan(add, zeros, parts)[0]

  def step(self, carry, mb: dict, diagnose):
    """One AdamW step on one mini-batch (a lax.scan body); `carry` ends with the step count
    of the iteration's first mini-batch plus this one's index."""
    params, opt_state, j = carry
    (value, aux), grads = self.grads(params, self.constrain(mb), diagnose)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    out = {"loss": value, "opt/grad_norm": optax.tree.norm(grads), "opt/lr": self.schedule(j),
           **aux}
    return (params, opt_state, j + 1), out

  def kl_before_after(self, params: PyTree, batch: dict) -> Array:
    """k1 estimate of KL(π_old ‖ π_new) on the batch's own tokens (rollouts of π_old)."""
    new = self.model(params)

    def new_logprobs(mb):
      mb = self.constrain(mb)
      stats = _stats(new, self.hidden(new, mb), mb["response"], self.shapes, 1)
      return stats.sampled_logits - stats.logsumexp

    # One micro-batch at a time, like the steps: a pass over the whole batch would hold
    # `minibatches * micro` times the activations of a forward pass.
    parts = jax.tree.map(lambda x: _split_rows(x, self.minibatches * self.micro), batch)
    new_lp = jax.lax.map(new_logprobs, {k: parts[k] for k in ("tokens", "segments", "s_index",
                                                              "response") if k in parts})
    return _token_mean(parts["behavior_logprobs"] - new_lp, parts["loss_mask"])

  def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    batch = self.constrain(as_rows(batch))
    mbs = jax.tree.map(lambda x: _split_rows(x, self.minibatches), batch)
    first = state.step * self.minibatches
    # Diagnostic iterations (Programs.diagnostic: every diagnostics_every-th and the last; none
    # when it is 0) also compute the loss's own diagnostic metrics and the KL below.
    done = state.step + 1
    due = ((done % self.diagnostics_every == 0) | (done == self.steps)
           if self.diagnostics_every else False)
    (params, opt_state, _), per_mb = jax.lax.scan(
        functools.partial(self.step, diagnose=due),
        (state.params, state.opt_state, first.astype(jnp.int32)), mbs)
    metrics = jax.tree.map(jnp.mean, per_mb)
    metrics["opt/grad_norm_max"] = jnp.max(per_mb["opt/grad_norm"])
    if self.estimator.samples and self.diagnostics_every:
      # The KL to the policy that sampled the rollouts: one more student pass, on diagnostic
      # iterations only (elsewhere 0, and the trainer does not log it).
      metrics["policy/kl_before_after"] = jax.lax.cond(
          due, lambda: self.kl_before_after(params, batch), lambda: jnp.zeros((), jnp.float32))
    return TrainState(params, opt_state, state.step + 1), metrics


# Metrics of the update that cost a pass of their own: logged on diagnostic iterations only.
UPDATE_DIAGNOSTIC_METRICS = ("policy/kl_before_after",)


@functools.lru_cache(maxsize=16)
def make_update(config: models.ModelConfig, loss: LossSettings, opt: OptSettings,
                shapes: Shapes, minibatches: int, total_updates: int,
                precision: Precision | None = None, diagnostics_every: int = 1):
  """The jitted `update(state, batch, key, micro=None, packed=False) -> (state, metrics)` of one
  configuration. `batch`: rows as `score` reads them (module docstring) plus the estimator's
  score arrays; `micro` (static, positional): micro-batches per mini-batch (None: the
  settings'; packed rows give their own); `packed` (static, positional): rows hold several
  sequences.

  `config` is the architecture in the parameters' dtype. With a mixed `precision`, the loss casts
  the parameters to the compute dtype inside the differentiated function, so the forward and
  backward passes run in it while gradients, AdamW moments and updates stay in the parameters'
  dtype (None: compute in the parameters' dtype).

  The batch's rows are split into `minibatches` strided mini-batches (row i goes to mini-batch
  i % minibatches, so each device keeps its rows), one AdamW step each, in a `lax.scan`. With
  `opt.microbatch_size`, each mini-batch is split the same way into micro-batches whose
  gradients are accumulated (in a second scan) before its step: each micro-batch's token-mean
  loss is weighted by its share of the mini-batch's loss tokens, so the step's gradient is the
  mini-batch's token-mean gradient (to float rounding) and only one micro-batch's activations are
  live at a time; diagnostics are weighted the same way (token counts are summed). Metrics
  are means over the mini-batches, plus, on iterations divisible by `diagnostics_every` and the
  last one, the KL between the policy before and after the update, estimated on the batch's own
  tokens (k1: E[log π_old − log π_new] over rollouts of π_old; 0 on other iterations).
  The state is donated; with a mesh, state and batch keep explicit shardings. The key is part
  of the update's signature (a stochastic loss would draw from it); no estimator uses it today.
  """
  tx, schedule = make_optimizer(opt, total_updates)
  graphdef, _ = split_abstract(compute_config(config, precision))
  program = _Update(estimators.get(loss.estimator), loss, shapes, graphdef,
                    precision.compute_dtype if precision is not None and precision.mixed
                    else None, tx, schedule, minibatches, opt.microbatches,
                    total_updates // minibatches, diagnostics_every)

  def update(state: TrainState, batch: dict, key: Array, micro: int | None = None,
             packed: bool = False) -> tuple[TrainState, dict]:
    del key
    layout = dataclasses.replace(program, micro=micro or program.micro, packed=packed)
    with sharding.traced_under(shapes.mesh):
      return layout(state, batch)

  static = (3, 4)     # micro, packed
  if shapes.mesh is None:
    return jax.jit(update, donate_argnums=0, static_argnums=static)
  state = train_state_shardings(config, opt, total_updates, shapes.mesh)
  rows = NamedSharding(shapes.mesh, PartitionSpec(sharding.BATCH_AXES))
  return jax.jit(update, donate_argnums=0, static_argnums=static,
                 in_shardings=(state, rows, sharding.replicated(shapes.mesh)),
                 out_shardings=(state, sharding.replicated(shapes.mesh)))


# ----------------------------------------------------------------------------------------------
# state construction
# ----------------------------------------------------------------------------------------------


def _suffix_lookup(shardings_by_path: dict, path: tuple, fallback):
  """The sharding of the parameter whose key path is the longest suffix of `path`."""
  for start in range(len(path)):
    hit = shardings_by_path.get(path[start:])
    if hit is not None:
      return hit
  return fallback


def split_abstract(config: models.ModelConfig) -> tuple[Any, PyTree]:
  """(graphdef, abstract parameters) of a Decoder with `config`, allocating nothing."""
  return nnx.split(nnx.eval_shape(lambda: models.Decoder(config)))


@functools.lru_cache(maxsize=16)
def train_state_shardings(config: models.ModelConfig, opt: OptSettings, total_updates: int,
                          mesh: Mesh) -> TrainState:
  """Shardings of a TrainState: parameters by `models.model_shardings`, optimizer moments like
  their parameters (matched by key path), scalars replicated."""
  _, params = split_abstract(config)
  param_shardings = models.model_shardings(params, mesh)
  by_path = dict(jax.tree_util.tree_flatten_with_path(param_shardings)[0])
  rep = sharding.replicated(mesh)
  abstract = abstract_state(params, opt, total_updates)

  def opt_leaf(path, leaf):
    s = _suffix_lookup(by_path, path, rep)
    return s if len(s.spec) <= leaf.ndim else rep

  opt_shardings = jax.tree_util.tree_map_with_path(opt_leaf, abstract.opt_state)
  return TrainState(params=param_shardings, opt_state=opt_shardings, step=rep)


def init_state(params: PyTree, opt: OptSettings, total_updates: int,
               shardings: TrainState | None) -> TrainState:
  """A fresh TrainState around `params`, created directly in `shardings` (one jitted init)."""
  tx, _ = make_optimizer(opt, total_updates)

  def init(p):
    return TrainState(p, tx.init(p), jnp.zeros((), jnp.int32))

  if shardings is None:
    return jax.jit(init)(params)
  return jax.jit(init, in_shardings=(shardings.params,), out_shardings=shardings)(params)


def abstract_state(params: PyTree, opt: OptSettings, total_updates: int) -> TrainState:
  """The TrainState's shapes and dtypes, without allocating anything."""
  tx, _ = make_optimizer(opt, total_updates)
  return jax.eval_shape(lambda p: TrainState(p, tx.init(p), jnp.zeros((), jnp.int32)), params)
