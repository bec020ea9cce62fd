"""Rules of the built-in text game: guess a number from distance clues (environment tests).

The game's texts use only the characters of `tiny_arith.CHARS` ("0123456789+="), so the
tiny_arith character tokenizer encodes them and a game task can share a run (and a tokenizer) with
tiny_arith prompts. Rules (played by `opd_jax.environments.GuessNumber`):

  * an episode's secret is a number x in [0, 10**DIGITS) drawn from its seed; the first
    observation is "=" (make a guess);
  * an action is a guess: 1 to DIGITS digits (surrounding whitespace is ignored);
  * a wrong guess g gets the clue "+d=" with d = |x - g| ("off by d, guess again"); an action
    that is not a guess gets "+=" (no clue); both cost a turn;
  * the right guess gets "+0=" and ends the episode with reward 1 and success.

Guessing 0 and then the clue's distance wins in two turns, so a policy can reach success 1.
"""

from __future__ import annotations

import numpy as np

DIGITS = 2
START = "="               # the first observation: make a guess
NO_CLUE = "+="            # the clue for an action that is not a guess
SOLVED = "+0="            # the clue of the right guess


def secret(seed: int) -> int:
  """The secret number of the episode with this seed."""
  return int(np.random.default_rng(seed).integers(10 ** DIGITS))


def clue(secret_number: int, action: str) -> str:
  """The observation after `action` when the secret is `secret_number`."""
  guess = action.strip()
  if not (guess.isascii() and guess.isdigit() and 1 <= len(guess) <= DIGITS):
    return NO_CLUE
  return f"+{abs(secret_number - int(guess))}="
