"""Hugging Face checkpoint folders <-> Decoder: streamed safetensors loading, saving, tokenizer."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from opd_jax.errors import UserError
from opd_jax.models.config import SUPPORTED_DTYPES, ModelConfig, config_from_hf, config_to_hf
from opd_jax.models.decoder import Decoder
from opd_jax.models.partitioning import is_stacked, param_partition_spec
from opd_jax.sharding import check_mesh

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHOWN = 5  # names listed in an error message


class CheckpointError(UserError):
  """A checkpoint folder that cannot be loaded: the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class _Target:
  path: tuple            # flat NNX path of the parameter
  variable: Any          # its abstract nnx.Variable
  transpose: bool        # torch Linear weights are [out, in]; our kernels are [in, out]
  names: tuple[str, ...]  # its checkpoint tensor: one name, or one per layer when stacked

  @property
  def stacked(self) -> bool:
    return is_stacked(self.path)

  @property
  def hf_shape(self) -> tuple[int, ...]:
    """The shape of (each of) its checkpoint tensor(s)."""
    shape = tuple(self.variable.shape)[1 if self.stacked else 0:]
    return shape[::-1] if self.transpose else shape


def hf_tensor_name(path: tuple, layer: int | None = None) -> tuple[str, bool]:
  """transformers' tensor name of the parameter at NNX `path`, and whether it is transposed.

  Args:
    path: the parameter's flat NNX path, e.g. ("layers", "self_attn", "q_proj", "kernel").
    layer: for a stacked layer parameter (path starting with "layers"), which layer's slice:
      ("layers", "self_attn", "q_proj", "kernel") with layer=3 is
      model.layers.3.self_attn.q_proj.weight. Must be None for any other parameter.

  Returns:
    (tensor name, whether the checkpoint stores the transpose of our array / slice).
  """
  names = [str(p) for p in path]
  if is_stacked(path) != (layer is not None):
    raise ValueError(f"hf_tensor_name: layer={layer!r} for the parameter {'.'.join(names)}; "
                     "accepted: a layer index exactly for the stacked layer parameters "
                     "(path 'layers', ...), None otherwise")
  if is_stacked(path):
    names = ["layers", str(int(layer))] + names[1:]
  if names[0] == "lm_head":
    return "lm_head.weight", True
  leaf = names[-1]
  suffix = "bias" if leaf == "bias" else "weight"
  return "model." + ".".join(names[:-1] + [suffix]), leaf == "kernel"


def _targets(abstract, num_layers: int) -> list[_Target]:
  targets = []
  for p, var in nnx.to_flat_state(abstract):
    layers = range(num_layers) if is_stacked(p) else (None,)
    names = [hf_tensor_name(p, layer) for layer in layers]
    targets.append(_Target(p, var, names[0][1], tuple(n for n, _ in names)))
  return targets


def _listing(names) -> str:
  names = sorted(names)
  more = f" (and {len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
  return ", ".join(names[:_SHOWN]) + more


def _dtype_name(dtype) -> str:
  try:
    name = jnp.dtype(dtype).name
  except TypeError as e:
    raise ValueError(f"dtype={dtype!r} is not a dtype; accepted: {SUPPORTED_DTYPES}") from e
  if name not in SUPPORTED_DTYPES:
    raise ValueError(f"dtype={name!r} is not supported; accepted: {SUPPORTED_DTYPES}")
  return name


