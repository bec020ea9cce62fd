"""Math answer grading: strict extraction, then math-verify's comparison in killable workers."""

# Standard library only at import time (no jax, nothing from the package): the worker processes
# load this file by path and import math-verify (latex2sympy2_extended, sympy) themselves.
#
# What is ours and what is math-verify's. Hugging Face's math-verify (`parse` / `verify`:
# latex2sympy2_extended's grammar, its normalisation of units, text, percent and degrees, and its
# comparison of numbers, expressions, sets, tuples, intervals, matrices and relations) decides
# every pair that the cheap rules below leave open. Ours, each for a reason the tests show:
#   - extraction (math-verify's own `parse` reads "I think it's 5 or maybe 7" as 7, and a
#     `\boxed{}` inside an unfinished reasoning block);
#   - a few string rewrites math-verify lacks: thousands separators written `1\,000` or `1 000`,
#     a trailing stray backslash, redundant outer braces, plain-text "pi" and the sign °,
#     several boxes of a reference read together;
#   - the value side of a labelled reference ("(p,q)=(3,2)", "|AB|=1", "AB=4, CD=5"), done
#     here so that the exact and numeric rules below see the value;
#   - exact numbers without a worker ("2.0000001" is not 2; 20-digit integers compare exactly),
#     identical strings and lists of plain numbers without a worker (speed: most answers are
#     decided in this process), an answer with unbalanced braces rejected (math-verify repairs
#     "\frac{1}{2" into 1/2);
#   - the worker processes, killed on a hard wall-clock limit and under a memory cap
#     (math-verify's own time limits use signal.alarm, which only works in the main thread and
#     cannot stop a computation stuck in C code), where the LaTeX parser runs ANTLR's two-stage
#     (SLL, then LL) prediction for speed.

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from fractions import Fraction

# Answers longer than this (after extraction) are compared as whitespace-free strings only.
MAX_ANSWER_CHARS = 1000
# Relative tolerance for two plain numbers when the reference is not an integer.
REL_TOL = Fraction(1, 10**6)
# Seconds a new worker may take to import math-verify and report ready.
_STARTUP_TIMEOUT_S = 120.0

# Which rule decided an item (`GradeReport.rules`).
RULE_NO_ANSWER = "no answer"
RULE_EXACT = "exact"
RULE_NUMERIC = "numeric"
RULE_MATH_VERIFY = "math-verify"
RULE_MALFORMED = "malformed"
RULE_TIMEOUT = "timeout"
RULE_ERROR = "error"

# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# A chat template's turn markers: what follows is not the model's answer.
_TURN_END_RE = re.compile(r"<\|(?:im_start|im_end|endoftext|eot_id|end_of_turn)\|>")
# Phrases that introduce a final answer; `strict` ones must be followed by maths or a number.
_PHRASE_RE = re.compile(
    r"(?P<final>final\s+answer)\s*(?:is\b|:)\s*:?"
    r"|\banswer\s+is\b\s*:?"
    r"|(?P<line>^[ \t>#*_]*answer)(?:[ \t*_]*:|(?=[ \t]*(?:\$|\\\[|\\\()))"
    r"|(?P<strict>\bthe\s+(?:result|solution)\s+is\b)\s*:?",
    re.IGNORECASE | re.MULTILINE)
# "$x \geq 5$ is the solution": a math span followed by such a phrase.
_POSTFIX_RE = re.compile(
    r"(\$\$?)([^$]+?)\1\s+is\s+(?:the|our|my)\s+(?:final\s+)?(?:answer|solution)\b",
    re.IGNORECASE)
# `\$` inside maths is a dollar sign, not a delimiter.
_MATH_SPAN_RE = re.compile(
    r"\$\$(?P<a>.+?)\$\$|\\\[(?P<b>.+?)\\\]|(?<!\\)\$(?P<c>(?:\\\$|[^$\n])+?)(?<!\\)\$"
    r"|\\\((?P<d>[^\n]+?)\\\)", re.DOTALL)
# "$12$ and $13$": more maths listed after the first span.
_LISTED_SPANS_RE = re.compile(r"\s*(?:,|;|and|or)\s*\\?\$")
_SENTENCE_END_RE = re.compile(r"[.!?](?=\s|$)|\n")
_HEDGE_RE = re.compile(
    r"\b(?:maybe|perhaps|probably|possibly|i\s+think|i\s+guess|i\s+believe|not\s+sure|"
    r"or\s+so)\b", re.IGNORECASE)
# Words between two boxes that make the second a revision of the first, not a further part.
_REVISION_RE = re.compile(
    r"\b(?:no|not|wait|but|actually|instead|however|rather|mistake|wrong|oops|sorry|hmm|"
    r"correct(?:ion|ed)?|recheck|check|again|so|thus|therefore|hence|then)\b", re.IGNORECASE)
_GAP_MAX_CHARS = 80
_NUMBER_TOKEN_RE = re.compile(r"(?<![\w.])[-+]?\d+(?:[.,]\d+)*(?![\w])")


def _braced(text: str, start: int) -> tuple[str, int] | None:
  """(content, index after '}') of the group opening at text[start] == '{'; None if unbalanced."""
  depth = 0
  i, n = start, len(text)
  while i < n:
    c = text[i]
    if c == "\\":
      i += 2  # an escaped brace \{ or \} does not open or close a group
      continue
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return text[start + 1:i], i + 1
    i += 1
  return None


def _box_at(text: str, match: re.Match) -> tuple[str | None, int]:
  """(argument, end) of the box named by `match`: `{...}` or one bare token (`\\boxed 5`)."""
  pos = match.end()
  while pos < len(text) and text[pos].isspace():
    pos += 1
  if pos >= len(text):
    return None, pos
  if text[pos] == "{":
    group = _braced(text, pos)
    if group is None:
      return None, len(text)
    return group[0].strip() or None, group[1]
  token = re.match(r"[^\s$]*", text[pos:]).group(0)
  end = pos + len(token)
  return token.rstrip(".,") or None, end


