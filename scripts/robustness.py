"""Do the notebooks' conclusions survive a re-draw? Run each one under other seeds and kernels, asserting only.

A change of CPU is a new draw of the training noise: float rounding differs,
so trajectories differ by about one standard deviation. A notebook's
assertions must state what survives such a draw (`../shared/NOTEBOOKS.md`,
"Survive a re-draw"). This script executes every experiment notebook
headless (nothing is compared with the committed outputs, only the notebook's
own assertions run) under each draw of `DRAWS`:

    offset1000-default   CH11_SEED_OFFSET=1000, this CPU's default kernels
    offset2000-default   CH11_SEED_OFFSET=2000, this CPU's default kernels
    offset1000-avx2      CH11_SEED_OFFSET=1000, torch/oneDNN/MKL held to AVX2

and writes `benchmarks/robustness.json`: per notebook, the hash of its code
cells, and per draw pass or the failing cell and error, with the date, the
machine and the commit. `tests/test_robustness.py` fails when the record is
missing, stale (a notebook's code changed since) or holds a failure.

    python scripts/robustness.py                    # every notebook, every draw (about 45 min on 2 cores)
    python scripts/robustness.py --only 02 --only 07
    python scripts/robustness.py --only 03 --draw offset1000-avx2   # one draw, to iterate on a fix

Run it before committing any change to a notebook's code. Several runs may
update the record at once (different notebooks): writes are locked and atomic.
But: the draws cover two seed offsets and two kernel settings on one CPU;
another CPU maker is a further draw that only a run there can check.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import hashlib
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "benchmarks" / "robustness.json"
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
DRAWS = {
    "offset1000-default": {"CH11_SEED_OFFSET": "1000"},
    "offset2000-default": {"CH11_SEED_OFFSET": "2000"},
    "offset1000-avx2": {"CH11_SEED_OFFSET": "1000", **AVX2},
}
# Set for every draw; what the caller's shell holds must not leak in (a full-size run, a record file, a GPU).
FIXED_ENV = {"CH11_PROGRESS": "0", "CH11_DEVICE": "cpu"}
CLEARED_ENV = ("CH11_FULL", "CH11_RECORD_PATH", "CH11_SEED_OFFSET", *AVX2)


def notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def code_hash(path: Path) -> str:
    """sha256 of a notebook's code cells (sources only, in order): what a re-draw actually tests."""
    cells = json.loads(Path(path).read_text())["cells"]
    sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return hashlib.sha256("\n\x00\n".join(sources).encode("utf-8")).hexdigest()


def select(only: list[str] | None) -> list[Path]:
    found = notebooks()
    if not only:
        return found
    picked = [p for p in found if any(p.stem == o or p.stem.split("_", 1)[0] == o for o in only)]
    missing = [o for o in only if not any(p.stem == o or p.stem.split("_", 1)[0] == o for p in found)]
    if missing:
        raise SystemExit(f"--only: no notebook matches {missing}; choose from {[p.stem for p in found]}")
    return picked


@contextmanager
def draw_environment(draw: str):
    """os.environ as the draw wants it (the notebook kernel inherits it), restored afterwards."""
    saved = dict(os.environ)
    try:
        for key in CLEARED_ENV:
            os.environ.pop(key, None)
        os.environ.update(FIXED_ENV)
        os.environ.update(DRAWS[draw])
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_draw(path: Path, draw: str) -> dict:
    """Execute `path` headless under `draw`; {"ok", "cell", "error", "seconds"}."""
    from chapter11.__main__ import execute

    with tempfile.TemporaryDirectory(prefix="ch11_robust_") as tmp, draw_environment(draw):
        target = Path(tmp) / path.name
        result = execute(path, target, records=None, show_progress=False)
        executed = target.read_text() if target.exists() else ""
    out = {"ok": bool(result["ok"]), "cell": result["cell"], "error": result["error"], "seconds": round(result["seconds"], 1)}
    seeds_printed = f"(CH11_SEED_OFFSET={DRAWS[draw]['CH11_SEED_OFFSET']})"
    if out["ok"] and seeds_printed not in executed:  # a notebook that ignores the offset re-draws nothing
        out.update(ok=False, error=f"the notebook never printed seeds_line(...) ending in {seeds_printed}: does it read CH11_SEED_OFFSET?")
    return out


@contextmanager
def locked_record():
    """Read-modify-write of the record under an exclusive lock; yields the dict to change."""
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    lock_path = RECORD.with_name("." + RECORD.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(RECORD.read_text()) if RECORD.exists() else {}
        data.setdefault("notebooks", {})
        yield data
        data["draws"] = DRAWS
        data["how"] = "python scripts/robustness.py: every notebook headless under each draw, its own assertions only (no output comparison)"
        data["notebooks"] = dict(sorted(data["notebooks"].items()))
        from chapter11.report import atomic_write_text

        atomic_write_text(json.dumps(data, indent=1) + "\n", RECORD)


def update(path: Path, draw: str, result: dict, machine: str, commit: str) -> None:
    digest = code_hash(path)
    with locked_record() as data:
        entry = data["notebooks"].get(path.stem)
        if entry is None or entry.get("code_hash") != digest:
            entry = {"code_hash": digest, "draws": {}}  # the code changed: earlier draws no longer count
        entry["draws"][draw] = {**result, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                "machine": machine, "commit": commit}
        data["notebooks"][path.stem] = entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", help="notebook number or stem (repeatable); default: all")
    parser.add_argument("--draw", action="append", choices=list(DRAWS), help="draw to run (repeatable); default: all")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a shared machine: idle threads sleep
    from chapter11.bench import describe_machine
    from chapter11.report import _commit

    machine, commit = describe_machine(), _commit()
    chosen, draws = select(args.only), args.draw or list(DRAWS)
    failed = []
    for path in chosen:
        for draw in draws:
            digest = code_hash(path)
            start = time.perf_counter()
            print(f"{path.stem} [{draw}] ...", flush=True)
            result = run_draw(path, draw)
            if code_hash(path) != digest:
                print(f"  {path.stem} changed while it ran: not recorded", flush=True)
                failed.append(f"{path.stem} [{draw}] (changed while running)")
                continue
            update(path, draw, result, machine, commit)
            status = "pass" if result["ok"] else f"FAIL at cell {result['cell']}: {result['error']}"
            print(f"  {status} ({time.perf_counter() - start:.0f} s)", flush=True)
            if not result["ok"]:
                failed.append(f"{path.stem} [{draw}]")
    print(f"wrote {RECORD.relative_to(ROOT)}; " + (f"failed: {', '.join(failed)}" if failed else "every draw passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
