"""Math evaluation: pass@1 / avg@k on the five test benchmarks, or on your own prompts with
answers, during training and standalone.

Each problem is rendered like a training prompt: the five math benchmarks with the student's chat
template and the instruction of `opd_jax.data.prompts`; `prompts` (your own JSONL or parquet
file, `config.eval.sources.prompts`, in the format of `data.dataset="prompts"`, every row with an
"answer") exactly as training renders that dataset (`data.template`, `data.chat_template`).
Prompts longer than `data.max_prompt_len` tokens follow `data.long_prompts` (drop, reported;
truncate; error), decided when the benchmark is read, before any sampling. k responses are
sampled (the paper: top-p 0.9, temperature 1), and each response is graded against the
problem's answer on its text after `</think>` (last `\\boxed{}`) by
`opd_jax.data.math_grading`. Per benchmark:

  pass@1  fraction of problems whose FIRST sample is correct (Table 1's protocol with k = 1);
  avg@k   mean correctness over all k samples (the unbiased pass@1 estimate; k > 1 only);
  pass@k  fraction of problems with at least one correct sample (k > 1 only);
plus the mean response length in tokens (stop token included), the fraction of responses that
hit the length budget without stopping, and the fraction without an extractable answer. "avg/"
metrics are the unweighted mean over the evaluated benchmarks (the paper's Avg column).

Standalone, on a trainer run or on a Hugging Face folder (student and teacher rows of Table 1):

  python -m opd_jax.evaluate --config=experiments/math_lsm.py --checkpoint=DIR [--step=N]
      [--workdir=OUT] [--label=NAME] [--config.eval.samples=32 ...]

DIR is a trainer workdir (its `checkpoints/`), a checkpoint folder of a run, or a Hugging Face
checkpoint folder (config.json + safetensors).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from opd_jax import masking, metrics, models, sampling, sharding
from opd_jax.data import math_datasets, math_grading, prompts, registry
from opd_jax.errors import DataError
from opd_jax.settings import ConfigError, TrainSettings

# The five test sets of Table 1, in the paper's column order (built once with TFDS), then
# "prompts": your own file of prompts with answers (config.eval.sources.prompts, read as it is).
MATH_BENCHMARKS = ("math500", "aime24", "aime25", "minerva_math", "olympiadbench")
PROMPTS = registry.PROMPTS
BENCHMARKS = MATH_BENCHMARKS + (PROMPTS,)
# Their column headers.
COLUMNS = {"math500": "MATH500", "aime24": "AIME24", "aime25": "AIME25",
           "minerva_math": "Minerva", "olympiadbench": "Olympiad", PROMPTS: "Prompts"}
_PROMPTS_KEY = "config.eval.sources.prompts"
_STEP_FILE = re.compile(r"^step_(\d+)\.json$")


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """The evaluation settings of a config (`config.eval` plus the prompt and stop settings)."""
  benchmarks: tuple[str, ...]
  samples: int
  max_new_tokens: int
  top_p: float
  temperature: float
  batch_size: int
  limit: int
  math_verify: bool
  data_dir: str
  sources: tuple[tuple[str, str], ...]
  grade_timeout_s: float
  grade_workers: int
  chat_template: bool
  template: str               # data.template: a "prompt" row of the prompts benchmark
  max_prompt_len: int
  long_prompts: str           # data.long_prompts: drop | truncate | error
  stop_strings: tuple[str, ...]
  banned_strings: tuple[str, ...]
  seed: int

  @classmethod
  def of(cls, **overrides) -> "EvalSettings":
    """The trainer's default evaluation settings (configs.opd()) with `overrides`."""
    from opd_jax import configs  # pylint: disable=import-outside-toplevel
    return dataclasses.replace(cls.from_config(configs.opd()), **overrides)

  @classmethod
  def from_config(cls, config: Mapping) -> "EvalSettings":
    """Checks `config.eval` (one ValueError naming the first bad setting) and freezes it."""
    c = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    e = c["eval"]
    benchmarks = tuple(e["benchmarks"])
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if not benchmarks or unknown or len(set(benchmarks)) != len(benchmarks):
      raise ValueError(f"config.eval.benchmarks={benchmarks!r} is not accepted; give distinct "
                       f"names among {', '.join(BENCHMARKS)}")
    for key in ("samples", "max_new_tokens", "batch_size"):
      if not isinstance(e[key], int) or isinstance(e[key], bool) or e[key] < 1:
        raise ValueError(f"config.eval.{key}={e[key]!r} is not accepted; a positive int")
    if not isinstance(e["limit"], int) or e["limit"] < 0:
      raise ValueError(f"config.eval.limit={e['limit']!r} is not accepted; an int >= 0 "
                       "(0 = every problem)")
    if not 0.0 < e["top_p"] <= 1.0:
      raise ValueError(f"config.eval.top_p={e['top_p']!r} is not accepted; a float in (0, 1]")
    if e["temperature"] < 0:
      raise ValueError(f"config.eval.temperature={e['temperature']!r} is not accepted; >= 0 "
                       "(0 = greedy)")
    if e["grade_timeout_s"] <= 0:
      raise ValueError(f"config.eval.grade_timeout_s={e['grade_timeout_s']!r} is not "
                       "accepted; > 0 seconds")
    if e["grade_workers"] < 0:
      raise ValueError(f"config.eval.grade_workers={e['grade_workers']!r} is not accepted; an "
                       "int >= 0 (0 = half the CPUs, 2 to 8)")
    sources = tuple(sorted((k, str(v)) for k, v in dict(e["sources"]).items() if v))
    for name, path in sources:
      if name not in BENCHMARKS:
        raise ValueError(f"config.eval.sources.{name} is not a benchmark; accepted: "
                         f"{', '.join(BENCHMARKS)}")
      if not pathlib.Path(path).exists():
        raise ValueError(f"config.eval.sources.{name}={path!r} does not exist; give the local "
                         "file or folder the benchmark is built from")
    d = c["data"]
    if d["long_prompts"] not in registry.LONG_PROMPTS:
      raise ConfigError(f"config.data.long_prompts={d['long_prompts']!r} is not accepted; "
                        f"accepted: {', '.join(registry.LONG_PROMPTS)}")
    if PROMPTS in benchmarks and "{prompt}" not in d["template"]:
      raise ConfigError(f"config.data.template={d['template']!r} is not accepted; it must hold "
                        "'{prompt}', where each row's prompt goes")
    return cls(
        benchmarks=benchmarks, samples=e["samples"], max_new_tokens=e["max_new_tokens"],
        top_p=float(e["top_p"]), temperature=float(e["temperature"]),
        batch_size=e["batch_size"], limit=e["limit"], math_verify=bool(e["math_verify"]),
        data_dir=e["data_dir"] or c["data"]["data_dir"], sources=sources,
        grade_timeout_s=float(e["grade_timeout_s"]), grade_workers=e["grade_workers"],
        chat_template=bool(d["chat_template"]), template=str(d["template"]),
        max_prompt_len=d["max_prompt_len"], long_prompts=str(d["long_prompts"]),
        stop_strings=tuple(c["rollout"]["stop_strings"]),
        banned_strings=tuple(c["rollout"]["banned_strings"]), seed=c["seed"])


