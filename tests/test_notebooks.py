"""Executes the notebooks with shortened settings (they hold no logic of their own)."""

import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_toy_variance_notebook_runs(monkeypatch):
  monkeypatch.setenv("TOY_NOTEBOOK_CONFIG", "smoke")  # the kernel inherits the environment
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
