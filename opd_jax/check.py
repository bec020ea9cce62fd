"""The teacher/student compatibility check: OK / WARN / FAIL lines before a run is launched.

`python -m opd_jax.check --config=experiments/<name>.py[:smoke]` reports, for each task's teacher
and the student: embedding rows against tokenizer sizes and the shared range; pad, eos, bos and
the stop and mask strings as ids on both sides; the two chat templates rendering one fixed
conversation (the first difference shown token by token, a system prompt the template injects);
the re-tokenisation round trip of a sample of the dataset's prompts and of text from the
student's vocabulary; which tokens the special-token mask removes; and, with the models loaded,
the renderer-bias probe: each model's mean log-prob per token of a fixed response after its own
rendering of the prompt and after the other side's (nats/token). The last line is one JSON
object. The trainer runs the cheap form (tokenizers and config.json files only, no model, no
dataset) in `train.setup` before anything is compiled, and refuses a pair with a FAIL line
(`Incompatible`, a ConfigError whose message is that line).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from opd_jax import cli, masking, models, programs
from opd_jax.data import prompts, registry
from opd_jax.settings import ConfigError, TrainSettings

OK, WARN, FAIL = "OK", "WARN", "FAIL"
# The fixed conversation both templates render, and the fixed response of the bias probe.
CONVERSATION = ({"role": "system", "content": "You are a careful assistant."},
                {"role": "user", "content": "What is 12 + 30?"})
RESPONSE = "12 + 30 = 42."
BIAS_WARN = 0.05          # nats/token between the two renderings: WARN above it
SPECIAL_LOGP_WARN = -10.0  # nats: a model scoring the response's end-of-turn token below this
VOCAB_SAMPLE = 256        # single tokens of the student's vocabulary re-tokenised
PROMPT_SAMPLE = 16        # dataset prompts re-tokenised (the command; not the trainer)
_SENTINEL = "SYSTEM-SENTINEL-7f3a"


class Incompatible(ConfigError):
  """The start-up check found a FAIL line; the message is that line."""


@dataclasses.dataclass(frozen=True)
class Line:
  level: str
  topic: str
  text: str

  def __str__(self) -> str:
    return f"{self.level:<4}  {self.topic}: {self.text}"


@dataclasses.dataclass
class Side:
  """One model of the pair: its name, tokenizer and embedding rows (config.json)."""
  name: str
  tokenizer: Any
  rows: int


def _tok(tokenizer, ids: Sequence[int]) -> list[str]:
  return [str(t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


def _pieces(tokenizer, ids: Sequence[int]) -> list[str]:
  """Each id decoded on its own (what a token reads as)."""
  return [tokenizer.decode([int(i)]) for i in ids]


# ----------------------------------------------------------------------------------------------
# the lines
# ----------------------------------------------------------------------------------------------


def vocab_lines(student: Side, teacher: Side) -> tuple[list[Line], int]:
  """Embedding rows vs tokenizer sizes, the shared range and whether ids name the same tokens;
  and the shared vocabulary size."""
  out = []
  ns, nt = len(student.tokenizer), len(teacher.tokenizer)
  shared = min(ns, nt, student.rows, teacher.rows)
  for side, n in ((student, ns), (teacher, nt)):
    if n > side.rows:
      added = set(getattr(side.tokenizer, "added_tokens_decoder", {}) or {})
      extra = range(side.rows, n)
      level = WARN if all(i in added for i in extra) else FAIL
      ids = f"id {side.rows}" if n == side.rows + 1 else f"ids {side.rows}..{n - 1}"
      out.append(Line(level, "vocabulary", f"the {side.name}'s tokenizer has {n} tokens but its "
                      f"embedding only {side.rows} rows: {ids} " +
                      f"({', '.join(map(repr, _tok(side.tokenizer, extra[:3])))}) have no row" +
                      ("; they are added tokens, never sampled: a prompt must not contain them"
                       if level == WARN else "")))
  common = min(ns, nt)
  s_tokens, t_tokens = _tok(student.tokenizer, range(common)), _tok(teacher.tokenizer,
                                                                    range(common))
  differ = [i for i in range(common) if s_tokens[i] != t_tokens[i]]
  summary = (f"student tokenizer {ns} tokens, embedding {student.rows} rows; {teacher.name} "
             f"tokenizer {nt} tokens, embedding {teacher.rows} rows; shared range [0, {shared})")
  if differ:
    shown = ", ".join(f"id {i}: {s_tokens[i]!r} vs {t_tokens[i]!r}" for i in differ[:3])
    out.append(Line(FAIL, "vocabulary", f"{len(differ)} of {common} shared ids name different "
                    f"tokens ({shown}): the {teacher.name} would score other tokens than the "
                    f"student sampled; {summary}"))
  elif ns != nt:
    out.append(Line(WARN, "vocabulary", f"the tokenizers agree on their first {common} ids but "
                    f"differ in size; ids >= {shared} are never sampled nor scored; {summary}"))
  else:
    padding = "" if min(student.rows, teacher.rows) <= ns else (
        f"; embedding rows past {shared} are padding, banned in rollouts")
    out.append(Line(OK, "vocabulary", f"same {ns} tokens on both sides{padding}; {summary}"))
  return out, shared


def _special(tokenizer, name: str) -> int | None:
  value = getattr(tokenizer, f"{name}_token_id", None)
  return None if value is None else int(value)


def special_id_lines(student: Side, teacher: Side, stop_strings: Sequence[str],
                     mask_strings: Sequence[str]) -> list[Line]:
  """pad / eos / bos and the stop and mask strings as ids on both sides; pad == eos; the end of
  turn masked out of the loss."""
  out = []
  for name in ("pad", "eos", "bos"):
    ids = [_special(side.tokenizer, name) for side in (student, teacher)]
    shown = " vs ".join(f"{side.name} " + ("none" if i is None else
                                             f"{_tok(side.tokenizer, [i])[0]!r} (id {i})")
                        for side, i in zip((student, teacher), ids))
    # A differing eos is a warning: responses end on the stop strings (their lines below).
    level = OK if ids[0] == ids[1] else WARN
    out.append(Line(level, f"{name} token", ("equal: " if level == OK else "differ: ") + shown))
  for side in (student, teacher):
    pad, eos = _special(side.tokenizer, "pad"), _special(side.tokenizer, "eos")
    if pad is not None and pad == eos:
      out.append(Line(WARN, "pad == eos", f"the {side.name}'s pad and eos are both "
                      f"{_tok(side.tokenizer, [pad])[0]!r} (id {pad}): this trainer masks padding "
                      "by length, never by id, so the end of turn stays in the loss; code that "
                      "masks pad ids would drop it and the student would never learn to stop"))
  ids = {}
  for kind, strings in (("stop strings", stop_strings), ("mask strings", mask_strings)):
    for string in strings:
      per_side = []
      for side in (student, teacher):
        try:
          per_side.append(masking.ids_for_strings(side.tokenizer, [string])[0])
        except ValueError:
          per_side.append(None)
      ids[(kind, string)] = per_side[0]
      shown = f"{string!r}: student id {per_side[0]}, {teacher.name} id {per_side[1]}"
      if per_side[0] is None:
        out.append(Line(FAIL, kind, f"{shown}: not one token of the student's tokenizer"))
      elif per_side[0] != per_side[1]:
        out.append(Line(WARN, kind, f"{shown}: the {teacher.name} reads that id as "
                        f"{_tok(teacher.tokenizer, [per_side[0]])[0]!r}"))
      else:
        out.append(Line(OK, kind, shown))
  masked = [(s, i) for (k, s), i in ids.items() if k == "mask strings" and i is not None]
  if masked:
    out.append(Line(OK, "special-token mask", "removes from the loss the first occurrence per "
                    "response of " + ", ".join(f"{s!r} (id {i})" for s, i in masked)))
  else:
    out.append(Line(OK, "special-token mask", "removes nothing (loss.mask_strings is empty)"))
  ends = {i for (k, _), i in ids.items() if k == "stop strings"} | {
      _special(student.tokenizer, "eos")}
  for s, i in masked:
    if i in ends:
      out.append(Line(WARN, "special-token mask", f"{s!r} (id {i}) ends a turn: masking its "
                      "first occurrence leaves the student no signal to stop (keep it only on "
                      "purpose)"))
  return out


def _render(tokenizer, messages, *, generation: bool = True) -> list[int]:
  return list(tokenizer.apply_chat_template([dict(m) for m in messages],
                                            add_generation_prompt=generation, tokenize=True,
                                            return_dict=True)["input_ids"])


def injected_system_prompt(tokenizer) -> str | None:
  """The system message a chat template adds to a conversation that has none (None: none)."""
  user = [dict(CONVERSATION[1])]
  with_system = tokenizer.apply_chat_template([{"role": "system", "content": _SENTINEL}] + user,
                                              tokenize=False)
  plain = tokenizer.apply_chat_template(user, tokenize=False)
  at = with_system.find(_SENTINEL)
  head = with_system[:at] if at > 0 else ""         # the system turn's header
  if not head or head not in plain:
    return None
  after = with_system[at + len(_SENTINEL):]
  closer = after[:max(after.find(user[0]["content"]), 0)]   # system turn end + user header
  rest = plain[plain.find(head) + len(head):]
  end = rest.find(closer) if closer else -1
  return rest[:end] if end >= 0 else rest


def template_lines(student: Side, teacher: Side, chat_template: bool) -> list[Line]:
  """The fixed conversation under both chat templates; a system prompt a template injects."""
  if not chat_template:
    return [Line(OK, "chat template", "data.chat_template=False: prompts are raw text on both "
                 "sides (no template is applied)")]
  missing = [side.name for side in (student, teacher)
             if not getattr(side.tokenizer, "chat_template", None)]
  if missing:
    return [Line(FAIL, "chat template", f"data.chat_template=True but the {' and '.join(missing)}"
                 " tokenizer has no chat_template")]
  out = []
  s_ids, t_ids = _render(student.tokenizer, CONVERSATION), _render(teacher.tokenizer,
                                                                   CONVERSATION)
  if s_ids == t_ids:
    out.append(Line(OK, "chat template", f"both render the fixed conversation to the same "
                    f"{len(s_ids)} ids"))
  else:
    i = next((j for j, (a, b) in enumerate(zip(s_ids, t_ids)) if a != b), min(len(s_ids),
                                                                               len(t_ids)))
    out.append(Line(WARN, "chat template", f"the renderings differ from token {i} (student "
                    f"{len(s_ids)} ids, {teacher.name} {len(t_ids)}): student "
                    f"{_pieces(student.tokenizer, s_ids[i:i + 6])} vs {teacher.name} "
                    f"{_pieces(teacher.tokenizer, t_ids[i:i + 6])}; the trainer renders each "
                    "side's prompt with its own template (see the renderer-bias probe)"))
  for side in (student, teacher):
    injected = injected_system_prompt(side.tokenizer)
    if injected:
      out.append(Line(WARN, "system prompt", f"the {side.name}'s template injects a system "
                      f"prompt when the conversation has none: {injected.strip()[:80]!r}"))
  return out


def round_trip_lines(student: Side, teacher: Side, vocab: int, *,
                     prompt_texts: Sequence[str] = (), max_fraction: float = 0.0,
                     seed: int = 0) -> list[Line]:
  """Text from the student's vocabulary (single tokens and one run of them) and the dataset's
  prompts: decoded by the student, re-encoded by both tokenizers, compared."""
  out = []
  specials = set(getattr(student.tokenizer, "all_special_ids", ()) or ())
  candidates = np.array([i for i in range(vocab) if i not in specials])
  if len(candidates):
    ids = np.random.default_rng(seed).choice(candidates, min(VOCAB_SAMPLE, len(candidates)),
                                             replace=False)
    texts = [student.tokenizer.decode([int(i)]) for i in ids]
    texts.append(student.tokenizer.decode([int(i) for i in ids[:64]]))
    bad = [t for t in texts if student.tokenizer.encode(t, add_special_tokens=False)
           != teacher.tokenizer.encode(t, add_special_tokens=False)]
    level = OK if not bad else WARN
    out.append(Line(level, "round trip (vocabulary)", f"{len(texts) - len(bad)} of {len(texts)} "
                    f"texts from the student's vocabulary encode to the same ids on both sides"
                    + (f" (first differing: {bad[0][:40]!r})" if bad else "")))
  if prompt_texts:
    ids = [student.tokenizer.encode(t, add_special_tokens=False) for t in prompt_texts]
    stats = prompts.retokenization_stats(ids, prompts.retokenize(ids, student.tokenizer,
                                                                 teacher.tokenizer))
    fraction = stats.fraction
    level = OK if fraction == 0 else (FAIL if fraction > max_fraction else WARN)
    out.append(Line(level, "round trip (prompts)", f"{len(ids)} dataset prompts decoded by the "
                    f"student and re-encoded by the {teacher.name}: mismatch fraction "
                    f"{fraction:.3f} (data.retokenize_max_fraction={max_fraction})"))
  return out


def pair_lines(student: Side, teacher: Side, *, chat_template: bool,
               stop_strings: Sequence[str], mask_strings: Sequence[str],
               prompt_texts: Sequence[str] = (), max_fraction: float = 0.0) -> list[Line]:
  """Every tokenizer-level line of one student/teacher pair (the cheap form)."""
  out, vocab = vocab_lines(student, teacher)
  out += special_id_lines(student, teacher, stop_strings, mask_strings)
  out += template_lines(student, teacher, chat_template)
  out += round_trip_lines(student, teacher, vocab, prompt_texts=prompt_texts,
                          max_fraction=max_fraction)
  return out


# ----------------------------------------------------------------------------------------------
# the renderer-bias probe (models loaded)
# ----------------------------------------------------------------------------------------------


def response_logprobs(model, prompt_ids: Sequence[int], response_ids: Sequence[int],
                      vocab: int) -> np.ndarray:
  """The model's log-probs (over the shared vocabulary) of `response_ids` after `prompt_ids`."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  tokens = np.asarray([list(prompt_ids) + list(response_ids)], np.int32)

  @nnx.jit
  def logits(m, t):
    return models.forward(m, t, jax.numpy.ones(t.shape, bool))

  logp = jax.nn.log_softmax(logits(model, tokens)[0, :, :vocab].astype("float32"), axis=-1)
  at = np.arange(len(response_ids)) + len(prompt_ids) - 1
  return np.asarray(logp)[at, np.asarray(response_ids)]


