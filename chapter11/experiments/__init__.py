"""Experiment drivers: the settings, grids and recorded runs behind the notebooks, kept apart from the methods.

Covers: one module per notebook that needs more than the method modules
give it (`exp01_schedules`, `exp02_lottery`, `exp03_movement`, `exp04_heads`,
`exp05_onnx`, `exp06_dynamic`, `exp07_channels`, `exp08_kernels`, `exp09_oneshot`), each with
its settings, tasks, one-seed runs, grids, the functions that record runs
into `benchmarks/full/` and a command line
(`python -m chapter11.experiments.exp02_lottery --help`); `benchmarks`, the
drivers behind `python -m chapter11 bench`; `explorers`, the knobs each
notebook shows over its results (`chapter11.plots.Explorer`); and here, what every driver
repeats: the seeds of a recorded run (`seeds_from_command_line`, or
`driver_arguments` with a driver's own switches) and the
append-only JSON-lines logs that make long grids resumable (`append_jsonl`,
`read_jsonl`; one log per worker process, `worker_log` and `read_logs`; and
the loop over a run's units around them, `run_units`). Recording a run and loading it back are
`chapter11.report.save_full_run` / `load_full_run` (the core: notebooks
load records too), and a notebook's live seeds shift with
`chapter11.train.offset_seeds`.

Drivers import the core and the method modules; only the command line, the
notebooks and other drivers import them (`tests/test_layout.py`).

But: a log is trusted as written by this package: a torn last line (a run
killed mid-write) is skipped with a warning and cut off by the next append;
anything else unreadable stops the driver.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

MIN_RECORDED_SEEDS = 8  # fewer seeds do not settle a comparison that three live seeds could not


def driver_arguments(doc: str, default: int, argv=None, flags: Mapping[str, tuple[str, int]] | None = None, workers: bool = False):
    """A driver's command line: `--seeds N` as seeds 0..N-1 (at least 8), plus on/off `flags`.

    `flags` maps each flag to (its help, the default number of seeds when it
    is given): a flag that switches to another run may need another count.
    With `workers`, also `--worker I/N` (one of N processes sharing a run's
    log), parsed into `args.worker, args.workers` (0, 1 without it).
    Returns the parsed namespace, with `seeds` as a list.

    >>> args = driver_arguments("Demo.", 12, ["--other"], {"--other": ("the other run", 9)})
    >>> args.other, len(args.seeds)
    (True, 9)
    >>> args = driver_arguments("Demo.", 8, ["--worker", "1/2"], workers=True)
    >>> args.worker, args.workers
    (1, 2)
    """
    import argparse

    flags = dict(flags or {})
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    given = "".join(f", {n} with {f}" for f, (_, n) in flags.items())
    parser.add_argument("--seeds", type=int, default=None, help=f"number of seeds, from 0 (default {default}{given})")
    for flag, (text, _) in flags.items():
        parser.add_argument(flag, action="store_true", help=text)
    if workers:
        parser.add_argument("--worker", default=None, metavar="I/N", help="run every N-th unit from the I-th and record nothing")
    args = parser.parse_args(argv)
    if workers:
        given = args.worker
        try:
            args.worker, args.workers = (int(v) for v in given.split("/")) if given else (0, 1)
        except ValueError:
            parser.error(f"--worker must be I/N with 0 <= I < N, got {given!r}")
        if not 0 <= args.worker < args.workers:
            parser.error(f"--worker must be I/N with 0 <= I < N, got {given!r}")
    if args.seeds is None:
        args.seeds = next((n for f, (_, n) in flags.items() if getattr(args, f.lstrip("-").replace("-", "_"))), default)
    if args.seeds < MIN_RECORDED_SEEDS:
        parser.error(f"--seeds must be at least {MIN_RECORDED_SEEDS}: fewer do not settle the comparison")
    args.seeds = list(range(args.seeds))
    return args


def parse_worker(argv: Sequence[str]) -> tuple[int, int]:
    """`[--worker I/N]` from a driver's remaining arguments: (I, N), or (0, 1) without it; SystemExit on anything else.

    >>> parse_worker(["--worker", "1/2"]), parse_worker([])
    ((1, 2), (0, 1))
    """
    if not argv:
        return 0, 1
    if len(argv) == 2 and argv[0] == "--worker":
        try:
            i, n = (int(v) for v in argv[1].split("/"))
        except ValueError:
            i, n = -1, 0
        if 0 <= i < n:
            return i, n
    raise SystemExit(f"expected [--worker I/N] with 0 <= I < N, got {' '.join(argv)!r}")


def seeds_from_command_line(doc: str, default: int, argv=None) -> list[int]:
    """`--seeds N` (default `default`, at least 8) from a driver's command line, as seeds 0..N-1.

    >>> seeds_from_command_line("Demo.", 12, ["--seeds", "9"])
    [0, 1, 2, 3, 4, 5, 6, 7, 8]
    """
    return driver_arguments(doc, default, argv).seeds


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of one JSON-lines log, in order; [] if it does not exist.

    A last line without its newline that does not parse is a write cut short
    (the run was killed): it is skipped with a warning, and the next
    `append_jsonl` cuts it off. Any other line that does not parse raises
    ValueError naming the file and the line.

    >>> import tempfile
    >>> log = Path(tempfile.mkdtemp()) / "runs.jsonl"
    >>> append_jsonl(log, {"key": "a"}); append_jsonl(log, {"key": "b"})
    >>> [r["key"] for r in read_jsonl(log)]
    ['a', 'b']
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                warnings.warn(f"{path}: skipped a torn last line (a write cut short): {line[:60]!r}", stacklevel=2)
                continue
            raise ValueError(f"{path}, line {number}: not a JSON record ({e.msg}); the log is damaged") from None
    return records


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record as a line, flushed to disk.

    A torn last line (a write cut short) is cut off first, with a warning,
    so the log stays one whole record per line. One writer per file: the
    grids give each worker process its own log.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(0)
            data = f.read()
            if not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1  # 0 when the only line is torn
                warnings.warn(f"{path}: cut off a torn last line (a write cut short): {data[keep:keep + 60]!r}", stacklevel=2)
                f.truncate(keep)
        f.seek(0, os.SEEK_END)
        f.write((json.dumps(record) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def worker_log(log_path: str | os.PathLike | None, worker: int, workers: int) -> Path | None:
    """The log process `worker` of `workers` appends to: `log_path` itself, or `<stem>.w<worker>.jsonl` beside it.

    `append_jsonl` allows one writer per file, so processes that share a
    run each write their own log and read them all (`read_logs`).

    >>> worker_log("build/grid.jsonl", 1, 2).name
    'grid.w1.jsonl'
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1 or not 0 <= worker < workers:
        raise ValueError(f"need 0 <= worker < workers, got worker={worker!r}, workers={workers!r}")
    if workers > 1 and log_path is None:
        raise ValueError("workers > 1 needs a log_path to share finished runs")
    if log_path is None:
        return None
    log_path = Path(log_path)
    return log_path if workers == 1 else log_path.with_name(f"{log_path.stem}.w{worker}.jsonl")


