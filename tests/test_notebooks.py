"""nbval over every committed experiment notebook, one test per notebook.

Each notebook runs in its own pytest process (strict nbval: outputs must match
the committed ones after sanitising timings, addresses and progress bars), so
a failure names the notebook and shows the end of nbval's report.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
TIMEOUT_S = 900


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 1, "notebooks/ holds no experiment notebook"


@pytest.mark.notebooks
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_nbval(notebook):
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", "--nbval-current-env",
        "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"),
        "--nbval-cell-timeout", str(TIMEOUT_S), "-o", "addopts=", str(notebook),
    ]
    env = dict(os.environ, CH11_PROGRESS="0")
    env.pop("CH11_RECORD_PATH", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S * 2)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    assert proc.returncode == 0, f"nbval failed for {notebook.name}:\n{tail}"