def _gap_joins(gap: str) -> bool:
  """Whether the text between two boxes lists parts ("and", ",") rather than revising one."""
  if len(gap) > _GAP_MAX_CHARS or _REVISION_RE.search(gap) or _HEDGE_RE.search(gap):
    return False
  return re.search(r"[.!?]\s+[A-Z]|\n\s*\n", gap) is None


def _sentence_bounds(text: str, start: int, end: int) -> tuple[int, int]:
  """The span of the sentences containing text[start:end] (at most 200 characters either side)."""
  lo = max(0, start - 200)
  before = [m.end() for m in _SENTENCE_END_RE.finditer(text, lo, start)]
  after = _SENTENCE_END_RE.search(text, end, min(len(text), end + 200))
  return (before[-1] if before else lo), (after.start() if after else min(len(text), end + 200))


def _hedged(text: str, start: int, end: int) -> bool:
  lo, hi = _sentence_bounds(text, start, end)
  return _HEDGE_RE.search(text, lo, hi) is not None


def _boxes(text: str) -> list[tuple[int, int, str | None]]:
  """(start, end, argument) of every box, in order."""
  out = []
  pos = 0
  while True:
    m = _BOX_RE.search(text, pos)
    if m is None:
      return out
    arg, end = _box_at(text, m)
    out.append((m.start(), end, arg))
    pos = max(end, m.end())


def _last_box_run(text: str, boxes) -> list[tuple[int, int, str | None]]:
  """The last box and the boxes before it that list further parts of the same answer."""
  run = [boxes[-1]]
  for prev in reversed(boxes[:-1]):
    if prev[2] is None or not _gap_joins(text[prev[1]:run[0][0]]):
      break
    run.insert(0, prev)
  return run


def _read_value(text: str, pos: int) -> tuple[str | None, int]:
  """The answer written at text[pos:] after an answer phrase, and where it ends.

  Maths first (`$...$`, `\\(...\\)` on the line; `$$...$$`, `\\[...\\]` across lines); else the
  rest of the sentence, where a sentence such as "The largest $n$ is 34" gives what follows its
  last "is", and one with a single number gives that number.
  """
  # Spaces, one line break, Markdown emphasis ("**Answer:** 5") and an opening quote.
  m = re.match(r"[ \t*_]*\n?[ \t*_]*(?:\\?[\"\u201c])?", text[pos:])
  pos += m.end()
  span = _MATH_SPAN_RE.match(text, pos)
  end = _SENTENCE_END_RE.search(text, span.end() if span else pos)
  end = end.start() if end else len(text)
  if span is not None and not _LISTED_SPANS_RE.match(text, span.end(), end):
    value = next(g for g in span.groups() if g is not None)
    return value.strip() or None, span.end()
  rest = text[pos:end].strip()
  masked = _MATH_SPAN_RE.sub(" M ", rest)
  if len(re.findall(r"[A-Za-z]{2,}", masked)) >= 2:  # a sentence, not a value
    tail = re.split(r"\s(?:is|are|equals|was|=)\s", rest)
    if len(tail) > 1:
      return _read_value(tail[-1], 0)[0], end
    spans = list(_MATH_SPAN_RE.finditer(rest))
    numbers = _NUMBER_TOKEN_RE.findall(_MATH_SPAN_RE.sub(" ", rest))
    if len(spans) + len(numbers) == 1:
      return (next(g for g in spans[0].groups() if g is not None).strip() if spans
              else numbers[0]), end
    if spans or numbers:
      return None, end
  rest = re.sub(r"\\?[\"\u201d]$", "", rest.replace("$", "").strip().rstrip(".,;")).strip()
  return rest or None, end


def _phrase_answer(text: str, after: int = 0) -> tuple[str | None, int, int] | None:
  """(answer, start, end) of the last answer phrase at or after `after`; None without one."""
  last = None
  for m in _PHRASE_RE.finditer(text, after):
    last = m
  post = None
  for m in _POSTFIX_RE.finditer(text, after):
    post = m
  if post is not None and (last is None or post.start() > last.start()):
    return post.group(2).strip() or None, post.start(), post.end()
  if last is None:
    return None
  value, end = _read_value(text, last.end())
  if last.group("strict") and value is not None and not re.search(r"\d|\\|[<>=]", value):
    value = None  # "the solution is to factor ...": not an answer
  return value, last.start(), end


@dataclasses.dataclass(frozen=True)
class _Extraction:
  answer: str | None  # the reading when the reference has one part
  parts: str | None  # several boxes read together ("3, -5"), when the response lists parts


def _extract(text: str) -> _Extraction:
  if "</think>" in text:
    text = text.rsplit("</think>", 1)[1]
  elif "<think>" in text:
    return _Extraction(None, None)  # cut off while reasoning: no answer
  turn_end = _TURN_END_RE.search(text)
  if turn_end is not None:
    text = text[:turn_end.start()]
  boxes = _boxes(text) if _BOX_RE.search(text) else []
  if boxes:
    last = boxes[-1]
    phrase = _phrase_answer(text, last[1])
    if phrase is not None and phrase[0] is not None:  # a final answer stated after the last box
      return _phrase_result(text, phrase)
    if last[2] is None:  # empty or unclosed: an earlier box is not used instead
      return _Extraction(None, None)
    run = _last_box_run(text, boxes)
    if _hedged(text, run[0][0], run[-1][1]):
      return _Extraction(None, None)
    parts = ", ".join(b[2] for b in run) if len(run) > 1 else None
    return _Extraction(last[2], parts)
  phrase = _phrase_answer(text)
  if phrase is None or phrase[0] is None:
    return _Extraction(None, None)
  return _phrase_result(text, phrase)


def _phrase_result(text: str, phrase) -> _Extraction:
  value, start, end = phrase
  if _hedged(text, start, end):
    return _Extraction(None, None)
  return _Extraction(value, None)