def read_logs(log_path: str | os.PathLike) -> list[dict]:
    """The records of `log_path` and of its worker logs (`<stem>.w<i>.jsonl` beside it), file by file."""
    log_path = Path(log_path)
    return [rec for path in sorted(log_path.parent.glob(log_path.stem + "*.jsonl")) for rec in read_jsonl(path)]


def run_units(units: Sequence[Hashable], run_unit: Callable[[Hashable], dict], unit_of: Callable[[dict], Hashable],
              log_path: str | os.PathLike, worker: int = 0, workers: int = 1,
              describe: Callable[[dict], str] | None = None) -> dict | None:
    """The resumable loop of a recorded run: run every unit no log holds yet, and return {unit: row}.

    `run_unit(unit)` returns the unit's row (holding what `unit_of(row)`
    needs to give the unit back); its wall time is added as "seconds" and
    the row is appended to this process's log (`worker_log`), so a killed run
    resumes where it stopped. With `workers` > 1 this process runs every
    `workers`-th unit from `worker` and returns None; a last call with
    workers=1 finds them all in the logs (RuntimeError if any is missing).
    `describe(row)` is printed after each unit.
    """
    import time

    own_log = worker_log(log_path, worker, workers)
    done = {unit_of(row): row for row in read_logs(log_path)}
    for i, unit in enumerate(units):
        if unit in done or i % workers != worker:
            continue
        started = time.time()
        row = run_unit(unit)
        row["seconds"] = round(time.time() - started, 1)
        append_jsonl(own_log, row)
        done[unit] = row
        if describe is not None:
            print(describe(row), flush=True)
    if workers > 1:
        return None
    missing = [u for u in units if u not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(units)} units are in no log yet, e.g. {missing[0]!r}")
    return {u: done[u] for u in units}
