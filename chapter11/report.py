"""Headline numbers of an experiment, and files written so nothing is half-lost.

A notebook calls `record("final_accuracy", acc)` for each number worth a line
in `build/summary.md`. When the notebook runs under `python -m chapter11 run`,
the variable `CH11_RECORD_PATH` names a JSON file next to the executed
notebook and every call appends there; run by hand, the numbers just collect
in memory (`recorded()` shows them). Nothing is printed, so notebook outputs
stay the same whichever way they run.

Every file this package writes goes through `atomic_write_bytes`: a temporary
file in the same folder, flushed, then renamed over the target, so a crash
leaves the old file or the new one, never half of one. A crash can leave the
hidden temporary file, named `.<target>.<pid>.<random>.tmp`; the next write to
the same target removes those whose writer is gone (no process with that pid
on this machine) and that are over a minute old, and any over a day old.

Every recorded run also says what it ran on: `machine_info` (CPU, cores,
threads, library versions, GPU) and `describe_machine` (one line of it).

But: the pid test only knows this machine's processes; on a folder shared by
several machines, a temporary file older than a minute whose writer runs
elsewhere would be removed.

    >>> _RECORDS.clear()
    >>> record("sparsity", 0.8); record("accuracy", 0.91234, unit="fraction")
    >>> recorded()["accuracy"]["value"]
    0.91234
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
import time
from numbers import Real
from pathlib import Path

__all__ = [
    "record",
    "recorded",
    "headline_table",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_torch_save",
    "RECORD_ENV",
    "FULL_RUNS",
    "save_full_run",
    "load_full_run",
    "machine_info",
    "describe_machine",
]

RECORD_ENV = "CH11_RECORD_PATH"
FULL_RUNS = Path(__file__).resolve().parent.parent / "benchmarks" / "full"
_RECORDS: dict[str, dict] = {}


def _file_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


STALE_AFTER_S = 60.0  # a temp file younger than this is never judged stale
ABANDONED_AFTER_S = 86400.0  # one older than this is stale whoever wrote it


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, OSError):
        return True  # exists under another user, or cannot tell: keep the file
    return True


def _remove_stale_temps(path: Path) -> list[str]:
    """Delete temp files of `path` left by writers that crashed; returns their names.

    Matches `.<name>.<pid>.<8 chars>.tmp` (and the older `.<name>.<8 chars>.tmp`,
    which has no pid). Stale: older than `STALE_AFTER_S` and its writer's pid
    is not running here (or unknown), or older than `ABANDONED_AFTER_S`.
    """
    pattern = re.compile(re.escape(f".{path.name}.") + r"(?:(\d+)\.)?[a-z0-9_]{8}\.tmp")
    now, removed = time.time(), []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
            if not entry.is_file(follow_symlinks=False) or age < STALE_AFTER_S:
                continue
            pid = match.group(1)
            if age < ABANDONED_AFTER_S and pid is not None and _writer_alive(int(pid)):
                continue
            os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:  # vanished meanwhile, or not ours to delete
            continue
    return removed


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write `data` to `path` atomically (temp file + rename in the same folder).

    The temp file is `.<name>.<pid>.<random>.tmp`; stale ones a crashed
    writer left for the same target are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; keep the target's mode, else the umask default
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(text.encode("utf-8"), path)


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """`torch.save` to `path` atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(buffer.getvalue(), path)


def _plain(value, name: str = "value"):
    """Turn numpy/torch scalars into JSON-friendly Python numbers.

    >>> import torch
    >>> _plain(torch.tensor(0.5)), _plain(3)
    (0.5, 3)
    >>> _plain(torch.ones(2), "x")
    Traceback (most recent call last):
    ...
    TypeError: value for 'x' must be a single number, got a Tensor with 2 elements; pass e.g. tensor.mean().item()
    """
    if hasattr(value, "item") and callable(value.item):
        size = value.numel() if callable(getattr(value, "numel", None)) else getattr(value, "size", 1)
        if size != 1:
            raise TypeError(
                f"value for {name!r} must be a single number, got a {type(value).__name__} with {size} elements; "
                "pass e.g. tensor.mean().item()"
            )
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, Real):
        value = float(value) if not isinstance(value, int) else value
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"value for {name!r} must be finite, got {value}")
        return value
    raise TypeError(f"value for {name!r} must be a number, bool or string, got {type(value).__name__}")


