"""Turn-taking timing of opd_jax against transformers/PyTorch running in a process of its own.

The benchmarks that compare with transformers share this protocol. The script starts itself again
as a worker (`--torch-server FOLDER ...`), which loads the transformers model, warms each call up
and prints "ready"; from then on it answers each call name read from stdin with the seconds of one
call. The parent then times its own call and asks the worker for one of its calls, in turns, so
that a slow spell of a shared machine hits both sides; the summary has the medians and each
round's ratio. Running transformers in a process of its own keeps XLA's and torch's thread pools
apart: neither side's idle worker threads spin while the other computes.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

PAUSE_S = 0.2  # between calls, so that one side's idle worker threads have gone to sleep
SERVER_FLAG = "--torch-server"


def seconds(fn: Callable[[], object]) -> float:
  """Wall-clock seconds of one call of fn()."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def pin_cores(n: int) -> list[int]:
  """Restricts the calling thread, and the threads and processes it starts later, to n cores.

  Call it from the main thread before JAX creates its CPU client: XLA sizes its thread pool by
  the schedulable cores, so both sides then compute with n threads on the same n cores (the
  worker also sets torch's thread count to n). With n or fewer cores available nothing changes.

  Args:
    n: number of cores, positive.

  Returns:
    The cores the process may now run on.
  """
  if n <= 0:
    raise ValueError(f"n must be a positive number of cores, got {n}")
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) > n:
    os.sched_setaffinity(0, cores[:n])
  return sorted(os.sched_getaffinity(0))


def serve(calls: Mapping[str, Callable[[], object]], *, stdin=None, stdout=None) -> None:
  """Worker side: one warm-up call of each, "ready", then the seconds of each named call.

  Args:
    calls: the worker's calls by name (each already bound to its model and inputs).
    stdin, stdout: the protocol's streams (default: the process's own).
  """
  stdin = sys.stdin if stdin is None else stdin
  stdout = sys.stdout if stdout is None else stdout
  for call in calls.values():
    call()                                 # warm-up
  print("ready", file=stdout, flush=True)
  for line in stdin:
    name = line.strip()
    if name not in calls:
      raise ValueError(f"unknown call {name!r}; the worker has: {', '.join(calls)}")
    print(seconds(calls[name]), file=stdout, flush=True)


class Worker:
  """Parent side: the worker process, started from `argv` (a script taking SERVER_FLAG)."""

  def __init__(self, argv: Sequence[str]):
    self._process = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

  def _answer(self) -> str:
    answer = self._process.stdout.readline()
    if not answer:
      raise RuntimeError(f"the transformers process ended (exit code {self._process.wait()})")
    return answer.strip()

  def wait_ready(self) -> None:
    """Blocks until the worker's warm-up is done (from then on nothing of it competes)."""
    answer = self._answer()
    if answer != "ready":
      raise RuntimeError(f"the transformers process answered {answer!r} instead of 'ready'")

  def seconds(self, name: str) -> float:
    """Seconds of one call `name`, timed inside the worker."""
    self._process.stdin.write(name + "\n")
    self._process.stdin.flush()
    return float(self._answer())

  def close(self) -> None:
    """Ends the worker (closing its stdin ends its loop) and waits for it."""
    if self._process.stdin and not self._process.stdin.closed:
      self._process.stdin.close()
    code = self._process.wait()
    if code:
      raise RuntimeError(f"the transformers process failed (exit code {code})")

  def __enter__(self) -> Worker:
    return self

  def __exit__(self, exc_type, *_) -> None:
    if exc_type is None:
      self.close()
    else:                                  # an error of ours: do not wait on a busy worker
      self._process.kill()
      self._process.wait()


def take_turns(ours: Mapping[str, Callable[[], object]], worker: Worker, rounds: int, *,
               pause_s: float = PAUSE_S) -> dict[str, tuple[list[float], list[float]]]:
  """Per round and call name, one timed call of ours, then one of the worker's (same name).

  Args:
    ours: our calls by name; the worker must serve the same names.
    worker: the started worker, its warm-up done (`wait_ready`).
    rounds: number of rounds, positive.
    pause_s: sleep before each call.

  Returns:
    {name: (our seconds per round, the worker's seconds per round)}.
  """
  if rounds <= 0:
    raise ValueError(f"rounds must be positive, got {rounds}")
  times = {name: ([], []) for name in ours}
  for _ in range(rounds):
    for name, call in ours.items():
      time.sleep(pause_s)
      times[name][0].append(seconds(call))
      time.sleep(pause_s)
      times[name][1].append(worker.seconds(name))
  return times


def summary(ours_s: Sequence[float], theirs_s: Sequence[float], tokens_per_call: int, *,
            first_s: float | None = None) -> dict:
  """Medians, tokens/s and ratios of one call's timings (ratio > 1: ours is faster).

  Args:
    ours_s, theirs_s: seconds per round of each side (same length, round by round).
    tokens_per_call: tokens one call processes or produces.
    first_s: seconds of our first call (with compilation); gives `ours_compile_s`, the first
      call's excess over the median.

  Returns:
    ours_s_per_call, [ours_compile_s,] ours_tokens_per_s, transformers_s_per_call,
    transformers_tokens_per_s, speedup (ratio of the medians) and speedup_per_round.
  """
  if len(ours_s) != len(theirs_s) or not ours_s:
    raise ValueError(f"need the same positive number of timings per side, got {len(ours_s)} "
                     f"and {len(theirs_s)}")
  ours_median, theirs_median = statistics.median(ours_s), statistics.median(theirs_s)
  result = {"ours_s_per_call": round(ours_median, 4)}
  if first_s is not None:
    result["ours_compile_s"] = round(first_s - ours_median, 2)
  result.update({
      "ours_tokens_per_s": round(tokens_per_call / ours_median, 1),
      "transformers_s_per_call": round(theirs_median, 4),
      "transformers_tokens_per_s": round(tokens_per_call / theirs_median, 1),
      "speedup": round(theirs_median / ours_median, 2),
      "speedup_per_round": [round(t / o, 2) for o, t in zip(ours_s, theirs_s)]})
  return result
