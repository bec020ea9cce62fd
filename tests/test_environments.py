"""Environment tasks: the built-in game, the multi-turn driver's layout and masks, the loss's
independence of observation tokens, and training runs with an environment task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_helpers
import train_helpers
from opd_jax import configs, environments, models, sampling, settings, steps, train
from opd_jax.data import text_game, tiny_arith

EOS = tiny_arith.VOCAB.index(tiny_arith.EOS)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tiny_arith.make_tokenizer(tmp_path_factory.mktemp("tok"))


# ----------------------------------------------------------------------------------------------
# the game
# ----------------------------------------------------------------------------------------------


def test_game_rules():
  assert [text_game.secret(s) for s in range(5)] == [text_game.secret(s) for s in range(5)]
  secrets = {text_game.secret(s) for s in range(300)}
  assert secrets <= set(range(100)) and len(secrets) > 50
  assert text_game.clue(37, "40") == "+3=" and text_game.clue(37, " 7\n") == "+30="
  assert text_game.clue(37, "37") == text_game.SOLVED == "+0="
  for bad in ("", "123", "4+", "=", "٣"):      # not 1-2 ASCII digits
    assert text_game.clue(37, bad) == text_game.NO_CLUE
  env = environments.GuessNumber()
  with pytest.raises(RuntimeError, match="reset"):
    env.step("1")
  for seed in range(20):    # guess 0, then the distance: solved within two turns
    assert env.reset(seed) == text_game.START
    first = env.step("0")
    x = text_game.secret(seed)
    assert first.done == (x == 0)
    if not first.done:
      assert (first.observation, first.reward) == (f"+{x}=", 0.0)
      last = env.step(first.observation[1:-1])
      assert (last.done, last.success, last.reward) == (True, True, 1.0)
  with pytest.raises(ValueError, match="environment_config='x'"):
    environments.GuessNumber("x")


def test_registry_names_and_adapters():
  assert "text_game" in environments.names()
  assert isinstance(environments.make("text_game", "", 2)[1], environments.Environment)
  with pytest.raises(ValueError, match="'nope' is not registered; accepted: .*text_game"):
    environments.make("nope")
  with pytest.raises(ValueError, match="cannot load 'Missing' from module 'opd_jax.data'"):
    environments.make("opd_jax.data:Missing")
  # "module:factory" loads an adapter the package does not register.
  env = environments.make("opd_jax.environments:GuessNumber")[0]
  assert env.reset(0) == text_game.START


def test_episode_seeds_are_games_of_groups_and_a_function_of_seed_and_step():
  a = environments.episode_seeds(3, 5, 8, 2)
  np.testing.assert_array_equal(a, environments.episode_seeds(3, 5, 8, 2))   # a resume replays
  assert (a[0::2] == a[1::2]).all() and len(set(a[0::2].tolist())) == 4
  assert not np.array_equal(a, environments.episode_seeds(3, 6, 8, 2))
  with pytest.raises(ValueError, match="count=7 rows do not split into games of group=2"):
    environments.episode_seeds(3, 5, 7, 2)


# ----------------------------------------------------------------------------------------------
# the driver with a scripted sampler (exact layouts, nothing to compile)
# ----------------------------------------------------------------------------------------------


class Countdown:
  """Episode `seed` ends (done) after `seed` actions, successfully when seed is even; the
  observation after action k is "+k=" (its length grows with k)."""

  def __init__(self, config=""):
    del config
    self.actions, self.observations = [], []

  def reset(self, seed):
    self.seed, self.actions, self.observations = seed, [], []
    return "=" * (1 + seed % 3)     # first observations of different lengths

  def step(self, action):
    self.actions.append(action)
    k = len(self.actions)
    self.observations.append(f"+{k}=")
    done = k == self.seed
    return environments.Step(self.observations[-1], done, float(done), done and self.seed % 2 == 0)


def _policy(context):
  """The scripted student: a function of the context's real ids (digits, then <eos>)."""
  n = len(context)
  ids = [tiny_arith.VOCAB.index(str((n + j) % 10)) for j in range(1 + n % 3)] + [EOS]
  return np.asarray(ids, np.int32), -(n + np.arange(len(ids))) / 100.0


