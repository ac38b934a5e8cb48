"""scripts/: the prepared GPU check parses and stays within its budget; full_runs.py records skips honestly."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_script_parses_and_budgets_its_stages():
    script = ROOT / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    limits = [int(t) for t in re.findall(r"^timeout (\d+) ", text, flags=re.M)]
    budget = int(re.search(r'BUDGET_S="\$\{BUDGET_S:-(\d+)\}"', text).group(1))
    assert budget <= 8 * 60  # the whole run, notebooks included, fits in 8 minutes of GPU time
    assert sum(limits[:3]) < budget  # the fixed stages leave time for the CH11_FULL=1 notebooks
    for needed in ("-m cuda", "bench semi --llm", "cuda_csr_benchmark", "scripts/full_runs.py"):
        assert needed in text, needed


def test_full_runs_records_what_did_not_fit(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "full_runs.py"), "--out", str(tmp_path), "--budget", "0", "--device", "cpu", "05", "08"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((tmp_path / "full_runs_cpu.json").read_text())
    assert data["settings"] == {"CH11_FULL": "1", "device": "cpu", "budget_s": 0.0}
    assert set(data["results"]) == {"05_sparse_inference_onnxruntime", "08_sparse_kernels"}
    assert all(r["status"] == "skipped" and "budget" in r["error"] for r in data["results"].values())
    assert data["machine"]["cores"] >= 1 and data["command"].startswith("python scripts/full_runs.py")