def extract_answer(text: str, *, parts: bool = True) -> str | None:
  """The final answer of a model response, or None when it gives none.

  Policy (strict: a response that does not clearly state one answer has none):
    - Only the text after the last `</think>` is read; a response that opens `<think>` and never
      closes it was cut off while reasoning and has no answer (a box inside it is not used).
      Text after a chat turn marker (`<|im_start|>`, `<|im_end|>`, ...) is dropped.
    - The answer is the argument of the last `\\boxed{...}` / `\\fbox{...}` (nested and escaped
      braces handled; `\\boxed 5` takes the next token). An empty or unclosed last box gives
      None: an earlier box is usually an intermediate result. "\\boxed{6} ... no wait ...
      \\boxed{8}" is 8.
    - Boxes that list parts of one answer are read together: "the roots are \\boxed{3} and
      \\boxed{-5}" gives "3, -5". Boxes join when the text between them is short and only
      separates ("and", ",", `\\quad`, labels such as "y_2 ="); words of revision ("no", "wait",
      "but", "actually", ...) or a new sentence end the run. `grade` uses this reading only when
      the reference has several parts, and the last box otherwise (`parts=False`).
    - A final answer stated in words after the last box wins over it ("... = \\boxed{255} ...
      Final Answer: The final answer is $10,455$." gives 10,455).
    - Without a box: the last of "final answer is" / "Final Answer:" / "answer is" / a line
      "Answer: X" (or "Answer \\[ X \\]") / "the result is" or "the solution is" followed by maths
      or a number / "$X$ is the answer" (or "... is our answer", "... is the solution"). The
      answer is the maths that follows ($...$, \\(...\\), $$...$$, \\[...\\]) or the rest of
      the sentence; Minerva's "Final Answer: The final answer is 7. I hope it is correct." gives
      7; a sentence such as "Final Answer: The largest $n$ is 34." gives what follows its last
      "is"; one with a single number gives that number.
    - Hedges give None: "maybe", "perhaps", "probably", "possibly", "I think", "I guess",
      "I believe", "not sure", "or so" in the sentence that states the answer
      ("I think the answer is 5 or maybe 7" has no answer).

  Args:
    text: the generated response.
    parts: read boxes that list several parts of the answer together (False: the last box).

  Returns:
    The raw answer string (not normalised), or None.
  """
  if not isinstance(text, str):
    raise TypeError(f"extract_answer: text must be a str, got {type(text).__name__}")
  found = _extract(text)
  return (found.parts or found.answer) if parts else found.answer


# ----------------------------------------------------------------------------------------------
# String preparation (ours: what math-verify does not do) and the cheap, in-process decisions
# ----------------------------------------------------------------------------------------------

_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\[", "\\]"), ("\\(", "\\)"))
# Thousands separators of one number: "1,000", "1{,}000", "1,\!000", "1\,000", "1 000".
_THOUSANDS_RE = re.compile(
    r"^([-+]?[1-9]\d{0,2})((?:(?:,|\{,\}|,\\!|\\,|\\ | |~)\d{3})+)(\.\d+)?$")
_PLAIN_PI_RE = re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])")
_COMMA_NUMBER_RE = re.compile(r"^[-+]?\d+,\d+$")  # "1,22", "0,111": not thousands
_LITERAL_RE = re.compile(
    r"^(?P<sign>[-+]?)(?:(?P<num>\d{1,60}(?:\.\d{0,60})?|\.\d{1,60})"
    r"(?:e(?P<exp>[-+]?\d{1,3})|\\(?:times|cdot)10\^(?:\{(?P<exp10>[-+]?\d{1,3})\}|(?P<exp1>\d)))?"
    r"|\\frac\{(?P<fn>-?\d{1,60})\}\{(?P<fd>\d{1,60})\}|(?P<sn>\d{1,60})/(?P<sd>\d{1,60})"
    r"|(?P<mw>\d{1,60})\\frac\{(?P<mn>\d{1,60})\}\{(?P<md>\d{1,60})\})$")
_INT_RE = re.compile(r"^[-+]?\d+$")
# A left side that only names the value: x, f(x), a_{1}, AB, |AB|, (p,q), \frac{NO}{BO}, V_1:V_2.
_SYM = r"(?:[A-Za-z]|\\(?:alpha|beta|gamma|delta|theta|lambda|mu|sigma|phi|omega))" \
       r"(?:_\{?[A-Za-z0-9]+\}?)?'*"
_WORD = rf"(?:{_SYM})+"
_ONE_LABEL = (rf"{_WORD}(?:\({_WORD}(?:,{_WORD})*\))?|\|{_WORD}\||\\frac\{{{_WORD}\}}\{{{_WORD}\}}"
              rf"|\({_WORD}(?:,{_WORD})+\)")
_LABEL_RE = re.compile(rf"^(?:{_ONE_LABEL})(?::(?:{_ONE_LABEL}))*$")
_SPACING_RE = re.compile(
    r"\\(?:left|right)(?![A-Za-z])|\\[,;:! ]|\\(?:q?quad|displaystyle)(?![A-Za-z])")


def _strip_wrappers(s: str) -> str:
  """Removes math delimiters around the whole answer and a trailing period or stray backslash."""
  while True:
    s = s.strip()
    before = s
    for left, right in _DELIMITERS:
      if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
        s = s[len(left):-len(right)].strip()
        break
    s = re.sub(r"^\$+|(?<!\\)\$+$", "", s).strip()  # one unmatched `$` at either end
    s = re.sub(r"(?:\.|(?<!\\)\\)+$", "", s).strip()  # "5.", "185\" (a stray backslash)
    if s == before:
      return s


