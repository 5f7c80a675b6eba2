"""docs/*.ipynb: committed without outputs, and executed end to end in the project's venv (issue #23)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "docs").glob("*.ipynb"))


def test_there_is_a_tutorial():
    assert ROOT / "docs" / "tutorial.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebook_has_no_outputs(path):
    # nbstripout's rule: outputs and execution counts stay out of git (they hold machine-specific
    # timings, and a stale output reads as a claim). Strip with: jupyter nbconvert
    # --ClearOutputPreprocessor.enabled=True --inplace docs/tutorial.ipynb (or nbstripout).
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {i} has outputs"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"
        assert "attachments" not in cell or not cell["attachments"], f"{path.name} cell {i} has attachments"
    assert "widgets" not in nb.get("metadata", {})


@pytest.mark.slow
def test_tutorial_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="the [test] extra installs nbclient/nbformat/ipykernel")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # A kernel spec that is this interpreter, the project's venv, whatever else is installed.
    spec = tmp_path / "jupyter" / "kernels" / "aigc-opt-venv"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "aigc_opt (venv)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("AIGC_OPT_MAX_ITERS", "3")  # the kernel inherits this environment
    work = tmp_path / "work"
    work.mkdir()
    nb = nbformat.read(ROOT / "docs" / "tutorial.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="aigc-opt-venv", timeout=600,
                                     resources={"metadata": {"path": str(work)}})
    client.execute()  # a failing cell raises CellExecutionError naming it
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("<table>" in h and "Quantize(int8-dynamic)+Compile(inductor)" in h for h in html), \
        "the report renders as an HTML table naming its recipes"
    assert any("image/png" in o.get("data", {}) for o in outputs), "the report's figure is shown inline"
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert (work / "recipe.yaml").read_text().startswith("aigc_opt_recipe: 1")
    assert (work / "out" / "minilm-onnx-int8" / "manifest.json").is_file()
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "GGUF blocks reused" in text and "next-token agreement" in text, "the LLM section ran"