class ScriptedSampler:
  """Stands in for sampling.sample; records the rows of every call."""

  def __init__(self):
    self.calls = []

  def __call__(self, model, prompts, prompt_mask, rng, *, max_new_tokens, stop_token_ids, **kw):
    del model, rng, kw
    rows = prompts.shape[0]
    out = np.zeros((rows, max_new_tokens), np.int32)
    mask = np.zeros((rows, max_new_tokens), bool)
    lp = np.zeros((rows, max_new_tokens), np.float32)
    for r in range(rows):
      ids, logp = _policy(prompts[r][prompt_mask[r]])
      ids, logp = ids[:max_new_tokens], logp[:max_new_tokens]
      out[r, :len(ids)], mask[r, :len(ids)], lp[r, :len(ids)] = ids, True, logp
      assert EOS in stop_token_ids
    self.calls.append((rows, max_new_tokens))
    return sampling.Rollout(jnp.asarray(out), jnp.asarray(mask), jnp.asarray(lp - 0.5),
                            jnp.asarray(lp))


def _segments(mask):
  """(start, end, is_student) runs of a row's real tokens."""
  runs, start = [], 0
  for t in range(1, len(mask) + 1):
    if t == len(mask) or mask[t] != mask[start]:
      runs.append((start, t, bool(mask[start])))
      start = t
  return runs


def _drive(monkeypatch, tokenizer, seeds, *, max_turns, episode_tokens, row_multiple=1):
  sampler = ScriptedSampler()
  monkeypatch.setattr(environments.sampling, "sample", sampler)
  envs = [Countdown() for _ in seeds]
  limits = environments.EpisodeSettings(max_turns=max_turns, turn_tokens=8,
                                        episode_tokens=episode_tokens, stop_token_ids=(EOS,))
  batch = environments.rollout(None, envs, seeds, environments.PlainRenderer(tokenizer),
                               jax.random.key(0), limits, row_multiple=row_multiple)
  return batch, envs, sampler


def _check_layout(batch, envs, renderer, budget):
  """Every row against an independent reading: the student's segments are what the scripted
  policy answers to the context before them, observations are the environment's texts."""
  assert batch.response.shape[1] == budget
  cut = 0
  for i, env in enumerate(envs):
    real = batch.response_mask[i]
    n = int(real.sum())
    assert real[:n].all() and not real[n:].any()              # right-padded
    assert not (batch.loss_mask[i] & ~real).any()             # loss tokens are real tokens
    assert not batch.policy_logprobs[i][~batch.loss_mask[i]].any()
    prompt = batch.prompt[i][batch.prompt_mask[i]]
    assert renderer.decode(prompt) == batch.prompt_texts[i]
    runs = _segments(batch.loss_mask[i][:n])
    students = [r for r in runs if r[2]]
    observations = [r for r in runs if not r[2]]
    assert runs[0][2] and len(students) == len(observations) + (runs[-1][2])
    for k, (a, b, _) in enumerate(students):
      want, want_lp = _policy(np.concatenate([prompt, batch.response[i, :a]]))
      if b - a < len(want):   # cut by the episode budget: the last segment, never played
        assert k == len(students) - 1 and b == budget and batch.ended[i] == environments.BUDGET
        assert len(env.actions) == k
        want, want_lp = want[:b - a], want_lp[:b - a]
        cut += 1
      else:
        assert env.actions[k] == renderer.decode(want)
      np.testing.assert_array_equal(batch.response[i, a:b], want)
      np.testing.assert_allclose(batch.policy_logprobs[i, a:b], want_lp, rtol=1e-6)
      np.testing.assert_allclose(batch.sample_logprobs[i, a:b], want_lp - 0.5, rtol=1e-6)
    for k, (a, b, _) in enumerate(observations):
      np.testing.assert_array_equal(batch.response[i, a:b],
                                    renderer.observation(env.observations[k], True))
    assert batch.turns[i] == len(env.actions)
  return cut