def _unbrace(s: str) -> str:
  """Removes braces around the whole answer ("{{1}}" -> "1"); math-verify reads them as a set."""
  for _ in range(len(s) // 2):
    if len(s) < 2 or s[0] != "{" or _braced(s, 0) != (s[1:-1], len(s)):
      break
    s = s[1:-1].strip()
  return s


def normalize_answer(answer: str) -> str:
  """The answer as it is compared: our string rewrites, before math-verify reads it.

  Removes math delimiters around the whole answer (`$...$`, `\\(...\\)`, `\\[...\\]`), a
  trailing period or stray backslash ("185\\"), braces around the whole answer; reads the boxes
  of an answer or reference given with `\\boxed{}` (several boxes that list parts are read
  together, "\\boxed{1} and \\boxed{2}" -> "1, 2"); removes the thousands separators of a lone
  number ("1,000", "1{,}000", "1\\,000", "1 000" -> "1000"; "32, 349" and "0,250" are not one
  number); writes a plain-text "pi" as `\\pi` and the sign ° as `^{\\circ}`. Strings longer
  than MAX_ANSWER_CHARS only lose their whitespace. Everything else (units, `\\text{}`, percent,
  degrees, `\\left`/`\\right`, `\\dfrac`) is math-verify's.

  Args:
    answer: an extracted answer (or a reference answer).

  Returns:
    The prepared string ("" for an empty answer).
  """
  if not isinstance(answer, str):
    raise TypeError(f"normalize_answer: answer must be a str, got {type(answer).__name__}")
  s = answer.strip()
  if len(s) > MAX_ANSWER_CHARS:
    return re.sub(r"\s+", "", s)
  if _BOX_RE.search(s):
    found = _extract(s)
    boxed = found.parts or found.answer
    if boxed is not None:
      s = boxed
  s = _unbrace(_strip_wrappers(_unbrace(_strip_wrappers(s))))
  s = _PLAIN_PI_RE.sub(r"\\pi", s).replace("°", "^{\\circ}")  # math-verify reads p*i, and no °
  m = _THOUSANDS_RE.match(s)
  if m:
    s = m[1] + re.sub(r"\D", "", m[2]) + (m[3] or "")
  return s


def _key(s: str) -> str:
  """Whitespace- and spacing-free form for the exact-string rule."""
  s = _SPACING_RE.sub("", s)
  s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
  return re.sub(r"\s+", "", s)


def _literal(s: str) -> Fraction | None:
  """Exact value of a plain number: 12, -0.5, 1.5e-3, 3\\times10^{5}, \\frac{1}{2}, 3/4."""
  m = _LITERAL_RE.match(s)
  if m is None:
    return None
  sign = -1 if m["sign"] == "-" else 1
  if m["num"] is not None:
    return sign * Fraction(m["num"]) * Fraction(10) ** int(
        m["exp"] or m["exp10"] or m["exp1"] or 0)
  num, den, whole = ((m["fn"], m["fd"], 0) if m["fn"] is not None else
                     (m["sn"], m["sd"], 0) if m["sn"] is not None else
                     (m["mn"], m["md"], int(m["mw"])))
  if int(den) == 0:
    return None
  return sign * (whole + Fraction(int(num), int(den)))


def _split_top(s: str, sep: str) -> list[str]:
  """Splits s at `sep` outside brackets ((), [], {}, \\{\\})."""
  parts, depth, start, i, n = [], 0, 0, 0, len(s)
  while i < n:
    if s[i] == "\\" and i + 1 < n and s[i + 1] in "{}":
      depth += 1 if s[i + 1] == "{" else -1
      i += 2
      continue
    if depth == 0 and s.startswith(sep, i):
      parts.append(s[start:i])
      i += len(sep)
      start = i
      continue
    if s[i] in "([{":
      depth += 1
    elif s[i] in ")]}":
      depth -= 1
    i += 1
  parts.append(s[start:])
  return parts


def _sides(s: str) -> list[str]:
  """s split at top-level "=" (not "<=", ">=", "!=", "==")."""
  sides = []
  for part in _split_top(s, "="):
    if sides and (sides[-1][-1:] in ("<", ">", "!", "\\") or part[:1] == "="):
      sides[-1] += "=" + part
    else:
      sides.append(part)
  return sides


def _value_side(s: str) -> str:
  """The value of a labelled answer ("(p,q)=(3,2)" -> "(3,2)"); s itself otherwise.

  Each comma-separated item whose left side only names the value loses its label
  ("AB=4, CD=5" -> "4, 5"); "7 = 11a+c" or "a+3z=0" is an equation and stays.
  """
  items = _split_top(s, ",")
  out = []
  for item in items:
    sides = _sides(item)
    if len(sides) == 2 and _LABEL_RE.match(_key(sides[0])):
      item = sides[1].strip()
    out.append(item.strip())
  return ", ".join(out)


def _numbers_equal(pred: Fraction, ref: Fraction, ref_is_int: bool) -> bool:
  if ref_is_int or ref == 0:
    return pred == ref
  return abs(pred - ref) <= REL_TOL * abs(ref)


def _prepare_pair(pred: str, ref: str) -> tuple[str, str]:
  """Rewrites of one pair that depend on both sides (labels), applied before any comparison."""
  if len(_sides(ref)) > 1 and len(_sides(pred)) == 1:
    ref = _value_side(ref)
  # A comma between two digit groups that is not a thousands separator ("0,250") separates two
  # numbers; math-verify would read it as a decimal comma (0.25) or, in expression mode, as 250.
  if _COMMA_NUMBER_RE.match(pred) and not _COMMA_NUMBER_RE.match(ref) and _literal(ref) is None:
    pred = pred.replace(",", ", ")
  return pred, ref


def _balanced(s: str) -> bool:
  """Whether the braces of s (other than `\\{`, `\\}`) pair up."""
  depth = 0
  for m in re.finditer(r"\\.|[{}]", s):
    if m.group() in "{}":
      depth += 1 if m.group() == "{" else -1
      if depth < 0:
        return False
  return depth == 0


def _number_list(k: str) -> tuple[str, list[tuple[Fraction, bool]]] | None:
  """("set" or the brackets, [(value, is_int)]) of a list of plain numbers; None otherwise.

  Read as math-verify reads them: `\\{...\\}` and a bare list are sets, `(a, b)`, `[a, b)` ...
  are ordered (tuples or intervals: the same brackets on both sides compare element-wise).
  """
  if k.startswith("\\{") and k.endswith("\\}"):
    kind, inner = "set", k[2:-2]
  elif len(k) > 2 and k[0] in "([" and k[-1] in ")]":
    kind, inner = k[0] + k[-1], k[1:-1]
  else:
    kind, inner = "set", k
  items = _split_top(inner, ",")
  if len(items) < 2:
    return None
  values = []
  for item in items:
    value = _literal(item)
    if value is None:
      return None
    values.append((value, _INT_RE.match(item) is not None))
  return kind, values


def _number_lists_equal(pred, ref) -> bool:
  if ref[0] != "set":
    return len(pred[1]) == len(ref[1]) and all(
        _numbers_equal(p, r, r_int) for (p, _), (r, r_int) in zip(pred[1], ref[1]))
  # Sets: every element has an equal one on the other side (duplicates merge).
  return (all(any(_numbers_equal(p, r, r_int) for p, _ in pred[1]) for r, r_int in ref[1]) and
          all(any(_numbers_equal(p, r, r_int) for r, r_int in ref[1]) for p, _ in pred[1]))


def _cheap_equal(pred: str, ref: str) -> tuple[bool | None, str]:
  """(decision, rule) without math-verify when possible; (None, "") when it must decide."""
  kp, kr = _key(pred), _key(ref)
  if kp == kr:
    return bool(kp), RULE_EXACT
  if not kp or not kr or len(pred) > MAX_ANSWER_CHARS or len(ref) > MAX_ANSWER_CHARS:
    return False, RULE_EXACT
  if not _balanced(kp):  # cut off ("\\frac{1}{2"): math-verify would repair and accept it
    return False, RULE_MALFORMED
  p, r = _literal(kp), _literal(kr)
  if p is not None and r is not None:
    return _numbers_equal(p, r, _INT_RE.match(kr) is not None), RULE_NUMERIC
  lp, lr = _number_list(kp), _number_list(kr)
  if lp is not None and lr is not None and lp[0] == lr[0]:
    return _number_lists_equal(lp, lr), RULE_NUMERIC
  # A decimal comma: "1,22" is 1.22 when the other side is that decimal ("0,111" vs "0.111").
  for a, b in ((kp, kr), (kr, kp)):
    if _COMMA_NUMBER_RE.match(a) and re.fullmatch(r"[-+]?\d*\.\d+", b):
      if Fraction(a.replace(",", ".")) == Fraction(b):
        return True, RULE_NUMERIC
  return None, ""


# ----------------------------------------------------------------------------------------------
# math-verify (worker processes only)
# ----------------------------------------------------------------------------------------------

_MV: dict = {}


def _mv_setup() -> None:
  """Imports math-verify; its own time limits are off (this process is killed instead)."""
  import logging  # pylint: disable=import-outside-toplevel
  logging.disable(logging.WARNING)  # "timeout disabled" notices; this process has no console
  import math_verify  # pylint: disable=import-outside-toplevel
  _two_stage_parsing()
  _MV["parse"], _MV["verify"] = math_verify.parse, math_verify.verify
  _MV["config"] = [math_verify.LatexExtractionConfig(boxed_match_priority=0),
                   math_verify.ExprExtractionConfig()]


def _two_stage_parsing() -> None:
  """Makes latex2sympy2_extended parse with ANTLR's SLL prediction first, full LL on an error.

  ANTLR documents that SLL prediction returns the same parse tree as LL or reports a syntax
  error; latex2sympy2_extended raises on any syntax error, so retrying with LL then gives
  exactly LL's result. SLL avoids LL's full-context prediction, which takes most of the time on
  comma lists: a tuple such as "(3, \\frac{\\pi}{4})" parses in about 3 ms instead of 60 ms.
  If the parser's internals are not what this expects, parsing stays as it is.
  """
  try:
    from antlr4.atn.PredictionMode import PredictionMode  # pylint: disable=import-outside-toplevel
    from latex2sympy2_extended import latex2sympy2  # pylint: disable=import-outside-toplevel
    cls = latex2sympy2._Latex2Sympy  # pylint: disable=protected-access
    create_parser, parse = cls.create_parser, cls.parse
  except (ImportError, AttributeError):
    return

  def sll_create_parser(self, latex_str):
    parser = create_parser(self, latex_str)
    if getattr(self, "_opd_sll", False):
      parser._interp.predictionMode = PredictionMode.SLL  # pylint: disable=protected-access
    return parser

  def two_stage_parse(self, latex_str):
    self._opd_sll = True
    try:
      return parse(self, latex_str)
    except Exception:  # pylint: disable=broad-except
      self._opd_sll = False
      return parse(self, latex_str)

  cls.create_parser, cls.parse = sll_create_parser, two_stage_parse


def _mv_read(s: str):
  # The whole prepared answer is one boxed expression: math-verify's extraction must not pick a
  # part of it (it would read "5 or 7" in `$...$` as the last number).
  return _MV["parse"]("\\boxed{" + s + "}", _MV["config"], parsing_timeout=None)


def _mv_equal(pred: str, ref: str) -> bool:
  """math-verify's verdict on two prepared answers (may be slow or hang: workers only)."""
  gold, answer = _mv_read(ref), _mv_read(pred)
  return bool(gold) and bool(answer) and bool(
      _MV["verify"](gold, answer, timeout_seconds=None))


# ----------------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------------

# A worker is a fresh interpreter that loads this file by path (not `opd_jax.data...`, not the
# caller's __main__), so it never imports jax or the caller's script; multiprocessing's "spawn"
# and "forkserver" would re-import __main__. subprocess uses fork+exec, safe with JAX threads.
_WORKER_BOOT = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_opd_math_grading_worker', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = module\n"
    "spec.loader.exec_module(module)\n"
    "module._worker_main(int(sys.argv[2]))\n")