def _read_config(folder: pathlib.Path, dtype: str) -> ModelConfig:
  config_file = folder / "config.json"
  if not config_file.is_file():
    raise CheckpointError(f"checkpoint folder {str(folder)!r} has no config.json")
  try:
    hf = json.loads(config_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
  try:
    return config_from_hf(hf, dtype=dtype)
  except ValueError as e:
    raise CheckpointError(f"{config_file}: {e}") from e


def check_folder(path) -> None:
  """Raises CheckpointError naming `path` unless it is a folder with a readable config.json and
  safetensors weights (single file, or an index whose files are all present). Reads no tensor:
  a cheap check before models load, so that a run fails at start-up, not minutes in."""
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist or is not a folder")
  _read_config(folder, "float32")
  _tensor_files(folder)


def _tensor_files(folder: pathlib.Path) -> dict[str, list[str]]:
  """File name -> names of the tensors it should hold, from the index or the single file."""
  index_file = folder / INDEX_FILE
  if index_file.is_file():
    try:
      weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index_file} is not a valid safetensors index (needs a "
                            f"'weight_map' object): {e}") from e
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
      files.setdefault(file, []).append(name)
    absent = [f for f in files if not (folder / f).is_file()]
    if absent:
      raise CheckpointError(f"{index_file} refers to missing files: {_listing(absent)}")
    return files
  if (folder / SINGLE_FILE).is_file():
    return {SINGLE_FILE: []}
  found = sorted(p.name for p in folder.glob("*.safetensors"))
  raise CheckpointError(f"checkpoint folder {str(folder)!r} has neither {SINGLE_FILE} nor "
                        f"{INDEX_FILE} (safetensors files found: {found or 'none'})")


def _open(file: pathlib.Path):
  try:
    return safe_open(str(file), framework="numpy")
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f"{file} is truncated or corrupt (not a readable safetensors file): "
                          f"{e}") from e


def _headers(folder: pathlib.Path, files: dict[str, list[str]]) -> dict[str, tuple[str, tuple]]:
  """Tensor name -> (file, shape), reading only the headers."""
  found: dict[str, tuple[str, tuple]] = {}
  for file, indexed in files.items():
    with _open(folder / file) as f:
      keys = set(f.keys())
      for name in keys:
        found[name] = (file, tuple(f.get_slice(name).get_shape()))
    if indexed and set(indexed) - keys:
      raise CheckpointError(f"{folder / file} lacks tensors that {INDEX_FILE} places there: "
                            f"{_listing(set(indexed) - keys)}")
  return found


def _ignorable(name: str, config: ModelConfig) -> bool:
  # Old checkpoints store rotary buffers; tied ones sometimes keep a copy of the embedding.
  return name.endswith("rotary_emb.inv_freq") or (
      name == "lm_head.weight" and config.tie_word_embeddings)


