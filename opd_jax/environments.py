"""Multi-turn environment tasks: the environment interface, a registry, and the rollout driver.

An episode is a conversation: the environment's first observation is the prompt, then the student
answers (one sampled response per turn, ended by a stop token or the turn's token budget), the
environment observes, the student answers again, and so on until the environment says `done`,
the turn limit, or the episode's token budget. The driver lays an episode out as the trainer's
batch row: `response` = [resp1 | obs1 | resp2 | obs2 | ... | respT], `response_mask` true on every
real token, `loss_mask` true only on the student's own tokens (observations are context: the
teacher and the student read them, the loss never counts them), `policy_logprobs` the sampler's
log-probs on the student's tokens (0 elsewhere). docs/environments.md describes the interface
and how an ALFWorld adapter plugs in.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from opd_jax import sampling, sharding
from opd_jax.data import prompts, text_game

# Why an episode ended (EpisodeBatch.ended).
DONE, TURNS, BUDGET = 0, 1, 2
# Stands for a response when a chat template renders the text that follows one.
_MARK = "\x00response\x00"


# ----------------------------------------------------------------------------------------------
# the interface
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
  """What an environment answers to one action.

  observation: the text the student reads next (not shown when `done`).
  done: the episode is over (solved, failed, or ended by the environment's own step limit).
  reward: this step's reward (an episode's rewards are summed; logged, not trained on).
  success: the episode ended in success (read when `done`).
  """
  observation: str
  done: bool
  reward: float = 0.0
  success: bool = False


@runtime_checkable
class Environment(Protocol):
  """One episode at a time; the driver keeps one instance per batch row and resets it per step.

  reset(seed) starts a new episode (the same seed gives the same episode) and returns its first
  observation as text; step(action) plays the student's decoded response of one turn.
  """

  def reset(self, seed: int) -> str: ...

  def step(self, action: str) -> Step: ...


class Renderer(Protocol):
  """How an episode's texts become the student's token ids (and back).

  prompt(text): ids of the first observation as a prompt (the student continues from them).
  observation(text, closed): ids inserted after a response and before the next one; `closed`
    says whether the response ended with a stop token (if not, the renderer closes the turn).
  decode(ids): a response's ids as the action text the environment receives.
  """

  def prompt(self, text: str) -> list[int]: ...

  def observation(self, text: str, closed: bool) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


def _encode_exact(tokenizer: Any, text: str, what: str) -> list[int]:
  ids = list(tokenizer.encode(text, add_special_tokens=False))
  back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
  if back != text:
    raise ValueError(f"the {what} {text!r:.200} does not survive the student's tokenizer (it "
                     f"decodes back as {back!r:.200}); the environment's texts must use characters "
                     "the tokenizer encodes")
  return ids


@dataclasses.dataclass(frozen=True)
class PlainRenderer:
  """Texts encoded as they are, no chat template (character tokenizers, the built-in game).

  close: text inserted after a response that did not stop by itself ("" = nothing).
  """
  tokenizer: Any
  close: str = ""

  def prompt(self, text: str) -> list[int]:
    return _encode_exact(self.tokenizer, text, "first observation")

  def observation(self, text: str, closed: bool) -> list[int]:
    head = "" if closed else self.close
    return _encode_exact(self.tokenizer, head + text, "observation")

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)


@dataclasses.dataclass(frozen=True)
class ChatRenderer:
  """Observations as user turns of the tokenizer's chat template (ALFWorld-style agents).

  The first observation is the user turn of the prompt (after `system`, if any). A later
  observation is the text the template puts after an assistant turn's end marker `turn_end`
  (e.g. "<|im_end|>"): for ChatML, "\\n<|im_start|>user\\n{obs}<|im_end|>\\n<|im_start|>
  assistant\\n". A response cut by the turn's budget is closed with `turn_end` first.
  """
  tokenizer: Any
  turn_end: str
  system: str | None = None

  def _head(self) -> list[dict[str, str]]:
    return [] if self.system is None else [{"role": "system", "content": self.system}]

  def prompt(self, text: str) -> list[int]:
    return prompts.encode_prompt(self._head() + [{"role": "user", "content": text}],
                                 self.tokenizer)

  def observation(self, text: str, closed: bool) -> list[int]:
    conversation = self._head() + [{"role": "user", "content": "."},
                                   {"role": "assistant", "content": _MARK},
                                   {"role": "user", "content": text}]
    rendered = self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                  add_generation_prompt=True)
    anchor = _MARK + self.turn_end
    if anchor not in rendered:
      raise ValueError(f"the chat template does not end an assistant turn with "
                       f"turn_end={self.turn_end!r}; set the renderer's turn_end to the template's "
                       "end-of-turn marker (one of config.rollout.stop_strings)")
    after = rendered.split(anchor, 1)[1]
    return _encode_exact(self.tokenizer, after if closed else self.turn_end + after, "observation")

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def chat_turn_end(tokenizer: Any, candidates: Sequence[str]) -> str:
  """The first of `candidates` (e.g. config.rollout.stop_strings) that the tokenizer's chat
  template writes right after an assistant message: the marker that ends a turn."""
  probe = [{"role": "user", "content": "."}, {"role": "assistant", "content": _MARK}]
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("the tokenizer has no chat_template; set config.data.chat_template=False "
                     "for plain observations, or use a tokenizer that ships a template")
  rendered = tokenizer.apply_chat_template(probe, tokenize=False)
  for end in candidates:
    if _MARK + end in rendered:
      return end
  raise ValueError(f"none of the stop strings {tuple(candidates)} ends an assistant turn in the "
                   "tokenizer's chat template; add its end-of-turn marker to "
                   "config.rollout.stop_strings")


# ----------------------------------------------------------------------------------------------
# the built-in game and the registry
# ----------------------------------------------------------------------------------------------


class GuessNumber:
  """The built-in text game (`opd_jax.data.text_game`) as an Environment."""

  def __init__(self, config: str = ""):
    if config:
      raise ValueError(f"the text_game environment takes no configuration; got "
                       f"environment_config={config!r} (accepted: \"\")")
    self._secret: int | None = None

  def reset(self, seed: int) -> str:
    self._secret = text_game.secret(seed)
    return text_game.START

  def step(self, action: str) -> Step:
    if self._secret is None:
      raise RuntimeError("step() outside an episode: call reset(seed) first")
    obs = text_game.clue(self._secret, action)
    if obs == text_game.SOLVED:
      self._secret = None
      return Step(obs, done=True, reward=1.0, success=True)
    return Step(obs, done=False)


# name -> factory(config: str) -> Environment. "module:attribute" names an external factory.
_REGISTRY: dict[str, Callable[[str], Environment]] = {"text_game": GuessNumber}


def register(name: str, factory: Callable[[str], Environment]) -> None:
  """Makes `factory(config) -> Environment` available as `tasks[i].environment = name`."""
  if not name or ":" in name:
    raise ValueError(f"environment name {name!r} must be non-empty and without ':' (':' marks "
                     "a 'module:factory' path)")
  _REGISTRY[name] = factory


def names() -> tuple[str, ...]:
  """The registered environment names."""
  return tuple(sorted(_REGISTRY))


def check_name(name: str) -> None:
  """Raises ValueError unless `name` is registered or has the form 'module:factory'."""
  if name in _REGISTRY:
    return
  module, _, attr = name.partition(":")
  if not (module and attr):
    raise ValueError(f"environment {name!r} is not registered; accepted: "
                     f"{', '.join(names())}, or 'package.module:factory' of an adapter")


def factory(name: str) -> Callable[[str], Environment]:
  """The factory of a registered name, or attribute `f` of the module `m` for a name 'm:f'."""
  check_name(name)
  if name in _REGISTRY:
    return _REGISTRY[name]
  module, _, attr = name.partition(":")
  try:
    return getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"environment {name!r}: cannot load {attr!r} from module {module!r} "
                     f"({e}); the module must be importable (installed or on PYTHONPATH)") from e


def make(name: str, config: str = "", count: int = 1) -> list[Environment]:
  """`count` fresh environments `factory(name)(config)`, checked against the interface."""
  build = factory(name)
  envs = [build(config) for _ in range(count)]
  for env in envs[:1]:
    if not isinstance(env, Environment):
      raise TypeError(f"environment {name!r} made a {type(env).__name__}, which lacks "
                      "reset(seed) -> str and step(action) -> Step")
  return envs


def episode_seeds(seed: int, step: int, count: int, group: int) -> np.ndarray:
  """Episode seeds of one iteration: `count` rows, each `group` consecutive rows one game."""
  if count % group:
    raise ValueError(f"count={count} rows do not split into games of group={group} episodes")
  games = np.random.default_rng([seed, step]).integers(0, 2 ** 31 - 1, count // group)
  return np.repeat(games, group)


# ----------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EpisodeSettings:
  """Limits of an episode and how its turns are sampled (static, hashable).

  max_turns: student responses per episode at most.
  turn_tokens: the sampler's budget for one response.
  episode_tokens: N, the budget of all responses and observations after the prompt.
  """
  max_turns: int
  turn_tokens: int
  episode_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  banned_token_ids: tuple[int, ...] = ()
  stop_token_ids: tuple[int, ...] = ()
  vocab_size: int | None = None     # tokens sampled and normalised over (sampling.sample)


@dataclasses.dataclass
class EpisodeBatch:
  """A batch of finished episodes in the trainer's layout (host numpy arrays, R rows).

  prompt, prompt_mask: [R, P] left-padded first observations (the student's rendering).
  response, response_mask, loss_mask, policy_logprobs, sample_logprobs: [R, N], N the episode
    budget; loss_mask is true exactly on the student's tokens, response_mask on every real one.
  turns: [R] student responses per episode; success, reward: [R]; ended: [R] DONE | TURNS |
    BUDGET; prompt_texts: the first observations.
  """
  prompt: np.ndarray
  prompt_mask: np.ndarray
  response: np.ndarray
  response_mask: np.ndarray
  loss_mask: np.ndarray
  policy_logprobs: np.ndarray
  sample_logprobs: np.ndarray
  turns: np.ndarray
  success: np.ndarray
  reward: np.ndarray
  ended: np.ndarray
  prompt_texts: list[str]

  def metrics(self, prefix: str = "env/") -> dict[str, float]:
    """Turns per episode, success rate, reward, observation-token fraction, budget endings."""
    real = max(int(self.response_mask.sum()), 1)
    observed = int((self.response_mask & ~self.loss_mask).sum())
    return {f"{prefix}turns_mean": float(self.turns.mean()),
            f"{prefix}success_rate": float(self.success.mean()),
            f"{prefix}reward_mean": float(self.reward.mean()),
            f"{prefix}observation_fraction": observed / real,
            f"{prefix}budget_ended_fraction": float(np.mean(self.ended == BUDGET))}


def _pow2_at_least(n: int) -> int:
  return 1 << (max(n, 1) - 1).bit_length()


def _row_bucket(count: int, multiple: int, total: int) -> int:
  """Rows sampled in a turn: `count` active episodes padded to a power of two times `multiple`
  (few compiled shapes; the mesh splits the rows evenly), at most `total` rounded up."""
  cap = -(-total // multiple) * multiple
  return min(multiple * _pow2_at_least(-(-count // multiple)), cap)


def rollout(model, envs: Sequence[Environment], seeds: Sequence[int], renderer: Renderer,
            rng: jax.Array, settings: EpisodeSettings, *, mesh=None, row_multiple: int = 1,
            max_prompt_len: int | None = None) -> EpisodeBatch:
  """Plays one episode per environment with the student; returns them in the trainer's layout.

  Each turn samples every unfinished episode's next response with `sampling.sample` (one
  compiled program per row bucket, context bucket and per-turn budget; the context is the
  prompt plus the episode so far, prefilled anew each turn), decodes it on the host, steps the
  environment and appends the observation's ids. An episode ends when the environment says
  done, after `max_turns` responses, or when the episode's tokens reach `episode_tokens` (a
  response cut there is kept but not played; an observation that leaves no room for a response
  ends the episode unshown). A response that uses its whole turn budget is played as it is.

  Args:
    model: the student (`opd_jax.models.Decoder`).
    envs: one environment per row (reset here with the row's seed).
    seeds: one episode seed per row.
    renderer: the student's texts <-> ids (`PlainRenderer`, `ChatRenderer`).
    rng: PRNG key; turn t samples with fold_in(rng, t).
    settings: the episode limits and sampling settings.
    mesh: optional mesh for the sampler (rows over the batch axes).
    row_multiple: the sampled row count is a multiple of this (the mesh's batch ways).
    max_prompt_len: optional limit on a first observation's ids.

  Returns:
    An EpisodeBatch of len(envs) rows.
  """
  if len(seeds) != len(envs):
    raise ValueError(f"got {len(seeds)} seeds for {len(envs)} environments; give one seed per "
                     "row")
  if settings.max_turns < 1 or settings.turn_tokens < 1 or settings.episode_tokens < 1:
    raise ValueError(f"episode settings {settings} need max_turns, turn_tokens and "
                     "episode_tokens >= 1")
  firsts, prompt_ids = _first_observations(envs, seeds, renderer, max_prompt_len)
  episodes = _Episodes.start(prompt_ids)
  for turn in range(settings.max_turns):
    active = episodes.active()
    if not active:
      break
    response = _sample_turn(model, episodes, active, jax.random.fold_in(rng, turn), settings,
                            mesh=mesh, row_multiple=row_multiple)
    for j, i in enumerate(active):
      _play_response(episodes, i, [x[j] for x in response], envs[i], renderer, settings)
  return episodes.batch(settings.episode_tokens, firsts)


def _first_observations(envs: Sequence[Environment], seeds: Sequence[int], renderer: Renderer,
                        max_prompt_len: int | None) -> tuple[list[str], list[np.ndarray]]:
  """Resets each environment with its row's seed; returns the first observations (texts) and
  their prompt ids, checked against `max_prompt_len`."""
  firsts = [env.reset(int(seed)) for env, seed in zip(envs, seeds)]
  prompt_ids = [np.asarray(renderer.prompt(t), np.int32) for t in firsts]
  for t, ids in zip(firsts, prompt_ids):
    if not len(ids) or (max_prompt_len and len(ids) > max_prompt_len):
      raise ValueError(f"the first observation {t!r:.100} renders as {len(ids)} tokens; "
                       f"accepted: 1 to max_prompt_len={max_prompt_len}")
  return firsts, prompt_ids


@dataclasses.dataclass
class _Episodes:
  """The episodes being played. Per row: the prompt ids, the episode's ids after the prompt,
  whose they are (True: the student's), the sampler's log-probs (0 on observations), and the
  counters of EpisodeBatch (`ended` is -1 while the episode goes on)."""
  prompt_ids: list[np.ndarray]
  tokens: list[list[int]]
  student: list[list[bool]]
  policy_lp: list[list[float]]
  sample_lp: list[list[float]]
  turns: np.ndarray
  success: np.ndarray
  reward: np.ndarray
  ended: np.ndarray

  @classmethod
  def start(cls, prompt_ids: list[np.ndarray]) -> _Episodes:
    """Episodes with nothing after their prompts yet."""
    n = len(prompt_ids)
    return cls(prompt_ids=prompt_ids, tokens=[[] for _ in range(n)],
               student=[[] for _ in range(n)], policy_lp=[[] for _ in range(n)],
               sample_lp=[[] for _ in range(n)], turns=np.zeros(n, np.int32),
               success=np.zeros(n, bool), reward=np.zeros(n, np.float32),
               ended=np.full(n, -1, np.int32))

  def active(self) -> list[int]:
    """The rows whose episode has not ended."""
    return [i for i in range(len(self.tokens)) if self.ended[i] < 0]

  def extend(self, i: int, ids, mine: bool, plp=None, slp=None) -> None:
    """Appends `ids` to row i: the student's (with the sampler's log-probs) or observed."""
    self.tokens[i].extend(int(x) for x in ids)
    self.student[i].extend([mine] * len(ids))
    zeros = [0.0] * len(ids)
    self.policy_lp[i].extend(zeros if plp is None else (float(x) for x in plp))
    self.sample_lp[i].extend(zeros if slp is None else (float(x) for x in slp))

  def batch(self, budget: int, prompt_texts: list[str]) -> EpisodeBatch:
    """The episodes in the trainer's layout: rows right-padded to the episode budget."""
    prompt, prompt_mask = prompts.left_pad(self.prompt_ids, 0, sampling.bucket_length(
        max(map(len, self.prompt_ids))))

    def right(rows, dtype):
      out = np.zeros((len(rows), budget), dtype)
      for i, row in enumerate(rows):
        out[i, :len(row)] = row
      return out

    return EpisodeBatch(
        prompt=prompt, prompt_mask=prompt_mask, response=right(self.tokens, np.int32),
        response_mask=right([[True] * len(t) for t in self.tokens], bool),
        loss_mask=right(self.student, bool), policy_logprobs=right(self.policy_lp, np.float32),
        sample_logprobs=right(self.sample_lp, np.float32), turns=self.turns,
        success=self.success, reward=self.reward, ended=self.ended, prompt_texts=prompt_texts)


def _sample_turn(model, episodes: _Episodes, active: list[int], key: jax.Array,
                 settings: EpisodeSettings, *, mesh, row_multiple: int
                 ) -> tuple[np.ndarray, ...]:
  """Samples the next response of every active episode from its prompt and episode so far.

  Returns:
    Host arrays (tokens, mask, policy log-probs, sample log-probs), row j for `active[j]`.
  """
  budget = settings.episode_tokens
  room = max(budget - len(episodes.tokens[i]) for i in active)
  new = min(settings.turn_tokens, _pow2_at_least(room))
  rows = _row_bucket(len(active), row_multiple, len(episodes.tokens))
  picked = active + [active[0]] * (rows - len(active))   # padding rows are discarded
  context = [np.concatenate([episodes.prompt_ids[i], np.asarray(episodes.tokens[i], np.int32)])
             for i in picked]
  ctx, ctx_mask = prompts.left_pad(context, 0, sampling.bucket_length(max(map(len, context))))
  out = sampling.sample(
      model, ctx, ctx_mask, key, max_new_tokens=new, temperature=settings.temperature,
      top_p=settings.top_p, top_k=settings.top_k, banned_token_ids=settings.banned_token_ids,
      stop_token_ids=settings.stop_token_ids, mesh=mesh, vocab_size=settings.vocab_size)
  return tuple(sharding.to_host(x) for x in (
      out.tokens, out.mask, out.policy_logprobs, out.sample_logprobs))


def _play_response(episodes: _Episodes, i: int, response: Sequence[np.ndarray],
                   env: Environment, renderer: Renderer, settings: EpisodeSettings) -> None:
  """Appends row i's sampled response (tokens, mask, log-probs), cut at the episode budget,
  and plays it: the environment's answer ends the episode or appends its observation."""
  toks, live, plp, slp = response
  budget = settings.episode_tokens
  keep = min(int(live.sum()), budget - len(episodes.tokens[i]))
  ids = toks[:keep]
  episodes.extend(i, ids, True, plp[:keep], slp[:keep])
  stopped = bool(keep) and int(ids[-1]) in settings.stop_token_ids
  if not stopped and keep < settings.turn_tokens:
    # Neither stopped nor out of its turn budget: cut by the episode budget (the sampler's
    # budget this turn is at most the room left), so the action is incomplete: not played.
    episodes.ended[i] = BUDGET
    return
  episodes.turns[i] += 1
  result = env.step(renderer.decode(ids))
  episodes.reward[i] += result.reward
  if result.done:
    episodes.ended[i], episodes.success[i] = DONE, bool(result.success)
    return
  if episodes.turns[i] == settings.max_turns:
    episodes.ended[i] = TURNS
    return
  obs = renderer.observation(result.observation, stopped)
  if len(episodes.tokens[i]) + len(obs) >= budget:   # no room left for another response
    episodes.ended[i] = BUDGET
    return
  episodes.extend(i, obs, False)
