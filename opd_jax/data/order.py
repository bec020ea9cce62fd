"""Data order as a pure function of (seed, step, process): a resumed run needs only the step."""

from __future__ import annotations

import numpy as np


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of the dataset's indices in `epoch` (a fresh seeded shuffle per epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, *, seed: int, step: int, global_batch: int,
                  process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """Dataset indices of this process's rows of the global batch at `step`.

  The global batch of step s is examples [s·B, (s+1)·B) of the concatenated epoch permutations
  (an epoch boundary may fall inside a batch); process p takes its contiguous share of B / P rows,
  the rows its devices hold in the global array.

  Args:
    num_examples: dataset size (> 0).
    seed: data seed.
    step: the batch's index (0-based).
    global_batch: B, rows over all processes; a multiple of process_count.
    process_index, process_count: this process and how many there are.

  Returns:
    int64 [B / P] dataset indices.
  """
  if num_examples < 1:
    raise ValueError(f"num_examples={num_examples}: the dataset is empty")
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f"global_batch={global_batch} must be a positive multiple of the "
                     f"process count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
  local = global_batch // process_count
  start = step * global_batch + process_index * local
  positions = np.arange(start, start + local)
  epochs, offsets = np.divmod(positions, num_examples)
  out = np.empty(local, np.int64)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = epoch_permutation(num_examples, seed, int(epoch))[offsets[sel]]
  return out
