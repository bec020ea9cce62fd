"""benchmarks/_turns.py: the worker protocol, the turn order, the summary's medians and ratios."""

import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import _turns  # noqa: E402


def test_summary_medians_ratios_and_compile_time():
  ours, theirs = [1.0, 4.0, 2.0], [3.0, 4.0, 8.0]
  s = _turns.summary(ours, theirs, 100, first_s=7.0)
  assert list(s) == ["ours_s_per_call", "ours_compile_s", "ours_tokens_per_s",
                     "transformers_s_per_call", "transformers_tokens_per_s", "speedup",
                     "speedup_per_round"]
  assert s["ours_s_per_call"] == 2.0 and s["transformers_s_per_call"] == 4.0
  assert s["ours_compile_s"] == 5.0                       # first call minus the median
  assert s["ours_tokens_per_s"] == 50.0 and s["transformers_tokens_per_s"] == 25.0
  assert s["speedup"] == 2.0                              # ratio of the medians
  assert s["speedup_per_round"] == [3.0, 1.0, 4.0]        # theirs / ours, round by round
  assert "ours_compile_s" not in _turns.summary(ours, theirs, 100)


@pytest.mark.parametrize("ours, theirs", [([1.0], [1.0, 2.0]), ([], [])])
def test_summary_rejects_unpaired_timings(ours, theirs):
  with pytest.raises(ValueError, match="same positive number"):
    _turns.summary(ours, theirs, 1)


def test_serve_warms_up_then_answers_each_name():
  counts = {"a": 0, "b": 0}

  def call(name):
    counts[name] += 1

  stdout = io.StringIO()
  _turns.serve({name: lambda name=name: call(name) for name in counts},
               stdin=io.StringIO("b\nb\na\n"), stdout=stdout)
  lines = stdout.getvalue().splitlines()
  assert lines[0] == "ready" and len(lines) == 4
  assert all(float(x) >= 0 for x in lines[1:])
  assert counts == {"a": 2, "b": 3}                       # one warm-up each, then as asked
  with pytest.raises(ValueError, match="unknown call 'c'; the worker has: a"):
    _turns.serve({"a": lambda: None}, stdin=io.StringIO("c\n"), stdout=io.StringIO())


def _worker_script(tmp_path, body: str) -> pathlib.Path:
  script = tmp_path / "worker.py"
  script.write_text(textwrap.dedent(f"""\
      import sys, time
      sys.path.insert(0, {str(BENCHMARKS)!r})
      import _turns
      """) + textwrap.dedent(body))
  return script


def test_take_turns_alternates_with_the_worker(tmp_path):
  log = tmp_path / "log"
  # The worker appends its call's name to the log; so do our calls, so the file shows the order.
  script = _worker_script(tmp_path, f"""\
      def call(name):
        with open({str(log)!r}, "a") as f:
          f.write("theirs " + name + "\\n")
        time.sleep(0.02)
      _turns.serve({{"x": lambda: call("x"), "y": lambda: call("y")}})
      """)

  def ours(name):
    with open(log, "a") as f:
      f.write(f"ours {name}\n")

  with _turns.Worker([str(script)]) as worker:
    worker.wait_ready()
    log.write_text("")                                   # drop the warm-up calls
    times = _turns.take_turns({"x": lambda: ours("x"), "y": lambda: ours("y")}, worker, 2,
                              pause_s=0)
  assert log.read_text().split("\n")[:-1] == ["ours x", "theirs x", "ours y", "theirs y"] * 2
  assert set(times) == {"x", "y"}
  for ours_s, theirs_s in times.values():
    assert len(ours_s) == len(theirs_s) == 2
    assert all(t >= 0.02 for t in theirs_s)              # timed inside the worker


def test_worker_that_dies_is_reported(tmp_path):
  script = _worker_script(tmp_path, "sys.exit(3)\n")
  with pytest.raises(RuntimeError, match=r"ended \(exit code 3\)"):
    with _turns.Worker([str(script)]) as worker:
      worker.wait_ready()


def test_worker_that_answers_otherwise_is_reported(tmp_path):
  script = _worker_script(tmp_path, "print('hello', flush=True)\n")
  with pytest.raises(RuntimeError, match="answered 'hello' instead of 'ready'"):
    with _turns.Worker([str(script)]) as worker:
      worker.wait_ready()


def test_pin_cores_restricts_this_process_and_its_children(tmp_path):
  before = os.sched_getaffinity(0)
  try:
    cores = _turns.pin_cores(1)
    assert len(cores) == 1 and set(cores) <= before
    child = subprocess.run([sys.executable, "-c", "import os; print(len(os.sched_getaffinity(0)))"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "1"
    assert _turns.pin_cores(len(before) + 1) == cores     # more than available: unchanged
  finally:
    os.sched_setaffinity(0, before)
  with pytest.raises(ValueError, match="n must be a positive number of cores, got 0"):
    _turns.pin_cores(0)


@pytest.mark.slow
def test_bench_forward_end_to_end():
  """The forward benchmark at a tiny shape: one JSON line, logits equal to transformers'."""
  out = subprocess.run(
      [sys.executable, str(BENCHMARKS / "bench_forward.py"), "--repeats", "2", "--batch", "1",
       "--seq_len", "8"], capture_output=True, text=True, check=True, timeout=600,
      cwd=BENCHMARKS.parent, env={**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)})
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["batch"] == 1 and result["seq_len"] == 8 and result["rounds"] == 2
  assert len(result["speedup_per_round"]) == 2 and result["speedup"] > 0
  assert result["max_abs_logit_diff"] < 1e-4
