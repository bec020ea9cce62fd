"""Every command the README shows, run as written: `python -m opd_jax...` commands on their ':smoke'
variant with the named model folders and data files replaced by the tiny stand-ins of
`opd_jax.smoke`, benchmark commands with the smallest sizes they take. A README command this file
does not know fails `test_every_readme_command_is_run_here`, so the two cannot drift apart."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from opd_jax import evaluate, smoke

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Multi-host launchers need the hosts; the command they start on every host is the single-host
# one with mesh.distributed=True, which tests/test_train.py runs as two processes.
LAUNCHERS = ("gcloud ", "srun ")
# Setting up the notebook's environment; tests/test_notebooks.py runs the notebook itself.
SETUP = ("source .venv/bin/activate", "pip install -e '.[", "jupyter lab notebooks/")
# Named paths in the README's commands -> the stand-in (key of smoke.build_assets) used here.
PLACEHOLDERS = {"/models/Qwen2.5-7B-Instruct": "student", "QWEN": "student",
                "/models/OpenThinker3-7B": "teacher", "OPENTHINKER": "teacher",
                "/data/dapo-math-17k": "dapo", "DAPO_PARQUET": "dapo",
                "/data/tfds": "tfds", "TFDS": "tfds", "heldout.jsonl": "prompts"}
# Benchmarks at their smallest sizes (the README's figures come from the defaults).
BENCH_ARGS = {
    "bench_forward.py": ["--repeats=1", "--batch=1", "--seq_len=16"],
    "bench_compile.py": ["--layers=1,2", "--repeats=1"],
    "bench_sampler.py": ["--repeats=1"],
    "bench_sampler_compact.py": ["--repeats=1", "--prompts=2", "--samples=2", "--prompt_len=8",
                                 "--max_new_tokens=64", "--stop_ids=16", "--vocab=512",
                                 "--layers=1"],
    "bench_topk_loss.py": ["--tokens", "64", "--dim=16", "--vocab=512", "--chunk_tokens=32",
                           "--chunk_vocab=128", "--time_tokens=32", "--time_dim=16",
                           "--time_vocab=512", "--repeats=1"],
    "bench_grading.py": ["--n=200"],
    "bench_train.py": ["--rounds=1"],
    "bench_diagnostics.py": ["--steps=3", "--skip=1", "--prompts=8", "--positions=8"],
}


def commands() -> list[str]:
  """The README's commands: lines of bash blocks (continuations joined, comments cut) and inline
  code spans that start with python, .venv/bin/python or make; generic patterns with <...>
  placeholders are descriptions, not commands."""
  found = []
  for block in re.findall(r"```bash\n(.*?)```", README, re.S):
    text = re.sub(r"\\\n\s*", " ", block)
    found += [line.split(" #")[0].strip() for line in text.splitlines()
              if not line.lstrip().startswith("#")]
  prose = re.sub(r"```.*?```", "", README, flags=re.S).replace("\n", " ")
  found += re.findall(r"`((?:\.venv/bin/)?python [^`]+|make [a-z-]+)`", prose)
  out = []
  for cmd in found:
    cmd = re.sub(r"\s+", " ", cmd.replace(".venv/bin/python", "python")).strip()
    cmd = re.sub(r"\[(--[^\]]+)\]", r"\1", cmd)   # an optional flag: run it too
    if cmd and "<" not in cmd and "..." not in cmd.split()[-1] and cmd not in out \
        and not cmd.startswith("python -m pytest"):   # the test suite itself
      out.append(cmd)
  return out


def python_blocks() -> list[str]:
  """The README's Python examples, in order (each may build on the one before)."""
  return re.findall(r"```python\n(.*?)```", README, re.S)


def _kind(cmd: str) -> str:
  if cmd.startswith(LAUNCHERS):
    return "launcher"
  if cmd.startswith("make "):
    return "make"
  if cmd.startswith("python benchmarks/"):
    return "benchmark"
  if cmd.startswith(SETUP):
    return "setup"
  if re.match(r"python -m opd_jax\.(main|evaluate|plan|check|export|plot) ", cmd):
    return "opd_jax"
  return "unknown"


def test_every_readme_command_is_run_here():
  cmds = commands()
  assert len(cmds) >= 15, cmds
  unknown = [c for c in cmds if _kind(c) == "unknown"]
  assert not unknown, f"README commands this file does not run: {unknown}"
  targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.M))
  for cmd in (c for c in cmds if _kind(c) == "make"):
    assert cmd.split()[1] in targets, cmd
  for cmd in (c for c in cmds if _kind(c) == "benchmark"):
    assert cmd.split()[1].split("/")[1] in BENCH_ARGS, cmd
  extras = (ROOT / "pyproject.toml").read_text()
  for cmd in (c for c in cmds if _kind(c) == "setup"):
    extra = re.search(r"\.\[(\w+)\]", cmd)
    assert extra is None or f"\n{extra.group(1)} = [" in extras, cmd
  assert (ROOT / "notebooks").is_dir() and (ROOT / "tests" / "test_notebooks.py").is_file()