# ----------------------------------------------------------------------------------------------
# scores and the table
# ----------------------------------------------------------------------------------------------


def accuracy_metrics(correct: np.ndarray) -> dict[str, float]:
  """pass@1 (first sample), avg@k and pass@k (k > 1 only) of a [problems, k] bool array."""
  correct = np.asarray(correct, bool)
  if correct.ndim != 2 or correct.shape[1] < 1:
    raise ValueError(f"correct must be [problems, k] with k >= 1, got shape {correct.shape}")
  k = correct.shape[1]
  if correct.shape[0] == 0:
    raise ValueError("correct has no problems; nothing to score")
  out = {"pass@1": float(correct[:, 0].mean())}
  if k > 1:
    out[f"avg@{k}"] = float(correct.mean())
    out[f"pass@{k}"] = float(correct.any(axis=1).mean())
  return out


def headline(k: int) -> str:
  """The metric a table shows for k samples: pass@1 (k = 1) or avg@k."""
  return "pass@1" if k == 1 else f"avg@{k}"


def format_table(rows: Sequence[tuple[str, Mapping[str, float]]],
                 benchmarks: Sequence[str] = MATH_BENCHMARKS, *, metric: str = "pass@1") -> str:
  """A text table in the paper's layout: MATH500, AIME24, AIME25, Minerva, Olympiad, Avg.

  Args:
    rows: (label, flat metrics) pairs, e.g. ("LSM step 400", {"math500/pass@1": 0.804, ...}).
    benchmarks: the columns (in BENCHMARKS order: Prompts after the paper's five); Avg is their
      unweighted mean.
    metric: which per-benchmark metric to show (in percent, one decimal).

  Returns:
    The table as text, one row per entry, with a header line.
  """
  order = [b for b in BENCHMARKS if b in benchmarks]
  header = ["Model"] + [COLUMNS[b] for b in order] + ["Avg"]
  body = []
  for label, m in rows:
    values = [m.get(f"{b}/{metric}") for b in order]
    shown = [f"{100 * v:.1f}" if v is not None else "-" for v in values]
    avg = (f"{100 * sum(values) / len(values):.1f}" if all(v is not None for v in values)
           else "-")
    body.append([label] + shown + [avg])
  width0 = max(len(r[0]) for r in [header] + body)
  widths = [width0] + [max(len(h), 5) for h in header[1:]]
  lines = [" | ".join(h.ljust(w) if i == 0 else h.rjust(w)
                      for i, (h, w) in enumerate(zip(header, widths)))]
  lines.append("-+-".join("-" * w for w in widths))
  for r in body:
    lines.append(" | ".join(x.ljust(w) if i == 0 else x.rjust(w)
                            for i, (x, w) in enumerate(zip(r, widths))))
  return "\n".join(lines)


def table_from_workdir(workdir: str | pathlib.Path) -> str:
  """The paper-layout table of every `workdir/eval/step_N.json`, one row per step."""
  records = []
  for path in sorted((pathlib.Path(workdir) / "eval").glob("step_*.json")):
    if _STEP_FILE.match(path.name):
      records.append(json.loads(path.read_text()))
  if not records:
    raise FileNotFoundError(f"{pathlib.Path(workdir) / 'eval'} holds no step_N.json")
  records.sort(key=lambda r: r["step"])
  last = records[-1]
  rows = [(f"{r['label']} step {r['step']}", r["metrics"]) for r in records]
  return format_table(rows, last["settings"]["benchmarks"],
                      metric=headline(last["settings"]["samples"]))


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------


