"""Ahead-of-time memory and FLOP plan of the trainer's three programs, per phase and per device.

`python -m opd_jax.plan --config=experiments/<name>.py --devices=N` compiles the rollout
(`sampling.sample`), teacher-scoring (`steps.score`) and update (`steps.make_update`) programs
for abstract inputs (`jax.ShapeDtypeStruct`s with their shardings) on N fake CPU devices: no
weights are read and no array is allocated. For each phase it prints what XLA's memory analysis
says one device holds (arguments, outputs, temporaries), the FLOPs of its cost analysis, the
buffers that stay resident from other phases, and whether the total fits each named accelerator;
when one does not, the largest buffers are named. The last line is one JSON object
`{"phases": {"rollout": {...}, "scoring": {...}, "update": {...}}, ...}`.

The architecture comes from the model's folder (`model.path`, only its config.json is read) or,
while that is "", from `model.plan_arch`: a built-in name (ARCHITECTURES) or a config.json file.
The trainer runs the same plan on its real mesh at start-up (`mesh.accelerator`, `check_run`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from opd_jax import cli
from opd_jax.settings import ConfigError

PHASES = ("rollout", "scoring", "update")
# Fraction of an accelerator's memory left free for the allocator's fragmentation and the
# runtime's own buffers: a phase fits when its total is at most (1 - HEADROOM) x the memory.
HEADROOM = 0.1
# Buffers named in a report that does not fit.
LARGEST = 8

# Published config.json values of the paper's models (planning needs no files). OpenThinker3-7B
# and the ALFWorld teacher are fine-tunes of Qwen2.5-7B-Instruct: the same shape.
_QWEN25_7B = {
    "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "head_dim": 128, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768, "tie_word_embeddings": False, "hidden_act": "silu",
}
ARCHITECTURES = {
    "qwen2.5-7b-instruct": _QWEN25_7B,
    "openthinker3-7b": _QWEN25_7B,
    "qwen2.5-1.5b-instruct": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "head_dim": 128, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768, "tie_word_embeddings": True, "hidden_act": "silu",
    },
}

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
# One HLO instruction with an array result: "%name = f32[2,3]{1,0} opcode(".
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*([a-z0-9]+)\[([0-9,]*)\]\S*\s+"
                          r"([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Instructions that name an existing buffer (or a parameter, counted with the arguments).
_NO_NEW_BUFFER = ("parameter", "get-tuple-element", "bitcast", "tuple", "constant")


@dataclasses.dataclass(frozen=True)
class Phase:
  """One compiled program's memory per device (bytes), as XLA's memory analysis gives it.

  `resident` is what other phases keep on the device meanwhile (the train state during the
  rollout and the scoring, the teachers during the update); it is not an argument of this
  program, but it occupies the same memory.
  """
  args: int
  outputs: int
  alias: int                 # outputs written into donated arguments (counted once)
  temp: int
  resident: int
  flops: float               # per device, as XLA's cost analysis counts (loop bodies once)
  compile_s: float
  largest: tuple[tuple[str, int], ...]   # (buffer, bytes per device), largest first

  @property
  def total(self) -> int:
    return self.args + self.outputs - self.alias + self.temp + self.resident

  def summary(self) -> dict[str, Any]:
    return {"args": self.args, "outputs": self.outputs, "alias": self.alias, "temp": self.temp,
            "resident": self.resident, "total": self.total, "flops": self.flops,
            "compile_s": round(self.compile_s, 2)}


class DoesNotFit(ConfigError):
  """A configuration whose plan exceeds the accelerator's memory; the message is the report."""


# ----------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------


def device_bytes(x) -> int:
  """Bytes one device holds of an array or ShapeDtypeStruct (its shard; all of it unsharded)."""
  shape = tuple(x.shape)
  sharding = getattr(x, "sharding", None)
  if sharding is not None:
    shape = tuple(sharding.shard_shape(shape))
  return math.prod(shape) * x.dtype.itemsize


def tree_bytes(tree) -> int:
  """Per-device bytes of every array of a pytree."""
  import jax  # pylint: disable=import-outside-toplevel
  return sum(device_bytes(x) for x in jax.tree.leaves(tree))


def _named_leaves(tree, prefix: str) -> list[tuple[str, int]]:
  import jax  # pylint: disable=import-outside-toplevel
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)
    name = name.removesuffix("/value")     # nnx Variables' own level
    out.append((f"{prefix}{name} {leaf.dtype}{list(leaf.shape)}", device_bytes(leaf)))
  return out


