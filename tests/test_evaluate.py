"""Math evaluation: score arithmetic, the paper-layout table, eval/step_N.json, the trainer hook,
the standalone entry on Hugging Face folders and trainer checkpoints, and the `prompts`
benchmark (your own file of prompts with answers)."""

import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx

import eval_helpers
import train_helpers
from opd_jax import configs, errors, evaluate, models, sampling, sharding, smoke, train
from opd_jax.data import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return eval_helpers.build_assets(tmp_path_factory.mktemp("eval_assets"))


def _experiment(name, arg=None):
  path = ROOT / "experiments" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# ----------------------------------------------------------------------------------------------
# arithmetic and layout
# ----------------------------------------------------------------------------------------------


def test_accuracy_metrics_against_brute_force():
  rng = np.random.default_rng(0)
  correct = rng.random((7, 5)) < 0.4
  m = evaluate.accuracy_metrics(correct)
  assert m["pass@1"] == pytest.approx(sum(row[0] for row in correct) / 7)
  assert m["avg@5"] == pytest.approx(sum(sum(row) for row in correct) / 35)
  assert m["pass@5"] == pytest.approx(sum(any(row) for row in correct) / 7)
  assert set(evaluate.accuracy_metrics(correct[:, :1])) == {"pass@1"}
  for bad in (np.zeros((3,), bool), np.zeros((0, 2), bool), np.zeros((2, 0), bool)):
    with pytest.raises(ValueError, match="correct"):
      evaluate.accuracy_metrics(bad)


def test_table_has_the_papers_columns_and_average():
  student = dict(zip(evaluate.MATH_BENCHMARKS, (0.682, 0.133, 0.0, 0.265, 0.329)))
  lsm = dict(zip(evaluate.MATH_BENCHMARKS, (0.804, 0.233, 0.267, 0.342, 0.439)))
  rows = [(label, {f"{b}/pass@1": v for b, v in m.items()})
          for label, m in (("student", student), ("LSM", lsm))]
  lines = evaluate.format_table(rows).splitlines()
  cells = [[x.strip() for x in line.split("|")] for line in (lines[0], lines[2], lines[3])]
  assert cells[0] == ["Model", "MATH500", "AIME24", "AIME25", "Minerva", "Olympiad", "Avg"]
  assert cells[1] == ["student", "68.2", "13.3", "0.0", "26.5", "32.9", "28.2"]
  assert cells[2] == ["LSM", "80.4", "23.3", "26.7", "34.2", "43.9", "41.7"]
  # A subset of benchmarks: only those columns, the average over them; missing values show "-".
  only = evaluate.format_table([("x", {"aime24/avg@32": 0.25}), ("y", {})], ["aime24"],
                               metric="avg@32").splitlines()
  assert [c.strip() for c in only[0].split("|")] == ["Model", "AIME24", "Avg"]
  assert [c.strip() for c in only[2].split("|")] == ["x", "25.0", "25.0"]
  assert [c.strip() for c in only[3].split("|")] == ["y", "-", "-"]


# ----------------------------------------------------------------------------------------------
# evaluate() with a scripted sampler: every number is known in advance
# ----------------------------------------------------------------------------------------------

N_TOKENS = 24


def _script(i: int, j: int) -> str | None:
  """Response of sample j to problem i (None: runs out of tokens without an answer)."""
  if (i, j) == (2, 0):
    return None
  if (i, j) == (1, 2):
    return "<think>hmm</think> I give up."
  answer = i if (i + j) % 3 != 1 else i + 1
  return f"<think>ok</think> \\boxed{{{answer}}}"


def _fake_sample(tokenizer, calls):
  """A stand-in for sampling.sample: the n-th row showing problem i gets _script(i, n)."""
  stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
  seen = {}

  def sample(model, tokens, mask, rng, *, max_new_tokens, num_samples, **kwargs):
    del model, rng
    assert num_samples == 1
    calls.append(dict(rows=tokens.shape[0], kwargs=kwargs))
    out = np.zeros((tokens.shape[0], max_new_tokens), np.int32)
    out_mask = np.zeros(out.shape, bool)
    for r in range(tokens.shape[0]):
      text = tokenizer.decode(tokens[r][mask[r]].tolist())
      j = seen[text] = seen.get(text, -1) + 1
      reply = _script(int(re.search(r"What is (\d+) plus", text).group(1)), j)
      ids = ([5] * max_new_tokens if reply is None else
             tokenizer.encode(reply, add_special_tokens=False) + [stop])
      out[r, :len(ids)], out_mask[r, :len(ids)] = ids, True
    return sampling.Rollout(out, out_mask, np.zeros(out.shape), np.zeros(out.shape))
  return sample