def _mesh_of(model) -> Any:
  """The mesh the model's parameters are sharded on, or None (single device)."""
  for leaf in jax.tree.leaves(nnx.state(model)):
    s = getattr(leaf, "sharding", None)
    if isinstance(s, NamedSharding):
      return s.mesh
  return None


def _decode(tokenizer, ids: Sequence[int], stop_texts: Sequence[str]) -> str:
  """The response text, special tokens kept (</think> may be one), the final stop token cut."""
  text = tokenizer.decode(list(ids), skip_special_tokens=False)
  for s in stop_texts:
    if s and text.endswith(s):
      return text[:-len(s)]
  return text


def load_benchmark(name: str, *, data_dir: str | pathlib.Path | None,
                   source: str | None = None, limit: int = 0) -> list[dict]:
  """The problems of a benchmark: a math benchmark's ({id, problem, answer, source}), built once
  under data_dir; the rows of the `prompts` file (`registry.read_prompts`), each with an answer.

  Args:
    name: one of BENCHMARKS.
    data_dir: the TFDS data folder of the builds (unused by `prompts`).
    source: the published file(s) for the first build (None: `<data_dir>/downloads/manual/`);
      for `prompts`, the file itself (config.eval.sources.prompts).
    limit: 0 for every problem, else the first `limit` (in the build's fixed order, the file's
      order).

  Returns:
    The problems as dicts.
  """
  if name not in BENCHMARKS:
    raise ValueError(f"benchmark {name!r} is not accepted; accepted: {', '.join(BENCHMARKS)}")
  if name == PROMPTS:
    rows = _prompt_problems(source)
    return rows[:limit] if limit else rows
  if data_dir is None:
    raise ValueError(f"benchmark {name!r} needs data_dir, the TFDS folder of its build")
  split = math_datasets.load_split(name, source=source or None, data_dir=data_dir)
  n = len(split) if not limit else min(limit, len(split))
  return list(split[:n])


def _prompt_problems(source: str | None) -> list[dict]:
  """The rows of the `prompts` benchmark's file; a DataError unless every row has an answer."""
  if not source:
    raise ConfigError(f"benchmark {PROMPTS!r} needs a file: set --{_PROMPTS_KEY}=FILE, a JSONL "
                      "or parquet file of prompts with answers in the format of "
                      "data.dataset='prompts' (README \"Your own prompts\")")
  rows = registry.read_prompts(source, dataset=PROMPTS, setting=_PROMPTS_KEY)
  lacking = [r["id"] for r in rows if not r["answer"].strip()]
  if lacking:
    shown = ", ".join(lacking[:5]) + (", ..." if len(lacking) > 5 else "")
    raise DataError(f"{source}: {len(lacking)} of {len(rows)} rows have no 'answer' (ids "
                    f"{shown}); benchmark {PROMPTS!r} grades every response against its row's "
                    "answer: give each row a non-empty \"answer\", or set "
                    f"--{_PROMPTS_KEY} to a file whose rows all have one")
  return rows


def _encoder(name: str, tokenizer, e: EvalSettings) -> Callable[..., registry.Encoded]:
  """The benchmark's encoder: the math instruction for the five, the `prompts` dataset's own
  rendering (data.template, data.chat_template) for `prompts`, as training renders them."""
  return registry.encoder(name, tokenizer, tokenizer, chat_template=e.chat_template,
                          max_prompt_len=e.max_prompt_len, long_prompts=e.long_prompts,
                          **({"template": e.template} if name == PROMPTS else {}))


def prepare_benchmark(name: str, tokenizer, e: EvalSettings, *,
                      data_dir: str | pathlib.Path | None,
                      log: Callable[[str], None] = print) -> tuple[list[dict], list[np.ndarray]]:
  """The problems of benchmark `name` that the evaluation samples, and their prompt ids.

  Prompts longer than `e.max_prompt_len` tokens follow `e.long_prompts` as the training data
  does (`registry.fitting_prompts`): "drop" leaves them out (said in `log`), "truncate" keeps
  their last tokens, "error" (or none left) is a DataError naming them.

  Returns:
    (problems, prompt ids), one each per problem kept.
  """
  problems = load_benchmark(name, data_dir=data_dir, source=dict(e.sources).get(name),
                            limit=e.limit)
  encode = _encoder(name, tokenizer, e)
  try:
    kept = registry.fitting_prompts(problems, encode, e.max_prompt_len, e.long_prompts,
                                    report=lambda line: log(f"eval {name}: {line}"))
    kept = [kept[i] for i in range(len(kept))]
    return kept, [encode(p).prompt for p in kept]
  except DataError as err:
    raise DataError(f"eval benchmark {name!r}: {err}") from None


