"""The rollout samples pages: rollouts token by token, coloured by the teacher-student gap."""

from __future__ import annotations

import dataclasses
import html
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from opd_jax import metrics


@dataclasses.dataclass(frozen=True)
class RolloutView:
  """One rollout as the HTML page shows it, token by token (all per-token fields equally long).

  prompt: the prompt text.
  tokens: the response's tokens as strings.
  gaps: per token, log p_teacher(token) - log p_student(token) in nats (the OPD reward).
  teacher_top: per token, the teacher's top tokens as (token string, probability), best first.
  mask: per token, whether it counts in the loss (False: shown greyed).
  special: per token, whether it is a special token (shown boxed); () = none is.
  """
  prompt: str
  tokens: Sequence[str]
  gaps: Sequence[float]
  teacher_top: Sequence[Sequence[tuple[str, float]]]
  mask: Sequence[bool]
  special: Sequence[bool] = ()

  def __post_init__(self):
    n = len(self.tokens)
    lengths = {"gaps": len(self.gaps), "teacher_top": len(self.teacher_top),
               "mask": len(self.mask)}
    if self.special:
      lengths["special"] = len(self.special)
    bad = {k: v for k, v in lengths.items() if v != n}
    if bad:
      raise ValueError(f"RolloutView has {n} tokens but per-token fields of other lengths: {bad}")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.legend { display: flex; align-items: center; gap: .6em; margin: .5em 0 1.5em; }