def test_driver_layout_masks_and_episodes_ending_at_different_turns(monkeypatch, tokenizer):
  seeds = [1, 2, 3, 9, 4, 6]
  batch, envs, sampler = _drive(monkeypatch, tokenizer, seeds, max_turns=4, episode_tokens=64,
                                row_multiple=4)
  assert _check_layout(batch, envs, environments.PlainRenderer(tokenizer), 64) == 0
  np.testing.assert_array_equal(batch.turns, [1, 2, 3, 4, 4, 4])
  d, t = environments.DONE, environments.TURNS
  np.testing.assert_array_equal(batch.ended, [d, d, d, t, d, t])
  np.testing.assert_array_equal(batch.success, [False, True, False, False, True, False])
  np.testing.assert_array_equal(batch.reward, [1, 1, 1, 0, 1, 0])
  # Only unfinished episodes are sampled, padded to a multiple of 4 (the mesh's batch ways)
  # and to few distinct row counts: 6 -> 8 (capped), 5 -> 8, 4, 3 -> 4.
  assert [rows for rows, _ in sampler.calls] == [8, 8, 4, 4]
  m = batch.metrics()
  observed = (batch.response_mask & ~batch.loss_mask).sum()
  assert m["env/turns_mean"] == pytest.approx(18 / 6)
  assert m["env/success_rate"] == pytest.approx(2 / 6)
  assert m["env/observation_fraction"] == pytest.approx(observed / batch.response_mask.sum())
  assert 0 < m["env/observation_fraction"] < 1 and m["env/budget_ended_fraction"] == 0


def test_driver_budget_truncation(monkeypatch, tokenizer):
  budget = 8
  batch, envs, sampler = _drive(monkeypatch, tokenizer, [9, 9, 1, 9], max_turns=8,
                                episode_tokens=budget)
  cut = _check_layout(batch, envs, environments.PlainRenderer(tokenizer), budget)
  assert cut >= 1      # some response was cut at the budget (and not played)
  assert (batch.response_mask.sum(axis=1) <= budget).all()
  np.testing.assert_array_equal(batch.ended == environments.BUDGET, [True, True, False, True])
  assert batch.ended[2] == environments.DONE and batch.turns[2] == 1
  # The per-turn budget shrinks with the room left (a power of two, at most turn_tokens).
  assert all(new <= 8 and new & (new - 1) == 0 for _, new in sampler.calls)
  assert sampler.calls[-1][1] < 8


def test_chat_renderer_renders_observations_as_user_turns(tmp_path):
  tok = model_helpers.make_tokenizer(tmp_path / "chatml")
  end = environments.chat_turn_end(tok, ("<|endoftext|>", "<|im_end|>"))
  assert end == "<|im_end|>"
  r = environments.ChatRenderer(tok, end)
  closed = tok.decode(r.observation("+3=", True), skip_special_tokens=False)
  assert closed == "\n<|im_start|>user\n+3=<|im_end|>\n<|im_start|>assistant\n"
  opened = tok.decode(r.observation("+3=", False), skip_special_tokens=False)
  assert opened == "<|im_end|>" + closed
  # The prompt, a response, an observation and the next response read as one conversation.
  convo = [{"role": "user", "content": "="}, {"role": "assistant", "content": "42"},
           {"role": "user", "content": "+3="}]
  ids = r.prompt("=") + tok.encode("42<|im_end|>", add_special_tokens=False) + r.observation(
      "+3=", True)
  assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(
      convo, tokenize=False, add_generation_prompt=True)
  with pytest.raises(ValueError, match="none of the stop strings"):
    environments.chat_turn_end(tok, ("<|endoftext|>",))