def evaluate(model, tokenizer, e: EvalSettings, *, data_dir: str | pathlib.Path | None,
             workdir: str | pathlib.Path | None = None, step: int = 0, label: str = "model",
             log: Callable[[str], None] = print) -> dict[str, float]:
  """Samples k responses per problem of each benchmark, grades them and reports the scores.

  Args:
    model: an `opd_jax.models.Decoder` (its parameters' mesh, if any, shards the sampling rows).
    tokenizer: the model's tokenizer (prompts use its chat template, responses are decoded by it).
    e: the evaluation settings (`EvalSettings.from_config(config)`; `EvalSettings.of(...)`
      overrides the trainer's defaults). Among them: `samples` k per problem; `batch_size`
      responses per sampler call (rounded up to a multiple of the mesh's batch ways), what bounds
      the KV cache's memory, batch_size x (prompt + max_new_tokens) tokens, one program per
      prompt-length bucket; `seed`: the draws of benchmark b, call c come from
      fold_in(fold_in(key(seed), b), c), the same at every training step (common random numbers
      make steps comparable); `banned_strings`: ids past the tokenizer's vocabulary (embedding
      padding) are always banned too; `math_verify`: also report the agreement rate with
      math-verify.
    data_dir: TFDS data folder of the math benchmark builds (None when only `prompts`, read
      from its file, is evaluated).
    workdir: where `eval/step_N.json` (scores and per-problem results) and
      `eval/step_N_responses.jsonl` (the texts) go; None writes nothing.
    step: the training step (names the files and the table row).
    label: the row label of the printed table.
    log: where the table and notes go.

  Returns:
    Flat metrics {"math500/pass@1": ..., "avg/pass@1": ..., "math500/mean_length": ...}.
  """
  benchmarks, k = e.benchmarks, e.samples
  _check_arguments(benchmarks, k=k, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
  draws = _Draws.of(model, tokenizer, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                    temperature=e.temperature, top_p=e.top_p, stop_strings=e.stop_strings,
                    banned_strings=e.banned_strings)
  root = jax.random.key(e.seed)
  flat: dict[str, float] = {}
  details: dict[str, Any] = {}
  texts: list[dict[str, Any]] = []
  with math_grading.Grader(workers=e.grade_workers or None) as grader:
    for name in benchmarks:
      problems, encoded = prepare_benchmark(name, tokenizer, e, data_dir=data_dir, log=log)
      responses, stopped = _sample_responses(
          model, encoded, k, jax.random.fold_in(root, BENCHMARKS.index(name)), draws)
      decoded = [_decode(tokenizer, ids, e.stop_strings) for ids in responses]
      refs = [p["answer"] for p in problems for _ in range(k)]
      report = grader.grade(decoded, refs, timeout_s=e.grade_timeout_s)
      m, items = _benchmark_metrics(problems, responses, stopped, report, k=k,
                                    max_new_tokens=e.max_new_tokens)
      if e.math_verify:
        m.update(_math_verify_agreement(decoded, refs, report, log))
      flat.update({f"{name}/{key}": v for key, v in m.items()})
      details[name] = dict(m, problems=len(problems), items=items)
      if name == PROMPTS:
        details[name]["source"] = dict(e.sources)[PROMPTS]
      texts += [{"benchmark": name, "id": p["id"], "sample": j, "response": decoded[i * k + j]}
                for i, p in enumerate(problems) for j in range(k)]
  flat.update(_benchmark_means(flat, benchmarks, k))
  settings = dict(benchmarks=list(benchmarks), samples=k, max_new_tokens=e.max_new_tokens,
                  top_p=e.top_p, temperature=e.temperature, limit=e.limit, seed=e.seed,
                  chat_template=e.chat_template, max_prompt_len=e.max_prompt_len,
                  long_prompts=e.long_prompts,
                  **({"template": e.template} if PROMPTS in benchmarks else {}))
  record = {"step": step, "label": label, "settings": settings, "metrics": flat,
            "benchmarks": details}
  _write_results(record, texts, workdir=workdir, log=log)
  return flat


def _check_arguments(benchmarks: tuple[str, ...], **counts: int) -> None:
  """Raises ValueError for an unknown benchmark or a count (k, budget, batch) below 1."""
  for b in benchmarks:
    if b not in BENCHMARKS:
      raise ValueError(f"benchmark {b!r} is not accepted; accepted: {', '.join(BENCHMARKS)}")
  for name, value in counts.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"evaluate: {name}={value!r} is not accepted; a positive int")


