"""Execute notebooks/quickstart.ipynb from top to bottom with nbclient, on its smallest settings.

Needs nbclient, nbformat and ipykernel, the packaged SmolLM2 model and the
real data folder; skipped when any is missing. It runs the real 135M model:
it took 930 s of wall time (440 s of CPU time) on 2 cores shared with other
jobs before the evaluation was cut to three metric groups and lambdas 0 and 1.
"""
import os
from pathlib import Path

import pytest

import skupy

from .helpers import REPO_ROOT, data_dir_or_skip

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart.ipynb"


def packaged_model_or_skip() -> Path:
    from skupy.gguf_io import find_packaged_gguf

    try:
        return find_packaged_gguf()
    except FileNotFoundError as error:
        pytest.skip(f"packaged SmolLM2 GGUF not available: {error}")


def cell_text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom(monkeypatch, tmp_path):
    data_dir = data_dir_or_skip()
    packaged_model_or_skip()
    package_root = str(Path(skupy.__file__).resolve().parents[1])
    monkeypatch.setenv("SKUPY_DATA_DIR", str(data_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("SKUPY_NOTEBOOK_STEPS", "2")
    monkeypatch.setenv("SKUPY_NOTEBOOK_PROMPTS", "4")
    monkeypatch.setenv("SKUPY_NOTEBOOK_TRAIN_PAIRS", "16")
    monkeypatch.setenv("SKUPY_NOTEBOOK_MAX_NEW_TOKENS", "12")
    monkeypatch.setenv("SKUPY_NOTEBOOK_LAMBDAS", "1")
    # Generation for the similarity, fluency and over-refusal sets dominates the run time, so they are left out.
    monkeypatch.setenv("SKUPY_NOTEBOOK_METRICS", "harmful,truthfulqa,nll")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TMPDIR", str(tmp_path))

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.get("execution_count") for cell in code_cells), "a code cell did not run"
    text = "".join(cell_text(cell) for cell in code_cells)
    assert "Paris" in text
    assert "step 2:" in text
    assert "chosen lambda:" in text
    assert list(tmp_path.glob("skupy-quickstart-*/sweep/tradeoff.png")), "the sweep plot was not written"
