"""Math answer grading: extraction, normalisation, symbolic equivalence under a hard time limit."""

# Standard library only at import time (no jax, nothing from the package): the worker processes
# load this file by path and import sympy themselves, so they start in about a second.

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
# Relative tolerance for two numbers when the reference is not an integer.
REL_TOL = Fraction(1, 10**6)
# Seconds a new worker may take to import sympy and report ready.
_STARTUP_TIMEOUT_S = 120.0
# Nesting depth beyond which the symbolic parser gives up (not equivalent).
_MAX_PARSE_DEPTH = 60

# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS_RE = re.compile(r"(?:final\s+answer|the\s+answer)\s*(?:is\b|:)\s*:?", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")


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


def _box_content(text: str, pos: int) -> str | None:
  """Argument of a \\boxed whose name ends at `pos`: `{...}` or one bare token (`\\boxed 5`)."""
  while pos < len(text) and text[pos].isspace():
    pos += 1
  if pos >= len(text):
    return None
  if text[pos] == "{":
    group = _braced(text, pos)
    if group is None:
      return None
    content = group[0].strip()
  else:
    content = re.match(r"[^\s$]*", text[pos:]).group(0).rstrip(".,")
  return content or None


def _last_boxed(text: str) -> str | None:
  last = None
  for last in _BOX_RE.finditer(text):
    pass
  return None if last is None else _box_content(text, last.end())


def extract_answer(text: str) -> str | None:
  """The final answer of a model response, or None when it gives none.

  Only the text after the last `</think>` is read; a response that opens `<think>` and never
  closes it was cut off while reasoning and has no answer. The answer is the argument of the last
  `\\boxed{...}` / `\\fbox{...}` (nested and escaped braces handled; `\\boxed 5` without braces
  takes the next token). If that last box is empty or its braces never close, the result is None:
  an earlier box is not used instead, since it is usually an intermediate result. Without any
  box, the text after the last "the answer is" / "final answer is" / "final answer:" up to the
  end of that sentence or line (dollar signs removed) is returned; otherwise None.

  Args:
    text: the generated response.

  Returns:
    The raw answer string (not normalised), or None.
  """
  if not isinstance(text, str):
    raise TypeError(f"extract_answer: text must be a str, got {type(text).__name__}")
  if "</think>" in text:
    text = text.rsplit("</think>", 1)[1]
  elif "<think>" in text:
    return None
  if _BOX_RE.search(text):
    return _last_boxed(text)
  last = None
  for last in _ANSWER_IS_RE.finditer(text):
    pass
  if last is None:
    return None
  rest = text[last.end():].lstrip()
  rest = rest.split("\n", 1)[0]
  math = re.match(r"\$\$?(.+?)\$\$?|\\\[(.+?)\\\]|\\\((.+?)\\\)", rest)
  if math:
    rest = next(g for g in math.groups() if g is not None)
  else:
    end = _SENTENCE_END_RE.search(rest)
    if end:
      rest = rest[:end.start()]
  rest = rest.replace("$", "").strip().rstrip(".,;").strip()
  return rest or None


# ----------------------------------------------------------------------------------------------
# Normalisation (string level, shared by the parent and the workers)
# ----------------------------------------------------------------------------------------------

_TEXT_MACRO_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|mathit|mathsf|operatorname)"
    r"\s*\{")
_UNITS = (
    "square units|sq units|cubic units|units?|cm|mm|km|meters?|metres?|inches|inch|feet|foot|ft|"
    "yards?|miles?|degrees?|radians?|dollars?|cents?|seconds?|sec|minutes?|mins?|hours?|hrs?|"
    "days?|weeks?|months?|years?|kg|grams?|mg|pounds?|lbs?|ounces?|oz|liters?|litres?|ml|mL|"
    "mph|km/h|m/s|cm\\^2|cm\\^3|m\\^2|m\\^3|eV|keV|MeV|Hz|kHz|MHz|GHz|kJ|kW|nm|km/s|"
    "people|students|ways|times")