def test_scores_lengths_and_files_with_a_scripted_sampler(assets, tmp_path, monkeypatch):
  tok = models.load_tokenizer(assets["tokenizer"])
  mesh = sharding.make_mesh()
  model = models.init_model(models.ModelConfig(
      model_type="qwen2", vocab_size=eval_helpers.MODEL_VOCAB, hidden_size=16,
      intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8), mesh=mesh)
  calls = []
  monkeypatch.setattr(evaluate.sampling, "sample", _fake_sample(tok, calls))
  lines = []
  k = 3
  out = evaluate.evaluate(
      model, tok, evaluate.EvalSettings.of(benchmarks=("math500", "aime24"), samples=k,
                                           max_new_tokens=N_TOKENS, batch_size=6),
      data_dir=assets["tfds"], workdir=tmp_path, step=7, label="scripted", log=lines.append)
  # 3 problems x 3 samples in calls of 6 rows, rounded up to the mesh's 8 batch ways.
  assert [c["rows"] for c in calls] == [8, 8] * 2
  assert calls[0]["kwargs"]["top_p"] == 0.9 and calls[0]["kwargs"]["temperature"] == 1.0
  # Embedding rows past the tokenizer's vocabulary are banned.
  assert set(range(len(tok), eval_helpers.MODEL_VOCAB)) <= set(calls[0]["kwargs"][
      "banned_token_ids"])

  correct = np.array([[_script(i, j) is not None and "\\boxed" in _script(i, j)
                       and (i + j) % 3 != 1 for j in range(k)] for i in range(3)])
  stop_len = lambda s: len(tok.encode(s, add_special_tokens=False)) + 1
  lengths = np.array([[N_TOKENS if _script(i, j) is None else stop_len(_script(i, j))
                       for j in range(k)] for i in range(3)])
  for b in ("math500", "aime24"):
    assert out[f"{b}/pass@1"] == pytest.approx(correct[:, 0].mean())
    assert out[f"{b}/avg@3"] == pytest.approx(correct.mean())
    assert out[f"{b}/pass@3"] == pytest.approx(correct.any(axis=1).mean())
    assert out[f"{b}/mean_length"] == pytest.approx(lengths.mean())
    assert out[f"{b}/truncated_fraction"] == pytest.approx(1 / 9)
    assert out[f"{b}/no_answer_fraction"] == pytest.approx(2 / 9)
  assert out["avg/avg@3"] == pytest.approx(correct.mean())

  record = json.loads((tmp_path / "eval" / "step_7.json").read_text())
  assert record["step"] == 7 and record["label"] == "scripted"
  assert record["metrics"] == out
  assert record["settings"]["samples"] == k and record["settings"]["benchmarks"] == [
      "math500", "aime24"]
  for b in ("math500", "aime24"):
    items = record["benchmarks"][b]["items"]
    assert len(items) == 3
    for item in items:
      i = int(item["answer"])
      assert item["correct"] == correct[i].tolist()
      assert item["length"] == lengths[i].tolist()
      assert item["truncated"] == [(i, j) == (2, 0) for j in range(k)]
  texts = [json.loads(x) for x in (tmp_path / "eval" / "step_7_responses.jsonl").open()]
  assert len(texts) == 2 * 3 * k
  boxed = [t for t in texts if "\\boxed" in t["response"]]
  assert boxed and all(not t["response"].endswith("<|im_end|>") for t in boxed)
  # The printed table: the paper's layout with this step's row (avg@3 in percent).
  table = lines[-1].splitlines()
  assert [c.strip() for c in table[0].split("|")] == ["Model", "MATH500", "AIME24", "Avg"]
  assert table[2].split("|")[0].strip() == "scripted step 7"
  assert float(table[2].split("|")[1]) == pytest.approx(round(100 * correct.mean(), 1))


