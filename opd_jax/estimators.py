"""The trainer's estimators as objects, registered by name: what each needs and its loss.

An estimator says whether it trains on the student's own rollouts (else on the dataset's
reference responses), which per-token score arrays of the teacher-scoring phase its update reads,
whether scoring must keep the teacher's full logits, its own config checks, and its loss on one
mini-batch given the student's hidden states. Nothing else in the package compares estimator
names: `get(name)` is the one place a name becomes behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from opd_jax import losses, models, topk

Array = jax.Array
REGISTRY: dict[str, type[Estimator]] = {}


class EstimatorError(ValueError):
  """A setting the configured estimator cannot work with."""


def register(cls: type[Estimator]) -> type[Estimator]:
  """Class decorator: makes `cls` available as `config.loss.estimator = cls.name`."""
  if cls.name in REGISTRY:
    raise ValueError(f"estimator {cls.name!r} is registered twice")
  REGISTRY[cls.name] = cls
  return cls


def names() -> tuple[str, ...]:
  """The registered estimator names, in registration order."""
  return tuple(REGISTRY)


def get(name: str) -> Estimator:
  """The estimator registered as `name`."""
  if name not in REGISTRY:
    raise EstimatorError(f"config.loss.estimator={name!r} is not accepted; accepted: "
                         f"{', '.join(REGISTRY)}")
  return REGISTRY[name]()


class Estimator:
  """Base class: the update's loss on one mini-batch and what it needs from the other phases."""
  name: ClassVar[str]
  # True: rollouts sampled from the student (OPD); False: the dataset's reference responses.
  samples: ClassVar[bool] = True
  # The per-token arrays of the scoring phase (steps.score) that the update reads.
  score_keys: ClassVar[tuple[str, ...]] = ()
  # Scoring also returns the teacher's [R, N, V] logits (only estimators that need them).
  full_teacher_logits: ClassVar[bool] = False

  def check(self, loss: Any, vocab: int) -> None:
    """Raises EstimatorError for settings this estimator cannot use (vocab: the shared size)."""
    del loss, vocab

  def reads_student_scores(self, loss: Any) -> bool:
    """Whether the loss reads the scoring phase's student log-probs ("behavior_logprobs"); when
    it does not, scoring runs the student only on diagnostic iterations."""
    del loss
    return False

  def diagnostic_metrics(self, loss: Any) -> tuple[str, ...]:
    """The loss's diagnostics that cost a pass of their own and are computed only when `loss`
    is called with `diagnose` true (NaN otherwise): the trainer logs them on diagnostic
    iterations only."""
    del loss
    return ()

  def loss(self, model, hidden: Array, mb: dict, loss: Any, vocab: int, mesh: Mesh | None,
           diagnose: bool | Array = True) -> tuple[Array, dict]:
    """(token-mean loss, scalar diagnostics incl. "policy/entropy") of one mini-batch.

    Args:
      model: the student (compute dtype), for its unembedding.
      hidden: [m, N, D] hidden states predicting each response token.
      mb: the mini-batch: response / loss_mask [m, N] and the `score_keys` arrays, per token in
        the compact layout of `opd_jax.packing` (c_segments [m, N]: the sequence of each token,
        present for packed rows).
      loss: the run's LossSettings.
      vocab: the vocabulary shared with the teacher (ids >= vocab never count).
      mesh: the mesh the arrays are laid out on (None: one device).
      diagnose: compute the `diagnostic_metrics` too (a bool, or a traced scalar: one program
        either way; where false they are NaN, or left out when statically false). The loss and
        its gradient do not depend on it.
    """
    raise NotImplementedError

  def logits_loss(self, student_logits: Array, teacher_logits: Array, tokens: Array,
                  mask: Array, loss: Any) -> Array:
    """The same token-mean loss on materialised logits (the estimator diagnostics differentiate
    it with respect to the student's logits at a sample of positions).

    Args:
      student_logits / teacher_logits: [B, T, V] float32 over the shared vocabulary.
      tokens: [B, T] the sampled (or reference) tokens; mask: [B, T] the positions that count.
      loss: the run's LossSettings.
    """
    raise NotImplementedError


def _behavior(student_logits: Array, tokens: Array) -> Array:
  """The student's own log-probs of `tokens`, as constants: the behaviour policy of an
  on-policy sample (importance weights and PPO ratios are 1 at the current parameters)."""
  return jax.lax.stop_gradient(losses.token_logprobs(student_logits, tokens))


def _token_mean(x: Array, mask: Array) -> Array:
  return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _on_full_logits(model, hidden: Array, mb: dict, vocab: int,
                    fn: Callable[[Array], tuple[Array, dict]]) -> tuple[Array, dict]:
  """`fn(logits)` on the student's [m, N, V] float32 logits of one mini-batch, plus the policy
  entropy (no gradient): what every estimator but the fused top-K one needs."""
  logits = models.logits_from_hidden(model, hidden)[..., :vocab]
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  entropy = _token_mean(-jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1), mb["loss_mask"])
  value, aux = fn(logits)
  aux = {k: v for k, v in aux.items() if k != "kl/student_entropy"}
  aux["policy/entropy"] = jax.lax.stop_gradient(entropy)
  return value, aux