_UNIT_WORD_RE = re.compile(rf"^\s*(?:{_UNITS})(?:\^\{{?\d\}}?)?\s*$")
# A known unit after a number, a closing bracket or brace (e.g. "10 cm", "5\sqrt{2} units").
_TRAILING_UNIT_RE = re.compile(rf"(?<=[\d}}).)])\s*(?:{_UNITS})(?:\^\{{?\d\}}?)?\s*$")
# Single-letter SI units are only stripped when separated by a space ("5 m", not "5m").
_TRAILING_LETTER_UNIT_RE = re.compile(r"(?<=[\d}])\s+(?:m|s|g|L|N|K|V|J|W)\s*$")
_PREFIX_RE = re.compile(
    r"^(?:[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?|\\[A-Za-z]+)(?:\([A-Za-z]\))?\s*(?:=|\\in(?![A-Za-z]))")
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL_RE = re.compile(r"(?<![\d.])(\d+)\.(\d*)(?![\d.])")
_BARE_ARG_RE = re.compile(r"\\[A-Za-z]+|[A-Za-z0-9]")
# Only a whole answer is a mixed number: in "1+2\frac{1}{2}" the juxtaposition is a product.
_MIXED_NUMBER_RE = re.compile(r"^([-+]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}$")


def _strip_text_macros(s: str) -> str:
  """Unwraps \\text{...}-like groups; drops a trailing one that is a unit ("5\\text{ cm}")."""
  start = 0
  while True:
    m = _TEXT_MACRO_RE.search(s, start)
    if m is None:
      return s
    group = _braced(s, m.end() - 1)
    if group is None:  # unbalanced: drop the macro name, keep the rest
      s = s[:m.start()] + s[m.end() - 1:]
      start = m.start()
      continue
    content, end = group
    tail = s[end:]
    head = s[:m.start()].strip()
    trailing = re.fullmatch(r"\s*(?:\^\{?\w+\}?)?\s*\.?\s*", tail) is not None
    if head and trailing and (content[:1].isspace() or _UNIT_WORD_RE.match(content)):
      return head
    s = s[:m.start()] + content + tail
    start = m.start()


def _fix_macro_args(s: str) -> str:
  """Braces around one-token arguments: \\frac12 -> \\frac{1}{2}, \\sqrt2 -> \\sqrt{2}."""
  inserts = []  # (position, "{" or "}") in s; a bare argument is one character or macro name
  for m in re.finditer(r"\\(frac|binom|sqrt)(?![A-Za-z])", s):
    j = m.end()
    if m.group(1) == "sqrt":
      while j < len(s) and s[j] == " ":
        j += 1
      if j < len(s) and s[j] == "[":
        j = s.find("]", j) + 1
        if j == 0:
          continue
    for _ in range(1 if m.group(1) == "sqrt" else 2):
      while j < len(s) and s[j] == " ":
        j += 1
      if j < len(s) and s[j] == "{":
        group = _braced(s, j)
        if group is None:
          break
        j = group[1]
        continue
      token = _BARE_ARG_RE.match(s, j)
      if token is None:
        break
      inserts += [(j, "{"), (token.end(), "}")]
      j = token.end()
  if not inserts:
    return s
  inserts.sort(key=lambda x: x[0])  # stable: "}" of one argument before "{" of the next
  out, prev = [], 0
  for pos, brace in inserts:
    out += [s[prev:pos], brace]
    prev = pos
  out.append(s[prev:])
  return "".join(out)


def _decimal(m: re.Match) -> str:
  frac = m.group(2).rstrip("0")
  return m.group(1) + ("." + frac if frac else "")


def _outer_pair_closes_at_end(s: str, close: str) -> bool:
  """Whether the bracket that opens s is closed by `close` at the very end of s."""
  depth = 0
  i = 0
  n = len(s)
  while i < n:
    if s.startswith("\\{", i) or s.startswith("\\}", i):
      c = s[i:i + 2]
      i += 2
    else:
      c = s[i]
      i += 1
    if c in ("(", "[", "{", "\\{"):
      depth += 1
    elif c in (")", "]", "}", "\\}"):
      depth -= 1
      if depth == 0:
        return i == n and s.endswith(close)
  return False


def _split_top(s: str, sep: str) -> list[str]:
  """Splits s at `sep` outside any bracket ((), [], {}, \\{\\})."""
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
    c = s[i]
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    i += 1
  parts.append(s[start:])
  return parts