def test_math_verify_agreement_is_reported_on_request(assets, monkeypatch):
  pytest.importorskip("math_verify")
  tok = models.load_tokenizer(assets["tokenizer"])
  model = models.init_model(models.ModelConfig(
      model_type="qwen2", vocab_size=eval_helpers.MODEL_VOCAB, hidden_size=16,
      intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8))
  monkeypatch.setattr(evaluate.sampling, "sample", _fake_sample(tok, []))
  e = evaluate.EvalSettings.of(benchmarks=("aime25",), samples=3, max_new_tokens=N_TOKENS,
                               batch_size=9)
  kwargs = dict(data_dir=assets["tfds"], workdir=None, log=lambda _: None)
  plain = evaluate.evaluate(model, tok, e, **kwargs)
  assert "aime25/math_verify_agreement" not in plain
  monkeypatch.setattr(evaluate.sampling, "sample", _fake_sample(tok, []))
  checked = evaluate.evaluate(model, tok, dataclasses.replace(e, math_verify=True), **kwargs)
  # Integer answers in \boxed{}: both graders decide every item alike.
  assert checked["aime25/math_verify_agreement"] == 1.0
  assert {k: v for k, v in checked.items() if "math_verify" not in k} == plain


# ----------------------------------------------------------------------------------------------
# real sampling on a tiny model, the trainer hook and the standalone entry
# ----------------------------------------------------------------------------------------------


def _smoke_config(assets, workdir, name="math_lsm"):
  c = _experiment(name, "smoke")
  eval_helpers.fill_paths(c, assets, workdir)
  return c


def test_evaluator_on_a_tiny_model_is_consistent_and_reproducible(assets, tmp_path):
  c = _smoke_config(assets, tmp_path)
  c.eval.samples = 2
  tok = models.load_tokenizer(assets["tokenizer"])
  model, _ = models.load_hf_checkpoint(assets["student"], mesh=sharding.make_mesh())
  evaluator = evaluate.make_evaluator(c, tok, log=lambda _: None)
  first = evaluator(0, model)
  again = evaluator(3, model)
  assert first == again   # the same draws at every step: common random numbers
  record = json.loads((tmp_path / "eval" / "step_0.json").read_text())
  for b in evaluate.MATH_BENCHMARKS:
    items = record["benchmarks"][b]["items"]
    assert len(items) == c.eval.limit
    lengths = np.array([it["length"] for it in items])
    assert ((1 <= lengths) & (lengths <= c.eval.max_new_tokens)).all()
    assert first[f"{b}/mean_length"] == pytest.approx(lengths.mean())
    correct = np.array([it["correct"] for it in items])
    assert first[f"{b}/avg@2"] == pytest.approx(correct.mean())
    truncated = np.array([it["truncated"] for it in items])
    assert not (truncated & (lengths < c.eval.max_new_tokens)).any()
  assert first["avg/pass@1"] == pytest.approx(np.mean([first[f"{b}/pass@1"]
                                                        for b in evaluate.MATH_BENCHMARKS]))
  assert evaluate.table_from_workdir(tmp_path).count("student step") == 2


@pytest.mark.parametrize("key, value, match", [
    ("benchmarks", ("gsm8k",), "config.eval.benchmarks"),
    ("samples", 0, "config.eval.samples"),
    ("top_p", 0.0, "config.eval.top_p"),
    ("limit", -1, "config.eval.limit"),
])
def test_bad_eval_settings_name_the_setting(assets, tmp_path, key, value, match):
  c = _smoke_config(assets, tmp_path)
  c.eval[key] = value
  with pytest.raises(ValueError, match=re.escape(match)):
    evaluate.make_evaluator(c, None)


def test_standalone_entry_on_a_hugging_face_folder(assets, tmp_path):
  c = _smoke_config(assets, tmp_path / "unused")
  flags = types.SimpleNamespace(config=c, checkpoint=str(assets["teacher"]), step=-1,
                                workdir=str(tmp_path / "teacher_eval"), label="", tokenizer="")
  out = evaluate.main([], flags)
  record = json.loads((tmp_path / "teacher_eval" / "eval" / "step_0.json").read_text())
  assert record["label"] == "teacher" and record["metrics"] == out
  assert set(record["benchmarks"]) == set(evaluate.MATH_BENCHMARKS)


# ----------------------------------------------------------------------------------------------
# the prompts benchmark: your own file of prompts with answers
# ----------------------------------------------------------------------------------------------