def renderer_bias_lines(student_model, teacher_model, student: Side, teacher: Side,
                        prompt_ids: tuple[Sequence[int], Sequence[int]],
                        response_ids: Sequence[int], vocab: int) -> tuple[list[Line], dict]:
  """Each model's mean log-prob per token of `response_ids` after its own rendering of the
  prompt and after the other side's (`prompt_ids` = (student's, teacher's)); the teacher's
  log-prob of the response's last token (its end of turn)."""
  out, figures = [], {}
  s_prompt, t_prompt = prompt_ids
  for model, side, own, other, other_name in (
      (teacher_model, teacher, t_prompt, s_prompt, "student"),
      (student_model, student, s_prompt, t_prompt, teacher.name)):
    lp_own = response_logprobs(model, own, response_ids, vocab)
    lp_other = response_logprobs(model, other, response_ids, vocab)
    bias = float(lp_own.mean() - lp_other.mean())
    role = "teacher" if side is teacher else "student"
    figures[role] = {"own": float(lp_own.mean()), "other": float(lp_other.mean()),
                          "bias": bias}
    out.append(Line(WARN if abs(bias) > BIAS_WARN else OK, "renderer bias",
                    f"the {side.name} scores the fixed response at {lp_own.mean():.3f} "
                    f"nats/token after its own rendering, {lp_other.mean():.3f} after that of the "
                    f"{other_name}: {bias:+.3f} nats/token"))
    if side is teacher:
      last = float(lp_own[-1])
      figures[role]["last_token"] = last
      out.append(Line(WARN if last < SPECIAL_LOGP_WARN else OK, "end of turn",
                      f"the {side.name} scores the response's last token "
                      f"{_tok(student.tokenizer, [response_ids[-1]])[0]!r} at {last:.2f} nats "
                      "after its own rendering"))
  return out, figures