def normalize_answer(answer: str) -> str:
  """Canonical string form of an answer (the first, exact stage of `is_equivalent`).

  Removes: a `\\boxed{}` wrapper, `$`, `\\$`, math delimiters, `\\left`/`\\right`, spacing
  macros, `\\displaystyle`, degree signs (`^\\circ`, `^{\\circ}`, `°`), percent signs, a trailing
  unit (a trailing `\\text{ ...}` group or a known unit word such as "cm", "meters", "degrees"),
  a leading `x =` / `f(x) =` / `x \\in`, trailing periods, thousands separators of a lone number
  ("1,000"; `{,}` anywhere), trailing decimal zeros ("2.50" -> "2.5", "3.0" -> "3"), and
  redundant outer braces or parentheses. Unwraps `\\text{}`/`\\mathrm{}`/`\\mbox{}`; rewrites
  `\\dfrac`/`\\tfrac` as `\\frac`, `\\frac12` as `\\frac{1}{2}`, mixed numbers `2\\frac{1}{2}` as
  `\\frac{5}{2}`, and " and " / " or " between items as commas. Whitespace is dropped except one
  space between a macro name and a following letter (`\\pi r`). Strings longer than
  MAX_ANSWER_CHARS only lose their whitespace.

  Args:
    answer: an extracted answer (or a reference answer).

  Returns:
    The normalised string ("" for an empty answer).
  """
  if not isinstance(answer, str):
    raise TypeError(f"normalize_answer: answer must be a str, got {type(answer).__name__}")
  s = answer.strip()
  if len(s) > MAX_ANSWER_CHARS:
    return re.sub(r"\s+", "", s)
  if _BOX_RE.search(s):
    boxed = _last_boxed(s)
    s = boxed if boxed is not None else s
  s = s.replace("\n", " ").replace("\\$", "").replace("$", "")
  s = re.sub(r"(?<!\\)\\[()\[\]]", "", s)  # math delimiters, not a "\\\\" row break
  s = re.sub(r"\\(?:left|right)\.", "", s)
  s = re.sub(r"\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])", "", s)
  s = re.sub(r"\\(?:displaystyle|textstyle|quad|qquad)(?![A-Za-z])|(?<!\\)\\[,;:! ]|~", " ", s)
  s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
  s = re.sub(r"\\[dt]binom(?![A-Za-z])", r"\\binom", s)
  s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree(?![A-Za-z])", "", s)
  s = re.sub(r"\\?%", "", s)
  s = _strip_text_macros(s)
  s = _TRAILING_UNIT_RE.sub("", s.strip())
  s = _TRAILING_LETTER_UNIT_RE.sub("", s)
  s = re.sub(r"\s*,?\s*\b(?:and|or)\b\s*", ",", s) if re.search(r"\s(?:and|or)\s", s) else s
  s = _fix_macro_args(s)
  s = s.strip()
  m = _PREFIX_RE.match(s)
  if m and s[m.end():].strip() and "=" not in s[m.end():]:
    s = s[m.end():]
  # A one-character sub/superscript ends at a space ("\log_2 8", "x^2 y"); \log_28 is log_2 8.
  s = re.sub(r"([_^])\s*([A-Za-z0-9])(?=\s+[A-Za-z0-9])", r"\1{\2}", s)
  s = re.sub(r"\\log_(\d)", r"\\log_{\1}", s)
  # Keep one space where deleting it would merge a macro name with a letter ("\pi r").
  s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", "\\1\x00", s)
  s = re.sub(r"\s+", "", s).replace("\x00", " ")
  s = s.replace("{,}", "")
  s = s.rstrip(".")
  if _THOUSANDS_RE.match(s):
    s = s.replace(",", "")
  s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)
  s = _DECIMAL_RE.sub(_decimal, s)
  s = _MIXED_NUMBER_RE.sub(
      lambda m: f"{m[1]}\\frac{{{int(m[2]) * int(m[4]) + int(m[3])}}}{{{m[4]}}}", s)
  while len(s) >= 2:
    if s[0] == "{" and _outer_pair_closes_at_end(s, "}"):
      s = s[1:-1]
    elif (s[0] == "(" and _outer_pair_closes_at_end(s, ")")
          and len(_split_top(s[1:-1], ",")) == 1):
      s = s[1:-1]
    else:
      break
  return s


# ----------------------------------------------------------------------------------------------
# Structure: tuples / intervals (ordered, brackets must match), sets and bare lists (unordered),
# unions, matrices; atoms are compared exactly here and symbolically in a worker.
# ----------------------------------------------------------------------------------------------

_INT_RE = re.compile(r"^[-+]?\d+$")
_LITERAL_RE = re.compile(
    r"^(?P<sign>[-+]?)(?:(?P<num>\d{1,60}(?:\.\d{0,60})?|\.\d{1,60})"
    r"(?:e(?P<exp>[-+]?\d{1,3})|\\(?:times|cdot)10\^(?:\{(?P<exp10>-?\d{1,3})\}|(?P<exp1>\d)))?"
    r"|\\frac\{(?P<fn>\d{1,60})\}\{(?P<fd>\d{1,60})\}|(?P<sn>\d{1,60})/(?P<sd>\d{1,60}))$")