# Graded against each row's own answer: row "b" asks for 1 plus 0 but its answer is "2" (what the
# scripted sampler's first sample gives), so its first sample is the correct one.
PROMPT_ROWS = [
    {"id": "a", "prompt": "What is 0 plus 0?", "answer": "0"},
    {"id": "b", "prompt": "What is 1 plus 0?", "answer": "2"},
    {"id": "c", "messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "What is 2 plus 0?"}], "answer": 2},
]
TEMPLATE = "{prompt}\n\nAnswer with a number."


def _write_rows(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _tiny_model(mesh=None):
  return models.init_model(models.ModelConfig(
      model_type="qwen2", vocab_size=eval_helpers.MODEL_VOCAB, hidden_size=16,
      intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8), mesh=mesh)


def _prompts_config(source, **data):
  """The trainer's defaults evaluating `source` (and math500), data settings overridden."""
  c = configs.opd()
  c.eval.benchmarks = ("math500", "prompts")
  c.eval.sources.prompts = str(source)
  c.data.update(data)
  return c


def test_prompts_benchmark_renders_as_training_and_grades_each_rows_answer(assets, tmp_path,
                                                                           monkeypatch):
  tok = models.load_tokenizer(assets["tokenizer"])
  source = _write_rows(tmp_path / "heldout.jsonl", PROMPT_ROWS)
  c = _prompts_config(source, template=TEMPLATE)
  e = dataclasses.replace(evaluate.EvalSettings.from_config(c), samples=3,
                          max_new_tokens=N_TOKENS, batch_size=6)
  assert e.template == TEMPLATE and e.long_prompts == c.data.long_prompts
  seen = []
  fake = _fake_sample(tok, [])

  def sample(model, tokens, mask, rng, **kwargs):
    seen.extend(tuple(tokens[r][mask[r]].tolist()) for r in range(tokens.shape[0]))
    return fake(model, tokens, mask, rng, **kwargs)
  monkeypatch.setattr(evaluate.sampling, "sample", sample)
  lines = []
  out = evaluate.evaluate(_tiny_model(), tok, e, data_dir=assets["tfds"], workdir=tmp_path,
                          step=3, label="mine", log=lines.append)

  # Each benchmark with its own encoder: the math problems with the \boxed instruction, the rows
  # of the file exactly as training encodes data.dataset="prompts" (data.template on "prompt"
  # rows, a "messages" chat as it is).
  kwargs = dict(chat_template=True, max_prompt_len=c.data.max_prompt_len)
  train_encode = registry.encoder("prompts", tok, tok, template=TEMPLATE, **kwargs)
  rows = registry.read_prompts(source)
  want = {tuple(train_encode(r).prompt.tolist()) for r in rows}
  math_encode = registry.encoder("math500", tok, tok, **kwargs)
  math_problems = evaluate.load_benchmark("math500", data_dir=assets["tfds"])
  want_math = {tuple(math_encode(p).prompt.tolist()) for p in math_problems}
  assert set(seen) == want | want_math and not want & want_math
  shown = "".join(tok.decode(list(ids)) for ids in want)
  assert "user\nWhat is 0 plus 0?\n\nAnswer with a number.<|im_end|>" in shown
  assert "Be brief." in shown and "boxed" not in shown
  assert all("boxed" in tok.decode(list(ids)) for ids in want_math)

  # Graded against the rows' answers with the math grader: [[T, F, T], [T, F, F], [F, T, F]].
  correct = np.array([[True, False, True], [True, False, False], [False, True, False]])
  assert out["prompts/pass@1"] == pytest.approx(2 / 3)
  assert out["prompts/avg@3"] == pytest.approx(correct.mean())
  assert out["prompts/pass@3"] == 1.0
  assert out["prompts/no_answer_fraction"] == pytest.approx(2 / 9)
  assert out["avg/pass@1"] == pytest.approx((out["math500/pass@1"] + 2 / 3) / 2)
  assert not train_helpers.undocumented_metrics({f"eval/{k}" for k in out})
  record = json.loads((tmp_path / "eval" / "step_3.json").read_text())
  details = record["benchmarks"]["prompts"]
  assert details["source"] == str(source) and details["problems"] == 3
  assert [(it["id"], it["answer"]) for it in details["items"]] == [("a", "0"), ("b", "2"),
                                                                   ("c", "2")]
  assert [it["correct"] for it in details["items"]] == correct.tolist()
  assert record["settings"]["template"] == TEMPLATE
  texts = [json.loads(x) for x in (tmp_path / "eval" / "step_3_responses.jsonl").open()]
  assert [t["id"] for t in texts if t["benchmark"] == "prompts"] == ["a"] * 3 + ["b"] * 3 + [
      "c"] * 3
  # The table: the paper's columns evaluated, then Prompts.
  header = [x.strip() for x in lines[-1].splitlines()[0].split("|")]
  assert header == ["Model", "MATH500", "Prompts", "Avg"]


def test_prompts_benchmark_needs_its_file_and_an_answer_in_every_row(assets, tmp_path):
  rows = [{"id": "q1", "prompt": "x", "answer": "1"}, {"id": "q2", "prompt": "y"},
          {"prompt": "z", "answer": " "}, {"id": "q4", "prompt": "w", "answer": None}]
  source = _write_rows(tmp_path / "heldout.jsonl", rows)
  with pytest.raises(errors.DataError, match=re.escape(
      f"{source}: 3 of 4 rows have no 'answer' (ids q2, 2, q4)")) as info:
    evaluate.load_benchmark("prompts", data_dir=None, source=str(source))
  assert "--config.eval.sources.prompts" in str(info.value)
  c = _prompts_config(source)
  c.eval.benchmarks = ("prompts",)
  with pytest.raises(errors.DataError, match="3 of 4 rows have no 'answer'"):
    evaluate.make_evaluator(c, models.load_tokenizer(assets["tokenizer"]))   # before a run
  # No file: the key to set, before anything loads; no TFDS folder is asked for.
  c.eval.sources.prompts = ""
  c.workdir, c.eval.every = str(tmp_path), 5
  e = evaluate.EvalSettings.from_config(c)
  assert evaluate.missing_benchmarks(e, None) == [
      '--config.eval.sources.prompts=FILE (your prompts with answers: a JSONL or parquet file, '
      'README "Your own prompts")']
  assert any(line.startswith("--config.eval.sources.prompts=FILE")
             for line in evaluate.missing_paths(c))
  with pytest.raises(errors.ConfigError, match=re.escape("set --config.eval.sources.prompts=FILE")):
    evaluate.load_benchmark("prompts", data_dir=None)
  c.eval.sources.prompts = str(tmp_path / "absent.jsonl")
  with pytest.raises(ValueError, match=re.escape("config.eval.sources.prompts=")):
    evaluate.EvalSettings.from_config(c)
  c.eval.sources.prompts = str(_write_rows(tmp_path / "heldout.csv", rows[:1]))
  with pytest.raises(errors.DataError, match=re.escape("config.eval.sources.prompts='")):
    evaluate.load_benchmark("prompts", data_dir=None, source=c.eval.sources.prompts)
  c.eval.sources.prompts, c.data.template = str(source), "no placeholder"
  with pytest.raises(errors.ConfigError, match="config.data.template"):
    evaluate.EvalSettings.from_config(c)


def test_prompts_benchmark_over_long_prompts_follow_data_long_prompts(assets, tmp_path):
  tok = models.load_tokenizer(assets["tokenizer"])
  rows = [{"id": f"r{i}", "prompt": "What is 1 plus 0? " * n, "answer": "1"}
          for i, n in enumerate([1, 30, 2])]
  source = _write_rows(tmp_path / "heldout.jsonl", rows)
  whole = registry.encoder("prompts", tok, tok, chat_template=True, max_prompt_len=10_000)
  limit = max(len(whole(r).prompt) for r in (rows[0], rows[2]))

  def prepare(policy, log=None):
    c = _prompts_config(source, max_prompt_len=limit, long_prompts=policy)
    c.eval.benchmarks = ("prompts",)
    e = evaluate.EvalSettings.from_config(c)
    return c, evaluate.prepare_benchmark("prompts", tok, e, data_dir=None,
                                         log=log or (lambda _: None))
  said = []
  _, (kept, ids) = prepare("drop", said.append)
  assert [p["id"] for p in kept] == ["r0", "r2"] and len(ids) == 2
  assert len(said) == 1 and said[0].startswith("eval prompts: 1 of 3 prompts") and "r1" in said[0]
  _, (kept, ids) = prepare("truncate")
  assert len(kept) == 3 and len(ids[1]) == limit
  assert ids[1].tolist() == whole(rows[1]).prompt[-limit:].tolist()
  with pytest.raises(errors.DataError, match=r"eval benchmark 'prompts': 1 of 3 prompts .*r1"):
    prepare("error")
  c = _prompts_config(source, max_prompt_len=limit, long_prompts="error")
  c.eval.benchmarks = ("prompts",)
  with pytest.raises(errors.DataError, match="1 of 3 prompts"):
    evaluate.make_evaluator(c, tok)   # found before a run, not at an evaluation mid-run
  # A "messages" row needs the chat template, as in training: also found before a run.
  _write_rows(source, [{"messages": [{"role": "user", "content": "hi"}], "answer": "1"}])
  c = _prompts_config(source, chat_template=False)
  c.eval.benchmarks = ("prompts",)
  with pytest.raises(errors.DataError, match="chat_template=True"):
    evaluate.make_evaluator(c, tok)
  c.data.long_prompts = "cut"
  with pytest.raises(errors.ConfigError, match="config.data.long_prompts='cut'"):
    evaluate.EvalSettings.from_config(c)


def test_standalone_entry_on_your_own_prompts_needs_no_benchmark_build(assets, tmp_path):
  c = _smoke_config(assets, tmp_path / "unused")
  c.eval.benchmarks = ("prompts",)
  c.eval.sources.prompts = str(assets["prompts"])
  c.eval.data_dir = c.data.data_dir = ""
  c.data.template = TEMPLATE
  flags = types.SimpleNamespace(config=c, checkpoint=str(assets["student"]), step=-1,
                                workdir=str(tmp_path / "out"), label="", tokenizer="")
  out = evaluate.main([], flags)
  record = json.loads((tmp_path / "out" / "eval" / "step_0.json").read_text())
  assert record["metrics"] == out and set(record["benchmarks"]) == {"prompts"}
  rows = registry.read_prompts(assets["prompts"])[:c.eval.limit]
  items = record["benchmarks"]["prompts"]["items"]
  assert [(it["id"], it["answer"]) for it in items] == [(r["id"], r["answer"]) for r in rows]
  assert {"prompts/pass@1", "avg/pass@1"} <= set(out)
  assert not (tmp_path / "out" / "tfds").exists()


def test_smoke_fills_the_prompts_benchmarks_file(assets, tmp_path):
  (tmp_path / "smoke_assets").symlink_to(assets["tokenizer"].parent)   # made once, reused
  c = _experiment("math_lsm", "smoke")
  c.workdir = str(tmp_path)
  c.eval.benchmarks = ("prompts",)
  filled = smoke.fill_missing(c, log=lambda _: None)
  assert "eval.sources.prompts" in filled and "eval.data_dir" not in filled
  assert c.eval.sources.prompts == str(assets["prompts"])
  assert all(r["answer"] for r in registry.read_prompts(c.eval.sources.prompts))


def test_a_run_written_before_the_prompts_benchmark_takes_its_source(tmp_path):
  c = configs.opd()
  del c.eval.sources["prompts"]
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))
  assert evaluate.run_config(tmp_path).eval.sources.prompts == ""


