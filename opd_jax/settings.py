"""The trainer's config boundary: a ConfigDict is validated here and frozen into dataclasses."""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from opd_jax import configs, estimators, packing
from opd_jax.errors import ConfigError, closest
from opd_jax.models.hf_io import CheckpointError, check_folder
from opd_jax.models.config import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES, ModelConfig

LSM_SUPPORTS = ("teacher", "teacher+sampled")
TAILS = ("none", "ema_pg")
PACKING = packing.MODES
SCHEDULES = ("constant", "cosine")
DTYPES = ("float32", "bfloat16")
LONG_PROMPTS = ("drop", "truncate", "error")   # opd_jax.data.registry.LONG_PROMPTS
WANDB_MODES = ("offline", "online")


def _fail(name: str, value: Any, accepted: str) -> None:
  raise ConfigError(f"config.{name}={value!r} is not accepted; {accepted}")


def plain(value: Any) -> Any:
  """A ConfigDict (also inside lists and tuples, as `to_dict` leaves them) as plain dicts."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(plain(v) for v in value)
  return value


def check_keys(config: Mapping, defaults: Mapping, prefix: str = "") -> None:
  """Raises ConfigError for keys absent from `defaults` or values of another type."""
  for key, value in config.items():
    name = f"{prefix}{key}"
    if key not in defaults:
      raise ConfigError(f"config.{name} is not a setting of this runner; "
                        f"{closest(str(key), defaults)}")
    default = defaults[key]
    if isinstance(default, Mapping):
      if not isinstance(value, Mapping):
        _fail(name, value, "expected a group of settings (a ConfigDict)")
      check_keys(value, default, name + ".")
    elif name == "tasks":
      for i, task in enumerate(value):
        check_keys(task, plain(configs.task_fields()), f"tasks[{i}].")
    elif default is not None and not _same_kind(value, default):
      _fail(name, value, f"expected a {type(default).__name__} like the default {default!r}")


def _same_kind(value: Any, default: Any) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


@dataclasses.dataclass(frozen=True)
class Precision:
  """The mixed-precision policy of one model (docs/design.md, "Precision").

  Parameters (and, for the student, the AdamW moments) are stored in `param_dtype`; matrix
  products and activations run in `compute_dtype` on a copy cast from them; logits, log-probs and
  losses are float32 whatever both are. Gradients flow through the cast back to the parameters.
  """
  param_dtype: str = "float32"
  compute_dtype: str = "float32"

  def __post_init__(self):
    for field in ("param_dtype", "compute_dtype"):
      if getattr(self, field) not in DTYPES:
        raise ConfigError(f"Precision.{field}={getattr(self, field)!r} is not accepted; "
                          f"accepted: {', '.join(DTYPES)}")

  @property
  def mixed(self) -> bool:
    """Whether computing needs a cast copy of the parameters."""
    return self.param_dtype != self.compute_dtype


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Where a model's weights come from (a local HF folder, or random weights of a shape)."""
  path: str
  tokenizer: str
  dtype: str                            # compute dtype
  random: tuple[tuple[str, Any], ...]   # the random-init shape, as sorted (name, value) pairs
  param_dtype: str = ""                 # storage dtype of parameters ("" = dtype)
  remat: str = "none"                   # rematerialisation policy of each layer (ModelConfig)
  attention: str = "auto"               # ModelConfig.attention_impl
  attention_block: int = 512            # ModelConfig.attention_block_q and _kv

  @property
  def precision(self) -> Precision:
    return Precision(self.param_dtype or self.dtype, self.dtype)

  def apply_runtime(self, config: ModelConfig) -> ModelConfig:
    """`config` with this source's runtime choices (remat, attention; never in config.json)."""
    return dataclasses.replace(config, remat=self.remat, attention_impl=self.attention,
                               attention_block_q=self.attention_block,
                               attention_block_kv=self.attention_block)

  @classmethod
  def from_config(cls, m: Mapping, name: str, *, trained: bool = True) -> "ModelSource":
    """Checks one model's settings; `trained` is False for a teacher (no optimizer state)."""
    if m["dtype"] not in DTYPES:
      _fail(f"{name}.dtype", m["dtype"], f"accepted: {', '.join(DTYPES)}")
    param_dtype = m.get("param_dtype", "")
    if param_dtype not in ("",) + DTYPES:
      _fail(f"{name}.param_dtype", param_dtype, f"accepted: '' (= {name}.dtype), "
            f"{', '.join(DTYPES)}")
    if not trained and param_dtype not in ("", m["dtype"]):
      _fail(f"{name}.param_dtype", param_dtype, f"a teacher is never updated, so it is stored in "
            f"the dtype it computes in: leave it '' and set {name}.dtype")
    if m["remat"] not in REMAT_POLICIES:
      _fail(f"{name}.remat", m["remat"], f"accepted: {', '.join(REMAT_POLICIES)}")
    if m["attention"] not in ATTENTION_IMPLEMENTATIONS:
      _fail(f"{name}.attention", m["attention"],
            f"accepted: {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    _positive(m, "attention_block", f"{name}.")
    if m["path"]:
      try:
        check_folder(m["path"])
      except CheckpointError as e:
        raise CheckpointError(f"config.{name}.path={m['path']!r}: {e}; set --config.{name}.path "
                              "to a local Hugging Face folder (config.json + safetensors; "
                              "nothing is downloaded)") from None
    if m["tokenizer"] and not os.path.isdir(m["tokenizer"]):
      _fail(f"{name}.tokenizer", m["tokenizer"], "expected an existing local folder "
            "(Hugging Face tokenizer files); nothing is downloaded")
    return cls(m["path"], m["tokenizer"] or m["path"], m["dtype"],
               tuple(sorted(dict(m["random"]).items())), param_dtype or m["dtype"], m["remat"],
               m["attention"], m["attention_block"])


@dataclasses.dataclass(frozen=True)
class DatasetSource:
  """A registered dataset and the local files it is built from."""
  dataset: str
  source: str
  data_dir: str
  split: str

  @classmethod
  def from_config(cls, d: Mapping, name: str) -> "DatasetSource":
    if not d["dataset"]:
      _fail(f"{name}.dataset", d["dataset"], "name a registered dataset (e.g. tiny_arith)")
    if d["source"] and not os.path.exists(d["source"]):
      _fail(f"{name}.source", d["source"], "expected an existing local file or folder")
    return cls(d["dataset"], d["source"], d["data_dir"], d["split"])


@dataclasses.dataclass(frozen=True)
class EnvironmentSource:
  """An environment task's environment and episode limits (see opd_jax.environments)."""
  environment: str
  config: str
  max_turns: int
  turn_tokens: int
  episode_tokens: int          # 0 = rollout.max_new_tokens
  system_prompt: str

  @classmethod
  def from_config(cls, t: Mapping, name: str) -> "EnvironmentSource":
    from opd_jax import environments  # pylint: disable=import-outside-toplevel
    try:
      environments.check_name(t["environment"])
    except ValueError as e:
      raise ConfigError(f"config.{name}.environment={t['environment']!r} is not accepted: "
                        f"{e}") from None
    if t["data"]["dataset"]:
      _fail(f"{name}.data.dataset", t["data"]["dataset"], f"a task draws either dataset "
            f"prompts or environment episodes; {name}.environment is set, so leave the dataset "
            "empty")
    for key in ("max_turns", "turn_tokens"):
      _positive(t, key, f"{name}.")
    if t["episode_tokens"] < 0:
      _fail(f"{name}.episode_tokens", t["episode_tokens"], "accepted: >= 0 (0 = "
            "rollout.max_new_tokens)")
    return cls(t["environment"], t["environment_config"], t["max_turns"], t["turn_tokens"],
               t["episode_tokens"], t["system_prompt"])


@dataclasses.dataclass(frozen=True)
class Task:
  """One task: dataset prompts (`data`) or environment episodes (`env`), and its teacher."""
  name: str
  data: DatasetSource | None
  teacher: ModelSource
  env: EnvironmentSource | None = None


def _from_group(cls, group: Mapping, **derived):
  """One group dataclass from its ConfigDict group: every field of `cls` by keyword, from the
  group's key of the same name (`derived` overrides: values computed from several keys). Floats
  given as ints become floats; a field marked `zero_is_none` maps 0 to None ("off")."""
  hints = typing.get_type_hints(cls)
  values = {}
  for f in dataclasses.fields(cls):
    if f.name in derived:
      values[f.name] = derived[f.name]
      continue
    value = group[f.name]
    if f.metadata.get("zero_is_none") and value == 0:
      value = None
    elif hints[f.name] in (float, float | None) and isinstance(value, int) \
        and not isinstance(value, bool):
      value = float(value)
    elif isinstance(value, list):
      value = tuple(value)
    values[f.name] = value
  return cls(**values)


def _off_when_zero():
  return dataclasses.field(metadata={"zero_is_none": True})


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """config.data (less the dataset's own DatasetSource fields)."""
  prompts_per_step: int
  max_prompt_len: int
  long_prompts: str
  chat_template: bool
  template: str
  retokenize_max_fraction: float

  @classmethod
  def from_config(cls, d: Mapping) -> "DataSettings":
    for key in ("prompts_per_step", "max_prompt_len"):
      _positive(d, key, "data.")
    if d["long_prompts"] not in LONG_PROMPTS:
      _fail("data.long_prompts", d["long_prompts"], f"accepted: {', '.join(LONG_PROMPTS)}")
    if "{prompt}" not in d["template"]:
      _fail("data.template", d["template"], "it must hold '{prompt}', where a row's prompt goes")
    if not 0.0 <= d["retokenize_max_fraction"] <= 1.0:
      _fail("data.retokenize_max_fraction", d["retokenize_max_fraction"], "accepted: [0, 1]")
    return _from_group(cls, d)


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
  """config.rollout."""
  num_samples: int
  max_new_tokens: int
  temperature: float
  top_p: float
  top_k: int
  stop_strings: tuple[str, ...]
  banned_strings: tuple[str, ...]
  compact: bool

  @classmethod
  def from_config(cls, r: Mapping) -> "RolloutSettings":
    for key in ("num_samples", "max_new_tokens"):
      _positive(r, key, "rollout.")
    if not 0.0 < r["top_p"] <= 1.0:
      _fail("rollout.top_p", r["top_p"], "accepted: a float in (0, 1]")
    if r["temperature"] < 0:
      _fail("rollout.temperature", r["temperature"], "accepted: >= 0 (0 = greedy)")
    if r["top_k"] < 0:
      _fail("rollout.top_k", r["top_k"], "accepted: an int >= 0 (0 = off)")
    return _from_group(cls, r)


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """config.loss: static settings of the update's loss (hashable: part of the compiled
  program's key). The clips are None when off (0 in the config)."""
  estimator: str
  k: int
  support: str
  renormalize: bool
  tail: str
  tail_weight_clip: float | None = _off_when_zero()
  gamma: float
  ppo_clip: float | None = _off_when_zero()
  advantage_clip: float | None = _off_when_zero()
  chunk_tokens: int
  chunk_vocab: int
  # Special tokens masked at their first occurrence per response (the trainer's batch masks).
  mask_strings: tuple[str, ...] = ()

  @classmethod
  def from_config(cls, lo: Mapping) -> "LossSettings":
    if lo["estimator"] not in estimators.names():
      _fail("loss.estimator", lo["estimator"], f"accepted: {', '.join(estimators.names())}")
    _positive(lo, "k", "loss.")
    if lo["support"] not in LSM_SUPPORTS:
      _fail("loss.support", lo["support"], f"accepted by the fused trainer loss: "
            f"{', '.join(LSM_SUPPORTS)} (student supports need the teacher's full logits: use "
            "opd_jax.losses.topk_reverse_kl on materialised logits)")
    if lo["tail"] not in TAILS:
      _fail("loss.tail", lo["tail"], f"accepted: {', '.join(TAILS)}")
    if not 0.0 <= lo["gamma"] <= 1.0:
      _fail("loss.gamma", lo["gamma"], "accepted: a float in [0, 1]")
    if not 0.0 <= lo["ppo_clip"] < 1.0:
      _fail("loss.ppo_clip", lo["ppo_clip"], "accepted: [0, 1) (0 = no clipping)")
    for key in ("tail_weight_clip", "advantage_clip", "chunk_tokens", "chunk_vocab"):
      if lo[key] < 0:
        _fail(f"loss.{key}", lo[key], "accepted: >= 0")
    return _from_group(cls, lo)


@dataclasses.dataclass(frozen=True)
class OptSettings:
  """config.opt (the grad clip None when off)."""
  minibatch_size: int
  lr: float
  warmup_steps: int
  schedule: str
  b1: float
  b2: float
  eps: float
  weight_decay: float
  grad_clip: float | None = _off_when_zero()
  microbatch_size: int = 0     # rows per forward/backward pass (0: the whole mini-batch)
  packing: str = "pack"        # off | trim | pack (opd_jax.packing)
  microbatch_tokens: int = 0   # packed rows: tokens per device per micro-batch (0: derived)

  @property
  def microbatches(self) -> int:
    """Forward/backward passes per optimizer step, their gradients summed before the step."""
    return self.minibatch_size // self.microbatch_size if self.microbatch_size else 1

  @classmethod
  def from_config(cls, o: Mapping, rollouts: int, counted: str) -> "OptSettings":
    """`rollouts` per step, and how they are counted (for the mini-batch message)."""
    if o["schedule"] not in SCHEDULES:
      _fail("opt.schedule", o["schedule"], f"accepted: {', '.join(SCHEDULES)}")
    _positive(o, "minibatch_size", "opt.")
    if o["lr"] <= 0:
      _fail("opt.lr", o["lr"], "accepted: > 0")
    if rollouts % o["minibatch_size"]:
      _fail("opt.minibatch_size", o["minibatch_size"],
            f"the {rollouts} rollouts per step ({counted}) must split into whole mini-batches")
    if o["microbatch_size"] < 0 or (o["microbatch_size"] and
                                    o["minibatch_size"] % o["microbatch_size"]):
      _fail("opt.microbatch_size", o["microbatch_size"],
            f"accepted: 0 (the whole mini-batch) or a divisor of opt.minibatch_size="
            f"{o['minibatch_size']}")
    if o["packing"] not in PACKING:
      _fail("opt.packing", o["packing"], f"accepted: {', '.join(PACKING)}")
    if not isinstance(o["microbatch_tokens"], int) or o["microbatch_tokens"] < 0:
      _fail("opt.microbatch_tokens", o["microbatch_tokens"],
            "accepted: 0 (the unpacked micro-batch's tokens) or a positive int")
    return _from_group(cls, o)


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  """config.mesh."""
  data: int
  fsdp: int
  tensor: int
  distributed: bool
  accelerator: str          # memory plan checked at start-up against this ("" = no check)

  @property
  def shape(self) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes for `sharding.make_mesh`."""
    return self.data, self.fsdp, self.tensor

  def make(self):
    """The mesh over every device; a ConfigError naming the `config.mesh` keys when the sizes
    do not fit the devices present (checked here: the device count is known only now)."""
    from opd_jax import sharding  # pylint: disable=import-outside-toplevel
    try:
      return sharding.make_mesh(*self.shape)
    except ValueError as e:
      raise ConfigError(f"config.mesh (data={self.data}, fsdp={self.fsdp}, tensor="
                        f"{self.tensor}): {e}; set --config.mesh.data, --config.mesh.fsdp, "
                        "--config.mesh.tensor") from None

  @classmethod
  def from_config(cls, m: Mapping) -> "MeshSettings":
    if m["accelerator"]:
      memory_budget(m["accelerator"], "mesh.accelerator")
    return _from_group(cls, m)


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  """config.checkpoint (`init_step` None: the init folder's own step, else its latest)."""
  every: int
  keep: int
  async_save: bool
  init: str
  init_step: int | None

  @classmethod
  def from_config(cls, ck: Mapping) -> "CheckpointSettings":
    for key in ("every", "keep"):
      _positive(ck, key, "checkpoint.")
    if ck["init"] and not os.path.isdir(ck["init"]):
      _fail("checkpoint.init", ck["init"], "expected an existing folder: a run's workdir, its "
            "checkpoints/ folder or one step's folder")
    if not isinstance(ck["init_step"], int) or ck["init_step"] < -1:
      _fail("checkpoint.init_step", ck["init_step"], "accepted: -1 (the latest, or the step "
            "of a step folder) or a step >= 0")
    return _from_group(cls, ck, init_step=None if ck["init_step"] < 0 else ck["init_step"])


@dataclasses.dataclass(frozen=True)
class LogSettings:
  """config.log."""
  every: int
  samples_every: int
  samples_count: int
  tensorboard: bool
  plot: bool
  wandb: str                # W&B project ("" = none)
  wandb_mode: str
  diagnostics_every: int
  diagnostics_positions: int

  @classmethod
  def from_config(cls, lg: Mapping) -> "LogSettings":
    _positive(lg, "every", "log.")
    if lg["wandb_mode"] not in WANDB_MODES:
      _fail("log.wandb_mode", lg["wandb_mode"], f"accepted: {', '.join(WANDB_MODES)}")
    for key in ("samples_every", "samples_count", "diagnostics_every", "diagnostics_positions"):
      if lg[key] < 0:
        _fail(f"log.{key}", lg[key], "accepted: an int >= 0")
    return _from_group(cls, lg)


# Config groups -> the dataclasses that read them (every key of a group is read by one of them;
# tests/test_settings.py checks that against configs.opd(), so the two never drift apart).
GROUPS = {"data": (DataSettings, DatasetSource), "rollout": (RolloutSettings,),
          "loss": (LossSettings,), "opt": (OptSettings,), "mesh": (MeshSettings,),
          "checkpoint": (CheckpointSettings,), "log": (LogSettings,)}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """Everything the trainer needs, checked; built once from the ConfigDict by from_config."""
  seed: int
  workdir: str
  steps: int
  model: ModelSource
  tasks: tuple[Task, ...]
  data: DataSettings
  rollout: RolloutSettings
  loss: LossSettings
  opt: OptSettings
  mesh: MeshSettings
  checkpoint: CheckpointSettings
  log: LogSettings
  eval_every: int

  @property
  def rollouts_per_step(self) -> int:
    return self.data.prompts_per_step * self.rollout.num_samples

  @property
  def minibatches(self) -> int:
    return self.rollouts_per_step // self.opt.minibatch_size

  @property
  def score_parts(self) -> int:
    """Parts the scoring pass splits a batch into: one per micro-batch (as the update's)."""
    return self.minibatches * self.opt.microbatches

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "TrainSettings":
    """Validates every setting (one ConfigError naming the first bad one) and freezes them."""
    c = plain(config)
    check_keys(c, plain(configs.opd()))
    if not c["workdir"]:
      _fail("workdir", c["workdir"], "the trainer needs a folder for checkpoints and metrics "
            "(--config.workdir=DIR)")
    _positive(c, "steps")
    tasks = tuple(_task(t, i) for i, t in enumerate(c["tasks"]))
    if not tasks:
      tasks = (Task(c["data"]["dataset"], DatasetSource.from_config(c["data"], "data"),
                    ModelSource.from_config(c["teacher"], "teacher", trained=False)),)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
      _fail("tasks", names, "task names (or datasets) must be distinct")
    data = DataSettings.from_config(c["data"])
    rollout = RolloutSettings.from_config(c["rollout"])
    loss = LossSettings.from_config(c["loss"])
    opt = OptSettings.from_config(
        c["opt"], data.prompts_per_step * rollout.num_samples,
        f"data.prompts_per_step={data.prompts_per_step} x rollout.num_samples="
        f"{rollout.num_samples}")
    mesh = MeshSettings.from_config(c["mesh"])
    checkpoint = CheckpointSettings.from_config(c["checkpoint"])
    log = LogSettings.from_config(c["log"])
    if c["eval"]["every"] < 0:
      _fail("eval.every", c["eval"]["every"], "accepted: an int >= 0")
    return cls(seed=c["seed"], workdir=c["workdir"], steps=c["steps"],
               model=ModelSource.from_config(c["model"], "model"), tasks=tasks, data=data,
               rollout=rollout, loss=loss, opt=opt, mesh=mesh, checkpoint=checkpoint, log=log,
               eval_every=c["eval"]["every"])


def _task(t: Mapping, i: int) -> Task:
  """tasks[i]: an environment task when its environment is set, else a dataset task."""
  t = {**plain(configs.task_fields()), **t}
  if t["environment"]:
    env = EnvironmentSource.from_config(t, f"tasks[{i}]")
    return Task(t["name"] or t["environment"], None,
                ModelSource.from_config(t["teacher"], f"tasks[{i}].teacher", trained=False), env)
  if not t["data"]["dataset"]:
    _fail(f"tasks[{i}].data.dataset", t["data"]["dataset"], "name a registered dataset (e.g. "
          f"tiny_arith), or set tasks[{i}].environment for an environment task")
  data = DatasetSource.from_config(t["data"], f"tasks[{i}].data")
  return Task(t["name"] or t["data"]["dataset"], data,
              ModelSource.from_config(t["teacher"], f"tasks[{i}].teacher", trained=False))


# Per-device memory of the accelerators the memory plan knows by name (decimal GB, as sold).
ACCELERATORS = {"h100": 80e9, "h200": 141e9, "tpu_v5p": 95e9, "tpu_v5e": 16e9}
_UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


def memory_budget(accelerator: str, name: str = "accelerator") -> float:
  """Bytes per device of an accelerator name (ACCELERATORS) or a size such as "40GB"."""
  key = accelerator.strip()
  if key.lower() in ACCELERATORS:
    return ACCELERATORS[key.lower()]
  unit = key[-2:].upper()
  if unit in _UNITS:
    try:
      value = float(key[:-2])
    except ValueError:
      value = -1.0
    if value > 0:
      return value * _UNITS[unit]
  _fail(name, accelerator, f"accepted: {', '.join(ACCELERATORS)}, or a per-device size such as "
        "'40GB' (units KB, MB, GB, TB)")
  raise AssertionError  # unreachable: _fail raises


def _positive(d: Mapping, key: str, prefix: str = "") -> None:
  if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 1:
    _fail(prefix + key, d[key], "accepted: a positive int")


def token_ids(tokenizer, strings, key: str) -> tuple[int, ...]:
  """`masking.ids_for_strings` for the setting `config.<key>`: a ConfigError naming it when a
  string is not one token of the tokenizer."""
  from opd_jax import masking  # pylint: disable=import-outside-toplevel
  try:
    return tuple(masking.ids_for_strings(tokenizer, strings))
  except ValueError as e:
    raise ConfigError(f"config.{key}={tuple(strings)!r}: {e}; set --config.{key} to tokens of "
                      "the student's tokenizer") from None