def hlo_buffers(hlo_text: str, count: int = LARGEST) -> list[tuple[str, int]]:
  """The largest arrays the per-device program materialises, from its optimised HLO text.

  Instructions inside fused computations never reach memory and are skipped; so are parameters
  (the arguments) and instructions that only rename a buffer. Arrays of the same shape made by
  the same JAX operation (one per layer, say) are listed once with their count: (description,
  bytes of one; XLA may place several in the same memory, so counts are not added up).
  """
  groups: dict[tuple[str, str], list] = {}
  fused = False
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():          # a computation's header (or its closing brace)
      fused = line.startswith(("%fused", "%wrapped", "fused", "wrapped"))
      continue
    if fused:
      continue
    m = _INSTRUCTION.match(line)
    if m is None or m.group(4) in _NO_NEW_BUFFER or m.group(2) not in _DTYPE_BYTES:
      continue
    dims = [int(d) for d in m.group(3).split(",") if d]
    size = math.prod(dims) * _DTYPE_BYTES[m.group(2)]
    op = _OP_NAME.search(line)
    where = "/".join(op.group(1).split("/")[-3:]) if op else m.group(4)
    group = groups.setdefault((f"{m.group(2)}[{m.group(3)}]", where), [0, size, m.group(1)])
    group[0] += 1
  found = [(f"buffer {shape} ({where}; {n} such, e.g. %{first})" if n > 1 else
            f"buffer %{first} {shape} ({where})", size)
           for (shape, where), (n, size, first) in groups.items()]
  found.sort(key=lambda x: -x[1])
  return found[:count]


