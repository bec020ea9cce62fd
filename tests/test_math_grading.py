"""Tests for opd_jax.data.math_grading: extraction policy, equivalence rules, limits, batch API."""

import subprocess
import sys
import time

import pytest

from opd_jax.data import math_grading as mg

# (prediction, reference, equivalent)
MATCH = [
    (r"\frac{1}{2}", "0.5"),
    (r"\frac12", r"\frac{1}{2}"),
    (r"\dfrac{1}{2}", r"\frac12"),
    (r"\tfrac{3}{4}", "0.75"),
    ("1/2", r"\frac{1}{2}"),
    (".5", r"\frac12"),
    (r"-\frac{1}{3}", r"\frac{-1}{3}"),
    (r"\sqrt{8}", r"2\sqrt{2}"),
    (r"\sqrt2", r"\sqrt{2}"),
    (r"\sqrt[3]{8}", "2"),
    (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}"),
    (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}"),
    (r"\pi/2", r"\frac{\pi}{2}"),
    ("pi/2", r"\frac{\pi}{2}"),
    ("1.5707963", r"\frac{\pi}{2}"),
    ("0.3333333", r"\frac{1}{3}"),
    ("x+1", "1+x"),
    ("2x^2+4x", "2x(x+2)"),
    ("(x+1)^2", "x^2+2x+1"),
    (r"\frac{x}{2}", "0.5x"),
    ("a_1 + a_2", "a_2+a_1"),
    (r"2\theta", r"\theta \cdot 2"),
    (r"\sin^2 x + \cos^2 x", "1"),
    (r"\log_2 8", "3"),
    (r"e^{\ln 2}", "2"),
    ("3+4i", "4i+3"),
    ("2^{10}", "1024"),
    ("1.5e3", "1500"),
    (r"1.3 \times 10^{-5}", "1.3e-5"),
    (r"7.6 \cdot 10^{7}", r"76000000"),
    ("5!", "120"),
    (r"\binom{5}{2}", "10"),
    ("2.0", "2"),
    ("2.50", "2.5"),
    ("3.0", "3"),
    ("1,000", "1000"),
    (r"1\,000", "1000"),
    ("1{,}000{,}000", "1000000"),
    (r"\$1,000", "1000"),
    (r"\$ 12.50", "12.5"),
    (r"50\%", "50"),
    ("50%", "50"),
    ("10 cm", "10"),
    (r"10\text{ meters}", "10"),
    (r"5\mbox{ cm}^2", "5"),
    (r"30^\circ", "30"),
    (r"30^{\circ}", "30"),
    ("30°", "30"),
    ("x = 5", "5"),
    ("y=2x+3", "2x+3"),
    ("f(x) = x^2", "x^2"),
    ("5.", "5"),
    (r"\boxed{7}", "7"),
    (r"2\frac{1}{2}", r"\frac{5}{2}"),
    (r"\text{(C)}", "C"),
    ("(C)", "C"),
    (r"\text{Monday}", "monday"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    ("[1, 2)", "[1,2)"),
    (r"\left[ 1, 2 \right]", "[1,2]"),
    (r"(-\infty, 2]", r"(-\infty,2]"),
    (r"x \in [0, 1]", "[0,1]"),
    (r"(-\infty,0)\cup(1,\infty)", r"(1,\infty)\cup(-\infty,0)"),
    (r"\{1,2\}", r"\{2,1\}"),
    ("1, 2", "2, 1"),
    (r"\{\frac{1}{2}, 3\}", "3, 0.5"),
    (r"7 \text{ and } 8", "8, 7"),
    (r"\{5\}", "5"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
    (r"\begin{pmatrix} 2/4 & 1 \end{pmatrix}", r"\begin{pmatrix}\frac12&1\end{pmatrix}"),
    ("x^2 + y^2 = 1", "y^2+x^2=1"),
    ("{" * 300 + "1" + "}" * 300, "1"),
    # Thousands separators of one number.
    ("12,345,678", "12345678"),
    ("4 096", "4096"),
    (r"65{,}536", "65536"),
    (r"9,\!801", "9801"),
    # A decimal comma, read so only against the same decimal.
    ("2,75", "2.75"),
    ("0,125", "0.125"),
    # Labelled references and "expr = value": the value side.
    ("(4,1)", "(m,n)=(4,1)"),
    ("9", "|PQ|=9"),
    ("3:5", "R_{1}:R_{2}=3:5"),
    ("6, 7", "PQ=6, RS=7"),
    (r"2\sqrt{2}", r"\frac{AC}{BD}=2\sqrt{2}"),
    ("-3, 8", "t=-3, 8"),
    (r"\sqrt{9} = 3", "3"),
    (r"\binom{6}{3} = 20", "20"),
    (r"\left| 2 - 9 \right| = 7", "7"),
    # Equality chains (last side) and approximations (the exact side).
    ("y = 2+3 = 5", "y = 5"),
    (r"t = 4 \cdot 2 = 8", "8"),
    (r"\frac{\sqrt{2}}{2} \approx 0.707", r"\frac{\sqrt{2}}{2}"),
    (r"k \approx 7", "7"),
    # \pm as two values.
    (r"\pm 7", "-7, 7"),
    (r"2 \pm \sqrt{3}", r"2-\sqrt{3}, 2+\sqrt{3}"),
    # Inequalities as relations.
    (r"4 \geq y", r"y \leq 4"),
    ("-y < -3", "y > 3"),
    # Percent in words, semicolon lists, a repeated set element, a stray backslash.
    ("45 percent", r"45\%"),
    ("45 pct", r"45\%"),
    ("(1;2),(3;4)", "(1,2),(3,4)"),
    ("5;6;7", r"\{5,6,7\}"),
    (r"\{2, 3, 3\}", r"\{2, 3\}"),
    ("42\\", "42"),
    # Lists of plain numbers (decided without a worker, as math-verify reads them).
    (r"\{3, 1, 1\}", r"\{1, 3\}"),
    ("(0.5, 2)", "(1/2, 2)"),
    ("3, 1", "1, 3"),
]
NO_MATCH = [
    ("1/2", "2"),
    ("(1,2)", "(2,1)"),
    ("x+1", "x-1"),
    ("2.0000001", "2"),
    ("1.99", "2"),
    ("2.5", "2"),
    ("[1,2)", "[1,2]"),
    ("(1,2)", "[1,2]"),
    (r"\{1,2\}", r"\{1,3\}"),
    ("1,2", "1,2,3"),
    (r"\frac{1}{3}", "0.33"),
    (r"\sqrt{2}", "1.414"),
    (r"\sqrt{8}", r"3\sqrt{2}"),
    (r"\pi", "3.14"),
    ("e", "2.718"),
    (r"\frac{\pi}{2}", r"\pi"),
    ("2x", "2y"),
    ("x^2", "2x"),
    ("(x+1)^2", "x^2+1"),
    ("y = 2x + 3", "2x + 4"),
    ("x^2+y^2=1", "x^2+y^2=2"),
    ("C", "D"),
    (r"\text{Monday}", "Tuesday"),
    ("50", "5"),
    ("10 cm", "100"),
    ("-5", "5"),
    ("1000", "100"),
    (r"7.6 \times 10^{7}", "7.6e6"),
    ("1.0001", "1.0002"),
    (r"\infty", r"-\infty"),
    ("3+4i", "3-4i"),
    (r"(0,1)\cup(2,3)", r"(0,1)\cup(2,4)"),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}2\\1\end{pmatrix}"),
    ("x>2", "x<2"),
    ("", "5"),
    # Thousands separators never join a list; a decimal comma is not a thousands separator.
    ("32, 349", "32349"),
    ("45, 678", "45678"),
    ("0,250", "250"),
    ("0,125", "125"),
    ("2,75", "275"),
    # Exact integers: no rounding, however many digits.
    ("123456789012345678901", "123456789012345678902"),
    # An equation is not its value side unless the left side only names it.
    ("4b+d", "9 = 4b+d"),
    ("0", "2a + 5c = 0"),
    (r"\pm 7", "7"),
    ("y > -3", "y > 3"),
    (r"4 \leq y", r"y \leq 4"),
    ("(10000000001, 1)", "(10000000002, 1)"),
    ("(0.5, 2)", "[0.5, 2]"),
]
TABLE = [(p, r, True) for p, r in MATCH] + [(p, r, False) for p, r in NO_MATCH]


def test_table_is_large_and_balanced():
  assert len(TABLE) >= 80
  assert len(NO_MATCH) >= len(TABLE) / 4


@pytest.fixture(scope="module")
def grader():
  """One Grader for the tests below, so that they share its worker processes."""
  with mg.Grader(workers=2) as shared:
    yield shared


@pytest.fixture(scope="module")
def table_report(grader):
  report = grader.grade([p for p, _, _ in TABLE], [r for _, r, _ in TABLE], extract=False,
                        timeout_s=10.0)
  assert report.num_timeouts == 0 and report.num_errors == 0
  return report


@pytest.mark.parametrize("index", range(len(TABLE)),
                         ids=[f"{p[:30]}|{r[:30]}|{e}" for p, r, e in TABLE])
def test_equivalence_table(table_report, index):
  prediction, reference, expected = TABLE[index]
  assert table_report.correct[index] is expected, (prediction, reference)


def test_rules_say_what_decided(grader):
  answers = ["x+1", "0.50", r"\frac{1}{2", r"\sqrt{8}", "9^{9^{9^{9}}}", None]
  references = ["x + 1", r"\frac{1}{2}", "0.5", r"2\sqrt{2}", "2", "1"]
  report = grader.grade(answers, references, extract=False, timeout_s=1.0)
  assert report.rules == ("exact", "numeric", "malformed", "math-verify", "timeout", "no answer")
  assert report.correct == (True, True, False, True, False, False)
  assert report.timed_out == (False, False, False, False, True, False)


def test_is_equivalent_agrees_with_batch_on_samples():
  for k in range(0, len(TABLE), 9):
    prediction, reference, expected = TABLE[k]
    assert mg.is_equivalent(prediction, reference) is expected, (prediction, reference)
  assert mg.is_equivalent(None, "1") is False


def test_symmetric_where_reference_is_not_integer():
  for p, r in [(r"\frac{1}{2}", "0.5"), (r"\sqrt{8}", r"2\sqrt{2}"), ("1, 2", "2, 1")]:
    assert mg.is_equivalent(r, p)


def test_hanging_expression_times_out_and_is_counted(grader):
  huge = "9^{9^{9^{9}}}"
  start = time.perf_counter()
  report = grader.grade([huge, "x+1", huge, r"9^{9^{9^{8}}}"], ["2", "1+x", "2", "3"],
                        extract=False, timeout_s=1.0)
  assert time.perf_counter() - start < 60
  assert report.correct == (False, True, False, False)
  assert report.timed_out == (True, False, True, True)
  assert report.num_timeouts == 3 and report.num_symbolic == 3
  # The killed workers were replaced: the same grader keeps working.
  again = grader.grade([r"\sqrt{8}", "x^2"], [r"2\sqrt{2}", "2x"], extract=False)
  assert again.correct == (True, False) and again.num_timeouts == 0
  start = time.perf_counter()
  assert mg.is_equivalent(huge, "3", timeout_s=1.0) is False
  assert time.perf_counter() - start < 60


def test_adversarial_inputs_do_not_crash(grader):
  long_answer = "1+" * 5000 + "1"
  cases = [
      (r"\frac{1}{2", "0.5"),
      (r"\frac{1{2}", "0.5"),
      ("}{", "1"),
      (r"\sqrt{" * 100 + "2" + "}" * 100, "2"),
      ("(" * 200 + "x", "x"),
      (long_answer, "10001"),
      ("{" * 5000 + "1" + "}" * 5000, "1"),
      (r"\begin{pmatrix}1", "1"),
      (r"\text{", "1"),
  ]
  report = grader.grade([p for p, _ in cases], [r for _, r in cases], extract=False,
                        timeout_s=5.0)
  assert report.correct == (False,) * len(cases)
  assert report.num_timeouts == 0
  # Over-long answers are compared as strings only, so identical ones still match, quickly.
  start = time.perf_counter()
  assert grader.grade([long_answer], [long_answer], extract=False).correct == (True,)
  assert time.perf_counter() - start < 5


def test_worker_start_failure_is_an_error_not_a_hang():
  with mg.Grader(workers=1, memory_limit_mb=1) as grader:
    with pytest.raises(RuntimeError, match=r"worker .*memory_limit_mb=1"):
      grader.grade(["x+1"], ["1+x"], extract=False)
    # Cheap pairs need no worker.
    assert grader.grade(["1"], ["1.0"], extract=False).correct == (True,)


def test_extract_answer():
  cases = [
      (r"so \boxed{2}", "2"),
      (r"first \boxed{1}, then \boxed{2}.", "2"),
      (r"<think>maybe \boxed{1}</think> so \boxed{2}", "2"),
      (r"<think>a</think>b<think>c \boxed{1}</think>The answer is 4.", "4"),
      (r"<think>still thinking \boxed{3}", None),
      (r"reasoning \boxed{1}</think>The answer is $\frac{1}{2}$.", r"\frac{1}{2}"),
      (r"\fbox{7}", "7"),
      (r"$\boxed 5$.", "5"),
      (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
      (r"\boxed{\{1,2\}}", r"\{1,2\}"),
      (r"\boxed{ }", None),
      (r"\boxed{}", None),
      (r"\boxed{\frac{1}{2}", None),
      (r"\boxed{1} and then \boxed{2", None),
      (r"\boxed{1}}", "1"),
      ("Final Answer: The final answer is 7. I hope it is correct.", "7"),
      ("Therefore, the answer is 3.5.\nMore text.", "3.5"),
      ("The final answer is: x = 2", "x = 2"),
      ("no answer here", None),
      ("", None),
      ("the answer is", None),
  ]
  for text, expected in cases:
    assert mg.extract_answer(text) == expected, text
  nested = r"\boxed{" + "{" * 2000 + "1" + "}" * 2000 + "}"
  assert mg.extract_answer(nested) == "{" * 2000 + "1" + "}" * 2000
  long_text = "x" * 10000 + r"\boxed{42}"
  assert mg.extract_answer(long_text) == "42"
  with pytest.raises(TypeError, match="text must be a str"):
    mg.extract_answer(None)


def test_extract_answer_where_models_write_answers():
  cases = [
      # A final "Answer: X" line (Markdown emphasis allowed), display maths after "Answer".
      ("We add them up.\nAnswer: 41", "41"),
      ("**Answer:** $\\frac{3}{4}$", r"\frac{3}{4}"),
      ("Work shown above.\nAnswer \\[ 12 \\]", "12"),
      ("Work shown above.\nAnswer $$\n12\n$$", "12"),
      # Minerva's format, and its sentences: what follows the last "is", or the one number.
      ("Final Answer: The final answer is $\\sqrt{5}$. I hope it is correct.", r"\sqrt{5}"),
      ("Final Answer: The smallest $k$ is 17.", "17"),
      ("Final Answer: Tom has 23 marbles left.", "23"),
      (r'Final Answer: The final answer is "$4$ and $9$". I hope it is correct.', "4 and 9"),
      # A final answer in words after the last box wins over that (intermediate) box.
      (r"so $2 + 3 = \boxed{5}$ apples, and with the others 11. The final answer is $11$.", "11"),
      # "the result is" / "the solution is" only with maths or a number after them.
      ("Adding, the result is $3$.", "3"),
      ("The solution is to factor the quadratic first.", None),
      (r"Therefore $y \leq 2$ is the solution.", r"y \leq 2"),
      ("So $17$ is our answer.", "17"),
      ("Answer the question first. Then we see x = 2.", None),
      # Text after a chat template's turn marker is not the model's.
      ("Hence the answer is 5. <|im_start|>user\nThe answer is 6", "5"),
      # `\$` inside maths is a dollar sign.
      ("Answer $ 3 \\$ + 4 \\$ = 7 \\$ $", r"3 \$ + 4 \$ = 7 \$"),
  ]
  for text, expected in cases:
    assert mg.extract_answer(text) == expected, text


def test_several_boxes_are_read_together_only_as_parts_of_one_answer():
  assert mg.extract_answer(r"So the two roots are \boxed{4} and \boxed{-7}.") == "4, -7"
  assert mg.extract_answer(r"So the two roots are \boxed{4} and \boxed{-7}.",
                           parts=False) == "-7"
  listed = r"$$\boxed{(1, 2)} \quad \text{and} \quad \boxed{(3, 4)}$$"
  assert mg.extract_answer(listed) == "(1, 2), (3, 4)"
  assert mg.extract_answer(r"$y_1 = \boxed{2x}$, $y_2 = \boxed{3x}$") == "2x, 3x"
  # Revisions and reasoning between boxes: only the last box.
  for text in [r"First guess \boxed{6}. Hmm, no wait, that is off by two: \boxed{8}.",
               r"Thus \boxed{6}, but actually \boxed{8}",
               r"We get \boxed{6}. Then we double it and get \boxed{8}"]:
    assert mg.extract_answer(text) == "8", text


def test_strictness_hedges_unfinished_reasoning_and_revisions_are_wrong(grader):
  cases = [  # (response, reference): each graded wrong
      ("I think the answer is 5 or maybe 7.", "7"),
      ("The answer is probably \\boxed{7}.", "7"),
      ("Perhaps \\boxed{7}", "7"),
      (r"<think>The sum is \boxed{7}", "7"),
      (r"<think>so \boxed{7} is it", "7"),
      (r"\boxed{6} ... no wait ... \boxed{8}", "6"),
      (r"\boxed{6} ... no wait ... \boxed{8}", "6, 8"),
      (r"Maybe \boxed{6} or \boxed{8}", "6, 8"),
  ]
  report = grader.grade([r for r, _ in cases], [ref for _, ref in cases])
  assert report.correct == (False,) * len(cases), report
  # The revision is read as its last box, which is right when the reference is 8.
  assert grader.grade([r"\boxed{6} ... no wait ... \boxed{8}"], ["8"]).correct == (True,)


def test_several_boxes_are_graded_together_when_the_reference_has_parts(grader):
  response = r"the roots are \boxed{3} and \boxed{-5}"
  report = grader.grade([response] * 4, ["-5, 3", "3", "-5", r"\{3, -5\}"])
  assert report.correct == (True, False, True, True)
  assert report.answers == ("3, -5", "-5", "-5", "3, -5")
  # A reference given with several boxes reads them together too.
  assert grader.grade(["3, -5"], [r"\boxed{3} and \boxed{-5}"], extract=False).correct == (True,)


def test_grade_report_counts_and_order(grader):
  responses = [r"\boxed{\frac{1}{2}}", "no answer", r"\boxed{x+1}", r"\boxed{1+x}",
               r"\boxed{x+1}", "The answer is 3", None]
  references = ["0.5", "1", "1+x", "x+1", "1+x", "4", "1"]
  report = grader.grade(responses, references)
  assert report.correct == (True, False, True, True, True, False, False)
  assert report.answers == (r"\frac{1}{2}", None, "x+1", "1+x", "x+1", "3", None)
  assert report.num_no_answer == 2
  assert report.num_symbolic == 2  # (x+1, 1+x) twice is one comparison; (1+x, x+1) another
  assert report.workers == 2 and report.accuracy == pytest.approx(4 / 7)
  cheap = mg.grade(["1", "2"], ["1", "3"], extract=False)
  assert cheap.workers == 0 and cheap.num_symbolic == 0 and cheap.correct == (True, False)


def test_bad_arguments():
  with pytest.raises(ValueError, match="2 responses but 1 references"):
    mg.grade(["1", "2"], ["1"])
  with pytest.raises(ValueError, match="timeout_s must be a positive"):
    mg.grade(["1"], ["1"], timeout_s=0)
  with pytest.raises(TypeError, match=r"references\[0\] must be a str"):
    mg.grade(["1"], [None])
  with pytest.raises(TypeError, match="not a str"):
    mg.grade("1", "1")
  with pytest.raises(ValueError, match="workers must be a positive int"):
    mg.Grader(workers=0)


def test_normalize_answer_examples():
  assert (mg.normalize_answer(r"$\left( \dfrac{1}{2}, 3 \right)$.")
          == r"\left( \dfrac{1}{2}, 3 \right)")
  assert mg.normalize_answer("1,000,000") == "1000000"
  assert mg.normalize_answer(r"1\,000.5") == "1000.5"
  assert mg.normalize_answer("(1,234)") == "(1,234)"  # a point, not a thousands separator
  assert mg.normalize_answer("0,250") == "0,250"  # not one number: 0 cannot open a group
  assert mg.normalize_answer(r"\boxed{1}, \boxed{2}") == "1, 2"
  assert mg.normalize_answer("{{7}}") == "7"
  assert mg.normalize_answer("185\\") == "185"


def test_two_stage_parsing_gives_the_same_expressions(monkeypatch):
  latex2sympy2 = pytest.importorskip("latex2sympy2_extended.latex2sympy2")
  inputs = [r"(3, \frac{\pi}{4})", r"\{1, 2, 3\}", "[1, 2)", r"(-\infty, 0] \cup (1, 2)",
            r"x^2 + 5x + 6", r"y = 2x + 3", r"1 \leq x < 4", r"\frac{1}{2", "a, b; c",
            r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"f(x) = \sqrt{x} + 1", "}{"]

  def parse_all():
    out = []
    for text in inputs:
      try:
        out.append(str(latex2sympy2.latex2sympy(text)))
      except Exception as e:  # pylint: disable=broad-except
        out.append(type(e).__name__)
    return out

  full_ll = parse_all()
  cls = latex2sympy2._Latex2Sympy  # pylint: disable=protected-access
  original = cls.parse
  monkeypatch.setattr(cls, "parse", cls.parse)  # both restored after the test
  monkeypatch.setattr(cls, "create_parser", cls.create_parser)
  mg._two_stage_parsing()  # pylint: disable=protected-access
  assert cls.parse is not original
  assert parse_all() == full_ll


def test_module_imports_neither_jax_nor_the_comparison_libraries():
  code = ("import sys; import opd_jax.data.math_grading; print(sorted(m for m in sys.modules if "
          "m.startswith(('jax', 'opd_jax', 'sympy', 'math_verify', 'latex2sympy2'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "['opd_jax', 'opd_jax.data', 'opd_jax.data.math_grading']"


def test_crosscheck_math_verify(monkeypatch):
  predictions = [r"\boxed{\frac{1}{2}}", r"\boxed{3}", r"\boxed{(1,2)}"]
  references = ["0.5", "4", "(1,2)"]
  agreement = mg.crosscheck_math_verify(predictions, references, ours=[True, False, True])
  assert agreement == 1.0
  assert mg.crosscheck_math_verify([], []) is None
  monkeypatch.setitem(sys.modules, "math_verify", None)
  with pytest.raises(ImportError, match="core dependency"):
    mg.crosscheck_math_verify(predictions, references)
