"""Tests for opd_jax.data.math_grading: extraction, equivalence table, time limits, batch API."""

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
    ("(1,2)", "1, 2"),
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
def table_report():
  report = mg.grade([p for p, _, _ in TABLE], [r for _, r, _ in TABLE], extract=False,
                    timeout_s=10.0)
  assert report.num_timeouts == 0 and report.num_errors == 0
  return report


@pytest.mark.parametrize("index", range(len(TABLE)),
                         ids=[f"{p[:30]}|{r[:30]}|{e}" for p, r, e in TABLE])
def test_equivalence_table(table_report, index):
  prediction, reference, expected = TABLE[index]
  assert table_report.correct[index] is expected, (prediction, reference)


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
  assert mg.normalize_answer(r"\left( \dfrac{1}{2}, 3 \right)") == r"(\frac{1}{2},3)"
  assert mg.normalize_answer(r"\$1,000.50.") == "1000.5"
  assert mg.normalize_answer(r"\pi r^2") == r"\pi r^2"
  assert mg.normalize_answer("(1,234)") == "(1,234)"  # a point, not a thousands separator


def test_module_imports_neither_jax_nor_the_package():
  code = ("import sys; import opd_jax.data.math_grading; "
          "print(sorted(m for m in sys.modules if m.startswith(('jax', 'opd_jax', 'sympy'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "['opd_jax', 'opd_jax.data', 'opd_jax.data.math_grading']"


def test_crosscheck_math_verify(monkeypatch):
  predictions = [r"\boxed{\frac{1}{2}}", r"\boxed{3}", r"\boxed{(1,2)}"]
  references = ["0.5", "4", "(1,2)"]
  try:
    import math_verify  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pass
  else:
    agreement = mg.crosscheck_math_verify(predictions, references, ours=[True, False, True])
    assert agreement == 1.0
    assert mg.crosscheck_math_verify([], []) is None
  monkeypatch.setitem(sys.modules, "math_verify", None)
  with pytest.raises(ImportError, match=r"pip install -e '\.\[mathverify\]'"):
    mg.crosscheck_math_verify(predictions, references)
