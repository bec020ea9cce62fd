"""Math dataset builders (TFDS array_record from local files), prompts, re-tokenisation, padding."""

import json
import os
import pathlib
import pickle
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from opd_jax.data import math_datasets as md
from opd_jax.data import prompts, registry

DAPO_HEAD = ("Solve the following math problem step by step. The last line of your response "
             "should be of the form Answer: $Answer (without quotes) where $Answer is the answer "
             "to the problem.\n\n")
DAPO_TAIL = "\n\nRemember to put your answer on its own line after \"Answer:\"."


def _write(path, rows, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if fmt == "parquet":
    pq.write_table(pa.Table.from_pylist(rows), path)
  elif fmt == "jsonl":
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  else:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(rows, f, ensure_ascii=False)
  return path


def _by_id(split):
  return sorted((dict(r) for r in split), key=lambda r: r["id"])


def _expected(name, triples):
  return sorted(({"id": i, "problem": p, "answer": a, "source": name} for i, p, a in triples),
                key=lambda r: r["id"])


def _dapo_row(i, problem, answer):
  return {"data_source": "math_dapo",
          "prompt": [{"content": DAPO_HEAD + problem + DAPO_TAIL, "role": "user"}],
          "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule-lm"},
          "extra_info": {"index": f"uuid-{i}"}}


def test_dapo_published_parquet_english_deduplicated_without_instruction(tmp_path):
  problems = [("What is $1+1$?", "2"), ("求 $x$ 的值。", "3"), ("What is $1+1$?", "2"),
              ("Find $y$ if $2y = 10$.", "5"), ("What is $1+1$?", "2")]
  src = _write(str(tmp_path / "src" / "dapo-math-17k.parquet"),
               [_dapo_row(i, p, a) for i, (p, a) in enumerate(problems)], "parquet")
  split = md.load_split("dapo_math_17k", source=src, data_dir=tmp_path / "tfds")
  assert _by_id(split) == _expected("dapo_math_17k", [
      ("uuid-0", "What is $1+1$?", "2"), ("uuid-3", "Find $y$ if $2y = 10$.", "5")])
  meta = md.build("dapo_math_17k", data_dir=tmp_path / "tfds").info.metadata
  assert (meta["rows"], meta["chinese"], meta["duplicates"]) == (5, 1, 2)
  assert os.path.isdir(tmp_path / "tfds" / "dapo_math_17k" / md.VERSION)


def test_dapo_processed_variants(tmp_path):
  # open-r1/DAPO-Math-17k-Processed: `prompt` is the user text (instruction still inside),
  # `solution` the ground truth, next to the original columns.
  row = _dapo_row(7, "Compute $3^2$.", "9")
  processed = {"prompt": row["prompt"][0]["content"], "solution": "9",
               "source_prompt": row["prompt"], **{k: row[k] for k in (
                   "data_source", "ability", "reward_model", "extra_info")}}
  src = _write(str(tmp_path / "a" / "en.parquet"), [processed], "parquet")
  assert _by_id(md.load_split("dapo_math_17k", source=src, data_dir=tmp_path / "t1")) == \
      _expected("dapo_math_17k", [("uuid-7", "Compute $3^2$.", "9")])
  # Minimal: only a problem text and an answer; rows are numbered.
  src = _write(str(tmp_path / "b" / "train.jsonl"),
               [{"prompt": "Compute $2^5$.", "solution": "32"}], "jsonl")
  assert _by_id(md.load_split("dapo_math_17k", source=src, data_dir=tmp_path / "t2")) == \
      _expected("dapo_math_17k", [("0", "Compute $2^5$.", "32")])


def test_strip_dapo_instruction():
  assert md.strip_dapo_instruction(DAPO_HEAD + "Find $x$.\n\nGiven $x=1$." + DAPO_TAIL) == \
      "Find $x$.\n\nGiven $x=1$."
  assert md.strip_dapo_instruction("  Find $x$. ") == "Find $x$."