def record(name: str, value, unit: str = "", note: str = "") -> None:
    """Record one headline number of the running experiment."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    _RECORDS[name] = {"value": _plain(value, name), "unit": unit, "note": note}
    target = os.environ.get(RECORD_ENV)
    if target:
        atomic_write_text(json.dumps(_RECORDS, indent=2, sort_keys=True), target)


def recorded() -> dict[str, dict]:
    """A copy of everything recorded so far in this process."""
    return {k: dict(v) for k, v in _RECORDS.items()}


def headline_table(records: dict[str, dict] | None = None) -> str:
    """Markdown table of recorded numbers (4 significant digits).

    >>> print(headline_table({"acc": {"value": 0.912345, "unit": "", "note": ""}}))
    | number | value | unit | note |
    |---|---|---|---|
    | acc | 0.9123 |  |  |
    """
    records = recorded() if records is None else records
    lines = ["| number | value | unit | note |", "|---|---|---|---|"]
    for name, r in records.items():
        v = r["value"]
        shown = f"{v:.4g}" if isinstance(v, float) else str(v)
        lines.append(f"| {name} | {shown} | {r.get('unit', '')} | {r.get('note', '')} |")
    return "\n".join(lines)



def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def machine_info() -> dict[str, str | int]:
    """CPU model, torch's CPU kernels, cores, torch threads, library versions and the GPU, if any.

    `cpu_kernels` is the instruction set torch's kernels were dispatched for
    (`AVX2`, `AVX512`, ...; `ATEN_CPU_CAPABILITY` lowers it). Two machines
    sold as "AMD EPYC" can differ here, and timings and the last digits of
    trained numbers differ with it.
    """
    import platform

    import numpy
    import torch

    info: dict[str, str | int] = {
        "cpu": _cpu_model(),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    for name in ("scipy", "onnxruntime", "numba", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = "not installed"
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    # thread-pool settings change timings (see chapter11.bench.QUIET_POOLS), so they are part of the record
    # so are the instruction-set caps of MKL and oneDNN: with them a newer CPU reproduces an older one's numbers
    keys = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT", "OMP_NUM_THREADS", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
    env = [f"{k}={os.environ[k]}" for k in keys if k in os.environ]
    info["thread_env"] = " ".join(env) or "defaults"
    return info


def describe_machine() -> str:
    """One line for a benchmark header."""
    i = machine_info()
    return f"{i['cpu']}, {i['cores']} cores ({i['torch_threads']} torch threads), torch {i['torch']}, GPU: {i['gpu']}"


def code_changes(porcelain: str) -> list[str]:
    r"""The changed paths of `git status --porcelain` output that can change what a run computes.

    Records under `benchmarks/` are what runs write, not what they run: a
    record saved earlier in the same session must not make the next one
    "dirty".

    >>> code_changes(" M benchmarks/full/01_a.json\n M chapter11/report.py\nR  old.py -> notebooks/new.ipynb")
    ['chapter11/report.py', 'notebooks/new.ipynb']
    """
    paths = [line[3:].split(" -> ")[-1].strip('"') for line in porcelain.splitlines() if line.strip()]
    return [p for p in paths if not p.startswith("benchmarks/")]


def _commit() -> str:
    import subprocess

    root = FULL_RUNS.parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (DIRTY if code_changes(status) else "")


DIRTY = "+uncommitted changes"
FORCE_DIRTY_ENV = "CH11_RECORD_DIRTY"
UNCOMMITTED_RUNS = FULL_RUNS.parent.parent / "build" / "uncommitted_runs"


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def save_full_run(name: str, results: dict, settings: dict, command: str, seconds: float,
                  folder: str | os.PathLike | None = None, force: bool | None = None) -> Path:
    """Write a recorded full run (`CH11_FULL=1`) to `benchmarks/full/<name>.json`.

    The file holds the date (UTC), the machine (`machine_info`),
    the full commit, the exact `command`, the `settings` the run used, its
    wall time in `seconds` and the `results`; notebooks load it with
    `load_full_run(name)`; `provenance(record)` is the line to print above
    what they plot.

    A record under `benchmarks/` must come from a clean commit: with
    uncommitted changes outside `benchmarks/` (`code_changes`) the run is written to `build/uncommitted_runs/`
    instead (nothing is lost, nothing is loaded from there) and a warning
    says so, unless `force=True` or `CH11_RECORD_DIRTY=1`, in which case the
    record lands where asked and its commit reads `<sha>+uncommitted changes
    (forced)`, which `provenance` prints whole.
    """
    import datetime
    import warnings

    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    for arg, value in (("results", results), ("settings", settings)):
        if not isinstance(value, dict):
            raise TypeError(f"{arg} must be a dict, got {type(value).__name__}")
    if force is None:
        force = os.environ.get(FORCE_DIRTY_ENV, "") == "1"
    target = Path(folder or FULL_RUNS)
    commit = _commit()
    if commit.endswith(DIRTY):
        if force:
            commit += " (forced)"
        elif _inside(target, FULL_RUNS.parent):
            warnings.warn(f"{name}: the working tree has uncommitted changes, so this run is not written to {target} "
                          f"but to {UNCOMMITTED_RUNS}; commit and run again for a record under benchmarks/, "
                          f"or set {FORCE_DIRTY_ENV}=1 to record it anyway (the record then says so)", stacklevel=2)
            target = UNCOMMITTED_RUNS
    payload = {
        "name": name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "commit": commit,
        "command": command,
        "settings": settings,
        "seconds": round(float(seconds), 1),
        "results": results,
    }
    text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False)
    return atomic_write_text(text + "\n", target / f"{name}.json")


def provenance(record: dict) -> str:
    """The whole provenance line of a recorded run: RECORDED, date, machine, full commit, command, minutes.

    A commit recorded from a dirty tree keeps its `+uncommitted changes`
    suffix (and `(forced)`) in the line; nothing is shortened.

    >>> print(provenance({"date": "2026-12-04 03:00 UTC", "machine": {"cpu": "AMD EPYC", "cores": 2, "torch": "2.14.1"},
    ...                   "commit": "0123456789abcdef0123456789abcdef01234567", "command": "python -m x", "seconds": 90.0}))
    RECORDED (not computed here) 2026-12-04 03:00 UTC on AMD EPYC, 2 cores, torch 2.14.1; commit 0123456789abcdef0123456789abcdef01234567; command: python -m x; 1.5 min

    The instruction sets the kernels ran with are part of the machine:

    >>> print(provenance({"machine": {"cpu": "AMD EPYC", "cpu_kernels": "AVX2", "cores": 2, "torch": "2.14.1",
    ...                               "thread_env": "OMP_WAIT_POLICY=PASSIVE MKL_ENABLE_INSTRUCTIONS=AVX2"}}))
    RECORDED (not computed here) ? on AMD EPYC (AVX2 kernels, MKL capped at AVX2), 2 cores, torch 2.14.1; commit ?; command: ?; 0.0 min

    A record assembled from worker logs took seconds to write; its runs' own
    time, where the results hold it (`runs_seconds`), follows:

    >>> print(provenance({"seconds": 3.0, "results": {"seconds_per_unit": {"a": 600.0, "b": 300.0}}}).split("; ")[-1])
    0.1 min (the runs: 15.0 min of wall time)
    """
    machine = record.get("machine", {})
    if isinstance(machine, dict):
        kernels = [f"{machine['cpu_kernels']} kernels"] if machine.get("cpu_kernels") else []
        caps = {"MKL_ENABLE_INSTRUCTIONS": "MKL", "ONEDNN_MAX_CPU_ISA": "oneDNN"}
        kernels += [f"{caps[k]} capped at {v}" for k, _, v in (e.partition("=") for e in str(machine.get("thread_env", "")).split()) if k in caps]
        cpu = machine.get("cpu", "?") + (f" ({', '.join(kernels)})" if kernels else "")
        machine = f"{cpu}, {machine.get('cores', '?')} cores, torch {machine.get('torch', '?')}"
    runs = runs_seconds(record.get("results"))
    took = "" if runs is None else f" (the runs: {runs[0] / 60:.1f} min of {runs[1]})"
    return (f"RECORDED (not computed here) {record.get('date', '?')} on {machine}; commit {record.get('commit', '?')}; "
            f"command: {record.get('command', '?')}; {float(record.get('seconds', 0)) / 60:.1f} min{took}")


def runs_seconds(results) -> tuple[float, str] | None:
    """The time a recorded run's units took, where its results hold it: (seconds, "wall time" or "CPU time"), else None.

    Drivers that resume from logs write it as `unit_seconds` or
    `wall_s_all_runs` (a sum), `seconds_per_unit` (a dict) or
    `seconds_per_seed` (a list), all wall time, or only as `cpu_s_all_runs`
    (CPU time); the record's own `seconds` then cover only the last call.

    >>> runs_seconds({"seconds_per_seed": [60.0, 90.0]}), runs_seconds({"cpu_s_all_runs": 120.0}), runs_seconds({"dense": 1.0})
    ((150.0, 'wall time'), (120.0, 'CPU time'), None)
    """
    if not isinstance(results, dict):
        return None
    for key in ("unit_seconds", "wall_s_all_runs", "seconds_per_unit", "seconds_per_seed", "cpu_s_all_runs"):
        value = results.get(key)
        if isinstance(value, dict):
            value = sum(value.values())
        elif isinstance(value, list):
            value = sum(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), "CPU time" if key == "cpu_s_all_runs" else "wall time"
    return None


def load_full_run(name: str, folder: str | os.PathLike | None = None) -> dict:
    """The recorded full run `name` (see `save_full_run`); FileNotFoundError says how to make one."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"name must be a plain file stem inside the recorded-runs folder, got {name!r}")
    path = Path(folder or FULL_RUNS) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no recorded full run at {path}: run the notebook once with CH11_FULL=1 to record it")
    return json.loads(path.read_text())