def load_hf_checkpoint(path, *, dtype=jnp.float32, mesh: Mesh | None = None):
  """Loads a local Hugging Face Llama / Qwen2 / Qwen3 checkpoint folder into a Decoder.

  Tensors are streamed one at a time from safetensors (single file or sharded with
  model.safetensors.index.json); each device reads only its own slice and the array is created
  directly with its target sharding, so the host never holds two copies of the model. Layer i's
  tensors (model.layers.{i}.*) become slice i of the stacked layer parameters: for each device,
  the slices of every layer's tensor it holds are read straight into one buffer.

  Args:
    path: folder with config.json and the safetensors file(s).
    dtype: parameter and compute dtype (float32, bfloat16 or float16); logits stay float32.
    mesh: optional mesh with Auto axes data, fsdp, tensor; parameters are sharded on it (see
      partitioning.param_partition_spec). None: everything on the first device.

  Returns:
    (model, config): the Decoder and its ModelConfig.

  Raises:
    CheckpointError (a ValueError) for a missing folder or file, an unsupported model_type,
    missing/unexpected tensors, a shape mismatch, or a truncated/corrupt safetensors file.
  """
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist or is not a folder")
  config = _read_config(folder, _dtype_name(dtype))
  if mesh is not None:
    check_mesh(mesh)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config)))
  targets = _targets(abstract, config.num_layers)
  wanted = {name: target for target in targets for name in target.names}

  files = _tensor_files(folder)
  found = _headers(folder, files)
  missing = set(wanted) - set(found)
  if missing:
    raise CheckpointError(f"{folder} lacks {len(missing)} tensors the {config.model_type} "
                          f"config needs: {_listing(missing)}")
  unexpected = {n for n in found if n not in wanted and not _ignorable(n, config)}
  if unexpected:
    raise CheckpointError(f"{folder} has {len(unexpected)} tensors the {config.model_type} "
                          f"config does not use: {_listing(unexpected)}")
  for name, target in wanted.items():
    if found[name][1] != target.hf_shape:
      raise CheckpointError(f"tensor {name} in {folder / found[name][0]} has shape "
                            f"{found[name][1]}, expected {target.hf_shape} from config.json")

  np_dtype = jnp.dtype(config.dtype)
  default = SingleDeviceSharding(jax.devices()[0])
  loaded = []
  with contextlib.ExitStack() as stack:
    # A layer's tensors may sit in any file of a sharded checkpoint: every file stays open
    # (safetensors maps them; nothing is read until a slice is asked for).
    handles = {file: stack.enter_context(_open(folder / file)) for file in files}

    def read_one(name, index, transpose):
      """The slice `index` (of our layout) of checkpoint tensor `name`, in our layout."""
      file = found[name][0]
      try:
        x = handles[file].get_slice(name)[index[::-1] if transpose else index]
      except SafetensorError as e:
        raise CheckpointError(f"{folder / file}: cannot read tensor {name}: {e}") from e
      return x.T if transpose else x

    for target in targets:
      def read(index, target=target):
        if not target.stacked:
          return np.ascontiguousarray(read_one(target.names[0], index, target.transpose)
                                      ).astype(np_dtype)
        # This device's layers: each one's slice is read and cast straight into its row.
        out = None
        layers = range(len(target.names))[index[0]]
        for row, layer in enumerate(layers):
          x = read_one(target.names[layer], index[1:], target.transpose)
          if out is None:
            out = np.empty((len(layers),) + x.shape, np_dtype)
          out[row] = x
        return out
      sharding = default if mesh is None else NamedSharding(
          mesh, param_partition_spec(target.path, target.variable.shape, mesh))
      array = jax.make_array_from_callback(tuple(target.variable.shape), sharding, read)
      loaded.append((target.path, target.variable.replace(array)))
  model = nnx.merge(graphdef, nnx.from_flat_state(loaded))
  return model, config


