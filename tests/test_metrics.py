"""Metrics writer (jsonl, config, TensorBoard) and the progress line."""

import glob
import io
import json
import math
import os
import struct
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from opd_jax import errors
from opd_jax.metrics import MetricsWriter, Progress, WandbSettings


def _read_events(workdir):
  """(step, tag, value) of every scalar in workdir/tensorboard, decoding the TFRecord framing."""
  out = []
  for name in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
    with open(name, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out.append((event.step, v.tag, v.simple_value))
  return out


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_jsonl_lines_and_tensorboard_scalars(tmp_path):
  writer = MetricsWriter(tmp_path, primary=True)
  writer.write(1, {"loss": 0.5, "lr": np.float32(0.25), "tokens": np.int64(12),
                   "kl/overlap": jnp.asarray(0.75), "bf16": jnp.asarray([1.5], jnp.bfloat16),
                   "count": jnp.asarray(3, jnp.int32)})
  writer.write(2, {"loss": float("nan"), "grad_norm": float("inf"), "b": float("-inf"),
                   "ok": True})
  # Flushed per write: readable before close.
  assert _lines(tmp_path)[0] == {"step": 1, "kl/overlap": 0.75, "loss": 0.5, "lr": 0.25,
                                 "tokens": 12, "bf16": 1.5, "count": 3}
  writer.close()
  with open(tmp_path / "metrics.jsonl") as f:
    raw = f.read().splitlines()
  assert raw[1] == '{"b": "-inf", "grad_norm": "inf", "loss": "nan", "ok": 1, "step": 2}'
  assert isinstance(_lines(tmp_path)[0]["tokens"], int)
  assert isinstance(_lines(tmp_path)[0]["count"], int)
  events = _read_events(tmp_path)
  assert (1, "loss", 0.5) in events and (1, "kl/overlap", 0.75) in events
  assert (1, "tokens", 12.0) in events
  assert any(s == 2 and t == "loss" and math.isnan(v) for s, t, v in events)
  with pytest.raises(ValueError, match="metric 'x'"):
    writer.write(3, {"x": np.ones(3)})
  with pytest.raises(ValueError, match="'step'"):
    writer.write(3, {"step": 1})


def test_every_sink_uses_the_metric_names_as_they_are(tmp_path):
  names = {"eval/aime24/pass@1": 0.5, "eval/avg/avg@32": 0.25, "kl/num_tokens": 7,
           "task/math/loss": 1.5}
  with MetricsWriter(tmp_path, primary=True) as w:
    w.write(3, names)
  tags = {t for _, t, _ in _read_events(tmp_path)}
  assert tags == set(names) == set(_lines(tmp_path)[0]) - {"step"}


def test_weights_and_biases_offline_run_logs_the_same_names_and_steps(tmp_path, monkeypatch):
  wandb = pytest.importorskip("wandb", reason="the wandb extra: pip install '.[wandb]'")
  monkeypatch.setenv("WANDB_SILENT", "true")
  logged, real_init = [], wandb.init

  def spying_init(**kw):
    run = real_init(**kw)
    real_log = run.log
    monkeypatch.setattr(run, "log", lambda values, step: (logged.append((step, dict(values))),
                                                          real_log(values, step=step)))
    logged.append(("init", kw))
    return run

  monkeypatch.setattr(wandb, "init", spying_init)
  settings = WandbSettings("opd-test", "offline", config={"seed": 3})
  with MetricsWriter(tmp_path, primary=True, tensorboard=False, wandb=settings) as w:
    w.write(1, {"loss": 0.5, "eval/math500/pass@1": 0.25})
    w.write(2, {"loss": 0.25})
  (_, init), *rows = logged
  assert init["mode"] == "offline" and init["project"] == "opd-test"
  assert init["dir"] == str(tmp_path) and init["config"] == {"seed": 3}
  assert rows == [(r.pop("step"), r) for r in _lines(tmp_path)]
  runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))
  assert len(runs) == 1 and os.path.getsize(runs[0]) > 0
  # The same workdir gives the same run id (a resumed trainer run continues its W&B run).
  assert os.path.basename(runs[0]) == f"run-{init['id']}.wandb"


def test_weights_and_biases_requested_without_the_package_names_the_setting(tmp_path,
                                                                            monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)   # import wandb raises ImportError
  with MetricsWriter(tmp_path, primary=True, tensorboard=False) as w:   # not requested: fine
    w.write(1, {"loss": 1.0})
  with pytest.raises(errors.ConfigError, match=r"config.log.wandb='p' needs the wandb package: "
                                               r"pip install '.\[wandb\]'"):
    MetricsWriter(tmp_path, primary=True, wandb=WandbSettings("p"))


def test_truncate_after_makes_a_resumed_file_equal_an_uninterrupted_one(tmp_path):
  full, resumed = tmp_path / "full", tmp_path / "resumed"
  with MetricsWriter(full, primary=True, tensorboard=False) as w:
    for step in range(1, 9):
      w.write(step, {"loss": 1.0 / step})
  with MetricsWriter(resumed, primary=True, tensorboard=False) as w:
    for step in range(1, 7):   # crashed after step 6; the last checkpoint is step 4
      w.write(step, {"loss": 1.0 / step})
  with open(resumed / "metrics.jsonl", "a") as f:
    f.write('{"loss": 0.1, "st')   # a line cut short by the crash
  with MetricsWriter(resumed, primary=True, tensorboard=False) as w:
    w.truncate_after(4)
    assert [r["step"] for r in _lines(resumed)] == [1, 2, 3, 4]
    for step in range(5, 9):
      w.write(step, {"loss": 1.0 / step})
  assert (full / "metrics.jsonl").read_text() == (resumed / "metrics.jsonl").read_text()