BENCHMARKS = [
    # (dataset, format, files {relative path: rows}, expected (id, problem, answer))
    ("math500", "jsonl", {"test.jsonl": [
        {"problem": "Simplify $\\frac{2}{4}$.", "solution": "... \\boxed{\\frac12}",
         "answer": "\\frac{1}{2}", "subject": "Algebra", "level": 1,
         "unique_id": "test/algebra/1.json"},
        {"problem": "What is $2+3$?", "solution": "5", "answer": "5", "subject": "Prealgebra",
         "level": 1, "unique_id": "test/prealgebra/2.json"}]},
     [("test/algebra/1.json", "Simplify $\\frac{2}{4}$.", "\\frac{1}{2}"),
      ("test/prealgebra/2.json", "What is $2+3$?", "5")]),
    ("aime24", "parquet", {"train.parquet": [  # HuggingFaceH4/aime_2024
        {"id": 60, "problem": "Find $n$.", "solution": "s", "answer": "204", "url": "u",
         "year": "2024"},
        {"id": 61, "problem": "Find $m$.", "solution": "s", "answer": "025", "url": "u",
         "year": "2024"}]},
     [("60", "Find $n$.", "204"), ("61", "Find $m$.", "025")]),
    ("aime24", "parquet", {"aime_2024_problems.parquet": [  # Maxwell-Jia/AIME_2024
        {"ID": "2024-I-1", "Problem": "Find $k$.", "Solution": "s", "Answer": 33},
        {"ID": "2024-II-4", "Problem": "Find $j$.", "Solution": "s", "Answer": 7}]},
     [("2024-I-1", "Find $k$.", "33"), ("2024-II-4", "Find $j$.", "7")]),
    ("aime25", "jsonl", {"aime2025-I.jsonl": [{"question": "Find $a$.", "answer": "70"}],
                         "aime2025-II.jsonl": [{"question": "Find $b$.", "answer": "588"},
                                               {"question": "Find $c$.", "answer": "16"}]},
     [("0", "Find $a$.", "70"), ("1", "Find $b$.", "588"), ("2", "Find $c$.", "16")]),
    ("aime25", "parquet", {"train.parquet": [  # yentinglin/aime_2025
        {"id": "0", "problem": "Find $d$.", "answer": "70", "solution": "", "url": "u",
         "year": 2025}]},
     [("0", "Find $d$.", "70")]),
    ("minerva_math", "jsonl", {"test.jsonl": [
        {"question": "A star has $T=5000$ K. Find $\\lambda$.", "answer": "580"},
        {"question": "Compute the mass.", "answer": "2.5e30"}]},
     [("0", "A star has $T=5000$ K. Find $\\lambda$.", "580"),
      ("1", "Compute the mass.", "2.5e30")]),
    ("olympiadbench", "parquet", {"OE_TO_maths_en_COMP/train-00000-of-00001.parquet": [
        {"id": 1606, "question": "Find all $x$.", "solution": ["s"], "final_answer": ["$1,2$"],
         "context": None, "modality": "Text-only", "is_multiple_answer": True, "unit": None,
         "answer_type": "Numerical", "language": "English"},
        {"id": 1607, "question": "Find $p$ and $q$.", "solution": ["s"],
         "final_answer": ["$3$", "$\\frac{1}{2}$"], "context": None, "modality": "Text-only",
         "is_multiple_answer": True, "unit": None, "answer_type": "Numerical",
         "language": "English"}]},
     [("1606", "Find all $x$.", "1,2"), ("1607", "Find $p$ and $q$.", "3, \\frac{1}{2}")]),
    ("olympiadbench", "json", {"test.json": [  # a JSON array
        {"id": 9, "question": "Find $r$.", "final_answer": ["$4$"]}]},
     [("9", "Find $r$.", "4")]),
]


@pytest.mark.parametrize("name,fmt,files,expected", BENCHMARKS,
                         ids=[f"{b[0]}-{b[1]}-{i}" for i, b in enumerate(BENCHMARKS)])
def test_benchmark_formats(tmp_path, name, fmt, files, expected):
  for rel, rows in files.items():
    _write(str(tmp_path / "src" / rel), rows, fmt)
  # A folder source reads every data file in it (AIME 2025 comes as two files).
  folder = os.path.dirname(str(tmp_path / "src" / next(iter(files))))
  split = md.load_split(name, source=folder, data_dir=tmp_path / "tfds")
  assert len(split) == len(expected)
  assert _by_id(split) == _expected(name, expected)
  assert _by_id(split[:]) == _by_id(split)
  assert split[-1] == split[len(split) - 1]
  with pytest.raises(IndexError):
    split[len(split)]


