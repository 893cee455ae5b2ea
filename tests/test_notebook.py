"""The example notebook runs from the first cell to the last and ends with a depth panel."""

import base64
import io

import nbformat
import numpy as np
from nbclient import NotebookClient
from PIL import Image

from conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "examples" / "distillation.ipynb"


def test_the_example_notebook_executes_every_cell_and_shows_a_panel(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells)  # every cell ran
    assert not any(output.output_type == "error" for cell in code_cells for output in cell.outputs)
    pictures = [output.data["image/png"] for output in code_cells[-1].outputs if "image/png" in output.get("data", {})]
    assert len(pictures) == 1
    panel = np.asarray(Image.open(io.BytesIO(base64.b64decode(pictures[0]))))
    assert panel.shape[:2] == (64, 4 * 96)  # RGB | truth | prediction | error at the notebook's size