def _to_host(x: jax.Array) -> np.ndarray:
  if not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _shard_groups(names_and_bytes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
  """Consecutive groups of tensor names whose sizes add up to at most max_bytes (or one tensor)."""
  groups: list[list[str]] = [[]]
  size = 0
  for name, nbytes in names_and_bytes:
    if groups[-1] and size + nbytes > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += nbytes
  return groups


def save_hf_checkpoint(model: Decoder, config: ModelConfig, path, *,
                       max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

  Tensors are gathered to the host one safetensors file at a time: files of at most
  `max_shard_bytes` (plus model.safetensors.index.json when there are several), in `config.dtype`.
  On several hosts every process must call it; only process 0 writes.

  Args:
    model: the Decoder.
    config: its ModelConfig (may differ from model.config in dtype and carried-through keys).
    path: output folder, created if needed; earlier model*.safetensors files there are removed.
    max_shard_bytes: largest size of one safetensors file (a larger single tensor gets its own).
  """
  arch = dataclasses.replace(config, dtype=model.config.dtype,
                             hf_extra_json=model.config.hf_extra_json, remat=model.config.remat)
  if arch != model.config:
    raise ValueError(f"config {config} does not describe the model's architecture "
                     f"{model.config}")
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  folder = pathlib.Path(path)
  writer = jax.process_index() == 0
  if writer:
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:
      if old.is_file():
        old.unlink()
  dtype = jnp.dtype(config.dtype)
  # name -> (array, layer or None, transposed), in transformers' order: the embedding, layer 0's
  # tensors, layer 1's, ..., the rest. A stacked parameter is gathered one layer at a time.
  first, stacked, rest = {}, [], {}
  for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if is_stacked(p):
      stacked.append((p, var[...]))
    else:
      name, transpose = hf_tensor_name(p)
      (first if str(p[0]) == "embed_tokens" else rest)[name] = (var[...], None, transpose)
  params = dict(first)
  for layer in range(model.config.num_layers):
    for p, x in stacked:
      name, transpose = hf_tensor_name(p, layer)
      params[name] = (x, layer, transpose)
  params.update(rest)
  nbytes = lambda x, layer: (x.size // (x.shape[0] if layer is not None else 1)) * dtype.itemsize
  groups = _shard_groups([(n, nbytes(x, layer)) for n, (x, layer, _) in params.items()],
                         max_shard_bytes)
  weight_map = {}
  for i, group in enumerate(groups):
    n = len(groups)
    file = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    tensors = {}
    for name in group:
      x, layer, transpose = params[name]
      x = _to_host(x if layer is None else x[layer])
      tensors[name] = np.ascontiguousarray(x.T if transpose else x).astype(dtype)
      weight_map[name] = file
    if writer:
      save_file(tensors, str(folder / file), metadata={"format": "pt"})
    del tensors
  if writer:
    if len(groups) > 1:
      total = sum(nbytes(x, layer) for x, layer, _ in params.values())
      index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
      (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config_to_hf(config), indent=2,
                                                   sort_keys=True) + "\n")


def load_tokenizer(path):
  """`transformers.AutoTokenizer` from a local folder, offline (chat template included).

  Args:
    path: folder with tokenizer.json / tokenizer_config.json (usually the checkpoint folder).

  Returns:
    The tokenizer.
  """
  folder = pathlib.Path(path)
  if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
    raise CheckpointError(f"tokenizer folder {str(path)!r} has no tokenizer.json or "
                          "tokenizer_config.json")
  import transformers  # pylint: disable=import-outside-toplevel  (slow import, only needed here)
  return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                    "special_tokens_map.json", "generation_config.json")


def drop_layers(src, dst, layers) -> dict:
  """Copies a checkpoint folder without some of its decoder layers (a pruned model).

  The kept layers are renumbered 0.. in their order, config.json's num_hidden_layers shrinks,
  every other tensor and the tokenizer files are copied unchanged.

  Args:
    src: a Hugging Face folder `load_hf_checkpoint` reads.
    dst: the output folder (created; its model*.safetensors are replaced).
    layers: indices of the layers to remove (distinct, each in [0, num_hidden_layers)).

  Returns:
    The config.json dict written.
  """
  folder, out = pathlib.Path(src), pathlib.Path(dst)
  config = _read_config(folder, "float32")
  drop = sorted({int(i) for i in layers})
  if len(drop) != len(list(layers)) or any(not 0 <= i < config.num_layers for i in drop):
    raise ValueError(f"layers={list(layers)} must be distinct indices in [0, "
                     f"{config.num_layers}) (the checkpoint's layers)")
  if len(drop) == config.num_layers:
    raise ValueError(f"layers={list(layers)} removes every layer of {folder}")
  renumber = {old: new for new, old in enumerate(i for i in range(config.num_layers)
                                                 if i not in drop)}
  files = _tensor_files(folder)
  tensors = {}
  for file in files:
    with _open(folder / file) as f:
      for name in f.keys():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
          old = int(parts[2])
          if old not in renumber:
            continue
          name_out = ".".join(parts[:2] + [str(renumber[old])] + parts[3:])
        else:
          name_out = name
        tensors[name_out] = f.get_tensor(name)
  out.mkdir(parents=True, exist_ok=True)
  for old in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
    if old.is_file():
      old.unlink()
  save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
  hf = json.loads((folder / "config.json").read_text())
  hf["num_hidden_layers"] = len(renumber)
  if isinstance(hf.get("layer_types"), list):   # per-layer settings follow their layers
    hf["layer_types"] = [hf["layer_types"][i] for i in renumber]
  (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
  for name in _TOKENIZER_FILES:
    if (folder / name).is_file():
      (out / name).write_bytes((folder / name).read_bytes())
  return hf