def test_json_lines_in_a_json_file(tmp_path):
  rows = [{"question": "Q?", "answer": "1"}, {"question": "R?", "answer": "2"}]
  src = _write(str(tmp_path / "test.json"), rows, "jsonl")
  assert _by_id(md.load_split("minerva_math", source=src, data_dir=tmp_path / "t")) == \
      _expected("minerva_math", [("0", "Q?", "1"), ("1", "R?", "2")])
  src = _write(str(tmp_path / "one" / "test.json"), rows[:1], "jsonl")
  assert _by_id(md.load_split("minerva_math", source=src, data_dir=tmp_path / "t1")) == \
      _expected("minerva_math", [("0", "Q?", "1")])


def test_wrong_columns_one_clear_error(tmp_path):
  src = _write(str(tmp_path / "aime.parquet"), [{"question_text": "Q", "sol": "1"}], "parquet")
  message = (f"{src} does not match the aime24 format: expected columns (problem: one of "
             "problem, Problem, question; answer: one of answer, Answer); found columns: "
             "question_text, sol")
  with pytest.raises(ValueError, match=re.escape(message)):
    md.load_split("aime24", source=src, data_dir=tmp_path / "tfds")
  # The failed build leaves nothing in the way of a good one.
  good = _write(str(tmp_path / "good.jsonl"), [{"Problem": "Q", "Answer": 3}], "jsonl")
  assert _by_id(md.load_split("aime24", source=good, data_dir=tmp_path / "tfds")) == \
      _expected("aime24", [("0", "Q", "3")])
  src = _write(str(tmp_path / "m.jsonl"), [{"question": "Q", "solution": "1"}], "jsonl")
  with pytest.raises(ValueError, match=re.escape("(answer: one of answer); found columns: "
                                                 "question, solution")):
    md.load_split("minerva_math", source=src, data_dir=tmp_path / "tfds")


def test_bad_rows_and_sources_raise(tmp_path):
  src = _write(str(tmp_path / "m.jsonl"), [{"question": "Q", "answer": "1"},
                                          {"question": "R", "answer": " "}], "jsonl")
  with pytest.raises(ValueError, match=re.escape(f"{src}, row 1: column answer must be")):
    md.load_split("minerva_math", source=src, data_dir=tmp_path / "tfds")
  with pytest.raises(ValueError, match="dataset name 'gsm8k' is unknown; known datasets: "
                                       "dapo_math_17k, math500"):
    md.load_split("gsm8k", source=src, data_dir=tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match="nowhere.jsonl does not exist"):
    md.load_split("math500", source=tmp_path / "nowhere.jsonl", data_dir=tmp_path / "tfds")
  csv = tmp_path / "m.csv"
  csv.write_text("question,answer\nQ,1\n")
  with pytest.raises(ValueError, match=r"m\.csv has an unsupported format; accepted suffixes: "
                                       r"\.parquet, \.jsonl, \.json"):
    md.load_split("minerva_math", source=csv, data_dir=tmp_path / "tfds")
  obj = tmp_path / "o.json"
  obj.write_text("42")
  with pytest.raises(ValueError, match="must hold a JSON array of objects"):
    md.load_split("minerva_math", source=obj, data_dir=tmp_path / "tfds")


def test_second_build_reuses_the_first_without_the_source(tmp_path, monkeypatch):
  rows = [{"problem": f"P{i}?", "answer": str(i), "unique_id": f"u{i}"} for i in range(6)]
  src = _write(str(tmp_path / "src" / "test.jsonl"), rows, "jsonl")
  first = _by_id(md.load_split("math500", source=src, data_dir=tmp_path / "tfds"))
  os.rename(src, src + ".moved")

  def no_read(*args, **kwargs):
    raise AssertionError("the source was read again")
  monkeypatch.setattr(md, "read_source", no_read)
  assert _by_id(md.load_split("math500", source=src, data_dir=tmp_path / "tfds")) == first
  split = md.load_split("math500", data_dir=tmp_path / "tfds")
  assert _by_id(split) == first and len(first) == 6
  # Data loader workers get the split (and the builder) pickled.
  assert _by_id(pickle.loads(pickle.dumps(split))) == first
  builder = pickle.loads(pickle.dumps(md.build("math500", data_dir=tmp_path / "tfds")))
  assert _by_id(md.MathSplit(builder.as_data_source(split="test"))) == first


