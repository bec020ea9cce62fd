"""Run outputs: metrics.jsonl + TensorBoard (process 0), config.json, a progress line."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import jax
import numpy as np

from opd_jax import errors

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"

# Non-finite floats as JSON strings (plain JSON has no NaN or infinity); float(s) reads them back.
_NON_FINITE = {"nan": "nan", "inf": "inf", "-inf": "-inf"}
_WRITER_IDS = itertools.count()


def _scalar(key: str, value: Any) -> int | float:
  """A metric value as a Python int or float; raises ValueError naming `key` otherwise."""
  if isinstance(value, (bool, np.bool_)):
    return int(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value)
  if isinstance(value, (np.ndarray, jax.Array)) and np.size(value) == 1:
    array = np.asarray(value).reshape(())
    if array.dtype.kind in "biu":
      return int(array)
    if array.dtype.kind == "f" or array.dtype == jax.numpy.bfloat16:
      return float(array)
  raise ValueError(f"metric {key!r} = {value!r} is not accepted; give a Python / numpy / "
                   "one-element jax number")


def _json_value(value: int | float) -> int | float | str:
  if isinstance(value, float) and not math.isfinite(value):
    return _NON_FINITE[str(value)]
  return value


def _finite_or_null(value: Any) -> Any:
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, Mapping):
    return {k: _finite_or_null(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_null(v) for v in value]
  return value


def strict_json(value: Any, **kwargs) -> str:
  """`json.dumps(value, **kwargs)` as strict JSON: NaN and infinities (which are not JSON, and
  which many readers refuse) written as null. For result files; metrics.jsonl keeps them as the
  strings "nan", "inf", "-inf" instead (`read_metrics` reads them back)."""
  return json.dumps(_finite_or_null(value), allow_nan=False, **kwargs)


def _config_dict(config: Any) -> dict:
  """`config` (a Mapping or an ml_collections ConfigDict) as a plain JSON-checked dict."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise ValueError(f"config must be a mapping or a ConfigDict, got {type(config).__name__}")

  def check(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
      for k in value:
        if not isinstance(k, str):
          raise ValueError(f"config key {where}{k!r} is not a string; JSON needs string keys")
      return {k: check(v, f"{where}{k}.") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return [check(v, f"{where}{i}.") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int)):
      return value
    if isinstance(value, float) and math.isfinite(value):
      return value
    raise ValueError(f"config value {where.rstrip('.')} = {value!r} cannot be written as JSON; "
                     "use str / int / finite float / bool / None / list / dict")

  return check(config, "")


@dataclasses.dataclass(frozen=True)
class WandbSettings:
  """A Weights & Biases run: its project, its mode and the config it records."""
  project: str
  mode: str = "offline"         # offline (files under workdir/wandb, `wandb sync` uploads) |
  #                               online
  name: str = ""                # the run's name ("" = the workdir's folder name)
  config: Mapping[str, Any] | None = None


class _WandbRun:
  """One W&B run, started on first use, its history keyed by the same names and steps as
  metrics.jsonl."""

  def __init__(self, settings: WandbSettings, workdir: str):
    try:
      import wandb  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise errors.ConfigError(
          f"config.log.wandb={settings.project!r} needs the wandb package: pip install "
          "'.[wandb]' (or set --config.log.wandb='' to log without it)") from e
    self._settings, self._workdir, self._wandb, self._run = settings, workdir, wandb, None

  def log(self, values: Mapping[str, float], step: int) -> None:
    if self._run is None:
      s = self._settings
      # resume="allow" with a fixed id: a resumed trainer run continues the same W&B run.
      self._run = self._wandb.init(
          project=s.project, mode=s.mode, dir=self._workdir, config=dict(s.config or {}),
          name=s.name or os.path.basename(self._workdir), id=_run_id(self._workdir),
          resume="allow")
    self._run.log(dict(values), step=step)

  def finish(self) -> None:
    if self._run is not None:
      self._run.finish()
      self._run = None


def _run_id(workdir: str) -> str:
  """A W&B run id that is the same for every start of the run in `workdir`."""
  import hashlib  # pylint: disable=import-outside-toplevel
  return hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:16]


