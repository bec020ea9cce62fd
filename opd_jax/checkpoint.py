"""Thin Orbax wrapper: periodic async saves of the train state plus JSON metadata, and restore."""

# Why the v0 `CheckpointManager` API and not `orbax.checkpoint.v1`: in orbax-checkpoint 0.12.8 the
# v1 API still lives under `orbax.checkpoint.experimental.v1` (its names and semantics may change
# between releases), while `CheckpointManager` with named items and `args.StandardSave` /
# `args.StandardRestore` / `args.JsonSave` is the documented, stable interface that flax
# examples, maxtext and nanodo use.
#
# Crash safety (checked for 0.12.8 and tested): a step is written into `<step>.orbax-checkpoint-tmp`
# and becomes `<step>` by one atomic rename once every item and every process is done (on GCS,
# where rename is not atomic, Orbax writes a `commit_success.txt` marker instead). Listing steps
# ignores unfinished folders, and `cleanup_tmp_directories=True` deletes leftovers when a
# `Checkpointer` opens the directory. Old steps are deleted only after the new one is final.
#
# Multi-host: every process must construct the `Checkpointer` and call `save`, `restore`,
# `wait` and `close` at the same steps with the same arguments (Orbax places barriers inside
# them; one process skipping a call deadlocks the others). Each process writes the shards it
# holds; process 0 writes `meta` and finalises. The directory must be shared by all processes
# (GCS, NFS, Lustre).

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

PyTree = Any


def _positive_int(name: str, value: Any) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"checkpoint {name}={value!r} is not accepted; give a positive int")
  return int(value)


def _check_step(step: Any) -> int:
  if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
    raise ValueError(f"checkpoint step={step!r} is not accepted; give an int >= 0 (the number "
                     "of completed updates)")
  return int(step)


