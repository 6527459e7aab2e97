"""docs/notebooks/quickstart.ipynb: stored without outputs, and it runs from top to bottom."""

import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
NOTEBOOK = DOCS / "notebooks" / "quickstart.ipynb"


def test_the_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_the_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()
    text = "\n".join(
        out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
        for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    )  # fmt: skip
    assert "TrainResult(central model: test accuracy" in text
    assert "accuracy of predict:" in text
    assert "programs (compiled, from the cache):" in text  # the fixed costs, shown
    diloco = re.search(r"diloco with its defaults: ([0-9.]+) \| learner momentum: 0.0", text)
    assert diloco and float(diloco.group(1)) > 0.9, text  # the family's defaults train
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                if o.output_type == "error"]  # fmt: skip