@dataclasses.dataclass(frozen=True)
class _Draws:
  """What every sampler call of one evaluation shares."""
  mesh: Any                     # the model's mesh (None: one device)
  rows: int                     # rows per call: batch_size rounded up to the mesh's batch ways
  max_new_tokens: int
  temperature: float
  top_p: float
  stop_ids: tuple[int, ...]
  banned_ids: tuple[int, ...]   # the banned strings' ids and the embedding's padding rows

  @classmethod
  def of(cls, model, tokenizer, *, batch_size: int, max_new_tokens: int, temperature: float,
         top_p: float, stop_strings: Sequence[str], banned_strings: Sequence[str]) -> _Draws:
    """The sampler settings of `evaluate`'s arguments for `model` and its tokenizer."""
    mesh = _mesh_of(model)
    ways = sharding.batch_divisor(mesh) if mesh is not None else 1
    stop_ids = tuple(masking.ids_for_strings(tokenizer, stop_strings))
    vocab = model.config.vocab_size
    banned = tuple(masking.ids_for_strings(tokenizer, banned_strings)) + tuple(
        range(min(len(tokenizer), vocab), vocab))
    return cls(mesh=mesh, rows=-(-batch_size // ways) * ways, max_new_tokens=max_new_tokens,
               temperature=temperature, top_p=top_p, stop_ids=stop_ids, banned_ids=banned)


def _sample_responses(model, encoded: Sequence[Sequence[int]], k: int, key: jax.Array,
                      draws: _Draws) -> tuple[list[list[int]], list[bool]]:
  """k responses per prompt; returns per row (sample r % k of prompt r // k) its response ids,
  stop token included, and whether it ended on a stop token."""
  # Rows are sampled draws.rows at a time (one shape per call: the last call is padded with
  # copies of its first row), each row with its own draws, so a problem's k samples need not
  # share a call.
  queued = [encoded[r // k] for r in range(len(encoded) * k)]
  responses: list[list[int]] = []
  stopped: list[bool] = []
  for c, start in enumerate(range(0, len(queued), draws.rows)):
    chunk = queued[start:start + draws.rows]
    padded = chunk + [chunk[0]] * (draws.rows - len(chunk))
    p_len = sampling.bucket_length(max(len(p) for p in padded))
    tokens, mask = prompts.left_pad(padded, 0, p_len)
    out = sampling.sample(
        model, tokens, mask, jax.random.fold_in(key, c), max_new_tokens=draws.max_new_tokens,
        temperature=draws.temperature, top_p=draws.top_p, banned_token_ids=draws.banned_ids,
        stop_token_ids=draws.stop_ids, num_samples=1, mesh=draws.mesh)
    resp, resp_mask = sharding.to_host(out.tokens), sharding.to_host(out.mask)
    for r in range(len(chunk)):
      ids = resp[r, :int(resp_mask[r].sum())].tolist()
      responses.append(ids)
      stopped.append(bool(ids) and ids[-1] in draws.stop_ids)
  return responses, stopped


def _benchmark_metrics(problems: Sequence[Mapping[str, str]], responses: Sequence[Sequence[int]],
                       stopped: Sequence[bool], report: math_grading.GradeReport, *, k: int,
                       max_new_tokens: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """One benchmark's metrics (accuracy, lengths, truncation, no answer, timeouts) and its
  per-problem items (id, answer, and per sample the extracted answer, correctness, length,
  truncation)."""
  n = len(problems)
  correct = np.asarray(report.correct, bool).reshape(n, k)
  lengths = np.asarray([len(r) for r in responses]).reshape(n, k)
  truncated = (lengths == max_new_tokens) & ~np.asarray(stopped).reshape(n, k)
  m = accuracy_metrics(correct)
  m["mean_length"] = float(lengths.mean())
  m["truncated_fraction"] = float(truncated.mean())
  m["no_answer_fraction"] = report.num_no_answer / len(responses)
  m["grade_timeouts"] = float(report.num_timeouts)
  items = [{"id": p["id"], "answer": p["answer"],
            "extracted": list(report.answers[i * k:(i + 1) * k]),
            "correct": correct[i].tolist(), "length": lengths[i].tolist(),
            "truncated": truncated[i].tolist()} for i, p in enumerate(problems)]
  return m, items


def _math_verify_agreement(decoded: Sequence[str], refs: Sequence[str],
                           report: math_grading.GradeReport,
                           log: Callable[[str], None]) -> dict[str, float]:
  """{"math_verify_agreement": rate} of math-verify with our grades; {} (logged) without it."""
  try:
    return {"math_verify_agreement": math_grading.crosscheck_math_verify(
        decoded, refs, ours=report.correct)}
  except ImportError as e:
    log(f"eval: config.eval.math_verify is set but math-verify is missing ({e}); no "
        "agreement rate reported")
    return {}


def _benchmark_means(flat: Mapping[str, float], benchmarks: Sequence[str],
                     k: int) -> dict[str, float]:
  """The "avg/" metrics: the unweighted mean over the benchmarks (the paper's Avg column)."""
  return {f"avg/{key}": float(np.mean([flat[f"{b}/{key}"] for b in benchmarks]))
          for key in ["pass@1"] + ([f"avg@{k}", f"pass@{k}"] if k > 1 else [])}


def _write_results(record: Mapping[str, Any], texts: Sequence[Mapping[str, Any]], *,
                   workdir: str | pathlib.Path | None, log: Callable[[str], None]) -> None:
  """Writes eval/step_N.json and eval/step_N_responses.jsonl (process 0, with a workdir) and
  logs the table: every step of the workdir, else this evaluation's row alone."""
  step, settings = record["step"], record["settings"]
  if workdir is not None and jax.process_index() == 0:
    folder = pathlib.Path(workdir) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"step_{step}.json").write_text(metrics.strict_json(record, indent=1))
    with open(folder / f"step_{step}_responses.jsonl", "w", encoding="utf-8") as f:
      f.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in texts)
    log(table_from_workdir(workdir))
  else:
    log(format_table([(f"{record['label']} step {step}", record["metrics"])],
                     settings["benchmarks"], metric=headline(settings["samples"])))


def _benchmark_dir(e: EvalSettings, workdir: str | pathlib.Path | None) -> pathlib.Path | None:
  """The TFDS folder of the math benchmarks' builds; None when only `prompts` (no build) is
  evaluated."""
  if all(b == PROMPTS for b in e.benchmarks):
    return None
  data_dir = e.data_dir or (pathlib.Path(workdir) / "tfds" if workdir else "")
  if not data_dir:
    raise ValueError("config.eval.data_dir (or config.data.data_dir, or a workdir) must name the "
                     "TFDS folder of the benchmark builds")
  return pathlib.Path(data_dir)


def _buildable(name: str, source: str, data_dir: pathlib.Path) -> bool:
  """Whether dataset `name` is built in `data_dir`, or can be (a source or its manual folder)."""
  return bool(source) or math_datasets.BUILDERS[name](data_dir=data_dir).is_prepared() or \
      pathlib.Path(math_datasets.manual_dir(name, data_dir)).is_dir()


def missing_benchmarks(e: EvalSettings, workdir: str | pathlib.Path | None) -> list[str]:
  """One line per benchmark that is neither built nor has a source: the setting to give
  (`prompts` is read from its file, which it always needs)."""
  sources = dict(e.sources)
  out = []
  data_dir = _benchmark_dir(e, workdir)
  if data_dir is not None:
    missing = [b for b in e.benchmarks
               if b != PROMPTS and not _buildable(b, sources.get(b, ""), data_dir)]
    out += [f"--config.eval.sources.{b}=FILE (the published {COLUMNS[b]} file or folder)"
            for b in missing] + ([f"  or --config.eval.data_dir=DIR, a TFDS folder where "
                                  f"{'they are' if len(missing) > 1 else 'it is'} built "
                                  f"({data_dir} holds no build)"] if missing else [])
  if PROMPTS in e.benchmarks and not sources.get(PROMPTS):
    out.append(f"--{_PROMPTS_KEY}=FILE (your prompts with answers: a JSONL or parquet file, "
               "README \"Your own prompts\")")
  return out


def check_benchmarks(e: EvalSettings, workdir: str | pathlib.Path | None) -> None:
  """Raises one ConfigError (a ValueError the command line prints without a traceback) naming
  every benchmark that is neither built nor has a source (nor, for `prompts`, a file)."""
  missing = missing_benchmarks(e, workdir)
  if missing:
    raise ConfigError("the evaluation cannot start; set:\n  " + "\n  ".join(missing) +
                     "\n(or --config.eval.benchmarks to evaluate fewer)")


def missing_paths(config: ml_collections.ConfigDict) -> list[str]:
  """One line per model folder, dataset or benchmark a math run needs and was not given: the
  `--config.` setting to give (all at once, before anything loads)."""
  workdir = pathlib.Path(config.workdir)
  out = []
  if not config.model.path and not config.model.tokenizer:
    out.append("--config.model.path=DIR (the student's Hugging Face folder)")
  tasks = ([(f"tasks[{i}].", t.teacher, t.data) for i, t in enumerate(config.tasks)
            if not t.environment] if config.tasks else [("", config.teacher, config.data)])
  for prefix, teacher, data in tasks:
    if prefix and not data.dataset:   # a task with neither prompts nor an environment
      out.append(f"--config.{prefix}environment=MODULE:FACTORY (its environment adapter, "
                 "docs/environments.md) and its teacher: --config."
                 f"{prefix}teacher.path=DIR")
    if data.dataset not in math_datasets.DATASETS:
      continue
    if not teacher.path and not teacher.tokenizer:
      out.append(f"--config.{prefix}teacher.path=DIR (the teacher's Hugging Face folder)")
    if not _buildable(data.dataset, data.source, registry.data_dir(data, workdir)):
      out.append(f"--config.{prefix}data.source=FILE (the published {data.dataset} file or "
                 f"folder; or --config.{prefix}data.data_dir=DIR where it is built)")
  if config.eval.every:
    out += missing_benchmarks(EvalSettings.from_config(config), workdir)
  return out


def evaluate_with_config(model, tokenizer, config: ml_collections.ConfigDict, *, step: int,
                         workdir: str | pathlib.Path | None, label: str = "model",
                         log: Callable[[str], None] = print) -> dict[str, float]:
  """`evaluate` with the settings of `config.eval` (and its prompt / stop settings)."""
  e = EvalSettings.from_config(config)
  check_benchmarks(e, workdir)
  data_dir = _benchmark_dir(e, workdir)
  return evaluate(model, tokenizer, e, data_dir=data_dir, workdir=workdir, step=step,
                  label=label, log=log)


def make_evaluator(config: ml_collections.ConfigDict, tokenizer, *,
                   log: Callable[[str], None] = print) -> Callable[[int, Any], dict[str, float]]:
  """`evaluator(step, student_model) -> flat metrics` for `train.run(..., evaluator=...)`.

  Args:
    config: the run's config; `config.eval` holds the settings, results go to
      `config.workdir/eval/`.
    tokenizer: the student's tokenizer.
    log: where the table goes.

  Returns:
    The evaluator (settings are checked here, before training starts).
  """
  e = EvalSettings.from_config(config)   # fail before the run, not at its first evaluation
  if PROMPTS in e.benchmarks:
    # Its file, its answers and its prompts' lengths, checked now: never an error mid-run.
    prepare_benchmark(PROMPTS, tokenizer, e, data_dir=None, log=log)
  label = "student"

  def evaluator(step: int, model) -> dict[str, float]:
    return evaluate_with_config(model, tokenizer, config, step=step, workdir=config.workdir,
                                label=label, log=log)
  return evaluator


def train(config: ml_collections.ConfigDict) -> list[dict]:
  """The OPD trainer with the math evaluator (the runner of the paper's experiment files)."""
  from opd_jax import train as trainer  # pylint: disable=import-outside-toplevel
  if not config.workdir:
    raise ConfigError("config.workdir='' is not accepted; the trainer needs a folder "
                      "(--config.workdir=DIR)")
  missing = missing_paths(config)
  if missing:
    raise ConfigError("this run needs paths that are not set; give:\n  " + "\n  ".join(missing)
                      + ("\n(--config.eval.every=0 trains without evaluating)"
                         if config.eval.every else "") +
                      "\nor run the file's ':smoke' variant, which makes tiny stand-ins")
  TrainSettings.from_config(config)   # every setting checked (model folders first) before use
  dataset = (config.tasks[0].data.dataset if config.tasks else config.data.dataset)
  tokenizer = registry.tokenizer_for(config.model.tokenizer or config.model.path, dataset,
                                     pathlib.Path(config.workdir))
  return trainer.run(config, evaluator=make_evaluator(config, tokenizer))


# ----------------------------------------------------------------------------------------------
# standalone: a trainer checkpoint or a Hugging Face folder
# ----------------------------------------------------------------------------------------------


def _is_hf_folder(folder: pathlib.Path) -> bool:
  return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def evaluation_mesh(config: ml_collections.ConfigDict, log: Callable[[str], None] = print):
  """The config's mesh when it fits the devices present, else all of them data-parallel (said
  in `log`): a run planned for 8 devices can still be evaluated on a laptop."""
  m = config.mesh
  try:
    return sharding.make_mesh(m.data, m.fsdp, m.tensor)
  except ValueError as e:
    log(f"mesh: {e}; evaluating on the {len(jax.devices())} devices present, data-parallel "
        "(set --config.mesh.data/fsdp/tensor to choose)")
    return sharding.make_mesh(-1, 1, 1)


def run_config(checkpoint: str | pathlib.Path) -> ml_collections.ConfigDict | None:
  """The settings a trainer run was started with (its config.json), or None for a folder that
  is not a trainer run (a Hugging Face folder). Lists come back as tuples, as in the files."""
  # pylint: disable=import-outside-toplevel
  from opd_jax import checkpoint as ckpt_lib
  folder = pathlib.Path(checkpoint)
  if not folder.is_dir() or _is_hf_folder(folder):
    return None
  ckdir, _ = ckpt_lib.locate(folder, name="--checkpoint")
  path = ckdir.parent / "config.json"
  if not path.is_file():
    return None

  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    if isinstance(value, list):
      return tuple(tuples(v) for v in value)
    return value

  config = ml_collections.ConfigDict(tuples(json.loads(path.read_text())))
  config.workdir = str(ckdir.parent)
  # Benchmark sources added since the run was written (eval.sources.prompts) can be set too.
  from opd_jax import configs  # pylint: disable=import-outside-toplevel
  if "eval" in config and "sources" in config.eval:
    for name, value in configs.eval_fields().sources.items():
      if name not in config.eval.sources:
        config.eval.sources[name] = value
  return config


def load_model(config: ml_collections.ConfigDict, checkpoint: str | pathlib.Path, *,
               step: int | None = None, tokenizer: str = "",
               log: Callable[[str], None] = print) -> tuple[Any, Any, int, str]:
  """The model to evaluate: a Hugging Face folder, or the student of a trainer checkpoint.

  Args:
    config: the experiment config (its model settings describe the student of a run; its mesh
      shards the model).
    checkpoint: a Hugging Face folder, a trainer workdir, its checkpoints folder or one step's
      folder.
    step: which checkpoint step (None: the step folder's own, else the latest); ignored for a
      Hugging Face folder.
    tokenizer: tokenizer folder; "" = the Hugging Face folder's own (if it has one), else
      config.model.tokenizer, else config.model.path.
    log: where notes (a mesh that does not fit the devices) go.

  Returns:
    (model, tokenizer, step, label): step is 0 for a Hugging Face folder.
  """
  # pylint: disable=import-outside-toplevel
  from opd_jax import checkpoint as ckpt_lib
  from opd_jax import programs, steps
  from opd_jax.settings import ModelSource, TrainSettings
  folder = pathlib.Path(checkpoint)
  if not folder.is_dir():
    raise ConfigError(f"--checkpoint={str(checkpoint)!r} is not an existing folder")
  mesh = evaluation_mesh(config, log)
  has_own = (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()
  tok_dir = tokenizer or (str(folder) if _is_hf_folder(folder) and has_own else "") or \
      config.model.tokenizer or config.model.path
  if not tok_dir:
    raise ConfigError("no tokenizer: pass --tokenizer=DIR or set config.model.tokenizer / "
                      "config.model.path")
  tok = models.load_tokenizer(tok_dir)
  if _is_hf_folder(folder):
    source = ModelSource.from_config(config.model, "model")
    model, _ = models.load_hf_checkpoint(folder, dtype=jnp.dtype(source.dtype), mesh=mesh)
    model = models.decoder.with_config(model, source.apply_runtime(model.config))
    return model, tok, 0, folder.name
  try:
    ckdir, _ = ckpt_lib.locate(folder, name="--checkpoint")
  except ValueError as e:
    raise ConfigError(f"--checkpoint={str(checkpoint)!r} is neither a Hugging Face folder "
                      f"(config.json + *.safetensors) nor a trainer run ({e})") from e
  run = config.copy_and_resolve_references()
  if not run.workdir:
    run.workdir = str(ckdir.parent)
  s = TrainSettings.from_config(run)
  student_config = programs.model_config_of(s.model, len(tok))
  p = programs.build(s, student_config, len(tok), mesh)
  state, _, chosen = ckpt_lib.restore(folder, p.abstract_state, step=step, name="--checkpoint")
  # The parameters as stored (their own dtype), as a checkpoint's user would read them.
  graphdef, _ = steps.split_abstract(student_config)
  return nnx.merge(graphdef, state.params), tok, chosen, ckdir.parent.name


def main(argv, flags) -> dict[str, float]:
  """The standalone entry point (see the module docstring)."""
  del argv
  # pylint: disable=import-outside-toplevel
  from opd_jax import checkpoint as ckpt_lib
  if not pathlib.Path(flags.checkpoint).is_dir():
    raise ConfigError(f"--checkpoint={flags.checkpoint!r} is not an existing folder")
  config = flags.config if flags.config is not None else run_config(flags.checkpoint)
  if config is None:
    raise ConfigError(f"--checkpoint={flags.checkpoint!r} is not a trainer run with a "
                      "config.json: give --config=experiments/<name>.py (its eval settings)")
  folder = pathlib.Path(flags.checkpoint)
  if flags.workdir:
    workdir = flags.workdir
  elif _is_hf_folder(folder):
    workdir = config.workdir
    if not workdir:
      raise ConfigError("evaluating a Hugging Face folder needs --workdir=OUT (or "
                        "--config.workdir) for eval/step_0.json")
  else:
    workdir = str(ckpt_lib.locate(folder, name="--checkpoint")[0].parent)
  if config.get("smoke"):   # a ':smoke' experiment file: tiny benchmark files where none is set
    from opd_jax import smoke
    config = config.copy_and_resolve_references()
    config.workdir = str(workdir)
    smoke.fill_missing(config)
  # The benchmarks' files (and the prompts file's answers) checked before a model loads.
  e = EvalSettings.from_config(config)
  check_benchmarks(e, workdir)
  if PROMPTS in e.benchmarks:
    load_benchmark(PROMPTS, data_dir=None, source=dict(e.sources)[PROMPTS])
  model, tok, step, label = load_model(
      config, flags.checkpoint, step=None if flags.step < 0 else flags.step,
      tokenizer=flags.tokenizer)
  return evaluate_with_config(model, tok, config, step=step, workdir=workdir,
                              label=flags.label or label)


def _cli() -> None:
  # Flags are defined only when run as a program, so that importing this module (the trainer's
  # runner does) never clashes with opd_jax.main's --config.
  # pylint: disable=import-outside-toplevel
  import sys

  from absl import flags as absl_flags
  from ml_collections import config_flags

  from opd_jax import cli
  # A trainer run's own config.json is the config (--config.x=y overrides one setting); a
  # Hugging Face folder takes an experiment file's settings.
  ckpt_arg = cli.flag_value(sys.argv[1:], "checkpoint")
  own = run_config(ckpt_arg) if ckpt_arg else None
  if own is not None:
    if cli.flag_value(sys.argv[1:], "config") is not None:
      raise SystemExit(f"--config: {ckpt_arg} is a trainer run, evaluated with its own settings "
                       f"({own.workdir}/config.json); drop --config and change single settings "
                       "with --config.eval.samples=32 and the like")
    config = config_flags.DEFINE_config_dict("config", own)
  else:
    config = config_flags.DEFINE_config_file(
        "config", None, "Experiment config file exposing get_config(); ':arg' is passed to it.")
  checkpoint = absl_flags.DEFINE_string(
      "checkpoint", None, "Trainer workdir, checkpoint folder, or Hugging Face folder.",
      required=True)
  step = absl_flags.DEFINE_integer("step", -1, "Checkpoint step (-1: the latest).")
  workdir = absl_flags.DEFINE_string(
      "workdir", "", "Where eval/step_N.json goes (default: the run's workdir).")
  label = absl_flags.DEFINE_string("label", "", "Row label of the table.")
  tokenizer = absl_flags.DEFINE_string("tokenizer", "", "Tokenizer folder (see load_model).")

  def run(argv):
    cli.check_usage(argv)
    values = type("Flags", (), dict(
        config=config.value, checkpoint=checkpoint.value, step=step.value,
        workdir=workdir.value, label=label.value, tokenizer=tokenizer.value))
    main(argv, values)

  cli.run_main(run)


if __name__ == "__main__":
  _cli()