def _key_name(key: Any) -> str:
  """One path entry as a string, so a namedtuple field and its saved dict key compare equal."""
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat(tree: PyTree) -> dict[tuple[str, ...], Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _describe(path: tuple[str, ...]) -> str:
  return "/".join(path) or "<root>"


class Checkpointer:
  """Keeps the last `keep` checkpoints of (state pytree, JSON meta) under `directory`.

  Each checkpoint is a folder `directory/<step>` with two items: `state` (any pytree of
  `jax.Array`s, possibly sharded over a mesh, and Python scalars) and `meta` (a JSON object:
  data position, config hash, rng info, ...). Saves are asynchronous by default: `save` returns
  once the arrays are copied off the devices (so the caller may donate or overwrite them at
  once) and the files are written by a background thread; `wait` blocks until they are final.
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int = 1, keep: int = 1,
               async_save: bool = True, read_only: bool = False):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: the folder holding one sub-folder per step; local or a GCS `gs://` path.
      save_every: `should_save(step)` is true when `step % save_every == 0`.
      keep: how many of the newest checkpoints to keep; older ones are deleted once a newer one
        is final.
      async_save: write files in a background thread (True) or inside `save` (False).
      read_only: only read (another run's checkpoints): the folder must exist, nothing in it is
        created or cleaned up, and `save` raises.
    """
    self._save_every = _positive_int("save_every", save_every)
    self._keep = _positive_int("keep", keep)
    self._read_only = bool(read_only)
    text = os.fspath(directory)
    if not text:
      raise ValueError("checkpoint directory='' is not accepted; give a folder path")
    if "://" not in text:
      text = os.path.abspath(text)
      if os.path.exists(text) and not os.path.isdir(text):
        raise ValueError(f"checkpoint directory {text!r} exists and is not a folder; give a "
                         "folder path (it is created if missing)")
      if read_only and not os.path.isdir(text):
        raise ValueError(f"checkpoint directory {text!r} does not exist")
    self._directory = epath.Path(text)
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=checkpoint_managers.FixedIntervalPolicy(self._save_every),
        preservation_policy=checkpoint_managers.LatestN(n=self._keep),
        enable_async_checkpointing=bool(async_save),
        # A reader must not delete the unfinished step of a run that is still writing.
        cleanup_tmp_directories=not read_only,
        create=not read_only,
    )
    # Registering both items up front lets a fresh manager read the metadata of old steps.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler = ocp.handlers.StandardCheckpointHandler()
    meta_handler = ocp.handlers.JsonCheckpointHandler()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
      registry.add("state", args, state_handler)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
      registry.add("meta", args, meta_handler)
    try:
      self._manager = ocp.CheckpointManager(self._directory, options=options,
                                            handler_registry=registry)
    except OSError as e:
      raise ValueError(f"checkpoint directory {text!r} cannot be opened or created: {e}") from e
    # The step whose background write may still be running (Orbax lists it at once).
    self._pending: int | None = None

  @property
  def directory(self) -> epath.Path:
    """The checkpoint folder (absolute)."""
    return self._directory

  def all_steps(self) -> list[int]:
    """Steps of all complete checkpoints, ascending.

    Raises the error of a background write that failed (its step is then not listed).
    """
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self.wait()   # finished: returns at once, or raises if the write failed
    steps = sorted(self._manager.all_steps())
    if self._pending is not None:
      steps = [s for s in steps if s != self._pending]
    return steps

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None when there is none.

    A step whose asynchronous write is still in flight is not complete and is not returned.
    """
    steps = self.all_steps()
    return steps[-1] if steps else None

  def should_save(self, step: int) -> bool:
    """True when `step` is a multiple of `save_every`."""
    return _check_step(step) % self._save_every == 0

  def save(self, step: int, state: PyTree, meta: Mapping[str, Any], *,
           force: bool = False) -> bool:
    """Saves `state` and `meta` as checkpoint `step` if `should_save(step)` or `force`.

    Call on every process with the same `step` and `meta`. Asynchronous by default: returns
    once the arrays are on the host; a previous save still in flight is waited for first.

    Args:
      step: the number of completed updates the state reflects.
      state: a pytree of jax.Arrays (any sharding) and Python scalars.
      meta: a JSON-serialisable mapping with string keys (no NaN or infinity).
      force: save even when `step % save_every != 0` (e.g. the end of a run).

    Returns:
      True if a save was started; False if skipped (not a save step, or a checkpoint of this
      step already exists, e.g. the final forced save right after a periodic one).
    """
    step = _check_step(step)
    if self._read_only:
      raise ValueError(f"checkpoint directory {self._directory} was opened read-only")
    if not isinstance(meta, Mapping):
      raise ValueError(f"checkpoint meta must be a mapping with string keys, got "
                       f"{type(meta).__name__}")
    try:
      meta = json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError) as e:
      raise ValueError(f"checkpoint meta for step {step} is not strict JSON ({e}); give str "
                       "keys and str / int / float / bool / None / list / dict values, no "
                       "NaN or infinity (convert numpy and jax scalars with int() / float())"
                       ) from e
    if not (force or self.should_save(step)):
      return False
    existing = self._manager.all_steps()
    if step in existing:
      return False
    if existing and step < max(existing):
      raise ValueError(f"checkpoint step {step} is older than the newest checkpoint "
                       f"{max(existing)} in {self._directory}; resume from the newest step or "
                       "use a fresh directory")
    saved = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        force=True)
    if saved:
      self._pending = step
    return bool(saved)

  def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict]:
    """Reads checkpoint `step` straight into the shardings of `abstract_state`.

    Each process reads only the shards its devices hold (no host copy of the whole state, no
    replication first). Call on every process.

    Args:
      step: a complete checkpoint's step (e.g. `latest_step()`).
      abstract_state: the state's pytree with `jax.ShapeDtypeStruct(shape, dtype,
        sharding=...)` leaves for arrays (for example `jax.eval_shape` of the init function
        jitted with `out_shardings`) and Python scalars where the state had them.

    Returns:
      (state, meta): the state with the structure of `abstract_state`, arrays in its
      shardings; the meta dict saved with it. Raises ValueError naming the checkpoint path
      and every leaf whose path, shape or dtype differs from the checkpoint.
    """
    step = _check_step(step)
    if self._pending == step:
      self.wait()
    steps = self.all_steps()
    path = self._directory / str(step)
    if step not in steps:
      raise ValueError(f"no complete checkpoint of step {step} in {self._directory}; "
                       f"complete steps: {steps or 'none'}")
    self._check_abstract(step, abstract_state, path)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta or {})

  def _check_abstract(self, step: int, abstract_state: PyTree, path: epath.Path) -> None:
    """Compares `abstract_state` with the saved tree's metadata; one error lists all problems."""
    metadata = self._manager.item_metadata(step).get("state")
    if metadata is None:
      raise ValueError(f"checkpoint {path} has no readable 'state' item; it was not written by "
                       "opd_jax.checkpoint.Checkpointer")
    stored = _flat(metadata.tree)
    wanted = _flat(abstract_state)
    problems = []
    for key in sorted(set(stored) - set(wanted)):
      problems.append(f"{_describe(key)}: in the checkpoint, missing from abstract_state")
    for key in sorted(set(wanted) - set(stored)):
      problems.append(f"{_describe(key)}: in abstract_state, missing from the checkpoint")
    for key in sorted(set(wanted) & set(stored)):
      want, have = wanted[key], stored[key]
      have_shape = tuple(getattr(have, "shape", ()) or ())
      if isinstance(want, (bool, int, float, np.number)):
        if have_shape:
          problems.append(f"{_describe(key)}: abstract_state has a Python scalar, the "
                          f"checkpoint an array of shape {have_shape}")
        continue
      if not isinstance(want, jax.ShapeDtypeStruct):
        problems.append(f"{_describe(key)}: abstract_state leaf is {type(want).__name__}; "
                        "give jax.ShapeDtypeStruct(shape, dtype, sharding=...) or a Python "
                        "scalar")
        continue
      if want.sharding is None:
        problems.append(f"{_describe(key)}: abstract_state leaf has no sharding; give "
                        "jax.ShapeDtypeStruct(..., sharding=NamedSharding(mesh, spec))")
      if tuple(want.shape) != have_shape:
        problems.append(f"{_describe(key)}: shape {tuple(want.shape)} in abstract_state, "
                        f"{have_shape} in the checkpoint")
      have_dtype = getattr(have, "dtype", None)
      if have_dtype is not None and np.dtype(want.dtype) != np.dtype(have_dtype):
        problems.append(f"{_describe(key)}: dtype {np.dtype(want.dtype)} in abstract_state, "
                        f"{np.dtype(have_dtype)} in the checkpoint")
    if problems:
      raise ValueError(f"checkpoint {path} does not match abstract_state:\n  " +
                       "\n  ".join(problems))

  def wait(self) -> None:
    """Blocks until every started save is final on disk; raises if a background write failed."""
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    finally:
      self._pending = None   # a failed step is dropped from Orbax's list when this raises

  def close(self) -> None:
    """Waits for pending saves and deletions, then releases Orbax's threads."""
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _is_step_folder(path: pathlib.Path) -> bool:
  return path.name.isdigit() and (path / "state").is_dir()


def locate(path: str | os.PathLike, step: int | None = None, *, name: str = "checkpoint"
           ) -> tuple[pathlib.Path, int | None]:
  """The checkpoints folder and step that `path` names.

  Args:
    path: a trainer workdir (holding `checkpoints/`), its `checkpoints/` folder, or one step's
      folder (`.../checkpoints/<step>`).
    step: the step wanted; None = the step folder's own, else the latest (returned as None).
    name: how the setting is called in errors (e.g. "config.checkpoint.init").

  Returns:
    (checkpoints folder, step or None for "the latest").
  """
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise ValueError(f"{name}={str(path)!r} is not an existing folder; give a run's workdir, "
                     "its checkpoints/ folder or one step's folder")
  if (folder / "checkpoints").is_dir():
    return folder / "checkpoints", step
  if _is_step_folder(folder):
    own = int(folder.name)
    if step is not None and step != own:
      raise ValueError(f"{name}={str(path)!r} is the folder of step {own}, but step {step} was "
                       "asked for; give the run's folder to pick another step")
    return folder.parent, own
  if any(_is_step_folder(p) for p in folder.iterdir() if p.is_dir()):
    return folder, step
  raise ValueError(f"{name}={str(path)!r} holds no checkpoint: expected a run's workdir (with "
                   "checkpoints/), its checkpoints/ folder (numbered step folders) or one step's "
                   "folder")


def restore(path: str | os.PathLike, abstract_state: PyTree, *, step: int | None = None,
            name: str = "checkpoint") -> tuple[PyTree, dict, int]:
  """Reads a complete checkpoint of another run without writing anything there.

  Args:
    path: what `locate` accepts.
    abstract_state: as for `Checkpointer.restore`.
    step: the step to read (None: the step folder's own, else the latest complete one).
    name: how the setting is called in errors.

  Returns:
    (state, meta, step).
  """
  directory, step = locate(path, step, name=name)
  with Checkpointer(directory, read_only=True) as reader:
    chosen = reader.latest_step() if step is None else step
    if chosen is None:
      raise ValueError(f"{name}={str(path)!r}: {directory} holds no complete checkpoint")
    state, meta = reader.restore(chosen, abstract_state)
  return state, meta, chosen
