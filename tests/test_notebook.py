"""launch/colab_tiny.ipynb runs top to bottom in a fresh kernel on CPU and shows what it promises.

The kernel imports this checkout's rre_jax (PYTHONPATH), so the install cell takes its "already importable"
branch; what is tested is everything after it: config overrides, the tiny run, the curves and the
monotonicity plot.
"""
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "launch" / "colab_tiny.ipynb"


def _outputs(cell, kind):
    return [o for o in cell.get("outputs", []) if o.get("output_type") == kind]


def test_notebook_runs_from_a_fresh_kernel(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for var, value in {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "RRE_WORKDIR": str(tmp_path / "run"),
                       "XLA_FLAGS": ""}.items():
        monkeypatch.setenv(var, value)  # the kernel inherits this environment
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "".join(o.get("text", "") for c in code for o in _outputs(c, "stream"))
    assert f"rre_jax from {REPO / 'rre_jax'}" in text
    assert "refused: " in text and "learnig_rate" in text  # the override demo shows a typo being refused
    assert "step 4: proxy" in text
    images = [c for c in code if any("image/png" in o.get("data", {}) for o in _outputs(c, "display_data"))]
    assert len(images) == 2, "expected the training curves and the proxy-vs-gold plot"
    assert (tmp_path / "run" / "dev_eval" / "plots" / "proxy_vs_gold.png").exists()
    assert "checkpoints scored: [2, 4]" in text
