"""The rollout samples pages: the HTML of rollouts and the trainer's samples page."""

import html.parser

import numpy as np
import pytest

import model_helpers as mh
from opd_jax.pages import RolloutView, token_texts, write_rollouts_html, write_samples_page


class _TagChecker(html.parser.HTMLParser):
  """Records tag nesting errors and the text of every element with a title."""
  VOID = {"meta", "br", "hr", "img", "input", "link"}

  def __init__(self):
    super().__init__()
    self.stack, self.errors, self.titles, self.tags = [], [], [], []

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)
    attrs = dict(attrs)
    if "title" in attrs:
      self.titles.append(attrs["title"])
    if tag not in self.VOID:
      self.stack.append(tag)

  def handle_endtag(self, tag):
    if not self.stack or self.stack.pop() != tag:
      self.errors.append(tag)


def _rows():
  return [
      RolloutView(prompt="What is 1 < 2 & 3?", tokens=["<script>", "alert(1)", "</script>",
                                                       " \"ok\"\n", "<eos>"],
                  gaps=[-1.25, 0.5, 0.0, 2.0, -3.0],
                  teacher_top=[[("<b>", 0.6), ("a", 0.3), ("c", 0.1)]] * 5,
                  mask=[True, True, True, True, False]),
      RolloutView(prompt="p2", tokens=["x"], gaps=[float("nan")], teacher_top=[[("x", 1.0)]],
                  mask=[True]),
  ]


def test_rollouts_html_escapes_and_shows_gaps_and_top_tokens(tmp_path):
  path = tmp_path / "samples" / "step_10.html"
  write_rollouts_html(path, _rows())
  text = path.read_text()
  assert "<script" not in text.lower()
  assert "&lt;script&gt;" in text and "1 &lt; 2 &amp; 3" in text
  checker = _TagChecker()
  checker.feed(text)
  checker.close()
  assert not checker.errors and not checker.stack
  assert "script" not in checker.tags and "b" not in checker.tags
  # Gaps and the teacher's top-3 with probabilities, per token, in the hover text.
  assert checker.titles[1] == "gap -1.2500 nats\nteacher top: '<b>' 0.600, 'a' 0.300, 'c' 0.100"
  assert any(t.startswith("not counted\ngap -3.0000") for t in checker.titles)
  assert any(t.startswith("gap +nan") for t in checker.titles)
  # Default scale = largest counted |gap| (2.0; the masked -3 is ignored): full colours there.
  assert "background:rgb(31,119,180)" in text       # the +2.0 token, full blue
  assert "background:rgb(255,255,255)" in text      # gap 0
  assert "&minus;2" in text and "+2" in text and "nats" in text
  assert "mean gap +0.3125 nats" in text             # (-1.25 + 0.5 + 0 + 2) / 4


def test_rollouts_html_bad_input(tmp_path):
  with pytest.raises(ValueError, match="'mask': 1"):
    RolloutView(prompt="", tokens=["a", "b"], gaps=[0.0, 0.0], teacher_top=[[], []], mask=[1])
  with pytest.raises(ValueError, match="scale=0"):
    write_rollouts_html(tmp_path / "x.html", _rows(), scale=0)


class _Tokenizer:
  """Token i reads "t<i>", as a Hugging Face tokenizer's decode and convert_ids_to_tokens
  would name it; no special tokens."""
  all_special_ids = ()

  def convert_ids_to_tokens(self, ids):
    return [f"t{i}" for i in ids]

  def decode(self, ids, **_):
    return "".join(f"t{i}" for i in ids)


def _step():
  """Host arrays of one trainer step: rollouts of 3 and 2 response tokens, top-4 teacher."""
  response_mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  batch = {"response": np.arange(8).reshape(2, 4), "response_mask": response_mask,
           "loss_mask": response_mask & np.array([True, False, True, True])}
  logits = np.log(np.array([0.5, 0.25, 0.125, 0.125]))
  scores = {"teacher_logprobs": np.full((2, 4), -1.0), "behavior_logprobs": np.full((2, 4), -1.5),
            "t_indices": np.broadcast_to(np.array([7, 8, 9, 6]), (2, 4, 4)),
            "t_logits": np.broadcast_to(logits + 3.0, (2, 4, 4)), "t_lse": np.full((2, 4), 3.0)}
  return batch, scores


def test_samples_page_shows_each_rollouts_response_gaps_and_teacher_top3(tmp_path):
  batch, scores = _step()
  path = tmp_path / "samples" / "step_3.html"
  write_samples_page(path, _Tokenizer(), batch, scores, 5, ["first & prompt", "second"])
  text = path.read_text()
  checker = _TagChecker()
  checker.feed(text)
  # count 5 > 2 rows: both rollouts, each cut to its own response length (3 and 2 tokens).
  assert "rollout 0: 3 tokens, 2 counted" in text and "rollout 1: 2 tokens, 1 counted" in text
  assert "first &amp; prompt" in text and "second" in text
  top = "teacher top: 't7' 0.500, 't8' 0.250, 't9' 0.125"
  assert checker.titles[1:4] == [f"gap +0.5000 nats\n{top}",
                                 f"not counted\ngap +0.5000 nats\n{top}",
                                 f"gap +0.5000 nats\n{top}"]
  assert ">t0</span>" in text and ">t2</span>" in text and ">t3</span>" not in text

  write_samples_page(path, _Tokenizer(), batch, scores, 1, ["only", "not shown"])
  text = path.read_text()
  assert "rollout 0" in text and "rollout 1" not in text and "not shown" not in text


def test_samples_page_shows_byte_level_tokens_as_text_and_marks_special_tokens(tmp_path):
  tok = mh.make_tokenizer(tmp_path / "tok")
  text = "Hello the world\n  twice: caf\u00e9 \u65e5\u672c<|im_end|>"
  ids = tok.encode(text, add_special_tokens=False)
  texts, special = token_texts(tok, ids)
  assert "".join(texts) == text and len(texts) == len(ids)
  assert special == [t == "<|im_end|>" for t in texts] and special[-1]
  assert not any(c in "".join(texts) for c in "\u0120\u010a")   # no raw "Ġ" / "Ċ"
  assert " the" in texts and "\n" in "".join(t for t in texts if "\n" in t)
  n = len(ids)
  batch = {"response": np.asarray([ids]), "response_mask": np.ones((1, n), bool),
           "loss_mask": np.ones((1, n), bool)}
  scores = {"teacher_logprobs": np.zeros((1, n)), "behavior_logprobs": np.zeros((1, n)),
            "t_indices": np.asarray(ids)[None, :, None].repeat(3, -1),
            "t_logits": np.zeros((1, n, 3)), "t_lse": np.zeros((1, n))}
  path = tmp_path / "run" / "samples" / "step_7.html"
  write_samples_page(path, tok, batch, scores, 1, ["p"], title="run: rollouts of step 7")
  page = path.read_text()
  assert "<title>run: rollouts of step 7</title>" in page and "Rollouts<" not in page
  assert f">{texts[0]}</span>" in page and "> the</span>" in page
  assert 'class="tok special"' in page and "&lt;|im_end|&gt;</span>" in page
  assert "\u0120" not in page and "\u010a" not in page