def _cost_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def _compile(fn: Callable, args: Sequence, resident: list[tuple[str, int]],
             arg_names: list[tuple[str, int]]) -> Phase:
  """Compiles `fn` for `args` and reads its memory; `resident` and `arg_names` are (name, bytes)
  of what other phases keep on the device and of this program's arguments."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  # The largest arguments and the program's own largest arrays, each kind shown.
  largest = (sorted(arg_names, key=lambda x: -x[1])[:LARGEST // 2]
             + hlo_buffers(compiled.as_text(), LARGEST - LARGEST // 2)
             + [(f"resident {what}", size) for what, size in resident if size])
  largest.sort(key=lambda x: -x[1])
  return Phase(args=int(mem.argument_size_in_bytes), outputs=int(mem.output_size_in_bytes),
               alias=int(mem.alias_size_in_bytes), temp=int(mem.temp_size_in_bytes),
               resident=sum(size for _, size in resident), flops=_cost_flops(compiled),
               compile_s=seconds, largest=tuple(largest))


# ----------------------------------------------------------------------------------------------
# the three programs for abstract inputs
# ----------------------------------------------------------------------------------------------


def abstract_model(config, mesh):
  """(graphdef, parameters as ShapeDtypeStructs with their shardings) of a Decoder."""
  import jax  # pylint: disable=import-outside-toplevel
  from opd_jax import models, steps  # pylint: disable=import-outside-toplevel
  graphdef, params = steps.split_abstract(config)
  shardings = models.model_shardings(params, mesh)
  return graphdef, jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)


def plan_run(p, teachers: Sequence[tuple[Any, Any]], *,
             log: Callable[[str], None] | None = None) -> dict[str, Phase]:
  """Compiles the trainer's programs for abstract inputs and reads their memory and FLOPs.

  Args:
    p: the run's `programs.Programs` (the very programs the trainer runs).
    teachers: one (graphdef, parameters) per task; the parameters may be arrays or
      ShapeDtypeStructs with shardings (only shapes, dtypes and shardings are read).
    log: where to say each phase's total as soon as it is compiled (None: nowhere).

  Returns:
    {phase: Phase} for "rollout", "scoring" and "update" ("update" alone for an estimator that
    trains on reference responses).
  """
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  from opd_jax import packing, sampling, sharding, steps
  s, mesh = p.settings, p.mesh
  rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))

  def arr(shape, dtype, where=rows):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=where)

  teachers = [(d, jax.tree.map(lambda x: arr(x.shape, x.dtype, x.sharding), pr))
              for d, pr in teachers]
  state = p.abstract_state
  compute = abstract_model(steps.compute_config(p.student_config, s.model.precision), mesh)[1]
  # Without a mixed policy the sampler and the scoring run on the state's own parameters.
  state_left = [("train state (parameters and AdamW moments)", tree_bytes(state))
                if s.model.precision.mixed else ("train state (AdamW moments)",
                                                 tree_bytes(state) - tree_bytes(state.params))]
  teacher_bytes = [(f"teacher {i} parameters", tree_bytes(t)) for i, (_, t) in enumerate(teachers)]
  n_rows, p_len, n_new = s.rollouts_per_step, sampling.bucket_length(s.data.max_prompt_len), \
      s.rollout.max_new_tokens
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = arr(key.shape, key.dtype, sharding.replicated(mesh))
  # The scoring and update passes run on the rows of config.opt.packing: planned for the largest
  # geometry a batch can take (packing.worst_case; the teacher's prompt bucket is the student's).
  geometry, layout_rows = packing.worst_case(
      s.opt.packing, n_rows, p_len, p_len, n_new, minibatches=s.minibatches,
      micro=s.opt.microbatches, ways=sharding.batch_divisor(mesh),
      microbatch_tokens=s.opt.microbatch_tokens)
  batch = {k: arr(shape, dtype) for k, (shape, dtype)
           in packing.abstract_arrays(geometry, layout_rows).items()}
  phases: dict[str, Phase] = {}

  def done(name: str, phase: Phase) -> Phase:
    if log is not None:
      log(f"{name}: {_size(phase.total).strip()} per device, compiled in {phase.compile_s:.1f} s")
    phases[name] = phase
    return phase

  scores = {}
  if p.estimator.samples:
    prompt_args = [arr((s.data.prompts_per_step, p_len), jnp.int32),
                   arr((s.data.prompts_per_step, p_len), bool)]
    done("rollout", _compile(jax.jit(p.rollout), [compute] + prompt_args + [key],
                             state_left + teacher_bytes, _named_leaves(compute, "arg student/")))
    worst = None
    score = jax.jit(lambda c, d, t, b: p.score(c, d, t, b, geometry), static_argnums=(1,))
    for i, (tdef, tparams) in enumerate(teachers):
      if any(tdef == d for d, _ in teachers[:i]):
        continue     # the same architecture and dtype compiles to the same program
      phase = _compile(score, [compute, tdef, tparams, batch],
                       state_left + teacher_bytes[:i] + teacher_bytes[i + 1:],
                       _named_leaves(compute, "arg student/") + _named_leaves(tparams,
                                                                              "arg teacher/"))
      if worst is None or phase.total > worst.total:
        worst = phase
        scores = jax.eval_shape(
            lambda *a, tdef=tdef: p.score(a[0], tdef, a[1], a[2], geometry)[0],
            compute, tparams, batch)
    done("scoring", worst)
  ubatch = {k: arr(v.shape, v.dtype) for k, v in p.update_inputs(batch, scores).items()}
  done("update", _compile(
      p.update, [state, ubatch, key, geometry.micro, geometry.packed], teacher_bytes,
      _named_leaves(state.params, "arg params/") + _named_leaves(state.opt_state,
                                                                 "arg opt_state/")))
  return phases


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _size(x: float) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:8.2f} {unit}"
  return f"{x:8.0f} B "


def fits(phases: dict[str, Phase], budget: float, headroom: float = HEADROOM) -> bool:
  """Whether every phase's per-device total leaves `headroom` of `budget` bytes free."""
  return all(p.total <= (1.0 - headroom) * budget for p in phases.values())


def table(phases: dict[str, Phase]) -> str:
  """The plan as a table: one row per phase, bytes per device."""
  lines = [f"{'phase':<9}{'args':>12}{'outputs':>12}{'temp':>12}{'resident':>12}{'total':>12}"
           f"{'TFLOP/dev':>11}{'compile':>9}"]
  for n, p in phases.items():
    lines.append(f"{n:<9}{_size(p.args):>12}{_size(p.outputs - p.alias):>12}"
                 f"{_size(p.temp):>12}{_size(p.resident):>12}{_size(p.total):>12}"
                 f"{p.flops / 1e12:11.2f}{p.compile_s:8.1f}s")
  lines.append("(per device; outputs exclude those written into donated arguments; resident = "
               "what other phases keep on the device meanwhile; FLOPs count each loop body once)")
  return "\n".join(lines)