_MATRIX_RE = re.compile(r"^\\begin\{([pbvBV]?matrix)\}(.*)\\end\{\1\}$", re.DOTALL)
_WORD_RE = re.compile(r"^[A-Za-z]{2,}$")


def _structure(s: str, depth: int = 0):
  """Nested tuples: ("atom", s) | ("seq", brackets, elems) | ("set", elems) | ("union", parts)
  | ("matrix", rows). Past _MAX_PARSE_DEPTH levels the rest is one atom (compared as text)."""
  if depth > _MAX_PARSE_DEPTH:
    return ("atom", s)
  depth += 1
  parts = _split_top(s, "\\cup")
  if len(parts) > 1:
    return ("union", tuple(_structure(p, depth) for p in parts))
  m = _MATRIX_RE.match(s)
  if m:
    rows = [r for r in m.group(2).split("\\\\") if r]
    return ("matrix", tuple(tuple(_structure(c, depth) for c in r.split("&")) for r in rows))
  if s.startswith("\\{") and s.endswith("\\}") and _outer_pair_closes_at_end(s, "\\}"):
    inner = s[2:-2]
    return ("set", tuple(_structure(e, depth) for e in _split_top(inner, ",") if e))
  if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _outer_pair_closes_at_end(s, s[-1]):
    elems = _split_top(s[1:-1], ",")
    if len(elems) >= 2:
      return ("seq", s[0] + s[-1], tuple(_structure(e, depth) for e in elems))
  elems = _split_top(s, ",")
  if len(elems) >= 2:
    return ("set", tuple(_structure(e, depth) for e in elems if e))
  m = _PREFIX_RE.match(s)
  if m and s[m.end():] and "=" not in s[m.end():]:
    s = s[m.end():]
  return ("atom", s)


def _literal(s: str) -> Fraction | None:
  """Exact value of a plain number: 12, -0.5, 1.5e-3, \\frac{1}{2}, 3/4; None for anything else."""
  m = _LITERAL_RE.match(s)
  if m is None:
    return None
  sign = -1 if m["sign"] == "-" else 1
  if m["num"] is not None:
    value = Fraction(m["num"]) * Fraction(10) ** int(m["exp"] or m["exp10"] or m["exp1"] or 0)
  elif m["fn"] is not None:
    if int(m["fd"]) == 0:
      return None
    value = Fraction(int(m["fn"]), int(m["fd"]))
  else:
    if int(m["sd"]) == 0:
      return None
    value = Fraction(int(m["sn"]), int(m["sd"]))
  return sign * value


def _numbers_equal(pred: Fraction, ref: Fraction, ref_is_int: bool) -> bool:
  if ref_is_int or ref == 0:
    return pred == ref
  return abs(pred - ref) <= REL_TOL * abs(ref)


def _cheap_atom_equal(pred: str, ref: str) -> bool | None:
  """Exact decision without sympy when possible; None means "needs the symbolic check"."""
  if pred == ref:
    return True
  if not pred or not ref:
    return False
  p, r = _literal(pred), _literal(ref)
  if p is not None and r is not None:
    return _numbers_equal(p, r, _INT_RE.match(ref) is not None)
  if _WORD_RE.match(pred) and _WORD_RE.match(ref):
    return pred.lower() == ref.lower()  # words ("even", "Monday") are text, not products
  if len(pred) > MAX_ANSWER_CHARS or len(ref) > MAX_ANSWER_CHARS:
    return False
  return None


def _match(pred, ref, atom_equal) -> bool | None:
  """Three-valued structural comparison (None: some atom pair is undecided)."""
  if ref[0] == "set" or pred[0] == "set":
    if "seq" in (pred[0], ref[0]) or "matrix" in (pred[0], ref[0]):
      return False
    p = pred[1] if pred[0] == "set" else (pred,)
    r = ref[1] if ref[0] == "set" else (ref,)
    return _match_unordered(p, r, atom_equal)
  if pred[0] != ref[0]:
    return False
  kind = ref[0]
  if kind == "atom":
    return atom_equal(pred[1], ref[1])
  if kind == "union":
    return _match_unordered(pred[1], ref[1], atom_equal)
  if kind == "seq":
    if pred[1] != ref[1]:
      return False
    return _match_ordered(pred[2], ref[2], atom_equal)
  if len(pred[1]) != len(ref[1]):  # matrix
    return False
  return _all3([_match_ordered(p, r, atom_equal) for p, r in zip(pred[1], ref[1])])


