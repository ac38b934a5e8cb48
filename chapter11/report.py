"""Headline numbers of an experiment, and files written so nothing is half-lost.

A notebook calls `record("final_accuracy", acc)` for each number worth a line
in `build/summary.md`. When the notebook runs under `python -m chapter11 run`,
the variable `CH11_RECORD_PATH` names a JSON file next to the executed
notebook and every call appends there; run by hand, the numbers just collect
in memory (`recorded()` shows them). Nothing is printed, so notebook outputs
stay the same whichever way they run.

Every file this package writes goes through `atomic_write_bytes`: a temporary
file in the same folder, flushed, then renamed over the target, so a crash
leaves the old file or the new one, never half of one.

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
import tempfile
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


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write `data` to `path` atomically (temp file + rename in the same folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def _plain(value):
    """Turn numpy/torch scalars into JSON-friendly Python numbers."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, Real):
        value = float(value) if not isinstance(value, int) else value
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"value must be finite, got {value}")
        return value
    raise TypeError(f"value must be a number, bool or string, got {type(value).__name__}")


def record(name: str, value, unit: str = "", note: str = "") -> None:
    """Record one headline number of the running experiment."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    _RECORDS[name] = {"value": _plain(value), "unit": unit, "note": note}
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



def _commit() -> str:
    import subprocess

    root = FULL_RUNS.parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted changes" if dirty else "")


def save_full_run(name: str, results: dict, settings: dict, command: str, seconds: float, folder: str | os.PathLike | None = None) -> Path:
    """Write a recorded full run (`CH11_FULL=1`) to `benchmarks/full/<name>.json`.

    The file holds the date (UTC), the machine (`chapter11.bench.machine_info`),
    the commit, the exact `command`, the `settings` the run used, its wall
    time in `seconds` and the `results`; notebooks load it with
    `load_full_run(name)` and label what they plot from it as recorded.
    """
    import datetime

    from .bench import machine_info

    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    for arg, value in (("results", results), ("settings", settings)):
        if not isinstance(value, dict):
            raise TypeError(f"{arg} must be a dict, got {type(value).__name__}")
    payload = {
        "name": name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "commit": _commit(),
        "command": command,
        "settings": settings,
        "seconds": round(float(seconds), 1),
        "results": results,
    }
    text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False)
    return atomic_write_text(text + "\n", Path(folder or FULL_RUNS) / f"{name}.json")


def load_full_run(name: str, folder: str | os.PathLike | None = None) -> dict:
    """The recorded full run `name` (see `save_full_run`); FileNotFoundError says how to make one."""
    path = Path(folder or FULL_RUNS) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no recorded full run at {path}: run the notebook once with CH11_FULL=1 to record it")
    return json.loads(path.read_text())
