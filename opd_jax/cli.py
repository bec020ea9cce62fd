"""Command-line helpers shared by the entry points: flags read before absl parses them, and
`run_main`, which prints a user error as one line (exit status 2) instead of a traceback."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence

from opd_jax import errors


def flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of `--name=V` or `--name V` in `argv` (the last one wins; None when absent).

  Entry points read a few flags before absl parses the command line (the device count before
  JAX starts, the run folder whose config becomes the defaults): both forms absl accepts are
  read here, so no form is silently ignored.
  """
  value = None
  for i, arg in enumerate(argv):
    if arg == "--":
      break
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}":
      if i + 1 >= len(argv):
        raise SystemExit(f"--{name} needs a value: --{name}=VALUE or --{name} VALUE")
      value = argv[i + 1]
  return value


def check_usage(argv: Sequence[str]) -> None:
  """The checks every entry point makes inside absl's `app.run`: no positional arguments;
  absl's INFO logs quiet unless --verbosity is set."""
  # pylint: disable=import-outside-toplevel
  from absl import app, flags, logging
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def require_config(argv: Sequence[str], config) -> None:
  """`check_usage`, and a --config given (the entry points that read an experiment file)."""
  from absl import app  # pylint: disable=import-outside-toplevel
  check_usage(argv)
  if config.value is None:
    raise app.UsageError("--config=experiments/<name>.py is required")


def _load_config_file(value: str):
  """The ConfigDict of `--config=FILE[:arg]`, without the command line's overrides."""
  path, _, arg = value.partition(":")
  if not os.path.isfile(path):
    raise errors.ConfigError(f"--config={value}: no such file {path!r}; give an experiment "
                             "file such as experiments/tiny_arith.py")
  spec = importlib.util.spec_from_file_location("_opd_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_overrides(config, names: Sequence[str]) -> None:
  """Raises ConfigError for the first `--config.NAME` that is no setting of `config`, naming it
  and the closest settings of its group."""
  for name in names:
    node, parts = config, name.split(".")
    for i, part in enumerate(parts):
      keys = node.keys() if hasattr(node, "keys") else ()
      if part not in keys:
        group = ".".join(parts[:i])
        where = f"config.{group}" if group else "the config"
        raise errors.ConfigError(
            f"--config.{name}: {part!r} is not a setting of {where}; "
            f"{errors.closest(part, keys) if keys else 'it holds no settings'}")
      node = node[part]


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every error turned into one ConfigError message."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  value = flag_value(argv, "config")
  if value and not os.path.isfile(value.partition(":")[0]):
    raise errors.ConfigError(f"--config={value}: no such file {value.partition(':')[0]!r}; give "
                             "an experiment file such as experiments/tiny_arith.py")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A config file whose get_config() raised: absl's message holds its traceback as text;
    # the last line is the error itself.
    lines = [line for line in str(e).splitlines() if line.strip()]
    raise errors.ConfigError(f"{lines[0].rstrip(':')}: {lines[-1]}" if "Traceback" in str(e)
                             else str(e)) from e
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # An override of a key the config lacks: ml_collections raises a bare AttributeError
    # ("'learning_rate'"); find which one and say so.
    overrides = [a.split("=", 1)[0].lstrip("-") for a in argv[1:]
                 if a.lstrip("-").startswith(("config.", "noconfig."))]
    names = [o.split(".", 1)[1] for o in overrides]
    if value and names:
      try:
        config = _load_config_file(value)
      except Exception:  # pylint: disable=broad-except  (the file's own error is `e`)
        config = None
      if config is not None:
        check_overrides(config, names)
    raise errors.ConfigError(f"--config={value}: {e}" if value else str(e)) from e


def debugging(argv: Sequence[str]) -> bool:
  """Whether errors show their traceback: `--debug` given or OPD_DEBUG set."""
  return (os.environ.get(errors.DEBUG_ENV, "") not in ("", "0")
          or any(a in ("--debug", "-debug", "--debug=true", "--debug=True") for a in argv))


def run_main(main_fn, argv: Sequence[str] | None = None) -> None:
  """`app.run(main_fn)`, but a UserError (settings, checkpoint, data) is printed as one line
  `error: ...` on stderr with exit status 2, no traceback (unless `debugging`)."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False, "Show the traceback of a settings, checkpoint or data "
                      f"error (also: environment variable {errors.DEBUG_ENV}=1).")
  argv = list(sys.argv if argv is None else argv)
  try:
    app.run(main_fn, argv=argv, flags_parser=_parse_flags)
  except errors.UserError as e:
    if debugging(argv):
      raise
    message = " ".join(str(e).split("\n")) if str(e).count("\n") < 3 else str(e)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