.scale { width: 18em; height: 1em; border: 1px solid #999;
         background: linear-gradient(to right, rgb(214,39,40), #fff, rgb(31,119,180)); }
.rollout { border-top: 1px solid #ccc; padding: .8em 0; }
.prompt { white-space: pre-wrap; background: #f4f4f4; padding: .4em; font-size: .9em; }
.response { white-space: pre-wrap; font-family: ui-monospace, monospace; line-height: 1.7; }
.tok { border-radius: 2px; }
.tok:hover { outline: 1px solid #000; }
.masked { background: #e0e0e0; color: #999; }
.special { border: 1px solid #777; font-size: .8em; padding: 0 .15em; }
.stats { color: #555; font-size: .85em; }
"""


def _style(gap: float, scale: float) -> str:
  """Diverging scale: red for gap < 0 (teacher finds the token less likely), blue for gap > 0."""
  t = max(-1.0, min(1.0, gap / scale))
  end = (214, 39, 40) if t < 0 else (31, 119, 180)
  rgb = [round(255 + abs(t) * (c - 255)) for c in end]
  text = ";color:#fff" if abs(t) > 0.6 else ""   # keep dark backgrounds readable
  return f"background:rgb({rgb[0]},{rgb[1]},{rgb[2]}){text}"


def _visible(token: str) -> str:
  """Token text for display: newlines and tabs shown as symbols (and kept), then HTML-escaped."""
  return html.escape(token.replace("\n", "\u21b5\n").replace("\t", "\u2192\t"))


def write_rollouts_html(path: str | os.PathLike, rows: Sequence[RolloutView], *,
                        title: str = "Rollouts", scale: float | None = None) -> None:
  """Writes a self-contained HTML page showing `rows` token by token.

  Each counted token's background encodes its teacher-student log-prob gap on a diverging
  scale from -scale (red) through 0 (white) to +scale (blue); hovering shows the gap and the
  teacher's top tokens with probabilities; uncounted tokens are grey. All text is escaped.

  Args:
    path: the .html file to write (parent folders are created).
    rows: the rollouts.
    title: the page title.
    scale: the |gap| in nats that gets the full colour; None: the largest finite |gap| of the
      counted tokens on the page.
  """
  rows = list(rows)
  if scale is None:
    finite = [abs(float(g)) for r in rows for g, m in zip(r.gaps, r.mask)
              if m and math.isfinite(float(g))]
    scale = max(finite, default=1.0) or 1.0
  if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
    raise ValueError(f"write_rollouts_html scale={scale!r} is not accepted; give a positive "
                     "finite number of nats")
  out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
         f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
         f"<h1>{html.escape(title)}</h1>",
         '<div class="legend"><span>gap = log p<sub>teacher</sub>(token) &minus; '
         "log p<sub>student</sub>(token), nats:</span>"
         f"<span>&minus;{scale:.3g}</span>"
         '<span class="scale" title="diverging colour scale"></span>'
         f"<span>+{scale:.3g}</span>"
         '<span class="tok masked">&nbsp;not counted&nbsp;</span></div>'
         '<div class="stats">Red: the teacher finds the sampled token less likely than the '
         "student does (negative reward); blue: more likely. Hover a token for its gap and the "
         "teacher's top tokens with probabilities.</div>"]
  for i, row in enumerate(rows):
    special = row.special or (False,) * len(row.tokens)
    counted = [float(g) for g, m in zip(row.gaps, row.mask) if m]
    mean = sum(counted) / len(counted) if counted else float("nan")
    out.append('<div class="rollout">')
    out.append(f'<div class="stats">rollout {i}: {len(row.tokens)} tokens, {len(counted)} '
               f"counted, mean gap {mean:+.4f} nats</div>")
    out.append(f'<div class="prompt">{html.escape(row.prompt)}</div>')
    spans = []
    for token, gap, top, counted_token, marked in zip(row.tokens, row.gaps, row.teacher_top,
                                                      row.mask, special):
      gap = float(gap)
      top_text = ", ".join(f"{t!r} {float(p):.3f}" for t, p in top)
      tip = f"gap {gap:+.4f} nats\nteacher top: {top_text}"
      if not counted_token:
        tip = "not counted\n" + tip
        style, cls = "", "tok masked"
      elif not math.isfinite(gap):
        style, cls = ' style="outline:1px dashed #000"', "tok"
      else:
        style, cls = f' style="{_style(gap, scale)}"', "tok"
      cls += " special" if marked else ""
      spans.append(f'<span class="{cls}"{style} title="{html.escape(tip, quote=True)}">'
                   f"{_visible(token)}</span>")
    out.append('<div class="response">' + "".join(spans) + "</div>")
    out.append("</div>")
  out += ["</body>", "</html>"]
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  metrics.write_atomically(path, "\n".join(out) + "\n")


def token_texts(tokenizer, ids: Sequence[int]) -> tuple[list[str], list[bool]]:
  """Each token of a response as the text it adds (a byte-level "Ġthe" is " the", "Ċ" a
  newline), and whether it is a special token (its own name then, e.g. "<|im_end|>").

  A character split over several byte-level tokens appears on the token that completes it
  (the ones before show ""), so the texts join to the decoded response.
  """
  special_ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
  special_ids |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                  if getattr(t, "special", False)}
  def text(seq) -> str:
    return tokenizer.decode(list(seq), skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)

  texts, special, start = [], [], 0
  for i, token_id in enumerate(ids):
    if token_id in special_ids:
      texts.append(tokenizer.convert_ids_to_tokens([token_id])[0])
      special.append(True)
      start = i + 1
      continue
    special.append(False)
    # Decoded after the token before it: tokenizers that drop a word's leading space when it
    # starts the text (SentencePiece) keep it here.
    context = list(ids[start - 1:start]) if start and ids[start - 1] not in special_ids else []
    head, piece = text(context), text(context + list(ids[start:i + 1]))
    piece = piece[len(head):] if piece.startswith(head) else text(ids[start:i + 1])
    if piece.endswith("\ufffd") and i + 1 < len(ids) and i + 1 - start < 4:
      texts.append("")   # an incomplete UTF-8 character: shown with the token that ends it
      continue
    texts.append(piece)
    start = i + 1
  return texts, special


def write_samples_page(path: str | os.PathLike, tokenizer, batch: Mapping[str, np.ndarray],
                       scores: Mapping[str, np.ndarray], count: int,
                       prompts_text: Sequence[str], *, title: str = "Rollouts") -> None:
  """Writes the samples page of one trainer step: its first `count` rollouts, token by token,
  each token with its teacher-student gap and the teacher's top 3 tokens.

  Args:
    path: the .html file to write (parent folders are created).
    tokenizer: the student's Hugging Face tokenizer: tokens are shown as the text they decode
      to (`token_texts`), special tokens boxed under their names.
    batch: host arrays of the step's rollouts: "response" and "response_mask" [B, T] (a row's
      response is its first `response_mask[r].sum()` tokens) and "loss_mask" [B, T].
    scores: host arrays of the step's scoring: "teacher_logprobs" and "behavior_logprobs"
      [B, T], the teacher's top-K "t_indices" and "t_logits" [B, T, K] and "t_lse" [B, T].
    count: how many rollouts to show at most (the first ones).
    prompts_text: per rollout row, the prompt text shown above it.
    title: the page's title (the trainer: the run's folder and the step).
  """
  host = {k: batch[k] for k in ("response", "response_mask", "loss_mask")} | {
      k: scores[k] for k in ("teacher_logprobs", "behavior_logprobs", "t_indices", "t_logits",
                             "t_lse")}
  views = []
  for r in range(min(count, host["response"].shape[0])):
    n = int(host["response_mask"][r].sum())
    ids = host["response"][r, :n].tolist()
    top_ids = host["t_indices"][r, :n, :3]
    top_p = np.exp(host["t_logits"][r, :n, :3] - host["t_lse"][r, :n, None])
    texts, special = token_texts(tokenizer, ids)
    views.append(RolloutView(
        prompt=prompts_text[r], tokens=tuple(texts), special=tuple(special),
        gaps=tuple(float(g) for g in (host["teacher_logprobs"][r, :n]
                                      - host["behavior_logprobs"][r, :n])),
        teacher_top=tuple(tuple(zip([token_texts(tokenizer, [i])[0][0] for i in t.tolist()],
                                    (float(x) for x in p))) for t, p in zip(top_ids, top_p)),
        mask=tuple(bool(c) for c in host["loss_mask"][r, :n])))
  write_rollouts_html(path, views, title=title)
