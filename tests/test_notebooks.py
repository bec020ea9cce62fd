"""Executes the notebooks with shortened settings (they hold no logic of their own)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 40 s: `make test-all` runs it
def test_toy_variance_notebook_runs(monkeypatch, tmp_path):
  monkeypatch.setenv("TOY_NOTEBOOK_CONFIG", "smoke")  # the kernel inherits the environment
  monkeypatch.setenv("TOY_NOTEBOOK_WORKDIR", str(tmp_path))  # outputs nowhere else
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(ROOT / "notebooks" / "toy_variance.ipynb", as_version=4)
  # Run from the repository root so that the kernel imports this checkout of opd_jax.
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(ROOT)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2  # the variance figure and the exact-study figure
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "Expected result" in text and "var exponent" in text
  for name in ("variance/summary.csv", "variance/toy_variance_seed42.png", "exact/exact.csv",
               "exact/toy_exact.png"):
    assert (tmp_path / name).stat().st_size > 0
