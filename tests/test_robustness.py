"""benchmarks/robustness.json: every notebook's assertions passed every re-draw, for its current code.

`scripts/robustness.py` runs each notebook headless, assertions only, under
seed offsets 1000 and 2000 with default kernels and offset 1000 with AVX2
kernels (`../shared/NOTEBOOKS.md`, "Survive a re-draw"). The record holds a
hash of each notebook's code cells; a notebook edited since its last run is
stale, and so is the record.
"""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("robustness", ROOT / "scripts" / "robustness.py")
robustness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(robustness)
NOTEBOOKS = robustness.notebooks()


@pytest.fixture(scope="module")
def record():
    assert robustness.RECORD.exists(), "benchmarks/robustness.json is missing: run python scripts/robustness.py"
    return json.loads(robustness.RECORD.read_text())


def test_draws_are_the_rule(record):
    assert set(robustness.DRAWS) == {"offset1000-default", "offset2000-default", "offset1000-avx2"}
    assert record["draws"] == robustness.DRAWS
    offsets = {d["CH11_SEED_OFFSET"] for d in robustness.DRAWS.values()}
    assert offsets == {"1000", "2000"}
    assert robustness.DRAWS["offset1000-avx2"]["ATEN_CPU_CAPABILITY"] == "avx2"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_survives_every_draw(record, notebook):
    entry = record["notebooks"].get(notebook.stem)
    assert entry is not None, f"{notebook.stem} is not in benchmarks/robustness.json: run python scripts/robustness.py --only {notebook.stem[:2]}"
    assert entry["code_hash"] == robustness.code_hash(notebook), (
        f"{notebook.stem}'s code changed since its robustness run: run python scripts/robustness.py --only {notebook.stem[:2]}")
    missing = set(robustness.DRAWS) - set(entry["draws"])
    assert not missing, f"{notebook.stem}: draws {sorted(missing)} not run"
    failed = {d: (r["cell"], r["error"]) for d, r in entry["draws"].items() if not r["ok"]}
    assert not failed, f"{notebook.stem} failed: {failed}"
    for draw in entry["draws"].values():
        assert draw["machine"] and draw["commit"] and draw["date"]


def test_code_hash_sees_code_not_outputs(tmp_path):
    cell = {"cell_type": "code", "source": ["x = 1\n", "assert x == 1"], "outputs": [], "metadata": {}, "execution_count": 1}
    nb = {"cells": [{"cell_type": "markdown", "source": ["# t"], "metadata": {}}, cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "00_t.ipynb"
    path.write_text(json.dumps(nb))
    before = robustness.code_hash(path)
    cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["1\n"]}]
    nb["cells"][0]["source"] = ["# other prose"]
    path.write_text(json.dumps(nb))
    assert robustness.code_hash(path) == before
    cell["source"] = ["x = 2\n", "assert x == 1"]
    path.write_text(json.dumps(nb))
    assert robustness.code_hash(path) != before


def test_draw_environment_sets_and_restores(monkeypatch):
    import os

    monkeypatch.setenv("CH11_FULL", "1")
    monkeypatch.setenv("CH11_SEED_OFFSET", "7")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    with robustness.draw_environment("offset1000-avx2"):
        assert os.environ["CH11_SEED_OFFSET"] == "1000"
        assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
        assert "CH11_FULL" not in os.environ
    assert os.environ["CH11_SEED_OFFSET"] == "7" and os.environ["CH11_FULL"] == "1"
    assert "ATEN_CPU_CAPABILITY" not in os.environ