def verdict(phases: dict[str, Phase], budget: float, name: str = "",
            headroom: float = HEADROOM, *, buffers: bool = True) -> str:
  """Whether the plan fits `budget` bytes per device; with `buffers`, the largest buffers of each
  phase that does not (arguments by name, the program's own arrays by HLO instruction, what
  stays resident)."""
  usable = (1.0 - headroom) * budget
  label = f"{name} ({_size(budget).strip()} per device, {usable / budget:.0%} usable)"
  over = [n for n, p in phases.items() if p.total > usable]
  if not over:
    worst = max(phases, key=lambda n: phases[n].total)
    return f"fits {label}: largest total {_size(phases[worst].total).strip()} ({worst})"
  lines = [f"does not fit {label}: " + ", ".join(
      f"{n} {_size(phases[n].total).strip()}" for n in over)]
  if buffers:
    lines += [largest_buffers(n, phases[n]) for n in over]
  return "\n".join(lines)


def largest_buffers(name: str, phase: Phase) -> str:
  """A phase's largest per-device buffers, one a line."""
  return "\n".join([f"largest buffers of {name}:"] +
                   [f"  {_size(size)}  {what}" for what, size in phase.largest])


def check_run(p, teachers: Sequence[tuple[Any, Any]], *,
              log: Callable[[str], None] = print) -> dict[str, Phase]:
  """The trainer's start-up check: plans the run's programs `p` against its accelerator.

  Returns:
    The phases. Raises DoesNotFit (with the report) when a phase exceeds the accelerator.
  """
  from opd_jax import settings  # pylint: disable=import-outside-toplevel
  s, mesh = p.settings, p.mesh
  budget = settings.memory_budget(s.mesh.accelerator, "mesh.accelerator")
  phases = plan_run(p, teachers)
  text = table(phases) + "\n" + verdict(phases, budget, s.mesh.accelerator)
  if not fits(phases, budget):
    raise DoesNotFit(f"config.mesh.accelerator={s.mesh.accelerator!r}: this run cannot fit "
                     f"(plan on mesh {dict(mesh.shape)}):\n{text}\nShrink the batch or the "
                     "lengths, add devices, or set config.mesh.accelerator='' to skip the check")
  log(f"memory plan on mesh {dict(mesh.shape)}:\n{text}")
  return phases


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def architecture(source, plan_arch: str, field: str, vocab: int | None):
  """The ModelConfig a model is planned with, in its parameters' dtype.

  Args:
    source: its `settings.ModelSource`.
    plan_arch: the config's `<field>.plan_arch`: used while `source.path` is "".
    field: the model's config name ("model", "teacher", "tasks[1].teacher") for messages.
    vocab: the vocabulary a random shape with vocab_size 0 takes (None: none known).
  """
  # pylint: disable=import-outside-toplevel
  from opd_jax import models, programs
  dtype = source.precision.param_dtype
  if source.path or not plan_arch:
    if not source.path and not dict(source.random)["vocab_size"] and not vocab:
      raise ValueError(f"config.{field}: a random shape with vocab_size=0 takes the tokenizer's "
                       f"size, which the plan does not read; set config.{field}.random."
                       f"vocab_size or config.{field}.plan_arch")
    return programs.model_config_of(source, vocab or 0)
  if plan_arch.lower() in ARCHITECTURES:
    hf = ARCHITECTURES[plan_arch.lower()]
  else:
    path = pathlib.Path(plan_arch)
    if path.is_dir():
      path = path / "config.json"
    if not path.is_file():
      raise ValueError(f"config.{field}.plan_arch={plan_arch!r} is neither a built-in "
                       f"architecture ({', '.join(ARCHITECTURES)}) nor a config.json file (or its "
                       "folder)")
    hf = json.loads(path.read_text())
  # The run's own choices (remat, attention) apply to a planned architecture as to a loaded one.
  return source.apply_runtime(models.config_from_hf(hf, dtype=dtype))