def test_text_the_tokenizer_cannot_encode_is_an_error(tokenizer):
  with pytest.raises(ValueError, match="observation 'higher' does not survive"):
    environments.PlainRenderer(tokenizer).observation("higher", True)


# ----------------------------------------------------------------------------------------------
# the loss never reads observation positions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator, gamma", [
    ("lsm", 0.0), pytest.param("sampled_token", 0.9, marks=pytest.mark.slow)])
def test_teacher_scores_at_observation_positions_do_not_change_the_update(estimator, gamma):
  # sampled_token with γ > 0: a token's return sums the rewards of later student tokens across
  # the observations in between, and must not pick up the observations' teacher log-probs.
  vocab, rows, p, n = 14, 4, 4, 10
  config = models.ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=16,
                              intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                              head_dim=8, qkv_bias=True, max_position_embeddings=64)
  rng = np.random.default_rng(0)
  student = rng.random((rows, n)) < 0.6      # the rest of every row are observation tokens
  student[:, 0] = True
  batch = {"prompt": rng.integers(2, vocab, (rows, p)).astype(np.int32),
           "prompt_mask": np.ones((rows, p), bool),
           "response": rng.integers(2, vocab, (rows, n)).astype(np.int32),
           "loss_mask": student}
  _, s_params = nnx.split(models.init_model(config, seed=0, std=0.3))
  shapes = steps.Shapes(vocab=vocab, k=4, mesh=None)
  # Teacher scores in the layout steps.score returns (their values do not matter here).
  t_logits = np.sort(rng.normal(size=(rows, n, 4)).astype(np.float32), axis=-1)[..., ::-1]
  scores = {"t_indices": np.argsort(rng.random((rows, n, vocab)), axis=-1)[..., :4].astype(
                np.int32),
            "t_logits": t_logits.copy(), "t_lse": t_logits.max(-1) + 1.0,
            "t_sampled": t_logits[..., 0] - 0.5,
            "teacher_logprobs": -rng.random((rows, n)).astype(np.float32) * 3,
            "behavior_logprobs": -rng.random((rows, n)).astype(np.float32)}
  reads = {"lsm": ("t_indices", "t_logits", "t_lse", "t_sampled", "behavior_logprobs"),
           "sampled_token": ("teacher_logprobs", "behavior_logprobs")}[estimator]
  opt = settings.OptSettings(minibatch_size=rows, lr=1e-2, warmup_steps=0, schedule="constant",
                             b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=None)
  loss = settings.LossSettings(estimator, k=4, support="teacher", renormalize=True,
                               tail="none", tail_weight_clip=None, gamma=gamma, ppo_clip=0.2,
                               advantage_clip=None, chunk_tokens=1024, chunk_vocab=8192)
  update = steps.make_update(config, loss, opt, shapes, 1, 10)

  def run(where):
    s = {}
    for k, v in scores.items():
      shape = v.shape if v.ndim == 2 else v.shape[:2]
      shift = 2.0 * np.abs(rng.normal(size=v.shape)).astype(np.float32)
      change = {"t_indices": lambda: rng.permutation(vocab)[v],
                "t_logits": lambda: -np.sort(-(v + shift), axis=-1),   # still descending
                "t_lse": lambda: v + shift + 3.0}.get(k, lambda: v - shift)()
      s[k] = np.where(where.reshape(shape + (1,) * (v.ndim - 2)), change, v)
    state = steps.init_state(jax.tree.map(jnp.array, s_params), opt, 10, None)
    state, metrics = update(state, batch | {k: s[k] for k in reads}, jax.random.key(0))
    return jax.device_get(state.params), float(metrics["loss"])

  base, base_loss = run(np.zeros_like(student))
  obs, obs_loss = run(~student)
  assert obs_loss == base_loss
  jax.tree.map(np.testing.assert_array_equal, base, obs)
  # The same change at one student position does change the loss: the test can fail.
  one = np.zeros_like(student)
  one[0, 0] = True
  _, moved = run(one)
  assert np.isfinite(moved) and moved != base_loss


