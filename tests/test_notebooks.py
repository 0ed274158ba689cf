"""The analysis notebooks run top to bottom on a small lake, and are stored without outputs.

Each notebook is executed in a real ipykernel (the venv's python3 kernel) against the
model-free synthetic lake and a fake `eval_labeler.json`, then once more against an empty
lake with no metrics, where every cell must print a note instead of failing.

    python -m pytest -q tests/test_notebooks.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from synthetic_lake import build_clean_lake

from cai_lib.feedback import label_metrics as lm

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NAMES = ["label_calibration", "refusal_boilerplate", "principles", "lineage_walk"]


@pytest.fixture(scope="module")
def lake_and_metrics(tmp_path_factory) -> tuple[Path, Path]:
    """The synthetic lake, and metrics shaped like `cai eval-labeler`'s (jobs/eval_labeler.py)."""
    tmp = tmp_path_factory.mktemp("nb")
    build_clean_lake(tmp / "lake")
    probs, outcomes = [0.2, 0.35, 0.45, 0.55, 0.6, 0.8, 0.9], [0, 0, 1, 1, 0, 1, 1]
    metrics = {**{f"human_{k}": v for k, v in lm.summarise(probs, outcomes).items()},
               "swap_consistency": 0.4, "position_bias": -0.03,
               "per_principle": lm.per_group(["harm", "harm", "harm", "ethics", "ethics", "ethics", "harm"],
                                             probs, outcomes),
               "reliability_curve": lm.reliability_curve(probs, outcomes)}
    (tmp / "eval_labeler.json").write_text(json.dumps(metrics, indent=2))
    return tmp / "lake", tmp / "eval_labeler.json"


def execute(name: str, lake: Path, metrics: Path, cwd: Path, monkeypatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("CAI_LAKE", str(lake))
    monkeypatch.setenv("CAI_EVAL_METRICS", str(metrics))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))   # cai_lib importable even without the editable install
    monkeypatch.delenv("MPLBACKEND", raising=False)  # ipykernel's inline backend emits the figures
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    # A probe cell, appended to this in-memory copy only: which python runs the kernel.
    nb.cells.append(nbformat.v4.new_code_cell("import sys, cai_lib; print(sys.executable)"))
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def test_the_four_notebooks_are_there():
    assert set(NAMES) <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{path.name}: code cells {dirty} have stored outputs; clear them before committing"
    assert any("cai_lib" in c.source for c in code)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_a_small_lake(name, lake_and_metrics, tmp_path, monkeypatch):
    lake, metrics = lake_and_metrics
    nb = execute(name, lake, metrics, tmp_path, monkeypatch)  # raises CellExecutionError on any error
    outs = outputs(nb)
    assert not [o for o in outs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outs), f"{name}: no figure"
    assert outs[-1].text.strip() == sys.executable  # the venv's python ran the kernel
    text = "".join(o.get("text", "") for o in outs)
    assert "Note:" not in text, f"{name} skipped a part on a full lake:\n{text}"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_prints_notes_on_an_empty_lake(name, tmp_path, monkeypatch):
    nb = execute(name, tmp_path / "no_lake", tmp_path / "no_metrics.json", tmp_path, monkeypatch)
    text = "".join(o.get("text", "") for o in outputs(nb))
    assert "Note:" in text