def _all3(results) -> bool | None:
  if any(x is False for x in results):
    return False
  return True if all(x is True for x in results) else None


def _match_ordered(pred, ref, atom_equal) -> bool | None:
  if len(pred) != len(ref):
    return False
  results = []
  for p, r in zip(pred, ref):
    results.append(_match(p, r, atom_equal))
    if results[-1] is False:
      return False
  return _all3(results)


def _match_unordered(pred, ref, atom_equal) -> bool | None:
  # Equivalence is transitive, so greedy matching on definite matches is exact when every pair
  # is decided; an undecided pair makes a failed greedy match undecided.
  if len(pred) != len(ref):
    return False
  unused = list(pred)
  undecided = False
  for r in ref:
    for k, p in enumerate(unused):
      result = _match(p, r, atom_equal)
      if result is True:
        del unused[k]
        break
      undecided |= result is None
    else:
      if not undecided:
        return False
  return True if not unused else (None if undecided else False)


def _cheap_equal(pred_norm: str, ref_norm: str) -> bool | None:
  if pred_norm == ref_norm:
    return True
  if not pred_norm or not ref_norm:
    return False
  if len(pred_norm) > MAX_ANSWER_CHARS or len(ref_norm) > MAX_ANSWER_CHARS:
    return False
  return _match(_structure(pred_norm), _structure(ref_norm), _cheap_atom_equal)


# ----------------------------------------------------------------------------------------------
# Symbolic comparison (worker processes only: imports sympy)
# ----------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.\d*|\.\d+|\d+)(?:e[-+]?\d+(?![A-Za-z0-9]))?)"
    r"|(?P<macro>\\[A-Za-z]+|\\[{}|])|(?P<word>[A-Za-z]+)"
    r"|(?P<char>\S))")
_GREEK = frozenset(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi "
    "rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi "
    "Omega".split())
_FUNCS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh ln log exp".split())
_PLAIN_NAMES = frozenset(_FUNCS | {"sqrt", "pi", "oo", "inf", "infty", "infinity"})


class _ParseError(ValueError):
  pass


