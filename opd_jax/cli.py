"""Command-line helpers shared by the entry points: flags read before absl parses them."""

from __future__ import annotations

from collections.abc import Sequence


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
