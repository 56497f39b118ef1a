"""The notebooks run: every code cell of each notebook executed in order in one namespace (what a kernel does), on a
tiny random MoE in the fast suite and on the embedded model when slow checks run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def run_notebook(path: Path) -> dict:
    namespace: dict = {"__name__": "__main__"}
    for number, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            exec(compile(source, f"{path.name}[cell {number}]", "exec"), namespace)  # noqa: S102
    return namespace


def test_there_is_a_notebook():
    assert NOTEBOOKS, "notebooks/ holds the worked examples"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_a_tiny_moe(path, monkeypatch):
    monkeypatch.setenv("PIKV_NOTEBOOK_MODEL", "tiny")
    namespace = run_notebook(path)
    if path.stem == "pikv_press_tour":
        # the expert-balanced press's floor keeps a token of every expert that has some, in every layer
        balanced = namespace["maps"]["ExpertBalancedPress(0.5, TOVA)"]
        seen = ~balanced.isnan()
        assert bool((balanced[seen] > 0).all())


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_the_embedded_model(path, monkeypatch):
    monkeypatch.setenv("PIKV_NOTEBOOK_MODEL", os.environ.get("PIKV_NOTEBOOK_MODEL_SLOW", "embedded"))
    run_notebook(path)