def test_rebuild_from_a_different_source_raises(tmp_path):
  src = _write(str(tmp_path / "a" / "test.jsonl"),
               [{"problem": "P?", "answer": "1", "unique_id": "u"}], "jsonl")
  md.load_split("math500", source=src, data_dir=tmp_path / "tfds")
  other = _write(str(tmp_path / "b" / "test.jsonl"),
                 [{"problem": "Another problem?", "answer": "12", "unique_id": "v"}], "jsonl")
  with pytest.raises(ValueError, match="math500 is already built in .*use another data_dir"):
    md.load_split("math500", source=other, data_dir=tmp_path / "tfds")


def test_default_source_is_the_manual_dir(tmp_path):
  _write(str(tmp_path / "tfds" / "downloads" / "manual" / "minerva_math" / "test.jsonl"),
         [{"question": "Q?", "answer": "4"}], "jsonl")
  assert _by_id(md.load_split("minerva_math", data_dir=tmp_path / "tfds")) == \
      _expected("minerva_math", [("0", "Q?", "4")])
  assert md.manual_dir("aime24", tmp_path) == str(tmp_path / "downloads" / "manual" / "aime24")
  for data_dir in (tmp_path / "tfds", tmp_path / "empty"):
    with pytest.raises(FileNotFoundError, match=re.escape(
        f"no source was given for aime24 and its manual folder {md.manual_dir('aime24', data_dir)} "
        "does not exist; pass source=")):
      md.load_split("aime24", data_dir=data_dir)


def test_registry():
  assert md.NAMES == ("dapo_math_17k", "math500", "aime24", "aime25", "minerva_math",
                      "olympiadbench")
  assert {n: s.split for n, s in md.DATASETS.items()} == {
      "dapo_math_17k": "train", **{n: "test" for n in md.NAMES[1:]}}
  assert tuple(md.BUILDERS) == md.NAMES
  assert all(md.BUILDERS[n].name == n and md.BUILDERS[n].SPEC.name == n for n in md.NAMES)


# ----------------------------------------------------------------------------------- prompts

STUDENT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                    "{% endif %}")
TEACHER_TEMPLATE = ("<|begin|>{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n"
                    "{% endfor %}{% if add_generation_prompt %}### assistant:\n{% endif %}")
CORPUS = ["What is $1+1$? The answer is \\boxed{2}.", "<think> reason step by step </think>",
          "Find the value of x such that x^2 = 4, then give the final answer.",
          "### user:\n### assistant:\n", "inside and then give"] * 10
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<|begin|>"]


def _tokenizer(template, vocab_size, corpus=CORPUS):
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>")
  fast.chat_template = template
  return fast


@pytest.fixture(scope="module")
def toks():
  student = _tokenizer(STUDENT_TEMPLATE, 360)
  # Same vocabulary, another chat template (e.g. a teacher fine-tuned with its own format).
  teacher = _tokenizer(TEACHER_TEMPLATE, 360)
  # Another vocabulary: trained on different text.
  foreign = _tokenizer(TEACHER_TEMPLATE, 300, [c[::-1] for c in CORPUS])
  assert student.get_vocab() == teacher.get_vocab() != foreign.get_vocab()
  return student, teacher, foreign