@pytest.mark.slow   # a 2-step training run (~25 s); test_paper_experiments covers restoring fast
def test_restores_the_student_of_a_trainer_checkpoint(assets, tmp_path):
  seen = {}

  def capture(step, model):
    seen[step] = jax.device_get(nnx.state(model))
    return {}
  c = _smoke_config(assets, tmp_path / "run")
  c.eval.every = 1
  train.run(c, evaluator=capture, log=lambda _: None)
  for step, folder in ((None, tmp_path / "run"), (1, tmp_path / "run" / "checkpoints")):
    model, _, got, label = evaluate.load_model(c, folder, step=step)
    assert got == (step or 2) and label == "run"
    want = jax.tree.leaves(seen[got])
    have = jax.tree.leaves(jax.device_get(nnx.state(model)))
    assert len(want) == len(have)
    for a, b in zip(want, have):
      np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(seen[0]),
                                                       jax.tree.leaves(seen[2])))
  with pytest.raises(ValueError, match="neither a Hugging Face folder"):
    evaluate.load_model(c, assets["sources"]["math500"].parent)


@pytest.mark.slow
def test_command_line_on_a_hugging_face_folder(assets, tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = str(ROOT)
  args = [sys.executable, "-m", "opd_jax.evaluate",
          f"--config={ROOT / 'experiments' / 'math_lsm.py'}:smoke",
          f"--checkpoint={assets['student']}", f"--workdir={tmp_path / 'out'}",
          f"--config.eval.data_dir={assets['tfds']}",
          "--config.eval.benchmarks=('aime24', 'prompts')",   # and your own prompts with answers
          f"--config.eval.sources.prompts={assets['prompts']}",
          "--config.data.template={prompt} Answer with a number."]
  out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "AIME24" in out.stdout and "Prompts" in out.stdout
  record = json.loads((tmp_path / "out" / "eval" / "step_0.json").read_text())
  assert record["label"] == "student" and "prompts/pass@1" in record["metrics"]
  assert record["settings"]["template"] == "{prompt} Answer with a number."