def plan_config(config, *, log: Callable[[str], None] = print) -> dict[str, Phase]:
  """Plans an experiment config on every present device (the mesh from `config.mesh`)."""
  # pylint: disable=import-outside-toplevel
  from opd_jax import settings
  run = config.copy_and_resolve_references()
  # The settings check wants a workdir and datasets; the plan writes and reads nothing.
  run.workdir = run.workdir or "unused-by-the-plan"
  for task in run.tasks:
    task.data.dataset = task.data.dataset or "unused-by-the-plan"
  s = settings.TrainSettings.from_config(run)
  mesh = s.mesh.make()
  fields = ([(t.teacher, f"tasks[{i}].teacher") for i, t in enumerate(run.tasks)] if run.tasks
            else [(run.teacher, "teacher")])
  student = architecture(s.model, run.model.plan_arch, "model", None)
  teachers = [architecture(t.teacher, c.plan_arch, name, student.vocab_size)
              for t, (c, name) in zip(s.tasks, fields)]
  vocab = min([student.vocab_size] + [t.vocab_size for t in teachers])
  log(f"mesh {dict(mesh.shape)}; student {_describe(student, s.model.precision)}")
  for (_, name), t in zip(fields, teachers):
    log(f"{name}: {_describe(t, None)}")
  log(f"rows: {s.data.prompts_per_step} prompts x {s.rollout.num_samples} samples = "
      f"{s.rollouts_per_step} rollouts; prompt {s.data.max_prompt_len}, response "
      f"{s.rollout.max_new_tokens}; mini-batch {s.opt.minibatch_size}; estimator "
      f"{s.loss.estimator}, K {s.loss.k}")
  from opd_jax import programs
  return plan_run(programs.build(s, student, vocab, mesh),
                  [abstract_model(t, mesh) for t in teachers], log=log)


def _describe(config, precision) -> str:
  dtypes = (f"parameters {precision.param_dtype}, compute {precision.compute_dtype}"
            if precision is not None else config.dtype)
  return (f"{config.model_type} {config.num_params / 1e9:.2f}B parameters ({dtypes}): "
          f"{config.num_layers} layers, width {config.hidden_size}, MLP "
          f"{config.intermediate_size}, heads {config.num_heads}/{config.num_kv_heads}, "
          f"vocabulary {config.vocab_size}")


def main(config, *, devices: int, accelerators: Sequence[str] = (),
         headroom: float = HEADROOM, log: Callable[[str], None] = print) -> dict:
  """Plans `config` on `devices` devices, prints the report and returns its JSON summary."""
  import jax  # pylint: disable=import-outside-toplevel

  from opd_jax import settings  # pylint: disable=import-outside-toplevel
  if len(jax.devices()) != devices:
    raise ValueError(f"--devices={devices} but {len(jax.devices())} devices are present; run "
                     "`python -m opd_jax.plan` (it fakes the CPU devices before JAX starts)")
  names = list(accelerators) or list(settings.ACCELERATORS)
  budgets = {n: settings.memory_budget(n, "accelerator") for n in names}
  t0 = time.perf_counter()
  phases = plan_config(config, log=log)
  log(table(phases))
  for n, b in budgets.items():
    log(verdict(phases, b, n, headroom, buffers=False))
  tightest = min(budgets.values())
  for n, p in phases.items():
    if p.total > (1.0 - headroom) * tightest:
      log(largest_buffers(n, p))
  log(f"planned in {time.perf_counter() - t0:.1f} s")
  out = {"phases": {n: p.summary() for n, p in phases.items()}, "devices": devices,
         "fits": {n: fits(phases, b, headroom) for n, b in budgets.items()}}
  log(json.dumps(out))
  return out


def parse_devices(argv: Sequence[str], default: int = 8) -> int:
  """The value of --devices in `argv` (`--devices=N` or `--devices N`), else `default`."""
  text = cli.flag_value(argv, "devices")
  if text is None:
    return default
  if not text.isdigit() or int(text) < 1:
    raise SystemExit(f"--devices={text!r} is not accepted; give a positive int")
  return int(text)


def _cli() -> None:
  # The fake devices must exist before JAX initialises its CPU backend: parse --devices by hand,
  # set the flags, and only then import JAX (through absl's flags and the package).
  devices = parse_devices(sys.argv[1:])
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={devices}").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  # pylint: disable=import-outside-toplevel
  from absl import app, flags
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file(
      "config", None, "Experiment config file exposing get_config(); ':arg' is passed to it.")
  flags.DEFINE_integer("devices", 8, "Fake CPU devices to compile for (the run's device count).")
  accel = flags.DEFINE_list("accelerator", [], "Accelerators to check (default: all of "
                            "h100, h200, tpu_v5p, tpu_v5e), or sizes such as 40GB.")
  head = flags.DEFINE_float("headroom", HEADROOM, "Fraction of memory kept free.")

  def run(argv):
    cli.require_config(argv, config)
    if flags.FLAGS.devices != devices:   # absl read a form the scan above did not
      raise app.UsageError(f"--devices={flags.FLAGS.devices} was read after JAX started with "
                           f"{devices} devices; give it as --devices=N or --devices N")
    main(config.value, devices=devices, accelerators=accel.value, headroom=head.value)

  from opd_jax import cli
  cli.run_main(run)


if __name__ == "__main__":
  _cli()
