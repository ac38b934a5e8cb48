"""Run notebooks at their full settings (CH11_FULL=1) within a time budget; record time and headline numbers.

    python scripts/full_runs.py --out benchmarks/gpu --budget 240 08 05 00
    python scripts/full_runs.py --out /tmp/full --budget 900 --device cpu 05

Each notebook runs in its own process group (`chapter11.__main__.execute`,
into build/notebooks/, never over the committed file) with the
time left in the budget as its limit; past the limit the whole group, kernel
included, is killed and the notebook is recorded as timed out. Notebooks that
no longer fit are recorded as skipped. The result goes to
OUT/full_runs_<device>.json through `chapter11.report.save_full_run` (date,
machine, commit, command): for each notebook its status, seconds and the
headline numbers it recorded. Files a notebook wrote under benchmarks/full/
during the run are copied to OUT/full/, so they come back from a lent machine.

But: a notebook's own cell timeout still applies (chapter11.__main__.CELL_TIMEOUT),
and the budget is wall-clock time on whatever machine runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chapter11.report import save_full_run  # noqa: E402


CHILD = """
import json, sys
from pathlib import Path
from chapter11.__main__ import execute
result = execute(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), show_progress=False)
print("RESULT " + json.dumps(result), flush=True)
"""


def run_one(path: Path, limit_s: float, env: dict) -> dict:
    """Execute one notebook with CH11_FULL=1 into build/notebooks/; kill its process group past `limit_s`."""
    target = ROOT / "build" / "notebooks" / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    records = target.with_suffix(".records.json")
    records.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(target), str(records)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit_s)
        status = "failed" if proc.returncode else "ok"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the notebook's kernel is in the same group
        out, _ = proc.communicate()
        status = "timed out"
    seconds = time.perf_counter() - start
    entry = {"status": status, "seconds": round(seconds, 1)}
    done = [line for line in (out or "").splitlines() if line.startswith("RESULT ")]
    if done:
        result = json.loads(done[-1][len("RESULT "):])
        entry["notebook_seconds"] = round(result["seconds"], 1)
        if not result["ok"]:
            entry.update(status="failed", error=f"cell {result['cell']}: {result['error']}")
    elif status != "timed out":
        entry["error"] = (out or "").strip().splitlines()[-1:] or ["no output"]
    if records.is_file():
        entry["records"] = {k: v["value"] for k, v in json.loads(records.read_text()).items()}
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", help="notebook numbers or names, in the order to run them")
    parser.add_argument("--out", default="benchmarks/gpu", help="folder for the JSON (default benchmarks/gpu)")
    parser.add_argument("--budget", type=float, default=240, help="seconds for all notebooks together")
    parser.add_argument("--device", default=None, help="CH11_DEVICE for the notebooks (default: theirs, CUDA when present)")
    args = parser.parse_args(argv)
    from chapter11.__main__ import select
    from chapter11.train import default_device

    out = Path(args.out)
    env = dict(os.environ, CH11_FULL="1", CH11_PROGRESS="0")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    if args.device:
        env["CH11_DEVICE"] = args.device
    device = args.device or default_device().type
    full = ROOT / "benchmarks" / "full"
    before = {p: p.stat().st_mtime for p in full.glob("*.json")} if full.is_dir() else {}
    start = time.perf_counter()
    results = {}
    for name in args.notebooks:
        path = select(name)[0]
        stem = path.stem
        left = args.budget - (time.perf_counter() - start)
        if left < 20:
            results[stem] = {"status": "skipped", "seconds": 0.0, "error": f"the budget of {args.budget:.0f} s was spent before it could start"}
            print(f"{stem}: skipped (budget spent)", flush=True)
            continue
        results[stem] = run_one(path, left, env)
        r = results[stem]
        print(f"{stem}: {r['status']} in {r['seconds']:.0f} s; {len(r.get('records', {}))} headline numbers", flush=True)
    prefixes = tuple(select(name)[0].stem[:3] for name in args.notebooks)   # "05_": files this run's notebooks record
    if full.is_dir():
        for p in full.glob("*.json"):
            if p.name.startswith(prefixes) and before.get(p) != p.stat().st_mtime:
                (out / "full").mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, out / "full" / p.name)
                print(f"copied {p.relative_to(ROOT)} to {out / 'full'}", flush=True)
    command = "python scripts/full_runs.py " + " ".join(sys.argv[1:] if argv is None else argv)
    path = save_full_run(f"full_runs_{device}", results, {"CH11_FULL": "1", "device": device, "budget_s": args.budget},
                         command, time.perf_counter() - start, folder=out)
    print(f"json: {path}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
