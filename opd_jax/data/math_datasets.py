"""TFDS builders (array_record, no TensorFlow) for DAPO-Math-17K and five math benchmarks."""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import json
import logging
import os
import re
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds

PathLike = str | os.PathLike
# Every builder writes these four text fields; `answer` is always a string.
FIELDS = ("id", "problem", "answer", "source")
SUFFIXES = (".parquet", ".jsonl", ".json")
VERSION = "1.0.0"

# The instruction lines DAPO-Math-17K wraps around every problem. They ask for "Answer: ..." on the
# last line, which would contradict our own prompt (reasoning in <think>, answer in \boxed{}).
_DAPO_HEAD = re.compile(
    r"^\s*Solve the following math problem step by step\. The last line of your response should "
    r"be of the form Answer: \$Answer \(without quotes\) where \$Answer is the answer to the "
    r"problem\.\s*", re.IGNORECASE)
_DAPO_TAIL = re.compile(
    r"Remember to put your answer on its own line after \"Answer:\"\.?\s*$", re.IGNORECASE)
# CJK ideographs (unified, extension A, compatibility): the test for DAPO's Chinese items.
_CJK = re.compile("[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff]")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How one published dataset maps onto the common schema {id, problem, answer, source}.

  Each field lists the column names it is read from, in order of preference: the first one a
  file has is used. A dotted name ("reward_model.ground_truth") reads a key of a struct column.
  A file without any `id` column numbers its rows instead (0, 1, ... across the files in order).
  """
  name: str
  split: str
  problem: tuple[str, ...]
  answer: tuple[str, ...]
  id: tuple[str, ...]
  description: str
  # DAPO-Math-17K only: strip the authors' instruction lines, drop items written in Chinese and
  # drop repeated problems (the published file repeats each problem about a hundred times).
  dapo_cleanup: bool = False


DATASETS: Mapping[str, DatasetSpec] = types.MappingProxyType({s.name: s for s in (
    DatasetSpec(
        "dapo_math_17k", "train",
        problem=("problem", "prompt", "source_prompt"),
        answer=("reward_model.ground_truth", "answer", "solution"),
        id=("extra_info.index",),
        description="DAPO-Math-17K (BytedTsinghua-SIA/DAPO-Math-17k), English part, deduplicated",
        dapo_cleanup=True),
    DatasetSpec(
        "math500", "test", problem=("problem",), answer=("answer",), id=("unique_id",),
        description="MATH500 (HuggingFaceH4/MATH-500)"),
    DatasetSpec(
        "aime24", "test", problem=("problem", "Problem", "question"), answer=("answer", "Answer"),
        id=("id", "ID"),
        description="AIME 2024 (HuggingFaceH4/aime_2024, Maxwell-Jia/AIME_2024)"),
    DatasetSpec(
        "aime25", "test", problem=("problem", "question", "Problem"), answer=("answer", "Answer"),
        id=("id", "ID"),
        description="AIME 2025 (opencompass/AIME2025 parts I and II, yentinglin/aime_2025)"),
    DatasetSpec(
        "minerva_math", "test", problem=("question", "problem"), answer=("answer",),
        id=("id", "idx"), description="Minerva math (math-ai/minervamath)"),
    DatasetSpec(
        "olympiadbench", "test", problem=("question", "problem"),
        answer=("final_answer", "answer"), id=("id",),
        description="OlympiadBench, English text-only maths (OE_TO_maths_en_COMP; "
                    "Hothan/OlympiadBench, math-ai/olympiadbench)"),
)})
NAMES = tuple(DATASETS)


def _spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise ValueError(f"dataset name {name!r} is unknown; known datasets: {', '.join(NAMES)}")
  return DATASETS[name]


def source_files(source: PathLike | Sequence[PathLike]) -> list[str]:
  """The data files a `source` names, in order.

  Args:
    source: a file (.parquet, .jsonl or .json: a JSON array of objects, or JSON lines), a folder
      (its files with those suffixes, sorted by name, not recursing), or a list of files/folders.

  Returns:
    Absolute paths of the files.
  """
  entries = [source] if isinstance(source, (str, os.PathLike)) else list(source)
  if not entries:
    raise ValueError("source is an empty list; give a data file, a folder or a list of them")
  files = []
  for entry in entries:
    path = os.path.abspath(os.fspath(entry))
    if os.path.isdir(path):
      found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(SUFFIXES))
      if not found:
        raise FileNotFoundError(
            f"source folder {path} holds no data file (accepted suffixes: {', '.join(SUFFIXES)})")
      files += found
    elif os.path.isfile(path):
      if not path.endswith(SUFFIXES):
        raise ValueError(f"source file {path} has an unsupported format; accepted suffixes: "
                         f"{', '.join(SUFFIXES)}")
      files.append(path)
    else:
      raise FileNotFoundError(f"source {path} does not exist")
  return files


def _read_rows(path: str) -> tuple[list[str], Any]:
  """(column names, rows(columns)) of one file: `rows` yields dicts holding at least `columns`.

  Parquet is streamed in batches of only the columns asked for (DAPO-Math-17K's published file
  has about 1.8 million rows).
  """
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    file = pq.ParquetFile(path)
    names = list(file.schema_arrow.names)

    def parquet_rows(columns):
      for batch in file.iter_batches(batch_size=8192, columns=columns):
        yield from batch.to_pylist()
    return names, parquet_rows
  with open(path, encoding="utf-8") as f:
    text = f.read()
  rows = None
  if path.endswith(".json"):
    try:
      rows = json.loads(text)
    except json.JSONDecodeError:
      rows = None  # not one JSON document: read it as JSON lines below
    if isinstance(rows, dict):
      rows = [rows]  # one JSON line
    if rows is not None and not isinstance(rows, list):
      raise ValueError(f"{path}: a .json source must hold a JSON array of objects (or JSON "
                       f"lines); found a JSON {type(rows).__name__}")
  if rows is None:
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}, line {line_no}: not valid JSON ({e})") from None
  for i, row in enumerate(rows):
    if not isinstance(row, dict):
      raise ValueError(f"{path}, record {i}: expected a JSON object, found "
                       f"{type(row).__name__}")
  names = list(dict.fromkeys(k for row in rows[:1] for k in row))
  return names, lambda columns: iter(rows)


def _pick(variants: tuple[str, ...], columns: list[str]) -> str | None:
  for variant in variants:
    if variant.split(".")[0] in columns:
      return variant
  return None


def _get(row: dict[str, Any], column: str) -> Any:
  value = row
  for key in column.split("."):
    if not isinstance(value, dict) or key not in value:
      return None
    value = value[key]
  return value


def _as_problem(value: Any) -> str | None:
  if isinstance(value, str):
    return value
  # A chat conversation (DAPO's `prompt`): the problem is the user's message.
  if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
    users = [m.get("content") for m in value if m.get("role", "user") == "user"]
    if len(users) == 1 and isinstance(users[0], str):
      return users[0]
  return None


def _as_answer(value: Any) -> str | None:
  if isinstance(value, bool):
    return None
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    return str(int(value)) if value.is_integer() else repr(value)
  if isinstance(value, (list, tuple)):
    # OlympiadBench's `final_answer` is a list (several answers for multi-answer problems).
    parts = [_as_answer(v) for v in value]
    return None if not parts or None in parts else ", ".join(parts)
  if not isinstance(value, str):
    return None
  answer = value.strip()
  # "$\frac{1}{2}$" -> "\frac{1}{2}": one pair of enclosing dollars is markup, not the answer.
  if len(answer) >= 2 and answer[0] == answer[-1] == "$" and "$" not in answer[1:-1]:
    answer = answer[1:-1].strip()
  return answer


def strip_dapo_instruction(text: str) -> str:
  """DAPO-Math-17K's problem text without the authors' instruction lines (absent ones are fine)."""
  text = text.strip()
  head = _DAPO_HEAD.match(text)
  if head:
    text = text[head.end():]
  # Searched for in the last characters only: a search over the whole text is slow.
  tail = _DAPO_TAIL.search(text, max(0, len(text) - 2 * len(_DAPO_TAIL.pattern)))
  if tail:
    text = text[:tail.start()]
  return text.strip()


def read_source(name: str, source: PathLike | Sequence[PathLike],
                stats: dict[str, int] | None = None) -> Iterator[dict[str, str]]:
  """Normalised examples {id, problem, answer, source} of a dataset's local files, in file order.

  Args:
    name: a key of `DATASETS`.
    source: what `source_files` accepts.
    stats: if given, filled with counts: "rows" read, and for DAPO-Math-17K the rows dropped as
      "chinese" (CJK characters in the problem) and as "duplicates" (a problem seen before).

  Yields:
    One dict of four strings per kept row.
  """
  spec = _spec(name)
  stats = {} if stats is None else stats
  stats.update(rows=0, chinese=0, duplicates=0)
  seen, seen_raw = set(), set()
  row_number = 0
  for path in source_files(source):
    columns, rows = _read_rows(path)
    chosen = {f: _pick(getattr(spec, f), columns) for f in ("problem", "answer", "id")}
    missing = [f for f in ("problem", "answer") if chosen[f] is None]
    if missing:
      expected = "; ".join(f"{f}: one of {', '.join(getattr(spec, f))}" for f in missing)
      raise ValueError(
          f"{path} does not match the {name} format: expected columns ({expected}); "
          f"found columns: {', '.join(columns) or '(none)'}")
    wanted = sorted({c.split(".")[0] for c in chosen.values() if c is not None})
    for row in rows(wanted):
      stats["rows"] += 1
      problem = _as_problem(_get(row, chosen["problem"]))
      answer = _as_answer(_get(row, chosen["answer"]))
      if problem is None or not problem.strip():
        raise ValueError(
            f"{path}, row {row_number}: column {chosen['problem']} must be non-empty text (or a "
            f"chat with one user message); found {_get(row, chosen['problem'])!r:.200}")
      if not answer:
        raise ValueError(
            f"{path}, row {row_number}: column {chosen['answer']} must be a non-empty string, "
            f"number or list of them; found {_get(row, chosen['answer'])!r:.200}")
      example_id = _get(row, chosen["id"]) if chosen["id"] else None
      example_id = str(row_number) if example_id is None else str(example_id)
      row_number += 1
      if spec.dapo_cleanup:
        # Most repeats are identical rows: skip them before any text processing.
        if problem in seen_raw:
          stats["duplicates"] += 1
          continue
        seen_raw.add(problem)
        problem = strip_dapo_instruction(problem)
        if _CJK.search(problem):
          stats["chinese"] += 1
          continue
        if problem in seen:
          stats["duplicates"] += 1
          continue
        seen.add(problem)
      yield {"id": example_id, "problem": problem.strip(), "answer": answer, "source": name}


def manual_dir(name: str, data_dir: PathLike) -> str:
  """Where a build without `source` looks for `name`'s files: <data_dir>/downloads/manual/<name>.

  (TFDS's manual folder, one subfolder per dataset.)
  """
  return os.path.join(os.fspath(data_dir), "downloads", "manual", _spec(name).name)


def _fingerprint(files: list[str]) -> list[dict[str, Any]]:
  # Name and size only: checking a cached build must not read the (possibly large) source again.
  return [{"name": os.path.basename(f), "bytes": os.path.getsize(f)} for f in files]


class QuietBuilder:
  """TFDS builder hooks for datasets built from local files: TFDS would print "Downloading and
  preparing dataset Unknown size ..." and "... downloaded and prepared", though nothing is
  downloaded; the callers print one line of their own instead."""

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


class _DropTfdsNoise(logging.Filter):
  """TFDS's warning that a folder it is about to fill has no dataset_info.json yet."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Variant folder")


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
  """Around opening and building a dataset from local files: no TFDS progress bars, no warning
  that a folder it is about to fill has no dataset_info.json yet."""
  drop, logger = _DropTfdsNoise(), logging.getLogger("absl")
  logger.addFilter(drop)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(True)
    logger.removeFilter(drop)


class _MathBuilder(QuietBuilder, tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builds one dataset of `DATASETS` from local files into array_record shards."""

  SPEC: DatasetSpec
  RELEASE_NOTES = {VERSION: "First version."}
  VERSION = tfds.core.Version(VERSION)
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the published files (.parquet, .jsonl or .json) in "
      "<data_dir>/downloads/manual/<dataset name>/, or pass source=<file or folder>.")
  # Nothing is downloaded, so there are no checksums to look up; TFDS's lookup would locate this
  # module through importlib_resources, which it does not install.
  url_infos = None

  def __init__(self, *, source: PathLike | Sequence[PathLike] | None = None, **kwargs):
    self._source = source
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.SPEC.description,
        features=tfds.features.FeaturesDict({f: tfds.features.Text() for f in FIELDS}),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    source = self._source
    if source is None:
      source = manual_dir(self.name, self.data_dir_root)
      if not os.path.isdir(source):
        raise FileNotFoundError(
            f"no source was given for {self.name} and its manual folder {source} does not "
            "exist; pass source=<file or folder> or put the published files in that folder")
    files = source_files(source)
    stats = {}
    # Materialised here so that the counts are known before the info is written.
    examples = list(read_source(self.name, files, stats))
    if not examples:
      raise ValueError(f"source {source} yielded no {self.name} example")
    self.info.metadata.update(source_files=_fingerprint(files), **stats)
    return {self.SPEC.split: self._generate_examples(examples)}

  def _generate_examples(self, examples):
    # Keys are the positions in the source; the writer shuffles records by key hash, so a data
    # source's index i is not example i.
    for i, example in enumerate(examples):
      yield i, example


# One module-level class per dataset (TFDS names the data folder after `name`; pickling a builder
# needs the class reachable by name).
class DapoMath17k(_MathBuilder, skip_registration=True):
  name = "dapo_math_17k"
  SPEC = DATASETS[name]


class Math500(_MathBuilder, skip_registration=True):
  name = "math500"
  SPEC = DATASETS[name]


class Aime24(_MathBuilder, skip_registration=True):
  name = "aime24"
  SPEC = DATASETS[name]


class Aime25(_MathBuilder, skip_registration=True):
  name = "aime25"
  SPEC = DATASETS[name]


class MinervaMath(_MathBuilder, skip_registration=True):
  name = "minerva_math"
  SPEC = DATASETS[name]


class OlympiadBench(_MathBuilder, skip_registration=True):
  name = "olympiadbench"
  SPEC = DATASETS[name]


BUILDERS: Mapping[str, type[_MathBuilder]] = types.MappingProxyType({c.name: c for c in (
    DapoMath17k, Math500, Aime24, Aime25, MinervaMath, OlympiadBench)})


def build(name: str, *, source: PathLike | Sequence[PathLike] | None = None,
          data_dir: PathLike | None = None) -> tfds.core.DatasetBuilder:
  """Prepares a dataset under `data_dir` once; later calls reuse it without reading the source.

  Args:
    name: a key of `DATASETS`.
    source: the published file(s): a file, a folder or a list (see `source_files`). None reads
      `<data_dir>/downloads/manual/<name>/`. Needed only for the first build.
    data_dir: TFDS data folder; the dataset goes to `<data_dir>/<name>/1.0.0/`. None uses TFDS's
      default (`$TFDS_DATA_DIR` or ~/tensorflow_datasets).

  Returns:
    The prepared builder (`builder.as_data_source()` reads it).
  """
  spec = _spec(name)
  with quiet_tfds():
    return _build(spec, source, data_dir)


def _build(spec: DatasetSpec, source, data_dir) -> tfds.core.DatasetBuilder:
  name = spec.name
  builder = BUILDERS[spec.name](source=source, data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    if source is not None and _sources_exist(source):
      recorded = builder.info.metadata.get("source_files")
      given = _fingerprint(source_files(source))
      if recorded != given:
        raise ValueError(
            f"{name} is already built in {builder.data_path} from {recorded}, but source={source} "
            f"holds {given}; use another data_dir or delete {builder.data_path} to rebuild")
    return builder
  print(f"building the {name} dataset in {builder.data_dir_root} (once)")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder


def _sources_exist(source: PathLike | Sequence[PathLike]) -> bool:
  entries = [source] if isinstance(source, (str, os.PathLike)) else list(source)
  return all(os.path.exists(e) for e in entries)


class MathSplit(collections.abc.Sequence):
  """Random-access view of a built split: item i is a dict of four `str` (see `FIELDS`)."""

  def __init__(self, data_source):
    self.data_source = data_source

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.__getitems__(range(*index.indices(len(self))))
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"index {index} is out of range for a split of {n} examples")
    return _decode(self.data_source[index % n])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, str]]:
    indices = list(indices)
    if not indices:
      return []
    return [_decode(r) for r in self.data_source.__getitems__(indices)]

  def __repr__(self) -> str:
    return f"MathSplit({self.data_source!r}, {len(self)} examples)"


def _decode(record: Mapping[str, Any]) -> dict[str, str]:
  return {k: v.decode("utf-8") if isinstance(v, bytes) else str(v) for k, v in record.items()}


def load_split(name: str, *, source: PathLike | Sequence[PathLike] | None = None,
               data_dir: PathLike | None = None) -> MathSplit:
  """The dataset's one split (DAPO-Math-17K: train; the benchmarks: test), built if needed.

  Args:
    name: a key of `DATASETS`.
    source: as for `build` (only read by the first build).
    data_dir: as for `build`.

  Returns:
    A random-access sequence of {id, problem, answer, source} dicts of `str`. The order is the
    build's shuffled record order, fixed for a given source: index i is not row i of the source.
  """
  builder = build(name, source=source, data_dir=data_dir)
  return MathSplit(builder.as_data_source(split=DATASETS[name].split))
