"""The teacher/student check: constructed bad pairs get the right lines; the trainer refuses a
FAIL pair before compiling; the command runs on the demo's models and on a ':smoke' file."""

import json
import pathlib
import subprocess
import sys

import importlib.util

import pytest
import transformers

import train_helpers
from opd_jax import check, configs, models, smoke, smollm, train
from opd_jax.data import tiny_arith

ROOT = pathlib.Path(__file__).resolve().parents[1]
STOPS = ("<|im_end|>", "<|endoftext|>")


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
  folder = tmp_path_factory.mktemp("chatml")
  smoke.make_chatml_tokenizer(folder)
  return folder


def _load(folder, **changes):
  tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
  for k, v in changes.items():
    setattr(tok, k, v)
  return tok


def _lines(student, teacher, *, rows=(320, 320), chat_template=True, mask=(), texts=()):
  return check.pair_lines(check.Side("student", student, rows[0]),
                          check.Side("teacher", teacher, rows[1]), chat_template=chat_template,
                          stop_strings=STOPS, mask_strings=mask, prompt_texts=texts)


def _levels(lines, topic):
  return [line.level for line in lines if line.topic == topic]


def _shifted_tokenizer(folder):
  """The ChatML stand-in with one extra special token in front: every id moves up by one."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=smoke.TOKENIZER_VOCAB + 1, special_tokens=["<|shift|>", *smoke.SPECIAL_TOKENS],
      show_progress=False, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(smoke._CORPUS * 20, trainer=trainer)  # pylint: disable=protected-access
  wrapped = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
      additional_special_tokens=["<|im_start|>"], chat_template=smoke.CHAT_TEMPLATE)
  wrapped.save_pretrained(str(folder))
  return wrapped


def test_the_same_tokenizer_on_both_sides_is_all_ok(chatml):
  tok = _load(chatml)
  lines = _lines(tok, tok, texts=["What is 2 + 3?", "Let me think step by step."])
  assert {line.level for line in lines} == {"OK"}, [str(x) for x in lines]
  assert {"vocabulary", "pad token", "eos token", "bos token", "stop strings", "chat template",
          "round trip (vocabulary)", "round trip (prompts)",
          "special-token mask"} <= {x.topic for x in lines}


def test_a_different_chat_template_is_shown_token_by_token(chatml):
  other = _load(chatml, chat_template=(
      "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
      "{% if add_generation_prompt %}### assistant: {% endif %}"))
  lines = _lines(_load(chatml), other)
  line = next(x for x in lines if x.topic == "chat template")
  assert line.level == "WARN" and "differ from token 0" in line.text
  assert "student ['<|im_start|>', 's'" in line.text and "teacher ['#', '#'" in line.text
  assert _levels(lines, "vocabulary") == ["OK"]


def test_a_template_that_injects_a_system_prompt_is_reported(chatml):
  injecting = (
      "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are SmolBot.<|im_end|>\n"
      "{% endif %}" + smoke.CHAT_TEMPLATE)
  assert check.injected_system_prompt(_load(chatml, chat_template=injecting)) == \
      "You are SmolBot."
  assert check.injected_system_prompt(_load(chatml)) is None
  lines = _lines(_load(chatml), _load(chatml, chat_template=injecting))
  assert any(x.topic == "system prompt" and x.level == "WARN" and "SmolBot" in x.text
             and "teacher" in x.text for x in lines)


def test_pad_equal_to_eos_is_a_warning(chatml):
  lines = _lines(_load(chatml), _load(chatml, pad_token="<|im_end|>"))
  assert _levels(lines, "pad == eos") == ["WARN"] and _levels(lines, "pad token") == ["WARN"]
  assert "teacher's pad and eos are both '<|im_end|>' (id 2)" in str(
      next(x for x in lines if x.topic == "pad == eos"))
  assert "FAIL" not in {x.level for x in lines}


def test_masking_the_end_of_turn_is_a_warning(chatml):
  tok = _load(chatml)
  lines = _lines(tok, tok, mask=("<|im_end|>",))
  assert _levels(lines, "special-token mask") == ["OK", "WARN"]
  assert "'<|im_end|>' (id 2)" in lines[[x.topic for x in lines].index("special-token mask")].text


def test_a_shifted_vocabulary_fails(chatml, tmp_path):
  lines = _lines(_load(chatml), _shifted_tokenizer(tmp_path / "shifted"))
  line = next(x for x in lines if x.topic == "vocabulary")
  assert line.level == "FAIL" and "shared ids name different tokens" in line.text
  assert _levels(lines, "eos token") == ["WARN"]
  assert "WARN" in _levels(lines, "round trip (vocabulary)")


def test_more_tokens_than_embedding_rows_fail_and_a_missing_template_fails(chatml):
  tok = _load(chatml)
  assert "FAIL" in _levels(_lines(tok, tok, rows=(320, 200)), "vocabulary")
  assert _levels(_lines(tok, _load(chatml, chat_template=None)), "chat template") == ["FAIL"]
  assert _levels(_lines(tok, _load(chatml, chat_template=None), chat_template=False),
                 "chat template") == ["OK"]


def test_renderer_bias_probe_is_zero_for_one_template_and_not_for_two(chatml):
  tok = _load(chatml)
  other = _load(chatml, chat_template=(
      "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
      "{% if add_generation_prompt %}assistant: {% endif %}"))
  config = models.ModelConfig(model_type="qwen2", vocab_size=smoke.MODEL_VOCAB, hidden_size=32,
                              intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                              head_dim=8, qkv_bias=True)
  student, teacher = (models.init_model(config, seed=i, std=0.5) for i in (0, 1))
  response = tok.encode(check.RESPONSE, add_special_tokens=False) + [tok.eos_token_id]
  sides = check.Side("student", tok, 320), check.Side("teacher", other, 320)
  same = check._render(tok, check.CONVERSATION)  # pylint: disable=protected-access
  lines, figures = check.renderer_bias_lines(student, teacher, *sides, (same, same), response,
                                             300)
  assert figures["teacher"]["bias"] == 0.0 and figures["student"]["bias"] == 0.0
  rendered = (same, check._render(other, check.CONVERSATION))  # pylint: disable=protected-access
  lines, figures = check.renderer_bias_lines(student, teacher, *sides, rendered, response, 300)
  assert abs(figures["teacher"]["bias"]) > 1e-3 and abs(figures["student"]["bias"]) > 1e-3
  own = check.response_logprobs(teacher, rendered[1], response, 300).mean()
  assert figures["teacher"]["own"] == pytest.approx(float(own))
  assert [x.topic for x in lines] == ["renderer bias", "end of turn", "renderer bias"]


def test_trainer_refuses_a_failing_pair_before_compiling(tmp_path, tiny_arith_dir, chatml):
  # The teacher reads ids with the ChatML tokenizer, the student with the arithmetic one.
  c = train_helpers.tiny_config(tmp_path / "w", tiny_arith_dir,
                                **{"teacher.tokenizer": str(chatml)})
  with pytest.raises(check.Incompatible, match=r"FAIL  vocabulary: \d+ of 14 shared ids"):
    train.run(c, log=lambda _: None)
  assert not (tmp_path / "w" / "checkpoints").exists()


def _demo_workdir(root: pathlib.Path, config) -> pathlib.Path:
  """The folders the demo caches (teacher/, student_seed0/), with random weights of its shapes."""
  from opd_jax import arith_demo  # pylint: disable=import-outside-toplevel
  for name, shape in (("teacher", config.demo.teacher), ("student_seed0", config.demo.student)):
    cfg = arith_demo._shape_config(shape)  # pylint: disable=protected-access
    models.save_hf_checkpoint(models.init_model(cfg, seed=0), cfg, root / name)
    tiny_arith.make_tokenizer(root / name)
  return root


def test_report_on_the_demos_models(tmp_path, tiny_arith_dir):
  spec = ROOT / "experiments" / "tiny_arith.py"
  module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("exp", spec))
  module.__spec__.loader.exec_module(module)
  c = module.get_config()
  c.workdir = str(_demo_workdir(tmp_path, c))
  c.data.data_dir = str(tiny_arith_dir)
  out = []
  summary = check.report(c, log=out.append)
  # transformers reads the folders' config.json (model_type qwen2) and adds <|endoftext|> to
  # the 14-token tokenizer: an added token without an embedding row, never sampled.
  assert summary["status"] == "WARN" and not summary["tasks"]["tiny_arith"]["fail"], out
  assert [w.split(": the")[1][:20] for w in summary["tasks"]["tiny_arith"]["warn"]] == [
      " student's tokenizer", " teacher's tokenizer"]
  assert "id 14 ('<|endoftext|>') have no row; they are added tokens" in "\n".join(out)
  assert json.loads(out[-1]) == summary
  assert f"student {tmp_path / 'student_seed0'}, teacher {tmp_path / 'teacher'}" in "\n".join(out)
  assert summary["tasks"]["tiny_arith"]["renderer_bias"]["teacher"]["bias"] == 0.0


def test_command_on_a_smoke_file(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "opd_jax.check", "--config=experiments/math_lsm.py:smoke",
       f"--config.workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
      check=False, env={"PATH": "", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = json.loads(proc.stdout.strip().splitlines()[-1])
  assert last["status"] == "OK" and last["tasks"]["dapo_math_17k"]["ok"] >= 12
  assert "OK    chat template: both render the fixed conversation" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not smollm.is_available(), reason=f"the model package is absent: "
                    f"`{smollm.INSTALL}` (make real-model)")
def test_smollm_pair_is_reported_with_pad_equal_to_eos_and_its_system_prompt(tmp_path):
  teacher = smollm.hf_folder(tmp_path / "teacher", log=lambda _: None)
  student = smollm.pruned_folder(teacher, tmp_path / "student", (10, 13), log=lambda _: None)
  tok = models.load_tokenizer(str(teacher))
  rows = json.loads((student / "config.json").read_text())["vocab_size"]
  lines = check.pair_lines(check.Side("student", models.load_tokenizer(str(student)), rows),
                           check.Side("teacher", tok, rows), chat_template=True,
                           stop_strings=("<|im_end|>",), mask_strings=())
  text = "\n".join(map(str, lines))
  assert "WARN  pad == eos: the student's pad and eos are both '<|im_end|>' (id 2)" in text
  assert "WARN  system prompt: the teacher's template injects a system prompt" in text
  assert "SmolLM" in text and "FAIL" not in text
  # The command's form on the real-model demo's config: the same pair, converted in its workdir.
  spec = ROOT / "experiments" / "smollm_heal.py"
  module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("exp", spec))
  module.__spec__.loader.exec_module(module)
  c = module.get_config()
  c.workdir = str(tmp_path / "cli")
  out = []
  summary = check.report(c, log=out.append)
  warned = "\n".join(summary["tasks"]["chat_prompts"]["warn"])
  assert summary["status"] == "WARN" and "pad == eos" in warned and "SmolLM" in warned, out
  assert summary["tasks"]["chat_prompts"]["renderer_bias"]["teacher"]["bias"] == 0.0