def _worker_main(memory_limit_mb: int) -> None:
  """Worker loop: one JSON task per stdin line -> one JSON result per line on the protocol fd."""
  protocol = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
  sys.stdout = sys.stderr
  try:
    if memory_limit_mb > 0:
      import resource  # pylint: disable=import-outside-toplevel
      limit = memory_limit_mb * 2**20
      resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _mv_setup()
    _mv_equal("x+1", "1+x")  # imports sympy and the LaTeX grammar, warms caches before "ready"
  except BaseException as e:  # pylint: disable=broad-except
    protocol.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
    return
  protocol.write(json.dumps({"ready": True}) + "\n")
  for line in sys.stdin:
    task = json.loads(line)
    try:
      result = {"id": task["id"], "ok": _mv_equal(task["p"], task["r"])}
    except BaseException as e:  # pylint: disable=broad-except
      # MemoryError (rlimit), RecursionError or a parser bug: not equivalent, reported.
      result = {"id": task["id"], "ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    protocol.write(json.dumps(result) + "\n")


class _Worker:
  """One worker process and the task it is running."""

  def __init__(self, memory_limit_mb: int):
    self.proc = subprocess.Popen(
        [sys.executable, "-P", "-c", _WORKER_BOOT, os.path.abspath(__file__),
         str(memory_limit_mb)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
        close_fds=True)
    self.fd = self.proc.stdout.fileno()
    self.buffer = b""
    self.ready = False
    self.started = time.monotonic()
    self.task = None
    self.deadline = None

  def send(self, task_id: int, pred: str, ref: str, timeout_s: float) -> None:
    data = (json.dumps({"id": task_id, "p": pred, "r": ref}) + "\n").encode()
    self.task = task_id
    self.deadline = time.monotonic() + timeout_s
    view = memoryview(data)
    while view:
      view = view[os.write(self.proc.stdin.fileno(), view):]

  def read_messages(self) -> list[dict] | None:
    """Complete messages available now; None when the process has exited."""
    chunk = os.read(self.fd, 1 << 16)
    if not chunk:
      return None
    self.buffer += chunk
    *lines, self.buffer = self.buffer.split(b"\n")
    return [json.loads(line) for line in lines if line]

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait()
    self.proc.stdin.close()
    self.proc.stdout.close()


def _default_workers() -> int:
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:
    cpus = os.cpu_count() or 1
  return max(2, min(8, cpus // 2))


@dataclasses.dataclass(frozen=True)
class GradeReport:
  """Result of `grade`: per-item decisions and counters.

  Attributes:
    correct: per item, whether the answer is equivalent to the reference.
    answers: per item, the answer that was graded (None: the response gives no answer); several
      boxes read together when the reference has several parts ("3, -5").
    rules: per item, what decided it: "exact" (equal strings), "numeric" (plain numbers or lists
      of them), "malformed" (the answer's braces do not pair up), "math-verify" (its verdict, in
      a worker), "timeout" (the worker hit the time limit and was killed; incorrect), "error"
      (the worker failed; incorrect), "no answer".
    timed_out: per item, whether its comparison hit the time limit (counted incorrect).
    num_timeouts: items whose comparison timed out.
    num_no_answer: items without an extractable answer (counted incorrect).
    num_symbolic: distinct (answer, reference) pairs that needed a worker.
    num_errors: distinct pairs whose worker failed (crashed, out of memory; counted incorrect).
    seconds: wall time of the call.
    workers: worker processes used (0 when every pair was decided in this process).
  """
  correct: tuple[bool, ...]
  answers: tuple[str | None, ...]
  timed_out: tuple[bool, ...]
  num_timeouts: int
  num_no_answer: int
  num_symbolic: int
  num_errors: int
  seconds: float
  workers: int
  rules: tuple[str, ...] = ()

  @property
  def accuracy(self) -> float:
    """Fraction of items graded correct (0.0 for no items)."""
    return sum(self.correct) / len(self.correct) if self.correct else 0.0


def _has_parts(ref: str) -> bool:
  """Whether a prepared reference lists several parts ("-5, 3", "1 \\pm \\sqrt{2}", "6 and 8")."""
  if "\\pm" in ref or "\\mp" in ref:
    return True
  ref = _key(ref)
  if ref.startswith("\\{") and ref.endswith("\\}"):  # a set: its elements are the parts
    ref = ref[2:-2]
  if any(len(_split_top(ref, sep)) > 1 for sep in (",", ";")):
    return True
  return re.search(r"(?<![\\A-Za-z])(?:and|or)(?![A-Za-z])", ref) is not None


class Grader:
  """Grades answers, keeping its math-verify worker processes alive between calls.

  Each comparison that the cheap rules leave open runs in a worker under a hard wall-clock
  limit; a worker that exceeds it is killed (SIGKILL) and replaced, and the comparison counts as
  not equivalent. Workers are started on first need and stopped by `close()` (or leaving a
  `with` block). Thread-safe: calls are serialised.

  Args:
    workers: maximum worker processes (default: half the usable CPUs, between 2 and 8).
    memory_limit_mb: address-space limit of each worker (0: none); exceeding it fails that
      comparison (not equivalent) instead of exhausting the host's memory.
  """

  def __init__(self, *, workers: int | None = None, memory_limit_mb: int = 4096):
    if workers is not None and (not isinstance(workers, int) or workers < 1):
      raise ValueError(f"Grader: workers must be a positive int or None, got {workers!r}")
    if not isinstance(memory_limit_mb, int) or memory_limit_mb < 0:
      raise ValueError(
          f"Grader: memory_limit_mb must be an int >= 0 (0: no limit), got {memory_limit_mb!r}")
    self.max_workers = workers or _default_workers()
    self.memory_limit_mb = memory_limit_mb
    self._workers: list[_Worker] = []
    self._lock = threading.Lock()

  def __enter__(self) -> Grader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Stops the worker processes (a later call starts new ones)."""
    with self._lock:
      for w in self._workers:
        w.kill()
      self._workers = []

  def grade(self, responses: Sequence[str | None], references: Sequence[str], *,
            timeout_s: float = 5.0, extract: bool = True) -> GradeReport:
    """Grades responses against reference answers.

    Args:
      responses: model responses (answers are extracted as `extract_answer` does, several boxes
        read together when the reference has several parts), or already extracted answers with
        `extract=False` (None: no answer).
      references: reference answers, one per response.
      timeout_s: hard wall-clock limit per distinct math-verify comparison, in seconds.
      extract: whether `responses` are full responses (True) or answers (False).

    Returns:
      A GradeReport.
    """
    start = time.perf_counter()
    _check_grade_args(responses, references, timeout_s)
    prepared_refs: dict[str, str] = {}
    answers: list[str | None] = []
    correct = [False] * len(responses)
    rules = [RULE_NO_ANSWER] * len(responses)
    tasks: dict[tuple[str, str], list[int]] = {}
    for k, (response, ref) in enumerate(zip(responses, references)):
      if ref not in prepared_refs:
        prepared_refs[ref] = normalize_answer(ref)
      ref_norm = prepared_refs[ref]
      answer = response
      if extract and response is not None:
        found = _extract(response)
        answer = found.parts if found.parts and _has_parts(ref_norm) else found.answer
      answers.append(answer)
      if answer is None:
        continue
      pred, ref_k = _prepare_pair(normalize_answer(answer), ref_norm)
      decided, rule = _cheap_equal(pred, ref_k)
      if decided is None:
        tasks.setdefault((pred, ref_k), []).append(k)
      else:
        correct[k], rules[k] = decided, rule
    statuses, used = self._run(list(tasks), timeout_s) if tasks else ([], 0)
    for status, items in zip(statuses, tasks.values()):
      for k in items:
        correct[k] = status == "true"
        rules[k] = {"timeout": RULE_TIMEOUT, "error": RULE_ERROR}.get(status, RULE_MATH_VERIFY)
    timed_out = tuple(r == RULE_TIMEOUT for r in rules)
    return GradeReport(
        correct=tuple(correct), answers=tuple(answers), timed_out=timed_out,
        num_timeouts=sum(timed_out), num_no_answer=sum(a is None for a in answers),
        num_symbolic=len(tasks), num_errors=statuses.count("error"),
        seconds=time.perf_counter() - start, workers=used, rules=tuple(rules))

  def _run(self, tasks: list[tuple[str, str]], timeout_s: float) -> tuple[list[str], int]:
    """Runs symbolic comparisons; statuses "true" | "false" | "timeout" | "error"."""
    with self._lock:
      statuses: list[str | None] = [None] * len(tasks)
      pending = deque(range(len(tasks)))
      wanted = min(self.max_workers, len(tasks))
      for w in [w for w in self._workers if w.proc.poll() is not None]:
        w.kill()  # exited since the last call: reap it and close its pipes
        self._workers.remove(w)
      while len(self._workers) < wanted:
        self._workers.append(_Worker(self.memory_limit_mb))
      workers = self._workers[:wanted]
      selector = selectors.DefaultSelector()
      for w in workers:
        selector.register(w.fd, selectors.EVENT_READ, w)
      try:
        while pending or any(w.task is not None for w in workers):
          for w in workers:
            if w.ready and w.task is None and pending:
              k = pending.popleft()
              try:
                w.send(k, *tasks[k], timeout_s)
              except OSError:  # died while idle: the EOF below replaces it
                w.task = None
                pending.appendleft(k)
          now = time.monotonic()
          deadlines = [w.deadline for w in workers if w.task is not None]
          deadlines += [w.started + _STARTUP_TIMEOUT_S for w in workers if not w.ready]
          wait = max(0.0, min(deadlines) - now) if deadlines else None
          for key, _ in selector.select(wait):
            w = key.data
            messages = w.read_messages()
            if messages is None:  # the process exited: its task failed, start a replacement
              if not w.ready:
                raise RuntimeError(
                    f"math grading worker exited while starting (exit code {w.proc.wait()}; "
                    f"memory_limit_mb={self.memory_limit_mb})")
              if w.task is not None:
                statuses[w.task] = "error"
              self._replace(w, workers, selector)
              continue
            for msg in messages:
              if "error" in msg and "id" not in msg:
                raise RuntimeError(f"math grading worker failed to start (memory_limit_mb="
                                   f"{self.memory_limit_mb}): {msg['error']}")
              if msg.get("ready"):
                w.ready = True
              elif msg.get("id") == w.task:
                statuses[w.task] = "true" if msg["ok"] else ("error" if "error" in msg else
                                                             "false")
                w.task = w.deadline = None
          now = time.monotonic()
          for w in list(workers):
            if w.task is not None and now > w.deadline:
              statuses[w.task] = "timeout"
              self._replace(w, workers, selector)
            elif not w.ready and now > w.started + _STARTUP_TIMEOUT_S:
              raise RuntimeError(
                  f"math grading worker did not start within {_STARTUP_TIMEOUT_S:.0f} s "
                  f"({sys.executable} importing math-verify)")
      except BaseException:
        for w in self._workers:
          w.kill()
        self._workers = []
        raise
      finally:
        selector.close()
      return statuses, wanted

  def _replace(self, old: _Worker, workers: list[_Worker], selector) -> None:
    selector.unregister(old.fd)
    old.kill()
    new = _Worker(self.memory_limit_mb)
    workers[workers.index(old)] = new
    self._workers[self._workers.index(old)] = new
    selector.register(new.fd, selectors.EVENT_READ, new)


def _check_grade_args(responses, references, timeout_s) -> None:
  if isinstance(responses, str) or isinstance(references, str):
    raise TypeError("grade: responses and references must be sequences of strings, not a str")
  if len(responses) != len(references):
    raise ValueError(f"grade: {len(responses)} responses but {len(references)} references; "
                     "they must pair up one to one")
  bad = next((i for i, r in enumerate(references) if not isinstance(r, str)), None)
  if bad is not None:
    raise TypeError(f"grade: references[{bad}] must be a str, got {type(references[bad]).__name__}")
  bad = next((i for i, r in enumerate(responses) if r is not None and not isinstance(r, str)), None)
  if bad is not None:
    raise TypeError(
        f"grade: responses[{bad}] must be a str or None, got {type(responses[bad]).__name__}")
  if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
    raise ValueError(f"grade: timeout_s must be a positive number of seconds, got {timeout_s!r}")


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

_DEFAULT_GRADER: Grader | None = None
_DEFAULT_LOCK = threading.Lock()


def _default_grader() -> Grader:
  global _DEFAULT_GRADER
  with _DEFAULT_LOCK:
    if _DEFAULT_GRADER is None:
      _DEFAULT_GRADER = Grader(workers=1)
      atexit.register(_DEFAULT_GRADER.close)
    return _DEFAULT_GRADER


def grade(responses: Sequence[str | None], references: Sequence[str], *, timeout_s: float = 5.0,
          workers: int | None = None, extract: bool = True) -> GradeReport:
  """Grades a batch of responses against reference answers (see `Grader.grade`).

  Pairs whose prepared strings or plain numbers decide the question are graded in this process;
  the rest (deduplicated) go to fresh math-verify worker processes, each comparison under a hard
  `timeout_s` limit, and the workers are stopped before returning. Use a `Grader` to keep them.

  Args:
    responses: model responses, or extracted answers with `extract=False` (None: no answer).
    references: reference answers, one per response.
    timeout_s: hard wall-clock limit per distinct math-verify comparison, in seconds.
    workers: maximum worker processes (default: half the usable CPUs, between 2 and 8).
    extract: whether `responses` are full responses (True) or answers (False).

  Returns:
    A GradeReport (per-item correct / answers / rules / timed_out, counters, wall time).
  """
  with Grader(workers=workers) as grader:
    return grader.grade(responses, references, timeout_s=timeout_s, extract=extract)


def is_equivalent(prediction: str | None, reference: str, *, timeout_s: float = 5.0) -> bool:
  """Whether an answer is mathematically equivalent to the reference answer.

  Rules, in order (`GradeReport.rules` names the one that decided):
    - both sides are prepared (`normalize_answer`: delimiters, boxes, thousands separators);
      an answer labelled where the reference is not, or the reverse, is compared by its value
      ("x = 5" vs "5", "(p,q)=(3,2)" vs "(3,2)", "AB=4, CD=5" vs "4, 5"; "7 = 11a+c" is an
      equation and keeps both sides);
    - "exact": equal strings up to whitespace, `\\left`/`\\right` and spacing macros;
    - "numeric": two plain numbers (integers, decimals, fractions, `\\frac{a}{b}`, scientific
      notation, mixed numbers) are compared as exact fractions; an integer reference needs
      exactly that integer ("2.0" is 2, "2.0000001" is not), other numbers match within relative
      tolerance 1e-6 ("1/3" vs "0.33" does not); "1,22" is 1.22 only against that decimal;
    - "math-verify": everything else is math-verify's `verify(parse(reference),
      parse(answer))` on the prepared strings, in a worker process: numbers (rounded to 6
      decimals), expressions (symbolic equality), sets (unordered; "1, 2" is a set, duplicates
      merge), tuples and intervals (ordered), matrices, equations and inequalities as relations
      ("5 \\geq x" is "x \\leq 5", a chain "x = 5+5+1 = 11" is its last side, "\\pm a" is
      {-a, a}), units, `\\text{}`, percent and degrees.
  A comparison that exceeds `timeout_s` is killed and is not equivalent ("timeout").

  The worker is a persistent helper process (started on first need, about two seconds; shared
  by all calls), replaced after a timeout.

  Args:
    prediction: the extracted answer (a `\\boxed{}` wrapper is removed); None is not equivalent.
    reference: the reference answer.
    timeout_s: hard wall-clock limit for the math-verify step, in seconds.

  Returns:
    True when equivalent.
  """
  if prediction is None:
    return False
  report = _default_grader().grade([prediction], [reference], timeout_s=timeout_s, extract=False)
  return report.correct[0]


def crosscheck_math_verify(predictions: Sequence[str], references: Sequence[str], *,
                           ours: Sequence[bool] | None = None) -> float | None:
  """Agreement rate between this grader and Hugging Face's math-verify used end to end.

  The comparison inside `grade` is math-verify's already; here math-verify also extracts the
  answer from the whole response with its own (lenient) rules, so the figure measures mostly
  where the two extractions differ. math-verify runs in this process with its own
  (signal-based, main-thread-only) time limits.

  Args:
    predictions: model responses (as for `grade` with extract=True).
    references: reference answers.
    ours: this grader's per-item decisions if already computed (else `grade` is called).

  Returns:
    The fraction of items on which both graders agree; None for empty inputs.

  Raises:
    ImportError: math-verify is missing (it is a core dependency: reinstall the package).
  """
  try:
    import math_verify  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "crosscheck_math_verify needs Hugging Face's math-verify, which is not installed; it is "
        "a core dependency of opd_jax: reinstall the package (pip install -e .)") from e
  _check_grade_args(predictions, references, 1.0)
  if not predictions:
    return None
  if ours is None:
    ours = grade(predictions, references).correct
  elif len(ours) != len(predictions):
    raise ValueError(f"crosscheck_math_verify: ours has {len(ours)} items, predictions "
                     f"{len(predictions)}; they must match")
  main = threading.current_thread() is threading.main_thread()
  timeout = 5 if main else None  # its timeouts use signal.alarm (main thread only)
  agree = 0
  for ok, pred, ref in zip(ours, predictions, references):
    gold = math_verify.parse(ref if "$" in ref or "\\boxed" in ref else f"${ref}$",
                             parsing_timeout=timeout)
    answer = math_verify.parse(pred or "", parsing_timeout=timeout)
    theirs = bool(gold and answer and math_verify.verify(gold, answer, timeout_seconds=timeout))
    agree += theirs == bool(ok)
  return agree / len(predictions)