# ----------------------------------------------------------------------------------------------
# the trainer's start-up form and the command
# ----------------------------------------------------------------------------------------------


def _teacher_tokenizer(task, student_tokenizer, workdir: pathlib.Path):
  if task.data is not None:
    return registry.tokenizer_for(task.teacher.tokenizer, task.data.dataset, workdir)
  return (models.load_tokenizer(task.teacher.tokenizer) if task.teacher.tokenizer
          else student_tokenizer)


def _pairs(s: TrainSettings, tokenizer, student_rows: int, workdir: pathlib.Path):
  """(task, student Side, teacher Side) per task, from tokenizers and config.json files."""
  for task in s.tasks:
    teacher_tok = _teacher_tokenizer(task, tokenizer, workdir)
    rows = programs.model_config_of(task.teacher, len(teacher_tok)).vocab_size
    name = "teacher" if len(s.tasks) == 1 else f"teacher of task {task.name!r}"
    yield task, Side("student", tokenizer, student_rows), Side(name, teacher_tok, rows)


def _templated(s: TrainSettings, task) -> bool:
  """Whether the task renders prompts with chat templates (datasets of stored ids do not)."""
  return s.data.chat_template and (task.data is None or registry.is_text(task.data.dataset))


def startup(s: TrainSettings, tokenizer, student_rows: int, workdir: pathlib.Path,
            log: Callable[[str], None] = print) -> list[Line]:
  """The cheap form, run by the trainer before anything is compiled: raises `Incompatible` with
  the first FAIL line; logs the WARN lines."""
  lines = []
  for task, student, teacher in _pairs(s, tokenizer, student_rows, workdir):
    lines += pair_lines(student, teacher, chat_template=_templated(s, task),
                        stop_strings=s.rollout.stop_strings, mask_strings=s.loss.mask_strings)
  failed = [line for line in lines if line.level == FAIL]
  if failed:
    raise Incompatible(f"the teacher/student check failed: {failed[0]} (the full report: "
                       "python -m opd_jax.check --config=<this experiment>)")
  warned = [line for line in lines if line.level == WARN]
  log(f"teacher/student check: {len(lines) - len(warned)} OK, {len(warned)} WARN" +
      "".join(f"\n  {line}" for line in warned))
  return lines