def test_prompt_messages():
  assert prompts.prompt_messages(" Find $x$. ") == [
      {"role": "user", "content": "Find $x$.\n\n" + prompts.INSTRUCTION}]
  assert prompts.prompt_messages("Q", instruction="", system="S") == [
      {"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
  assert "<think>" in prompts.INSTRUCTION and "</think>" in prompts.INSTRUCTION
  assert "\\boxed{}" in prompts.INSTRUCTION
  with pytest.raises(ValueError, match="problem must be a non-empty string"):
    prompts.prompt_messages("  ")


def test_student_prompt_uses_the_student_template(toks):
  student, _, _ = toks
  ids = prompts.encode_prompts(["What is $1+1$?"], student)[0]
  text = ("<|im_start|>user\nWhat is $1+1$?\n\n" + prompts.INSTRUCTION +
          "<|im_end|>\n<|im_start|>assistant\n")
  assert ids == student(text, add_special_tokens=False)["input_ids"]
  assert student.decode(ids) == text
  assert ids[0] == student.convert_tokens_to_ids("<|im_start|>")


def test_render_for_teacher_uses_the_teacher_template(toks):
  student, teacher, _ = toks
  messages = prompts.prompt_messages("Find the value of x.")
  response = "<think> x^2 = 4 </think> The answer is \\boxed{2}.<|im_end|>"
  student_prompt = prompts.encode_prompt(messages, student)
  prompt_ids, response_ids = prompts.render_for_teacher(messages, response, teacher)
  text = ("<|begin|>### user:\nFind the value of x.\n\n" + prompts.INSTRUCTION +
          "\n\n### assistant:\n")
  assert prompt_ids == teacher(text, add_special_tokens=False)["input_ids"]
  assert prompt_ids != student_prompt
  # The response keeps its special-token string as the teacher's special token.
  assert response_ids == teacher(response, add_special_tokens=False)["input_ids"]
  assert response_ids[-1] == teacher.convert_tokens_to_ids("<|im_end|>")
  # Shared vocabulary and a canonical response: nothing re-tokenises differently.
  student_ids = student(response, add_special_tokens=False)["input_ids"]
  stats = prompts.check_retokenization([student_ids], [response_ids], max_fraction=0.0)
  assert (stats.mismatched, stats.positions, stats.fraction) == (0, len(student_ids), 0.0)
  no_template = _tokenizer(None, 300)
  with pytest.raises(ValueError, match="has no chat_template"):
    prompts.render_for_teacher(messages, response, no_template)
  with pytest.raises(ValueError, match="the prompt's last message is an assistant turn"):
    prompts.encode_prompt(messages + [{"role": "assistant", "content": "x"}], teacher)


def _split_tokens(tok, ids, positions):
  """`ids` with the tokens at `positions` spelled byte by byte (the same text, other ids)."""
  out, pieces = [], 0
  for i, token_id in enumerate(ids):
    if i in positions:
      spelled = tok.convert_tokens_to_ids(list(tok.convert_ids_to_tokens(token_id)))
      assert len(spelled) > 1
      out += spelled
      pieces += len(spelled)
    else:
      out.append(token_id)
  return out, pieces


def test_retokenization_counts_non_canonical_ids(toks):
  student, teacher, _ = toks
  texts = [" ".join(CORPUS[:5]), "The answer is \\boxed{2}.", "x^2"]
  canonical = [student(t, add_special_tokens=False)["input_ids"] for t in texts]
  long_tokens = [i for i, t in enumerate(canonical[0]) if len(student.convert_ids_to_tokens(t)) > 2]
  # Three split tokens far apart, and one near the end of row 1 (a sampler may emit either).
  chosen = set(long_tokens[::max(1, len(long_tokens) // 3)][:3])
  assert len(chosen) == 3 and min(np.diff(sorted(chosen))) > prompts.RESYNC_WINDOW
  row0, pieces0 = _split_tokens(student, canonical[0], chosen)
  last = max(i for i, t in enumerate(canonical[1]) if len(student.convert_ids_to_tokens(t)) > 1)
  row1, pieces1 = _split_tokens(student, canonical[1], {last})
  sampled = [row0, row1, canonical[2]]
  assert student.batch_decode(sampled) == texts
  retok = prompts.retokenize(sampled, student, teacher)
  assert retok == canonical
  stats = prompts.retokenization_stats(sampled, retok)
  # Each split token counts as its pieces; nothing after it is shifted into the count.
  assert stats.mismatched == pieces0 + pieces1
  assert stats.positions == sum(map(len, sampled))
  assert (stats.rows_mismatched, stats.rows) == (2, 3)
  first = min(chosen)
  assert stats.first_mismatch == (0, first, row0[first], canonical[0][first])
  assert stats.metrics()["retok/mismatch_fraction"] == stats.fraction > 0
  assert prompts.retokenize([], student, teacher) == []
  assert prompts.retokenize([[]], student, teacher) == [[]]


def test_retokenization_alignment_by_hand():
  # Student token 3 is three teacher tokens; the rest agrees.
  s, t = [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 10, 11, 12, 4, 5, 6, 7, 8, 9]
  stats = prompts.retokenization_stats([s, [1, 2], [], [5]], [t, [1, 2, 7], [], [6]])
  assert (stats.mismatched, stats.positions) == (3 + 1 + 1, 11 + 3 + 1)
  assert stats.first_mismatch == (0, 2, 3, 10)
  assert prompts.retokenization_stats([[1, 2]], [[1, 2, 7]]).first_mismatch == (0, 2, -1, 7)
  assert prompts.retokenization_stats([s], [s]) == prompts.RetokenizationStats(
      0, len(s), 0, 1, None)
  # Nothing in common: every position differs.
  other = list(range(100, 140))
  assert prompts.retokenization_stats([list(range(50))], [other]).mismatched == 50


def test_check_retokenization_raises_for_another_vocabulary(toks):
  student, _, foreign = toks
  ids = [student(t, add_special_tokens=False)["input_ids"] for t in CORPUS[:5]]
  retok = prompts.retokenize(ids, student, foreign)
  stats = prompts.retokenization_stats(ids, retok)
  assert stats.fraction > 0.5
  with pytest.raises(ValueError, match=r"re-tokenise differently under the teacher's tokenizer, "
                                       r"above max_fraction=0.1; first at row 0"):
    prompts.check_retokenization(ids, retok, max_fraction=0.1)
  assert prompts.check_retokenization(ids, retok, max_fraction=1.0) == stats
  for bad in (-0.1, 1.5, "0.1", True):
    with pytest.raises(ValueError, match="max_fraction must be a number in"):
      prompts.check_retokenization(ids, retok, max_fraction=bad)
  with pytest.raises(ValueError, match="student_ids has 5 rows but teacher_ids has 4"):
    prompts.check_retokenization(ids, retok[:4], max_fraction=1.0)


def test_left_pad_and_unpad():
  ids = [[5, 6, 7], [8], [9, 10]]
  tokens, mask = prompts.left_pad(ids, pad_id=0)
  assert tokens.dtype == np.int32 and mask.dtype == bool
  np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 8], [0, 9, 10]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1], [0, 1, 1]])
  tokens, mask = prompts.left_pad([np.array(r) for r in ids], pad_id=3, length=5)
  assert tokens.shape == (3, 5) and (tokens[~mask] == 3).all()
  assert prompts.unpad(tokens, mask) == ids


@pytest.mark.parametrize("ids,kwargs,message", [
    ([], {}, "ids_list is empty"),
    ([[1], []], {}, "prompt 1 must be a non-empty 1-D list"),
    ([[1, 2.5]], {}, "prompt 0 must hold integer token ids"),
    ([[1, -2]], {}, "prompt 0 has token ids outside"),
    ([[1], [1, 2, 3]], {"length": 2}, "length=2 must be an integer >= the longest prompt, 3 "
                                      "tokens (prompt 1)"),
    ([[1]], {"pad_id": -1}, "pad_id must be an integer"),
])
def test_left_pad_errors(ids, kwargs, message):
  kwargs = {"pad_id": 0, **kwargs}
  with pytest.raises(ValueError, match=re.escape(message)):
    prompts.left_pad(ids, **kwargs)


# ------------------------------------------------------------------- your own prompts (registry)


def _prompt_rows():
  return [{"prompt": "What is 1+1?", "answer": "2"},
          {"id": "q7", "prompt": "Find x such that x^2 = 4, then give the final answer."},
          {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "What is the value?"}], "answer": 3}]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_prompts_dataset_reads_prompt_and_messages_rows(tmp_path, toks, fmt):
  student, teacher, _ = toks
  rows = _prompt_rows()
  path = tmp_path / f"mine.{fmt}"
  if fmt == "jsonl":
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  else:   # parquet needs one schema: every row has every column
    full = [{"id": r.get("id"), "prompt": r.get("prompt"), "messages": r.get("messages"),
             "answer": None if r.get("answer") is None else str(r["answer"])} for r in rows]
    pq.write_table(pa.Table.from_pylist(full), path)
  read = registry.read_prompts(path)
  assert [r["answer"] for r in read] == ["2", "", "3"]      # optional: "" when absent
  assert read[1]["id"] == "q7" and read[0]["id"] == "0"      # the row number when no id
  encode = registry.encoder(registry.PROMPTS, student, teacher, chat_template=True,
                            max_prompt_len=256, template="{prompt}\n\nOne word.")
  first, chat = encode(read[0]), encode(read[2])
  # "prompt": one user turn with the template; no instruction of ours (no <think>, no \boxed).
  assert student.decode(first.prompt) == ("<|im_start|>user\nWhat is 1+1?\n\nOne word.<|im_end|>"
                                          "\n<|im_start|>assistant\n")
  assert teacher.decode(first.teacher_prompt).startswith("<|begin|>### user:\nWhat is 1+1?")
  # "messages": the chat as given, every turn; the template does not touch it.
  assert student.decode(chat.prompt) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>"
                                         "user\nWhat is the value?<|im_end|>\n"
                                         "<|im_start|>assistant\n")
  assert first.answer == "2" and first.target is None


