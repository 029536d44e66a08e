"""Every notebook in notebooks/ is Colab-ready, committed with the outputs of a real run, and
executes headless, cell by cell, at the small sizes RNNJAX_NOTEBOOK_SMALL=1 selects."""

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COLAB = "https://colab.research.google.com/github/rnnjax/rnnjax/blob/main/notebooks/"
EXPECTED = {
    "01_cells_and_scan",
    "02_vanishing_gradients",
    "03_char_language_model",
    "04_forecasting",
    "05_scan_vs_unrolled",
    "06_porting_pytorch",
}
ids = [p.stem for p in NOTEBOOKS]


def source(cell):
    return cell.source if isinstance(cell.source, str) else "".join(cell.source)


def test_the_notebook_set_is_complete():
    assert set(ids) == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_is_colab_ready_and_committed_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    assert f"({COLAB}{path.name})" in source(first), "the first cell opens with the Colab badge"
    assert "colab-badge.svg" in source(first)
    code = [c for c in nb.cells if c.cell_type == "code"]
    setup = source(code[0])
    assert '"google.colab" in sys.modules' in setup and "pip" in setup, "first code cell installs"
    assert any("RNNJAX_NOTEBOOK_SMALL" in source(c) for c in code), "sizes must shrink in tests"
    assert any("jax.default_backend()" in source(c) for c in code), "sizes must follow the device"
    assert any("assert " in source(c) for c in code), "a notebook checks what it claims"
    assert nb.metadata.get("accelerator") == "GPU" or nb.metadata.get("colab"), "Colab metadata"
    # committed with the outputs of one real, complete run at full (not test) sizes
    counts = [c.execution_count for c in code]
    assert None not in counts and counts == sorted(counts), "run top to bottom, every cell"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = json.dumps([o for o in outputs if o.output_type == "stream"])
    assert "small sizes" not in text, "commit a full-size run, not the test run"
    assert any("image/png" in o.get("data", {}) for o in outputs), "plots render inline"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # raises CellExecutionError, naming the cell, on any error
    nb = load_execute().execute(path, small=True, timeout=300)
    streams = json.dumps([o for c in nb.cells if c.cell_type == "code" for o in c.outputs])
    assert "small sizes" in streams, "the notebook must announce the sizes it picked"


def load_execute():
    """notebooks/execute.py, the tool that also saves the committed runs."""
    spec = importlib.util.spec_from_file_location("execute", ROOT / "notebooks" / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
