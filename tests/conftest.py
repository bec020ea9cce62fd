"""Test set-up: 8 fake CPU devices, strict rank promotion, exact float32 matmuls."""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True)
settings.load_profile("ci")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_arith_dir(tmp_path_factory):
  """A TFDS data_dir with the tiny_arith dataset built once for the whole session."""
  from opd_jax.data import tiny_arith  # pylint: disable=import-outside-toplevel
  data_dir = tmp_path_factory.mktemp("tfds")
  tiny_arith.load(data_dir, "train")
  return data_dir