def trainer_config(config, workdir: pathlib.Path):
  """A trainer-shaped config of an experiment: itself, or, for the demo (experiment
  "tiny_arith"), its first run with the models it cached in the workdir (teacher/,
  student_seed<seed>/), random weights of their shapes while they are not trained yet; for the
  real-model demo (experiment "smollm_heal"), its LSM run on the converted SmolLM2 pair."""
  c = ml_collections.ConfigDict(config.copy_and_resolve_references().to_dict())
  c.workdir = str(workdir)
  if c.get("experiment") == "smollm_heal":
    return _heal_config(c, workdir)
  if c.get("experiment") != "tiny_arith":
    return c
  demo = c.demo
  seed = int(demo.seeds[0])
  del c["demo"]
  c.experiment, c.seed, c.loss.estimator, c.rollout.top_p = "opd", seed, "lsm", 0.9
  for group, folder, shape, std in (
      (c.model, workdir / f"student_seed{seed}", demo.student, demo.student_init_std),
      (c.teacher, workdir / "teacher", demo.teacher, demo.teacher_init_std)):
    if (folder / "config.json").is_file():
      group.path = group.tokenizer = str(folder)
    else:
      for key, value in shape.items():
        group.random[key] = value
      group.random.init_std = std
  return c


def _heal_config(c, workdir: pathlib.Path):
  """The real-model demo's pair (`make real-demo`): SmolLM2-135M-Instruct from its package and
  the pruned student, both converted into the workdir as the demo does (cached there), with a
  one-prompt chat_prompts file of the fixed conversation's user turn."""
  from opd_jax import smollm  # pylint: disable=import-outside-toplevel
  dropped = tuple(c.heal.dropped_layers)
  del c["heal"]
  c.experiment, c.loss.estimator, c.rollout.top_p = "opd", "lsm", 0.9
  teacher = smollm.hf_folder(workdir / "teacher", log=lambda _: None)
  student = smollm.pruned_folder(teacher, workdir / "student", dropped, log=lambda _: None)
  c.model.path = c.model.tokenizer = str(student)
  c.teacher.path = c.teacher.tokenizer = str(teacher)
  source = workdir / "check_prompts.jsonl"
  source.write_text(json.dumps({"prompt": CONVERSATION[1]["content"]}) + "\n")
  c.data.dataset, c.data.source = registry.CHAT_PROMPTS, str(source)
  return c


