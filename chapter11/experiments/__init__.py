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
`read_jsonl`). Recording a run and loading it back are
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
from collections.abc import Mapping
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
