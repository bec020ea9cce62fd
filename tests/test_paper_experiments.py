"""The paper's experiment files: Table A1's settings, every variant, and 2 training steps plus
evaluations on CPU with tiny random models, a ChatML tokenizer and a few data rows."""

import importlib.util
import json
import pathlib
import types

import pytest

import eval_helpers
from opd_jax import evaluate, main, sharding
from opd_jax.settings import TrainSettings

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE1 = ("math_lsm", "math_lsm_mask", "math_sampled_opd", "math_sampled_opd_mask")
ABLATIONS = ("ablation_top_p", "ablation_k", "ablation_support")
MULTITASK = ("multitask_lsm", "multitask_sampled_opd")
FILES = TABLE1 + ABLATIONS + MULTITASK
# Every (file, argument) a user can launch.
VARIANTS = ([(f, None) for f in FILES] +
            [("ablation_top_p", a) for a in ("p1.0", "p0.9", "p0.8", "sampled,p1.0",
                                             "sampled,p0.9", "sampled,p0.8")] +
            [("ablation_k", a) for a in ("k16", "k32", "k48")] +
            [("ablation_support", a) for a in ("teacher", "teacher+sampled", "teacher_tail")])


def load(name, arg=None):
  path = ROOT / "experiments" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return eval_helpers.build_assets(tmp_path_factory.mktemp("paper_assets"))


@pytest.mark.parametrize("name, arg", VARIANTS, ids=[f"{f}:{a}" for f, a in VARIANTS])
def test_table_a1_settings(name, arg):
  c = load(name, arg)
  assert c.experiment == "opd_eval"
  assert (c.model.path, c.model.dtype) == ("", "bfloat16")
  teachers = [t.teacher for t in c.tasks] if c.tasks else [c.teacher]
  assert all(t.path == "" and t.dtype == "bfloat16" for t in teachers)
  math_data = c.tasks[0].data if c.tasks else c.data
  assert math_data.dataset == "dapo_math_17k"
  assert (c.data.max_prompt_len, c.rollout.max_new_tokens) == (2048, 16384)
  assert c.data.prompts_per_step * c.rollout.num_samples == 128 and c.rollout.num_samples == 8
  assert (c.opt.minibatch_size, c.opt.lr, c.opt.warmup_steps, c.steps) == (64, 2e-6, 0, 400)
  assert c.rollout.temperature == 1.0
  assert (c.eval.top_p, c.eval.temperature) == (0.9, 1.0)
  sampled = c.loss.estimator == "sampled_token"
  if sampled:
    assert (c.loss.gamma, c.loss.ppo_clip) == (0.0, 0.2)
  else:
    assert c.loss.estimator == "lsm"
  if name in ABLATIONS:
    assert (tuple(c.eval.benchmarks), c.eval.samples) == (("aime24",), 32)
  else:
    assert (tuple(c.eval.benchmarks), c.eval.samples) == (evaluate.MATH_BENCHMARKS, 1)
  want_top_p = {"p1.0": 1.0, "p0.8": 0.8}.get((arg or "").split(",")[-1], 0.9)
  if name in TABLE1 + MULTITASK:
    want_top_p = 1.0 if sampled else 0.9
  assert c.rollout.top_p == want_top_p
  assert c.loss.k == ({"k16": 16, "k48": 48}.get(arg, 32))
  masked = name.endswith("_mask")
  assert tuple(c.loss.mask_strings) == (eval_helpers.MASK_STRINGS if masked else ())
  support = {"teacher+sampled": ("teacher+sampled", True, "none"),
             "teacher_tail": ("teacher", False, "ema_pg")}.get(arg, ("teacher", True, "none"))
  if not sampled:
    assert (c.loss.support, c.loss.renormalize, c.loss.tail) == support
  assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, 8, 1)
  assert c.opt.minibatch_size % (c.mesh.data * c.mesh.fsdp) == 0


def fill_paths(c, assets, workdir):
  """eval_helpers.fill_paths, keeping an environment task (the smoke's text game) free of a
  dataset: a task draws either dataset prompts or environment episodes."""
  eval_helpers.fill_paths(c, assets, workdir)
  for task in c.tasks:
    if task.environment:
      task.data.dataset = ""