class _LatexParser:
  """Recursive-descent parser from normalised LaTeX / plain maths text to a sympy expression.

  Builds sympy objects directly (no eval): numbers are exact rationals, single letters are
  symbols (`e` is Euler's number, `i` the imaginary unit), adjacent factors multiply.
  """

  def __init__(self, text: str, sp):
    self.sp = sp
    self.tokens = []
    for m in _TOKEN_RE.finditer(text):
      if m["word"] is not None and m["word"] not in _PLAIN_NAMES:
        self.tokens += [("letter", c) for c in m["word"]]
      else:
        kind = m.lastgroup
        self.tokens.append(("word" if kind == "word" else kind, m[kind]))
    self.pos = 0
    self.depth = 0

  def parse(self):
    expr = self.sum()
    if self.pos != len(self.tokens):
      raise _ParseError(f"unexpected {self.peek()!r}")
    return expr

  def peek(self):
    return self.tokens[self.pos][1] if self.pos < len(self.tokens) else None

  def next(self):
    if self.pos >= len(self.tokens):
      raise _ParseError("unexpected end")
    self.pos += 1
    return self.tokens[self.pos - 1]

  def expect(self, text):
    if self.next()[1] != text:
      raise _ParseError(f"expected {text!r}")

  def sum(self):
    self.depth += 1
    if self.depth > _MAX_PARSE_DEPTH:
      raise _ParseError("nested too deeply")
    expr = self.product()
    while self.peek() in ("+", "-"):
      op = self.next()[1]
      rhs = self.product()
      expr = expr + rhs if op == "+" else expr - rhs
    self.depth -= 1
    return expr

  def starts_factor(self):
    if self.pos >= len(self.tokens):
      return False
    kind, text = self.tokens[self.pos]
    if kind in ("num", "letter", "word"):
      return True
    if kind == "macro":
      return text not in ("\\cdot", "\\times", "\\div", "\\}", "\\|")
    return text in ("(", "{", "[")

  def product(self):
    expr = self.signed()
    while True:
      tok = self.peek()
      if tok in ("*", "\\cdot", "\\times"):
        self.next()
        expr = expr * self.signed()
      elif tok in ("/", "\\div"):
        self.next()
        expr = expr / self.signed()
      elif self.starts_factor():
        expr = expr * self.power()
      else:
        return expr

  def signed(self):
    if self.peek() == "-":
      self.next()
      return -self.signed()
    if self.peek() == "+":
      self.next()
      return self.signed()
    return self.power()

  def power(self):
    base = self.postfix()
    if self.peek() == "^" or self.peek() == "**":
      self.next()
      return self.sp.Pow(base, self.exponent())
    return base

  def exponent(self):
    if self.peek() == "{":
      return self.group("{", "}")
    if self.peek() == "-":
      self.next()
      return -self.exponent()
    return self.power()

  def postfix(self):
    expr = self.atom()
    while self.peek() == "!":
      self.next()
      expr = self.sp.factorial(expr)
    return expr

  def group(self, open_, close):
    self.expect(open_)
    expr = self.sum()
    self.expect(close)
    return expr

  def arg(self):
    return self.group("{", "}") if self.peek() == "{" else self.atom()

  def subscript(self) -> str:
    self.expect("_")
    if self.peek() == "{":
      self.next()
      parts = []
      while self.peek() not in ("}", None):
        parts.append(self.next()[1])
      self.expect("}")
      return "".join(parts)
    return self.next()[1]

  def atom(self):
    sp = self.sp
    kind, text = self.next()
    if kind == "num":
      return sp.Rational(text)
    if kind == "letter":
      if self.peek() == "_":
        return sp.Symbol(f"{text}_{self.subscript()}")
      return {"e": sp.E, "i": sp.I}.get(text) or sp.Symbol(text)
    if text in ("(", "[", "{"):
      self.pos -= 1
      return self.group(text, {"(": ")", "[": "]", "{": "}"}[text])
    if text == "|":
      expr = self.sum()
      self.expect("|")
      return sp.Abs(expr)
    name = text.lstrip("\\")
    if name in ("pi",):
      return sp.pi
    if name in ("infty", "inf", "infinity", "oo"):
      return sp.oo
    if name in _GREEK:
      return sp.Symbol(name)
    if name in ("frac", "cfrac"):
      num = self.arg()
      return num / self.arg()
    if name == "binom":
      n = self.arg()
      return sp.binomial(n, self.arg())
    if name == "sqrt":
      index = self.group("[", "]") if self.peek() == "[" else None
      radicand = self.group("(", ")") if kind == "word" and self.peek() == "(" else self.arg()
      return sp.sqrt(radicand) if index is None else sp.root(radicand, index)
    if name in _FUNCS:
      return self.function(name)
    raise _ParseError(f"unsupported {text!r}")

  def function(self, name):
    sp = self.sp
    base = None
    if name == "log" and self.peek() == "_":
      base = self.sp.sympify(_LatexParser(self.subscript(), sp).parse())
    power = None
    if self.peek() == "^":
      self.next()
      power = self.exponent()
    if self.peek() in ("(", "{", "["):
      arg = self.atom()
    else:
      arg = self.power()
    funcs = {"ln": sp.log, "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan}
    f = funcs.get(name) or getattr(sp, name)
    value = sp.log(arg, base) if base is not None else f(arg)
    return value if power is None else value ** power


def _to_sympy(text: str):
  import sympy  # pylint: disable=import-outside-toplevel
  if not text:
    raise _ParseError("empty")
  return _LatexParser(text, sympy).parse()


def _symbolic_atom_equal(pred: str, ref: str) -> bool:
  """Equivalence of two normalised atoms with sympy (worker side; may be slow or hang)."""
  cheap = _cheap_atom_equal(pred, ref)
  if cheap is not None:
    return cheap
  import sympy  # pylint: disable=import-outside-toplevel
  pred_sides, ref_sides = _split_top(pred, "="), _split_top(ref, "=")
  if len(pred_sides) != len(ref_sides) or len(ref_sides) > 2:
    return False
  try:
    if len(ref_sides) == 2:  # equations: the same after moving everything to one side
      dp = _to_sympy(pred_sides[0]) - _to_sympy(pred_sides[1])
      dr = _to_sympy(ref_sides[0]) - _to_sympy(ref_sides[1])
      return _exprs_equal(sympy, dp, dr, False) or _exprs_equal(sympy, dp, -dr, False)
    a, b = _to_sympy(pred), _to_sympy(ref)
  except (_ParseError, TypeError, ValueError, AttributeError, ZeroDivisionError, RecursionError):
    return False
  return _exprs_equal(sympy, a, b, _INT_RE.match(ref) is not None)


def _exprs_equal(sympy, a, b, ref_is_int: bool) -> bool:
  """a == b for sympy expressions; numbers within REL_TOL unless the reference is an integer."""
  diff = a - b
  if diff == 0:
    return True
  if not a.free_symbols and not b.free_symbols:
    gap, scale = _complex(diff), _complex(b)
    if gap is None or scale is None:
      return _proved_zero(sympy, diff)
    if ref_is_int or scale == 0:  # an exact match is needed: no numeric tolerance
      return abs(gap) < 1e-9 and _proved_zero(sympy, diff)
    return abs(gap) <= float(REL_TOL) * abs(scale)
  # Functions of symbols: a clear difference at a few positive points settles non-equivalence
  # cheaply; equivalence needs a proof (expand, then simplify, then sympy's `equals`).
  symbols = sorted(diff.free_symbols, key=str)
  for k in range(3):
    point = {s: sympy.Rational(7 + 3 * k + j, 11 + k) for j, s in enumerate(symbols)}
    gap = _complex(diff.subs(point))
    if gap is not None and abs(gap) > 1e-6 * (1 + abs(_complex(b.subs(point)) or 0)):
      return False
  return _proved_zero(sympy, diff)


def _complex(expr) -> complex | None:
  """expr evaluated to 30 digits as a finite complex number; None if it is not one."""
  try:
    value = complex(expr.evalf(30))
  except (TypeError, ValueError, OverflowError, AttributeError):
    return None
  return value if abs(value) < float("inf") and value == value else None


def _proved_zero(sympy, diff) -> bool:
  return sympy.expand(diff) == 0 or sympy.simplify(diff) == 0 or diff.equals(0) is True


def _symbolic_equal(pred_norm: str, ref_norm: str) -> bool:
  result = _match(_structure(pred_norm), _structure(ref_norm), _symbolic_atom_equal)
  return result is True


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
    _symbolic_equal("x+1", "1+x")  # imports sympy and warms its caches before "ready"
  except BaseException as e:  # pylint: disable=broad-except
    protocol.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
    return
  protocol.write(json.dumps({"ready": True}) + "\n")
  for line in sys.stdin:
    task = json.loads(line)
    try:
      result = {"id": task["id"], "ok": bool(_symbolic_equal(task["p"], task["r"]))}
    except BaseException as e:  # pylint: disable=broad-except
      # MemoryError (rlimit), RecursionError or a sympy bug: not equivalent, reported.
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
    answers: per item, the extracted answer (None: the response gives no answer).
    timed_out: per item, whether its symbolic comparison hit the time limit (counted incorrect).
    num_timeouts: items whose comparison timed out.
    num_no_answer: items without an extractable answer (counted incorrect).
    num_symbolic: distinct (answer, reference) pairs that needed a worker.
    num_errors: distinct pairs whose worker failed (crashed, out of memory; counted incorrect).
    seconds: wall time of the call.
    workers: worker processes used (0 when every pair was decided without sympy).
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

  @property
  def accuracy(self) -> float:
    """Fraction of items graded correct (0.0 for no items)."""
    return sum(self.correct) / len(self.correct) if self.correct else 0.0


class Grader:
  """Grades answers, keeping its sympy worker processes alive between calls.

  Each symbolic comparison runs in a worker under a hard wall-clock limit; a worker that exceeds
  it is killed (SIGKILL) and replaced, and the comparison counts as not equivalent. Workers are
  started on first need and stopped by `close()` (or leaving a `with` block). Thread-safe: calls
  are serialised.

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
      responses: model responses (answers are extracted with `extract_answer`), or already
        extracted answers with `extract=False` (None: no answer).
      references: reference answers, one per response.
      timeout_s: hard wall-clock limit per distinct symbolic comparison, in seconds.
      extract: whether `responses` are full responses (True) or answers (False).

    Returns:
      A GradeReport.
    """
    start = time.perf_counter()
    _check_grade_args(responses, references, timeout_s)
    if extract:
      answers = [None if r is None else extract_answer(r) for r in responses]
    else:
      answers = list(responses)
    correct = [False] * len(answers)
    timed_out = [False] * len(answers)
    tasks: dict[tuple[str, str], list[int]] = {}
    for k, (answer, ref) in enumerate(zip(answers, references)):
      if answer is None:
        continue
      pred_norm, ref_norm = normalize_answer(answer), normalize_answer(ref)
      decided = _cheap_equal(pred_norm, ref_norm)
      if decided is None:
        tasks.setdefault((pred_norm, ref_norm), []).append(k)
      else:
        correct[k] = decided
    statuses, used = self._run(list(tasks), timeout_s) if tasks else ([], 0)
    for status, items in zip(statuses, tasks.values()):
      for k in items:
        correct[k] = status == "true"
        timed_out[k] = status == "timeout"
    return GradeReport(
        correct=tuple(correct), answers=tuple(answers), timed_out=tuple(timed_out),
        num_timeouts=sum(timed_out), num_no_answer=sum(a is None for a in answers),
        num_symbolic=len(tasks), num_errors=statuses.count("error"),
        seconds=time.perf_counter() - start, workers=used)

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
                  f"({sys.executable} importing sympy)")
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

  Pairs whose normalised strings or plain numbers decide the question are graded in this process;
  the rest (deduplicated) go to fresh sympy worker processes, each comparison under a hard
  `timeout_s` limit, and the workers are stopped before returning. Use a `Grader` to keep them.

  Args:
    responses: model responses, or extracted answers with `extract=False` (None: no answer).
    references: reference answers, one per response.
    timeout_s: hard wall-clock limit per distinct symbolic comparison, in seconds.
    workers: maximum worker processes (default: half the usable CPUs, between 2 and 8).
    extract: whether `responses` are full responses (True) or answers (False).

  Returns:
    A GradeReport (per-item correct / answers / timed_out, counters, wall time).
  """
  with Grader(workers=workers) as grader:
    return grader.grade(responses, references, timeout_s=timeout_s, extract=extract)


def is_equivalent(prediction: str | None, reference: str, *, timeout_s: float = 5.0) -> bool:
  """Whether an answer is mathematically equivalent to the reference answer.

  Rules, in order: both sides are normalised (`normalize_answer`); equal strings match. Then the
  structure is compared: tuples and intervals are ordered and their brackets must match
  ("[1,2)" is not "[1,2]", "(1,2)" is not "(2,1)" nor "[1,2]"); `\\{...\\}` sets and bare comma
  lists ("1, 2") are unordered and interchangeable (a one-element set equals its element);
  unions (`\\cup`) are unordered; matrices are compared cell by cell. Atoms: plain numbers are
  compared as exact fractions ("1/2" = "0.5"); an integer reference needs exactly that integer
  ("2.0" matches "2", "2.0000001" and "1.99" do not), other numbers match within relative
  tolerance 1e-6 (so "1/3" vs "0.33" does not); two words are compared case-insensitively
  ("Monday"); everything else is parsed into sympy (exact rationals, `e` and `i` are the
  constants, `\\pi`, radicals, trigonometric and log functions, factorial, binomial) and
  compared: numbers numerically with the same integer / tolerance rule, expressions with
  symbols by proof (expand, simplify, sympy's `equals`) after a numeric spot check at three
  points; two equations match when their (left side - right side) agree up to sign. Anything
  sympy cannot parse (inequalities, text) matches only as an equal string.

  The sympy step runs in a persistent helper process (started on first need, about a second;
  shared by all calls) that is killed and replaced when one comparison exceeds `timeout_s`; a
  timed-out comparison is not equivalent.

  Args:
    prediction: the extracted answer (a `\\boxed{}` wrapper is removed); None is not equivalent.
    reference: the reference answer.
    timeout_s: hard wall-clock limit for the sympy step, in seconds.

  Returns:
    True when equivalent.
  """
  if prediction is None:
    return False
  report = _default_grader().grade([prediction], [reference], timeout_s=timeout_s, extract=False)
  return report.correct[0]


def crosscheck_math_verify(predictions: Sequence[str], references: Sequence[str], *,
                           ours: Sequence[bool] | None = None) -> float | None:
  """Agreement rate between this grader and Hugging Face's math-verify (a cross-check only).

  math-verify runs in this process with its own (signal-based, main-thread-only) time limits.

  Args:
    predictions: model responses (as for `grade` with extract=True).
    references: reference answers.
    ours: this grader's per-item decisions if already computed (else `grade` is called).

  Returns:
    The fraction of items on which both graders agree; None for empty inputs.

  Raises:
    ImportError: math-verify is not installed (`pip install -e '.[mathverify]'`).
  """
  try:
    import math_verify  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "crosscheck_math_verify needs Hugging Face's math-verify, which is not installed; "
        "install the mathverify extra: pip install -e '.[mathverify]'") from e
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
