"""Every notebook in notebooks/ executes without a cell error (nbclient, python3 kernel, repo root as cwd)."""

from pathlib import Path

import ipykernel  # noqa: F401  (the python3 kernel the notebooks run on; a test dependency)
import nbclient
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_without_errors(path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    # committed notebooks carry no outputs
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name}: outputs stored"
    monkeypatch.delenv("MPLBACKEND", raising=False)  # let the kernel use its inline backend
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(REPO)}})
    client.execute(cwd=str(REPO))  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    if path.name == "workload.ipynb":
        assert len(images) >= 7, f"{path.name}: {len(images)} figures shown"