def report(config, *, log: Callable[[str], None] = print, load_models: bool = True) -> dict:
  """The full report of an experiment config: every line per task, the renderer-bias probe
  when `load_models`, and the JSON summary (also the last line logged)."""
  # pylint: disable=import-outside-toplevel
  from opd_jax import sharding, smoke
  workdir = pathlib.Path(config.workdir or tempfile.mkdtemp(prefix="opd_check_"))
  c = trainer_config(config, workdir)
  if c.get("smoke"):
    smoke.fill_missing(c, log=log)
  s = TrainSettings.from_config(c)
  from opd_jax import tasks as tasks_lib
  tokenizer = tasks_lib.student_tokenizer(s, workdir)
  student_config = programs.model_config_of(s.model, len(tokenizer))
  mesh = sharding.make_mesh(*s.mesh.shape) if load_models else None
  student_model = (programs.load_model(s.model, len(tokenizer), seed=s.seed, mesh=mesh)
                   if load_models else None)
  summary = {"tasks": {}}
  for task, student, teacher in _pairs(s, tokenizer, student_config.vocab_size, workdir):
    examples, encode = [], None
    if task.data is not None:
      examples = registry.open_split(task.data, workdir)
      encode = registry.encoder(task.data.dataset, tokenizer, teacher.tokenizer,
                                chat_template=s.data.chat_template,
                                max_prompt_len=s.data.max_prompt_len)
    sample = [examples[i] for i in range(min(PROMPT_SAMPLE, len(examples)))]
    texts = ([str(encode(e).prompt_text) for e in sample]
             if task.data is not None and registry.is_text(task.data.dataset) else [])
    lines = pair_lines(student, teacher, chat_template=_templated(s, task),
                       stop_strings=s.rollout.stop_strings, mask_strings=s.loss.mask_strings,
                       prompt_texts=texts, max_fraction=s.data.retokenize_max_fraction)
    figures = {}
    vocab = min(len(tokenizer), len(teacher.tokenizer), student.rows, teacher.rows)
    if load_models and not any(x.level == FAIL and x.topic == "vocabulary" for x in lines):
      teacher_model = programs.load_model(task.teacher, len(teacher.tokenizer),
                                          seed=s.seed + 1000 + task_index(s, task), mesh=mesh)
      prompt_pair, response = _probe_inputs(s, _templated(s, task), tokenizer,
                                            teacher.tokenizer, sample, encode)
      more, figures = renderer_bias_lines(student_model, teacher_model, student, teacher,
                                          prompt_pair, response, vocab)
      lines += more
    log(f"== task {task.name!r}: student {s.model.path or 'random weights'}, teacher "
        f"{task.teacher.path or 'random weights'}")
    for line in lines:
      log(str(line))
    summary["tasks"][task.name] = {
        "ok": sum(x.level == OK for x in lines), "warn": [str(x) for x in lines
                                                          if x.level == WARN],
        "fail": [str(x) for x in lines if x.level == FAIL], "renderer_bias": figures}
  fails = sum(len(t["fail"]) for t in summary["tasks"].values())
  warns = sum(len(t["warn"]) for t in summary["tasks"].values())
  summary["status"] = FAIL if fails else (WARN if warns else OK)
  log(json.dumps(summary))
  return summary