def test_prompts_dataset_bad_rows_name_the_file_and_row(tmp_path):
  path = tmp_path / "bad.jsonl"
  for line, message in [('{"text": "x"}', "bad.jsonl:2: expected a JSON object"),
                        ('{"messages": [{"role": "user"}]}', "bad.jsonl:2: 'messages' must be"),
                        ('{"messages": [{"role": "assistant", "content": "a"}]}',
                         "bad.jsonl:2: the last message is an assistant turn"),
                        ("{oops", "bad.jsonl:2: not a JSON object")]:
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(registry.DataError, match=re.escape(message)):
      registry.read_prompts(path)
  with pytest.raises(registry.DataError, match="expected a .jsonl"):
    registry.read_prompts(tmp_path / "mine.csv")


def test_over_long_prompts_are_dropped_truncated_or_named_when_the_dataset_opens(toks):
  student, teacher, _ = toks
  rows = [{"id": f"r{i}", "prompt": "What is 1+1? " * n, "answer": ""}
          for i, n in enumerate([1, 40, 2, 60, 1])]
  whole = registry.encoder(registry.PROMPTS, student, teacher, chat_template=True,
                           max_prompt_len=10_000)
  lengths = [max(len(whole(r).prompt), len(whole(r).teacher_prompt)) for r in rows]
  limit = max(lengths[0], lengths[2], lengths[4])
  assert lengths[1] > limit and lengths[3] > limit

  def make(policy):
    return registry.encoder(registry.PROMPTS, student, teacher, chat_template=True,
                            max_prompt_len=limit, long_prompts=policy)

  said = []
  kept = registry.fitting_prompts(rows, make("drop"), limit, "drop", name="mine",
                                  report=said.append)
  assert [kept[i]["id"] for i in range(len(kept))] == ["r0", "r2", "r4"]
  assert len(said) == 1 and "2 of 5 prompts" in said[0] and "r1" in said[0] and "r3" in said[0]
  assert f"config.data.max_prompt_len={limit}" in said[0]
  with pytest.raises(registry.DataError, match=r"2 of 5 prompts .*ids r1 \(\d+ tokens\), r3"):
    registry.fitting_prompts(rows, make("error"), limit, "error")
  with pytest.raises(registry.DataError, match="5 of 5 prompts"):   # nothing left: an error
    registry.fitting_prompts(rows, make("drop"), 3, "drop")
  truncate = make("truncate")
  assert registry.fitting_prompts(rows, truncate, limit, "truncate") is rows
  cut, full = truncate(rows[3]), whole(rows[3])
  assert len(cut.prompt) == limit and cut.prompt.tolist() == full.prompt[-limit:].tolist()
  with pytest.raises(registry.DataError, match="exceeds config.data.max_prompt_len"):
    make("drop")(rows[3])       # the encoder itself never lets one through