def test_truncate_after_purges_tensorboard_events_from_the_old_run(tmp_path):
  with MetricsWriter(tmp_path, primary=True) as w:
    for step in range(1, 5):
      w.write(step, {"loss": float(step)})
  with MetricsWriter(tmp_path, primary=True) as w:
    w.truncate_after(2)
    w.write(3, {"loss": 30.0})
    w.close()
    w.write(4, {"loss": 40.0})   # reopened: must not purge this run's step 3 again
  # Opened in one second here, so order by the writer number MetricsWriter appends.
  files = sorted(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*")),
                 key=lambda name: int(name.rsplit(".", 1)[1]))
  assert len(files) == 3
  starts = []
  for name in files:
    with open(name, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        starts.append((name, event.step))
  # TensorBoard drops earlier files' events at steps >= a SessionLog.START's step.
  assert starts == [(files[1], 3)]


def test_config_written_once_and_differences_kept_aside(tmp_path):
  w = MetricsWriter(tmp_path, primary=True)
  config = {"seed": 0, "model": {"layers": 2, "dims": (4, 8)}, "name": "a"}
  assert w.write_config(config) == str(tmp_path / "config.json")
  assert json.loads((tmp_path / "config.json").read_text()) == {
      "seed": 0, "model": {"layers": 2, "dims": [4, 8]}, "name": "a"}
  assert w.write_config(dict(config)) is None   # identical on resume: untouched
  changed = dict(config, name="b")
  assert w.write_config(changed, step=40) == str(tmp_path / "config.resumed_40.json")
  assert w.write_config(changed) == str(tmp_path / "config.resumed_1.json")
  assert json.loads((tmp_path / "config.json").read_text())["name"] == "a"
  assert json.loads((tmp_path / "config.resumed_40.json").read_text())["name"] == "b"
  with pytest.raises(ValueError, match="model.bad"):
    w.write_config({"model": {"bad": object()}})
  w.close()


def test_config_accepts_a_config_dict(tmp_path):
  ml_collections = pytest.importorskip("ml_collections")
  c = ml_collections.ConfigDict({"seed": 3, "train": {"lr": 1e-3}})
  MetricsWriter(tmp_path, primary=True).write_config(c)
  assert json.loads((tmp_path / "config.json").read_text()) == {"seed": 3,
                                                                "train": {"lr": 1e-3}}


def test_non_primary_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  w = MetricsWriter(workdir, primary=False)
  w.write_config({"a": 1})
  w.write(1, {"loss": 1.0})
  w.truncate_after(0)
  w.close()
  assert not workdir.exists()


def test_default_primary_is_process_zero(tmp_path):
  w = MetricsWriter(tmp_path, tensorboard=False)   # one process here: index 0
  w.write(1, {"loss": 1.0})
  w.close()
  assert _lines(tmp_path) == [{"step": 1, "loss": 1.0}]


def test_progress_plain_lines():
  stream = io.StringIO()
  p = Progress(100, start_step=10, stream=stream, every=25, interval_s=1e9)
  for step in range(11, 101):
    p.update(step, {"loss": 1.0 / step, "other": 3.0})
  p.close()
  lines = stream.getvalue().splitlines()
  assert "\r" not in stream.getvalue()
  assert [line.split()[1] for line in lines] == ["11/100", "36/100", "61/100", "86/100",
                                                 "100/100"]
  assert "loss 0.0909" in lines[0] and "other" not in lines[0]
  assert "ETA --:--:--" in lines[0]
  assert "ETA 0:00:00" in lines[-1] and "steps/s" in lines[-1]


def test_progress_interactive_redraws_in_place():
  stream = io.StringIO()
  p = Progress(4, stream=stream, interactive=True, redraw_s=0.0)   # every update draws
  for step in range(1, 5):
    p.update(step, {"loss": 2.0})
  p.close()
  text = stream.getvalue()
  assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
  last = text.split("\r")[-1]
  assert last.startswith("[" + "#" * 20 + "] step 4/4") and "loss 2" in last


def test_progress_defaults_to_plain_lines_on_a_non_terminal():
  stream = io.StringIO()   # isatty() is False
  p = Progress(2, stream=stream)
  p.update(1, {})
  p.update(2, {})
  assert stream.getvalue().count("\n") == 2 and "\r" not in stream.getvalue()
  with pytest.raises(ValueError, match="total_steps=0"):
    Progress(0)


def test_strict_json_writes_null_for_non_finite_numbers():
  from opd_jax.metrics import strict_json  # pylint: disable=import-outside-toplevel
  text = strict_json({"a": float("nan"), "b": [1.5, float("inf"), np.float32("-inf")],
                      "c": {"d": np.float64(2.0), "e": None, "f": "nan"}}, indent=1)

  def refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")

  assert json.loads(text, parse_constant=refuse) == {
      "a": None, "b": [1.5, None, None], "c": {"d": 2.0, "e": None, "f": "nan"}}
