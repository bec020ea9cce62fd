"""Errors in what a user gave (settings, checkpoints, data): the command line prints them alone."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# Set (to anything but "" or "0") to see the traceback of an error the command line would
# otherwise print as one message; `--debug` on the command line does the same.
DEBUG_ENV = "OPD_DEBUG"


class UserError(ValueError):
  """Something the user gave cannot be used: a setting, a checkpoint folder, a data file.

  The message says what, where (the `--config.` key to change, the folder, the file and row)
  and what would be accepted. `python -m opd_jax.main` prints it on one line and exits with
  status 2, without a traceback (a ValueError, so code that caught ValueError still does).
  """


class ConfigError(UserError):
  """A setting has a value the trainer cannot use; the message names the setting."""


class DataError(UserError):
  """A dataset file or row cannot be used; the message names the file, the row and the setting."""


def closest(key: str, known: Iterable) -> str:
  """'closest: a, b; known here: ...' for an unknown `key` among the names `known`."""
  names = sorted(map(str, known))
  initials = "".join(w[:1] for w in key.split("_"))   # learning_rate -> lr
  near = [n for n in names if n in (initials, key[:len(n)])]
  near += [n for n in difflib.get_close_matches(key, names, n=3, cutoff=0.4) if n not in near]
  head = f"closest: {', '.join(near[:3])}; " if near else ""
  return f"{head}known settings here: {', '.join(names)}"