@register
class LocalSupportMatching(Estimator):
  """Teacher top-K local support matching (the paper's fix), fused with the unembedding."""
  name = "lsm"
  score_keys = ("behavior_logprobs", "t_indices", "t_logits", "t_lse", "t_sampled")

  def check(self, loss, vocab):
    if loss.k > vocab:
      raise EstimatorError(f"config.loss.k={loss.k} exceeds the shared vocabulary of {vocab} "
                           "tokens; accepted: 1 <= k <= vocabulary size")

  def reads_student_scores(self, loss):
    return loss.tail != "none"   # the tail's importance weight reads the behaviour log-probs

  def diagnostic_metrics(self, loss):
    if not loss.renormalize or loss.tail != "none":
      return ()   # the loss itself reads the vocabulary sweep: they come with it
    return tuple("policy/entropy" if m == "kl/student_entropy" else m for m in topk.STATISTICS)

  def loss(self, model, hidden, mb, loss, vocab, mesh, diagnose=True):
    k = loss.k
    teacher = topk.TopK(mb["t_indices"][..., :k], mb["t_logits"][..., :k], mb["t_lse"],
                        mb["t_sampled"])
    value, aux = topk.topk_reverse_kl_from_hidden(
        hidden, models.unembedding(model)[:, :vocab], teacher, mb["loss_mask"],
        support=loss.support, renormalize=loss.renormalize, tail=loss.tail,
        sampled_tokens=mb["response"], behavior_logprobs=mb["behavior_logprobs"],
        tail_weight_clip=loss.tail_weight_clip, chunk_tokens=loss.chunk_tokens,
        chunk_vocab=loss.chunk_vocab, mesh=mesh, statistics=diagnose)
    aux = dict(aux)
    if "kl/student_entropy" in aux:
      aux["policy/entropy"] = aux.pop("kl/student_entropy")
    return value, aux

  def logits_loss(self, student_logits, teacher_logits, tokens, mask, loss):
    return losses.topk_reverse_kl(
        student_logits, teacher_logits, mask, k=loss.k, support=loss.support,
        renormalize=loss.renormalize, tail=loss.tail, sampled_tokens=tokens,
        behavior_logprobs=_behavior(student_logits, tokens),
        tail_weight_clip=loss.tail_weight_clip)[0]


@register
class SampledToken(Estimator):
  """The sampled-token OPD baseline (Eq. 5; ĝ_γ of Eq. 3) with PPO clipping."""
  name = "sampled_token"
  score_keys = ("behavior_logprobs", "teacher_logprobs")

  def reads_student_scores(self, loss):
    return True

  def loss(self, model, hidden, mb, loss, vocab, mesh, diagnose=True):
    return _on_full_logits(model, hidden, mb, vocab, lambda logits: losses.sampled_token_opd(
        losses.token_logprobs(logits, mb["response"]), mb["teacher_logprobs"], mb["loss_mask"],
        gamma=loss.gamma, behavior_logprobs=mb["behavior_logprobs"], ppo_clip=loss.ppo_clip,
        advantage_clip=loss.advantage_clip, segment_ids=mb.get("c_segments")))

  def logits_loss(self, student_logits, teacher_logits, tokens, mask, loss):
    return losses.sampled_token_opd(
        losses.token_logprobs(student_logits, tokens),
        losses.token_logprobs(teacher_logits, tokens), mask, gamma=loss.gamma,
        behavior_logprobs=_behavior(student_logits, tokens), ppo_clip=loss.ppo_clip,
        advantage_clip=loss.advantage_clip)[0]


@register
class FullReverseKL(Estimator):
  """The full-vocabulary reverse KL (Eq. 4) against the teacher's materialised logits."""
  name = "full_rkl"
  score_keys = ("behavior_logprobs", "teacher_logits")
  full_teacher_logits = True

  def loss(self, model, hidden, mb, loss, vocab, mesh, diagnose=True):
    return _on_full_logits(model, hidden, mb, vocab, lambda logits: losses.full_reverse_kl(
        logits, mb["teacher_logits"], mb["loss_mask"]))

  def logits_loss(self, student_logits, teacher_logits, tokens, mask, loss):
    return losses.full_reverse_kl(student_logits, teacher_logits, mask)[0]


@register
class SupervisedFineTuning(Estimator):
  """Cross-entropy on the dataset's reference responses: a control, not OPD."""
  name = "sft"
  samples = False

  def loss(self, model, hidden, mb, loss, vocab, mesh, diagnose=True):
    return _on_full_logits(model, hidden, mb, vocab, lambda logits: (
        _token_mean(-losses.token_logprobs(logits, mb["response"]), mb["loss_mask"]), {}))

  def logits_loss(self, student_logits, teacher_logits, tokens, mask, loss):
    return _token_mean(-losses.token_logprobs(student_logits, tokens), mask)
