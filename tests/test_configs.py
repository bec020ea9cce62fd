"""The shared defaults of the experiment files: opd(), the paper's settings, variant arguments."""

import ml_collections
import pytest

from opd_jax import configs, settings
from test_experiments import FILES, load

# The groups of settings the trainer reads (opd_jax.settings.TrainSettings.from_config).
GROUPS = ("model", "teacher", "data", "rollout", "loss", "opt", "mesh", "checkpoint", "eval",
          "log")


def test_opd_has_every_group_the_trainer_reads():
  c = configs.opd()
  for group in GROUPS:
    assert isinstance(c[group], ml_collections.ConfigDict), group
  assert set(configs.base()) <= set(c)
  assert (c.experiment, c.tasks, c.smoke) == ("opd", (), False)
  assert set(c) == set(configs.base()) | set(GROUPS) | {"steps", "smoke", "tasks"}
  # A task carries its own prompts (or environment) and teacher, shaped like the single task's.
  task = configs.task_fields("math")
  assert task.name == "math"
  assert set(task.data) == set(configs.dataset_fields())
  assert set(task.teacher) == set(c.teacher) == set(configs.model_fields())


@pytest.mark.parametrize("arg", [None, "smoke"])
@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_experiment_files_keep_the_type_of_every_default(path, arg):
  c = settings.plain(load(path, arg)[1])
  if c["experiment"] in ("opd", "opd_eval", "tiny_arith"):
    c.pop("demo", None)   # the demo's own group; the rest is the trainer's config
    settings.check_keys(c, settings.plain(configs.opd()))
  else:
    # Runners of their own: only the fields every experiment has are shared.
    base = settings.plain(configs.base())
    settings.check_keys({k: c[k] for k in base}, base)


def test_the_type_check_above_catches_a_changed_type():
  c = settings.plain(configs.opd())
  c["loss"]["k"] = "32"   # a ConfigDict refuses this itself; a plain mapping does not
  with pytest.raises(settings.ConfigError, match=r"config.loss.k='32' is not accepted; "
                                                 "expected a int like the default 32"):
    settings.check_keys(c, settings.plain(configs.opd()))


@pytest.mark.parametrize("arg, flags, want", [
    (None, ("smoke",), (None, set())),
    ("", ("smoke",), (None, set())),
    ("k16", ("smoke",), ("k16", set())),
    ("k16,smoke", ("smoke",), ("k16", {"smoke"})),
    ("smoke,k16", ("smoke",), ("k16", {"smoke"})),
    ("smoke", ("smoke",), (None, {"smoke"})),
    ("sampled,p0.8,smoke", ("smoke", "sampled"), ("p0.8", {"smoke", "sampled"})),
    ("p0.8,,", ("smoke", "sampled"), ("p0.8", set())),
])
def test_split_variant(arg, flags, want):
  assert configs.split_variant(arg, "'k16' | 'k32'", flags) == want


def test_more_than_one_variant_is_unknown():
  with pytest.raises(ValueError, match=r"^unknown config argument 'k16,k32'; accepted: 'k16' \| "
                                       r"'k32', each optionally with ',smoke' \(or 'smoke' "
                                       r"alone: the default variant\)$"):
    configs.split_variant("k16,k32", "'k16' | 'k32'")
  error = configs.unknown_variant("x", "'a'")
  assert isinstance(error, ValueError) and str(error).startswith("unknown config argument 'x'")


def test_table_a1_math():
  c = configs.opd()
  configs.table_a1_math(c)
  assert c.experiment == "opd_eval"
  assert (c.model.path, c.teacher.path) == ("", "")
  assert (c.model.plan_arch, c.teacher.plan_arch) == ("qwen2.5-7b-instruct", "openthinker3-7b")
  assert (c.model.dtype, c.model.param_dtype, c.teacher.dtype) == ("bfloat16", "float32",
                                                                   "bfloat16")
  assert (c.model.remat, c.mesh.accelerator) == ("full", "h100")
  assert c.data.dataset == "dapo_math_17k"
  assert c.data.prompts_per_step * c.rollout.num_samples == 128
  assert (c.opt.minibatch_size, c.opt.microbatch_size, c.opt.lr) == (64, 8, 2e-6)
  assert (c.steps, c.eval.every) == (400, 50)
  assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, 8, 1)
  ablation = configs.table_a1_ablation()
  assert (tuple(ablation.eval.benchmarks), ablation.eval.samples) == (("aime24",), 32)


def test_smoke_math_shrinks_to_cpu_and_sets_smoke():
  c = configs.opd()
  configs.table_a1_math(c)
  configs.smoke_math(c)
  assert c.smoke is True
  assert c.steps == 2
  assert (c.model.dtype, c.model.param_dtype, c.teacher.dtype) == ("float32", "", "float32")
  assert c.mesh.accelerator == ""
  assert (c.data.prompts_per_step, c.rollout.num_samples, c.rollout.max_new_tokens) == (8, 2, 8)
  assert c.data.prompts_per_step * c.rollout.num_samples % c.opt.minibatch_size == 0
  assert (c.loss.k, c.eval.limit, c.eval.max_new_tokens) == (4, 2, 8)
  assert (c.log.samples_every, c.log.tensorboard) == (0, False)
  # Caps, not settings: smaller values stay.
  small = configs.table_a1_ablation()
  small.loss.k, small.eval.samples = 2, 1
  configs.smoke_math(small)
  assert (small.loss.k, small.eval.samples) == (2, 1)
  ablation = configs.table_a1_ablation()
  configs.smoke_math(ablation)
  assert ablation.eval.samples == 2


def test_multitask_smoke_plays_the_text_game():
  c = configs.opd()
  configs.table_a1_math(c)
  configs.math_and_alfworld_tasks(c)
  assert [t.name for t in c.tasks] == ["math", "alfworld"]
  configs.smoke_math_and_text_game(c)
  assert c.smoke is True
  assert [t.name for t in c.tasks] == ["math", "text_game"]
  assert c.tasks[1].environment == "text_game"
  assert all(t.teacher.dtype == "float32" for t in c.tasks)
