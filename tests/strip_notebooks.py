"""Strip volatile metadata from executed notebooks so that their diffs show only real changes.

Keeps outputs and execution counts (nbval's reference: it treats a cell without an
execution count as never run) renumbered 1..N in cell order; removes papermill's timings,
its injected-parameters cell and per-cell execution metadata.  Usage: python tests/strip_notebooks.py notebooks/*.ipynb
"""

import sys

import nbformat


def strip(path: str) -> None:
    notebook = nbformat.read(path, as_version=4)
    # papermill's injected-parameters cell belongs to one run, not to the notebook
    notebook.cells = [cell for cell in notebook.cells if "injected-parameters" not in cell.metadata.get("tags", [])]
    notebook.metadata.pop("papermill", None)
    notebook.metadata.pop("widgets", None)
    notebook.metadata["language_info"] = {"name": "python"}
    count = 0
    for cell in notebook.cells:
        cell.pop("id", None)
        for key in ("papermill", "execution", "ExecuteTime", "collapsed", "scrolled"):
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
            for output in cell.get("outputs", []):
                if "execution_count" in output:
                    output["execution_count"] = count
                output.get("metadata", {}).pop("needs_background", None)
    notebook.nbformat_minor = 4
    nbformat.write(notebook, path)


if __name__ == "__main__":
    for notebook_path in sys.argv[1:]:
        strip(notebook_path)