def task_index(s: TrainSettings, task) -> int:
  return list(s.tasks).index(task)


def _probe_inputs(s: TrainSettings, templated: bool, tokenizer, teacher_tokenizer, sample,
                  encode):
  """((student prompt ids, teacher prompt ids), response ids) of the bias probe: the fixed
  conversation under both templates and the fixed response with the student's end of turn; a
  dataset's first example and its reference where prompts are not rendered from text."""
  if sample and encode is not None:
    first = encode(sample[0])
    if first.target is not None and not templated:
      return (list(first.prompt), list(first.teacher_prompt)), [int(i) for i in first.target]
  if templated and getattr(tokenizer, "chat_template", None) and getattr(
      teacher_tokenizer, "chat_template", None):
    prompt_pair = (_render(tokenizer, CONVERSATION), _render(teacher_tokenizer, CONVERSATION))
  else:
    text = CONVERSATION[1]["content"]
    prompt_pair = (tokenizer.encode(text, add_special_tokens=False),
                   teacher_tokenizer.encode(text, add_special_tokens=False))
  try:
    stops = masking.ids_for_strings(tokenizer, s.rollout.stop_strings[:1])
  except ValueError:   # reported by the stop-strings line
    stops = []
  end = stops or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
  return prompt_pair, tokenizer.encode(RESPONSE, add_special_tokens=False) + end


def _cli() -> None:
  # pylint: disable=import-outside-toplevel
  from absl import app, flags
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file(
      "config", None, "Experiment config file exposing get_config(); ':arg' is passed to it.")
  no_models = flags.DEFINE_bool("no_models", False, "Tokenizers and config.json files only "
                                "(the trainer's start-up form): no renderer-bias probe.")

  def run(argv):
    cli.require_config(argv, config)
    out = report(config.value, load_models=not no_models.value)
    return 1 if out["status"] == FAIL else 0

  app.run(run)


if __name__ == "__main__":
  _cli()
