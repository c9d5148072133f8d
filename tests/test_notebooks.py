"""Every notebook in notebooks/ executes without a cell error through the installed packages
(nbclient, python3 kernel, notebooks/ as the working folder, as Jupyter starts it), with clean
outputs (no raw ANSI codes, no warnings on stderr) and no temporary folder left behind."""

import re
from pathlib import Path

import ipykernel  # noqa: F401  (the python3 kernel the notebooks run on; a test dependency)
import nbclient
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks in notebooks/"


def _texts(nb):
    for c in nb.cells:
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            if o.get("output_type") == "stream":
                yield o.get("name"), o.get("text", "")
            for mime, v in o.get("data", {}).items():
                if mime.startswith("text/"):
                    yield mime, v if isinstance(v, str) else "".join(v)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_without_errors(path, monkeypatch, tmp_path):
    nb = nbformat.read(path, as_version=4)
    # committed notebooks carry no outputs, and find the project through the installed packages
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name}: outputs stored"
            assert "sys.path" not in cell.source, f"{path.name}: edits sys.path"
    monkeypatch.delenv("MPLBACKEND", raising=False)  # let the kernel use its inline backend
    monkeypatch.delenv("CACHEWISE_RESULTS", raising=False)
    kernel_tmp = tmp_path / "kernel-tmp"
    kernel_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(kernel_tmp))  # the kernel's temporary folders, watched below
    cwd = path.parent
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(cwd)}})
    client.execute(cwd=str(cwd))  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    for kind, text in _texts(nb):
        assert not ANSI.search(text), f"{path.name}: raw ANSI codes in {kind}: {text[:200]!r}"
        assert kind != "stderr", f"{path.name}: stderr output: {text[:300]!r}"
    assert not list(kernel_tmp.iterdir()), f"{path.name}: left behind in the temporary folder: {list(kernel_tmp.iterdir())}"
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    if path.name == "workload.ipynb":
        assert len(images) >= 7, f"{path.name}: {len(images)} figures shown"
    else:
        assert len(images) >= 5, f"{path.name}: {len(images)} figures shown"
