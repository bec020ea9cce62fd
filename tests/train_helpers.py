"""Test helpers: a tiny OPD trainer config (random models, tiny_arith prompts), as a ConfigDict
and as an experiment file that `python -m opd_jax.main` can load in a subprocess."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The body of get_config(); `c` starts as configs.opd(). Random student and teacher, 8 prompts x 2
# rollouts of up to 5 tokens, two mini-batches per iteration.
TINY = """
c.steps = 4
c.data.dataset = "tiny_arith"
c.data.data_dir = {data_dir!r}
c.data.prompts_per_step = 4
c.data.chat_template = False
c.rollout.num_samples = 2
c.rollout.max_new_tokens = 5
c.rollout.stop_strings = ("<eos>",)
c.rollout.banned_strings = ("<pad>",)
c.model.random.hidden_size = 32
c.model.random.intermediate_size = 64
c.teacher.random.hidden_size = 32
c.teacher.random.intermediate_size = 64
c.teacher.random.init_std = 0.5
c.loss.k = 4
c.opt.minibatch_size = 4
c.opt.lr = 1e-3
c.checkpoint.every = 2
c.log.samples_every = 2
c.log.tensorboard = False
c.log.plot = False
"""


def tiny_config(workdir, data_dir, /, **overrides):
  """The TINY config as a ConfigDict, with dotted-name overrides ("loss.estimator": "sft")."""
  from opd_jax import configs  # pylint: disable=import-outside-toplevel
  c = configs.opd()
  exec(TINY.format(data_dir=str(data_dir)), {"c": c})  # pylint: disable=exec-used
  c.workdir = str(workdir)
  for name, value in overrides.items():
    *parents, leaf = name.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def write_config_file(path: pathlib.Path, data_dir, extra: str = "") -> pathlib.Path:
  """An experiment file with get_config() returning the TINY config (plus `extra` lines)."""
  body = (TINY.format(data_dir=str(data_dir)) + extra).strip().splitlines()
  path.write_text("from opd_jax import configs\n\n\ndef get_config(arg=None):\n"
                  "  c = configs.opd()\n" + "".join(f"  {line}\n" for line in body) +
                  "  return c\n")
  return path


def undocumented_metrics(names) -> list[str]:
  """The metric names that docs/metrics.md's tables do not list (`<...>` there is one path
  part: a benchmark, a task name, a k; `task/<name>/` prefixes any listed name)."""
  text = (ROOT / "docs" / "metrics.md").read_text()
  listed = re.findall(r"^\| `([^`]+)` \|", text, re.M)
  patterns = [re.compile(re.sub(r"<[^>]+>", r"[^/]+", re.escape(n).replace(r"\<", "<")
                                .replace(r"\>", ">")) + "$") for n in listed]
  known = ("step", "task_index")
  return sorted(n for n in names if n not in known and not any(
      p.match(re.sub(r"^task/[^/]+/", "", n)) for p in patterns))