class MetricsWriter:
  """Appends one JSON line per logged step to workdir/metrics.jsonl and mirrors it to TensorBoard.

  Only the primary process (process 0 unless told otherwise) writes; on the others every method
  is a no-op, so the trainer may call them on all processes. Lines are flushed per `write`, so
  the file is complete up to the last logged step whenever the run stops.
  """

  def __init__(self, workdir: str | os.PathLike, *, primary: bool | None = None,
               tensorboard: bool = True, wandb: WandbSettings | None = None):
    """Prepares the writer; files are opened on first use.

    Args:
      workdir: the run's output folder (created if missing).
      primary: whether this process writes; None means `jax.process_index() == 0`.
      tensorboard: also write TensorBoard scalars under workdir/tensorboard (tensorboardX).
      wandb: also log to Weights & Biases (the `wandb` package, `pip install '.[wandb]'`);
        None = not.
    """
    self._workdir = os.path.abspath(os.fspath(workdir))
    self._primary = jax.process_index() == 0 if primary is None else bool(primary)
    self._tensorboard = bool(tensorboard)
    self._jsonl: TextIO | None = None
    self._tb = None
    # Set by truncate_after: TensorBoard then hides the old run's events from this step on.
    self._purge_step: int | None = None
    self._wandb = None
    if self._primary and wandb is not None:
      self._wandb = _WandbRun(wandb, self._workdir)
    if self._primary:
      if os.path.exists(self._workdir) and not os.path.isdir(self._workdir):
        raise ValueError(f"workdir {self._workdir!r} exists and is not a folder")
      os.makedirs(self._workdir, exist_ok=True)

  @property
  def metrics_path(self) -> str:
    return os.path.join(self._workdir, METRICS_FILE)

  def write_config(self, config: Any, *, step: int | None = None) -> str | None:
    """Records the run's config as workdir/config.json, never overwriting the first one.

    If config.json already exists (a resumed run) and holds the same settings, nothing is
    written. If the settings differ, the original stays as the record of how the run started
    and the new settings go to config.resumed_<step>.json (`step`: the step resumed from; if
    None, the next free number 1, 2, ...), with a warning naming the changed keys.

    Args:
      config: a mapping or ml_collections ConfigDict of JSON-able values.
      step: the checkpoint step the run resumes from, used to name a differing config.

    Returns:
      The path written, or None (not primary, or identical to the existing config.json).
    """
    if not self._primary:
      return None
    new = _config_dict(config)
    path = os.path.join(self._workdir, CONFIG_FILE)
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
      if old == new:
        return None
      changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      if step is not None:
        path = os.path.join(self._workdir, f"config.resumed_{int(step)}.json")
      else:
        i = 1
        while os.path.exists(os.path.join(self._workdir, f"config.resumed_{i}.json")):
          i += 1
        path = os.path.join(self._workdir, f"config.resumed_{i}.json")
      logging.warning("config differs from %s/%s in %s; keeping the original and writing %s",
                      self._workdir, CONFIG_FILE, changed, path)
    write_atomically(path, json.dumps(new, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path

  def truncate_after(self, step: int) -> None:
    """Drops metrics of steps > `step` (logged after the checkpoint a run resumes from).

    The resumed run then appends exactly what an uninterrupted run would have written. A torn
    last line (the process died mid-write) is dropped too. TensorBoard keeps old event files,
    so the next TensorBoard writer is opened with purge_step = step + 1, which makes
    TensorBoard discard the earlier run's events from that step on.
    """
    if not self._primary:
      return
    step = int(step)
    self._close_files()
    self._purge_step = step + 1
    if not os.path.exists(self.metrics_path):
      return
    with open(self.metrics_path) as f:
      lines = f.read().split("\n")
    kept = []
    for i, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        row_step = json.loads(line)["step"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        if i == len(lines) - 1:   # no newline after it: a write cut short
          continue
        raise ValueError(f"{self.metrics_path} line {i + 1} is not a metrics record ({e}): "
                         f"{line[:200]!r}") from e
      if row_step <= step:
        kept.append(line + "\n")
    write_atomically(self.metrics_path, "".join(kept))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs `metrics` at `step`: one JSON line and one TensorBoard scalar per key.

    Args:
      step: the number of completed updates.
      metrics: name -> number (Python, numpy or one-element jax). Written with sorted keys;
        NaN and infinities become the JSON strings "nan", "inf", "-inf".
    """
    if not self._primary:
      return
    values = {}
    for key, value in metrics.items():
      if not isinstance(key, str) or key == "step":
        raise ValueError(f"metric name {key!r} is not accepted; give a string other than 'step'")
      values[key] = _scalar(key, value)
    record = {"step": int(step), **{k: _json_value(v) for k, v in values.items()}}
    if self._jsonl is None:
      self._jsonl = open(self.metrics_path, "a")
    self._jsonl.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")
    self._jsonl.flush()
    if self._tensorboard:
      if self._tb is None:
        import tensorboardX  # pylint: disable=import-outside-toplevel
        # Event file names hold the time in seconds: the suffix keeps a writer reopened within
        # the same second (resume right after a crash, tests) from overwriting the last file.
        self._tb = tensorboardX.SummaryWriter(
            os.path.join(self._workdir, TENSORBOARD_DIR), purge_step=self._purge_step,
            filename_suffix=f".{os.getpid()}.{next(_WRITER_IDS)}")
        self._purge_step = None   # purge once: a later reopen must not hide this run's events
      # The tags are the metric names as they are: add_scalar would rename "eval/aime24/pass@1"
      # to "eval/aime24/pass_1" (TensorFlow's old node-name rules), and every sink must agree.
      from tensorboardX.proto.summary_pb2 import Summary  # pylint: disable=import-outside-toplevel
      summary = Summary(value=[Summary.Value(tag=key, simple_value=values[key])
                               for key in sorted(values)])
      file_writer = self._tb._get_file_writer()  # pylint: disable=protected-access
      file_writer.add_summary(summary, global_step=int(step))
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(values, step=int(step))

  def _close_files(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def close(self) -> None:
    """Flushes and closes the files (a later `write` reopens them) and ends a W&B run."""
    self._close_files()
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of workdir/metrics.jsonl in file order ([] when there is none); the JSON
  strings "nan", "inf", "-inf" that `MetricsWriter.write` stores come back as floats."""
  path = os.path.join(os.fspath(workdir), METRICS_FILE)
  if not os.path.exists(path):
    return []
  special = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
  with open(path) as f:
    return [{k: special.get(v, v) if isinstance(v, str) else v
             for k, v in json.loads(line).items()} for line in f if line.strip()]


def write_atomically(path: str, text: str) -> None:
  """Writes `text` via a temporary file and a rename, so a crash never leaves a half-written file.

  Args:
    path: the file to write (its folder must exist); `path + ".tmp"` is used on the way.
    text: the whole content.
  """
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """Training progress: an in-place bar on a terminal, periodic plain lines in logs.

  The speed and ETA are measured from the first `update` on, so the compile time of the first
  step does not distort them.
  """

  def __init__(self, total_steps: int, *, start_step: int = 0, stream: TextIO | None = None,
               interactive: bool | None = None, every: int | None = None,
               interval_s: float = 60.0, redraw_s: float = 0.1,
               keys: Sequence[str] = ("loss",)):
    """Args:
      total_steps: the step the run ends at.
      start_step: the step the run (re)starts from.
      stream: where to write (default sys.stderr).
      interactive: redraw one line with "\\r"; None means `stream.isatty()`.
      every: non-interactive mode prints a line every `every` steps (default: every 1/20 of
        the run) or when `interval_s` seconds passed since the last line, and at the end.
      interval_s: see `every`.
      redraw_s: interactive mode redraws at most this often (and always at the first and last
        step).
      keys: the metrics shown, when present.
    """
    if not isinstance(total_steps, int) or total_steps < 1:
      raise ValueError(f"Progress total_steps={total_steps!r} is not accepted; give an int >= 1")
    self._total = total_steps
    self._stream = sys.stderr if stream is None else stream
    if interactive is None:
      interactive = bool(getattr(self._stream, "isatty", lambda: False)())
    self._interactive = interactive
    self._every = max(1, total_steps // 20) if every is None else int(every)
    if self._every < 1:
      raise ValueError(f"Progress every={every!r} is not accepted; give an int >= 1")
    self._interval_s = float(interval_s)
    self._keys = tuple(keys)
    self._first: tuple[int, float] | None = None
    self._last_step = start_step
    self._last_time = time.monotonic()
    self._last_width = 0
    self._redraw_s = float(redraw_s)

  def _line(self, step: int, metrics: Mapping[str, Any], now: float) -> str:
    parts = [f"step {step}/{self._total} ({100 * step / self._total:3.0f}%)"]
    for key in self._keys:
      if key in metrics:
        parts.append(f"{key} {_scalar(key, metrics[key]):.4g}")
    if self._first is not None and step > self._first[0] and now > self._first[1]:
      rate = (step - self._first[0]) / (now - self._first[1])
      parts.append(f"{rate:.3g} steps/s")
      parts.append(f"ETA {_clock(max(0, self._total - step) / rate)}")
    else:
      parts.append("ETA --:--:--")
    return " | ".join(parts)

  def update(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Reports that `step` updates are done; `metrics` are that step's (only `keys` shown)."""
    now = time.monotonic()
    first = self._first is None
    if first:
      self._first = (step, now)
    final = step >= self._total
    if self._interactive:
      if not (first or final) and now - self._last_time < self._redraw_s:
        return
      filled = int(20 * min(step, self._total) / self._total)
      line = "[" + "#" * filled + "." * (20 - filled) + "] " + self._line(step, metrics, now)
      pad = " " * max(0, self._last_width - len(line))
      self._stream.write("\r" + line + pad)
      self._last_width = len(line)
    else:
      due = (first or final or step - self._last_step >= self._every
             or now - self._last_time >= self._interval_s)
      if not due:
        return
      self._stream.write(self._line(step, metrics, now) + "\n")
    self._stream.flush()
    self._last_step, self._last_time = step, now

  def close(self) -> None:
    """Ends the in-place line (interactive mode)."""
    if self._interactive and self._last_width:
      self._stream.write("\n")
      self._stream.flush()
      self._last_width = 0