# ----------------------------------------------------------------------------------------------
# training with an environment task
# ----------------------------------------------------------------------------------------------


def _game_task(data_dir):
  game = configs.task_fields("game")
  game.environment = "text_game"
  game.max_turns = 2
  game.turn_tokens = 4
  game.episode_tokens = 12
  game.teacher.random.hidden_size = 32
  game.teacher.random.intermediate_size = 64
  game.teacher.random.init_std = 0.5
  return game




@pytest.mark.slow  # keeps `make test` under 10 minutes; `make test-all` runs it
def test_two_iterations_of_an_environment_task(tmp_path, tiny_arith_dir):
  c = train_helpers.tiny_config(tmp_path, tiny_arith_dir, steps=2, **{
      "data.prompts_per_step": 8, "opt.minibatch_size": 8, "log.samples_every": 1})
  c.data.dataset = ""
  c.tasks = (_game_task(tiny_arith_dir),)
  history = train.run(c, log=lambda _: None)
  assert [h["step"] for h in history] == [1, 2]
  last = history[-1]
  assert all(np.isfinite(v) for h in history for v in h.values())
  assert {"env/turns_mean", "env/success_rate", "env/observation_fraction",
          "env/reward_mean"} <= set(last)
  assert 1 <= last["env/turns_mean"] <= 2 and 0 <= last["env/success_rate"] <= 1
  assert 0 < last["env/observation_fraction"] < 1
  # The sampler's log-probs of every student token (drawn turn by turn, each turn prefilled with
  # the episode so far) equal the trainer's one forward pass over [prompt | resp | obs | resp]:
  # the student's tokens sit in the batch exactly where their contexts say.
  assert last["rollout/logprob_mismatch_max"] < 1e-4
  assert (tmp_path / "samples" / "step_2.html").exists()


@pytest.mark.slow
def test_environment_task_alternates_with_a_dataset_task(tmp_path, tiny_arith_dir):
  c = train_helpers.tiny_config(tmp_path, tiny_arith_dir, steps=2, **{
      "data.prompts_per_step": 8, "opt.minibatch_size": 8})
  arith = configs.task_fields("arith")
  arith.data.dataset = "tiny_arith"
  arith.data.data_dir = str(tiny_arith_dir)
  c.tasks = (arith, _game_task(tiny_arith_dir))
  history = train.run(c, log=lambda _: None)
  assert [h["task_index"] for h in history] == [0.0, 1.0]
  assert "task/game/env/turns_mean" in history[1] and "task/arith/loss" in history[0]
  assert all(np.isfinite(v) for h in history for v in h.values())


@pytest.mark.parametrize("task, match", [
    ({"environment": "nope"}, r"config.tasks\[0\].environment='nope' is not accepted"),
    ({"environment": "text_game", "data.dataset": "tiny_arith"},
     r"config.tasks\[0\].data.dataset='tiny_arith' .*either dataset prompts or environment"),
    ({"environment": "text_game", "max_turns": 0}, r"config.tasks\[0\].max_turns=0"),
    ({"environment": "text_game", "episode_tokens": -1}, r"config.tasks\[0\].episode_tokens=-1"),
    ({}, r"config.tasks\[0\].data.dataset='' .*or set tasks\[0\].environment"),
])
def test_bad_environment_settings_are_refused(tmp_path, task, match):
  c = train_helpers.tiny_config(tmp_path / "w", tmp_path / "tfds")
  t = configs.task_fields("t")
  for name, value in task.items():
    node = t
    *parents, leaf = name.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  c.tasks = (t,)
  with pytest.raises(settings.ConfigError, match=match):
    settings.TrainSettings.from_config(c)