@pytest.mark.slow
def test_readme_python_examples_run_in_order(tmp_path, monkeypatch):
  """The examples share one namespace, as a reader pasting them one after another would; the
  checkpoint example's folder is a tiny stand-in with the left-padded batch of the next one.
  They run in a fresh folder (the prompts example writes a file)."""
  monkeypatch.chdir(tmp_path)
  folder = smoke.make_model_folder(tmp_path / "model", seed=0)
  namespace = {}
  for block in python_blocks():
    if "/path/to/" in block:
      import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
      block = re.sub(r'"/path/to/[^"]+"', repr(str(folder)), block)
      namespace.update(tokens=jnp.array([[0, 5, 6], [7, 8, 9]], jnp.int32),
                       attention_mask=jnp.array([[0, 1, 1], [1, 1, 1]], bool))
    exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used


def _config_of(args: list[str]):
  """The ConfigDict a `--config=FILE[:arg] --config.a.b=v ...` command line builds (as written)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec_arg = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
  path, _, arg = spec_arg.partition(":")
  spec = importlib.util.spec_from_file_location("exp", ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg or None)
  for a in args:
    if a.startswith("--config.") and "=" in a:
      key, value = a[len("--config."):].split("=", 1)
      *parents, leaf = re.findall(r"\w+|\[\d+\]", key)
      node = c
      for p in parents:
        node = node[int(p[1:-1])] if p.startswith("[") else node[p]
      node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"
  return c


def docstring_commands(path: pathlib.Path) -> list[str]:
  """The `python -m opd_jax...` commands of an experiment file's docstring, each with its
  continuation lines (the indented `--flag` lines below it)."""
  import ast  # pylint: disable=import-outside-toplevel
  lines = ast.get_docstring(ast.parse(path.read_text())).splitlines()
  out = []
  for i, line in enumerate(lines):
    if "python -m opd_jax." not in line:
      continue
    text = line[line.index("python -m"):]
    for more in lines[i + 1:]:
      if not more.strip().startswith("--"):
        break
      text += " " + more
    text = re.sub(r"\([^)]*\)", " ", text)    # parenthesised remarks
    out.append(" ".join(w for w in text.split() if w != "[--step=N]"))
  return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return smoke.build_assets(tmp_path_factory.mktemp("readme_assets"))


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "experiments").glob("*.py")))
def test_experiment_docstring_commands_name_every_path_they_need(name, assets, tmp_path):
  """An experiment file's training command, its named folders standing for real ones, leaves no
  path unset (checked without running 7B models); its ':smoke' command runs in
  tests/test_command_line.py."""
  cmds = docstring_commands(ROOT / "experiments" / f"{name}.py")
  assert any(":smoke" in c for c in cmds), cmds
  for cmd in cmds:
    args = _substitute(shlex.split(cmd)[1:], assets, tmp_path)
    assert args[1] in ("opd_jax.main", "opd_jax.evaluate"), cmd
    if args[1] == "opd_jax.main" and ":smoke" not in cmd:
      c = _config_of(args)
      if c.experiment == "opd_eval":
        c.workdir = str(tmp_path)
        assert evaluate.missing_paths(c) == [], cmd


def _substitute(args: list[str], assets: dict, tmp: pathlib.Path) -> list[str]:
  out = []
  for a in args:
    if "=" in a:
      key, value = a.split("=", 1)
      value = str(assets[PLACEHOLDERS[value]]) if value in PLACEHOLDERS else value
      if re.match(r"(runs|workdir)/", value):
        # A step's folder names a step of the 2-step ':smoke' run.
        value = str(tmp / re.sub(r"(checkpoints/)\d+$", r"\g<1>2", value))
      elif key == "--config.workdir" and not os.path.isabs(value):
        value = str(tmp / value)   # e.g. DIR: never a folder in the repository
      a = f"{key}={value}"
    out.append(a)
  return out


def _smoke(args: list[str]) -> list[str]:
  out = []
  for a in args:
    if a.startswith("--config=experiments/"):
      path, _, arg = a.partition(":")
      a = f"{path}:{arg + ',smoke' if arg and 'smoke' not in arg else arg or 'smoke'}"
    out.append(a)
  return out


@pytest.mark.slow
def test_readme_opd_jax_commands_run_on_tiny_stand_ins(tmp_path):
  assets = smoke.build_assets(tmp_path / "assets")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  ran = []
  for cmd in (c for c in commands() if _kind(c) == "opd_jax"):
    args = _substitute(shlex.split(cmd)[1:], assets, tmp_path)
    module = args[1]
    if module == "opd_jax.main" and "--config.workdir" not in " ".join(args):
      args.append(f"--config.workdir={tmp_path / 'workdir' / str(len(ran))}")
    if module == "opd_jax.main" and _config_of(args).experiment == "opd_eval":
      # As written (before ':smoke'), a paper command names every path its run needs.
      assert evaluate.missing_paths(_config_of(args)) == [], cmd
    proc = subprocess.run([sys.executable, *_smoke(args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-4000:])
    ran.append(cmd)
  assert any("opd_jax.evaluate" in c for c in ran) and any("opd_jax.plan" in c for c in ran)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(BENCH_ARGS))
def test_readme_benchmarks_run_at_their_smallest_sizes(script):
  if script == "bench_train.py":
    pytest.importorskip("trl", reason="bench_train.py compares with TRL: the `peers` extra")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, f"benchmarks/{script}", *BENCH_ARGS[script]], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=1200, check=False)
  last = json.loads(proc.stdout.strip().splitlines()[-1])   # the last line is one JSON object
  # bench_train.py exits 3 when the machine was loaded before it started (its ratios are then
  # marked invalid): a run inside the test suite may well be.
  refused = script == "bench_train.py" and proc.returncode == 3 and last["valid"] is False
  assert proc.returncode == 0 or refused, proc.stderr[-4000:]