def test_readme_prompts_example_is_a_file_the_dataset_reads(tmp_path, monkeypatch, toks):
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
               if "my_prompts.jsonl" in b)
  monkeypatch.chdir(tmp_path)
  exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used
  rows = registry.read_prompts(tmp_path / "my_prompts.jsonl")
  assert [r["id"] for r in rows] == ["0", "q2", "2"] and rows[1]["answer"] == "391"
  encode = registry.encoder(registry.PROMPTS, toks[0], toks[1], chat_template=True,
                            max_prompt_len=512)
  assert all(len(encode(r).prompt) > 0 for r in rows)


def test_builds_say_one_line_and_nothing_about_downloads(tmp_path, capfd, caplog):
  """Built from local files: no "Downloading and preparing dataset Unknown size", no progress
  bars, no TFDS warning about the folder it is filling; one line saying what is built."""
  src = _write(str(tmp_path / "test.json"), [{"question": "Q?", "answer": "1"}], "jsonl")
  md.load_split("minerva_math", source=src, data_dir=tmp_path / "t")
  from opd_jax.data import tiny_arith  # pylint: disable=import-outside-toplevel
  tiny_arith.load(tmp_path / "arith", "test")
  out, err = capfd.readouterr()
  said = out + err + caplog.text
  for noise in ("Downloading and preparing", "Unknown size", "downloaded and prepared",
                "Generating", "Shuffling", "Variant folder"):
    assert noise not in said, (noise, said[-2000:])
  assert f"building the minerva_math dataset in {tmp_path / 't'} (once)" in out
  assert f"building the tiny_arith dataset in {tmp_path / 'arith'} (once)" in out
