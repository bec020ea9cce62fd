"""opd_jax.settings: each config group read by one frozen dataclass, the same messages as ever."""

import dataclasses

import pytest

import train_helpers
from opd_jax import configs, settings
from opd_jax.settings import ConfigError, TrainSettings


def test_every_key_of_a_trainer_group_is_a_field_of_its_dataclasses_and_back():
  """The ConfigDict declares each setting (with its comment) and the dataclasses read them by
  name: a key nobody reads, or a field no key feeds, fails here."""
  c = settings.plain(configs.opd())
  for group, classes in settings.GROUPS.items():
    fields = {f.name for cls in classes for f in dataclasses.fields(cls)}
    assert set(c[group]) == fields, (group, set(c[group]) ^ fields)


def test_groups_are_nested_not_flattened(tmp_path, tiny_arith_dir):
  c = train_helpers.tiny_config(tmp_path, tiny_arith_dir, **{
      "checkpoint.init_step": 3, "loss.ppo_clip": 0.0, "loss.gamma": 1, "mesh.fsdp": 2,
      "log.samples_every": 0, "loss.mask_strings": ("<eos>",), "rollout.compact": False})
  s = TrainSettings.from_config(c)
  assert s.checkpoint == settings.CheckpointSettings(every=2, keep=3, async_save=True, init="",
                                                     init_step=3)
  assert s.loss.ppo_clip is None                       # 0 = off
  assert s.loss.gamma == 1.0 and isinstance(s.loss.gamma, float)   # an int given for a float
  assert s.loss.mask_strings == ("<eos>",)
  assert s.rollout.compact is False and configs.opd().rollout.compact is True
  assert s.mesh.shape == (-1, 2, 1) and s.log.samples_every == 0
  assert s.data.prompts_per_step == 4 and s.rollouts_per_step == 8 and s.minibatches == 2
  hash(s.loss), hash(s.opt)   # static arguments of the compiled update
  c.checkpoint.init_step = -1
  assert TrainSettings.from_config(c).checkpoint.init_step is None


@pytest.mark.parametrize("key, value, match", [
    ("data.retokenize_max_fraction", 2.0, r"config.data.retokenize_max_fraction=2.0 is not "
     r"accepted; accepted: \[0, 1\]"),
    ("rollout.top_k", -1, r"config.rollout.top_k=-1 is not accepted; accepted: an int >= 0"),
    ("loss.tail", "x", r"config.loss.tail='x' is not accepted; accepted: none, ema_pg"),
    ("opt.minibatch_size", 3, r"the 8 rollouts per step \(data.prompts_per_step=4 x "
     r"rollout.num_samples=2\) must split into whole mini-batches"),
    ("mesh.accelerator", "h1000", r"config.mesh.accelerator='h1000'"),
    ("checkpoint.init_step", -2, r"config.checkpoint.init_step=-2"),
    ("log.samples_count", -1, r"config.log.samples_count=-1 is not accepted"),
    ("eval.every", -1, r"config.eval.every=-1 is not accepted"),
])
def test_each_group_names_the_bad_setting(tmp_path, tiny_arith_dir, key, value, match):
  c = train_helpers.tiny_config(tmp_path, tiny_arith_dir, **{key: value})
  with pytest.raises(ConfigError, match=match):
    TrainSettings.from_config(c)