def test_multitask_second_task_is_the_agentic_task_the_user_must_set(assets, tmp_path):
  for name in MULTITASK:
    c = load(name)
    assert [t.name for t in c.tasks] == ["math", "alfworld"]
    agent = c.tasks[1]
    assert (agent.environment, agent.data.dataset) == ("", "")
    assert (agent.turn_tokens, agent.max_turns) == (512, 50)
    fill_paths(c, assets, tmp_path)
    c.tasks[1].data.dataset = ""
    with pytest.raises(ValueError, match=r"tasks\[1\]\.data\.dataset='' .*tasks\[1\]\.environment"):
      TrainSettings.from_config(c)
    # The smoke plays the built-in game in its place.
    smoke = load(name, "smoke")
    assert (smoke.tasks[1].environment, smoke.tasks[1].name) == ("text_game", "text_game")
    fill_paths(smoke, assets, tmp_path)
    assert TrainSettings.from_config(smoke).tasks[1].env.environment == "text_game"


@pytest.mark.parametrize("name", ("ablation_top_p", "ablation_k", "ablation_support"))
def test_unknown_variants_are_errors(name):
  with pytest.raises(ValueError, match="smoke"):
    load(name, "p0.7,k8")


@pytest.mark.parametrize("arg", ("student", "student+sampled", "student_tail"))
def test_student_support_variants_say_why_they_are_missing(arg):
  with pytest.raises(ValueError, match="student-support variants are not available"):
    load("ablation_support", arg)


@pytest.mark.parametrize("name, arg", VARIANTS, ids=[f"{f}:{a}" for f, a in VARIANTS])
def test_every_variant_and_its_smoke_size_validate_with_paths_set(assets, tmp_path, name, arg):
  for variant in (arg, f"{arg},smoke" if arg else "smoke"):
    c = load(name, variant)
    fill_paths(c, assets, tmp_path)
    s = TrainSettings.from_config(c)
    evaluate.EvalSettings.from_config(c)
    ways = c.mesh.fsdp * (c.mesh.data if c.mesh.data > 0 else 8 // c.mesh.fsdp)
    assert s.opt.minibatch_size % ways == 0 and s.data.prompts_per_step % ways == 0
    if variant and "smoke" in variant:
      assert s.steps == 2 and s.rollout.max_new_tokens <= 16 and c.eval.limit <= 4


def _run_smoke(name, assets, workdir, arg="smoke"):
  c = load(name, arg)
  fill_paths(c, assets, workdir)
  history = main.run_experiment(c)
  return c, history


def test_lsm_mask_smoke_trains_evaluates_and_its_checkpoint_reproduces_the_evaluation(
    assets, tmp_path, capsys):
  c, history = _run_smoke("math_lsm_mask", assets, tmp_path)
  assert [h["step"] for h in history] == [1, 2]
  # Evaluated at step 0 and at the end; the final step's metrics carry eval/ values.
  assert "eval/avg/pass@1" in history[-1] and "eval/math500/mean_length" in history[-1]
  logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").open()]
  assert any("eval/avg/pass@1" in r for r in logged)
  for step in (0, 2):
    assert (tmp_path / "eval" / f"step_{step}.json").exists()
  out = capsys.readouterr().out
  assert "MATH500 | AIME24 | AIME25 | Minerva | Olympiad" in out and "student step 2" in out
  # The standalone entry restores the student of the final checkpoint and, with the same
  # settings and seed, draws exactly the same responses as the in-training evaluation.
  during = json.loads((tmp_path / "eval" / "step_2.json").read_text())
  flags = types.SimpleNamespace(config=c, checkpoint=str(tmp_path), step=-1, workdir="",
                                label="", tokenizer="")
  again = evaluate.main([], flags)
  after = json.loads((tmp_path / "eval" / "step_2.json").read_text())
  assert again == during["metrics"]
  assert after["benchmarks"] == during["benchmarks"]
  assert sharding.make_mesh().size == 8


@pytest.mark.slow
@pytest.mark.parametrize("name", [f for f in FILES if f != "math_lsm_mask"])
def test_every_other_file_smoke_runs(assets, tmp_path, name):
  _, history = _run_smoke(name, assets, tmp_path)
  assert [h["step"] for h in history] == [1, 2]
  assert "eval/avg/pass@1" in history[-1]
  if name in MULTITASK:
    assert [h["task_index"] for h in history] == [0.0, 1.0]
    assert 1 <= history[1]["task/text_game/env/turns_mean"] <= 2
