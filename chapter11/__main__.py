"""Command line: run every experiment headless and summarise it.

    python -m chapter11 list                 experiments with one-line descriptions
    python -m chapter11 run [--only NAME]    execute notebooks into build/notebooks/, write build/summary.md
    python -m chapter11 refresh [PATH ...]   re-execute committed notebooks in place (make notebooks)
    python -m chapter11 bench NAME [...]     benchmarks: masks, sparse, structured, semi (--help after NAME)
    python -m chapter11 labs [...]           build and autograde the nbgrader labs (labs --help; chapter11.labs)

`run` never touches the committed notebooks: each one is executed into
`build/notebooks/`, its headline numbers (`chapter11.report.record`) land in
`build/notebooks/NAME.records.json`, its figures in `build/figures/NAME/`. A
notebook that fails is reported with its cell and error, the others still
run, and the exit status is 1 if any failed.

`bench` hands over to the benchmark drivers (`chapter11.experiments.benchmarks`,
which lists them); it restarts itself once with `chapter11.bench.QUIET_POOLS`
set, so idle BLAS threads sleep between timings. This module sits at the top
of the package: it imports the core and the drivers, and nothing imports it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

from .report import RECORD_ENV, atomic_write_bytes, atomic_write_text, describe_machine, headline_table

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
BUILD = ROOT / "build"
CELL_TIMEOUT = 2400  # CH11_FULL=1 cells on a busy 2-core machine come close to 20 minutes


def experiments(folder: Path = NOTEBOOKS) -> list[Path]:
    """The experiment notebooks, in order (labs under notebooks/exercises are not experiments)."""
    return sorted(folder.glob("[0-9][0-9]_*.ipynb"))


def first_sentence(markdown: str) -> str:
    """The first sentence of the first prose paragraph (headings, formulas, images and tables skipped).

    >>> first_sentence("# Title\n\nMovement asks how a weight\nmoves (Sanh et al., 2020). More here.")
    'Movement asks how a weight moves (Sanh et al., 2020).'
    """
    for paragraph in re.split(r"\n\s*\n", markdown):
        lines = [line.strip() for line in paragraph.splitlines() if line.strip()]
        if lines and not lines[0].startswith(("#", "$", "!", "|", "```", "-", "*")):
            text = " ".join(lines)
            return re.split(r"(?<=[.!?])\s+(?=[A-Z(*`])", text)[0]
    return ""


def describe(path: Path) -> tuple[str, str]:
    """(title, one-sentence description) from the notebook's first markdown cell."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            lines = [line.strip() for line in cell.source.splitlines() if line.strip()]
            title = lines[0].lstrip("# ").strip() if lines else path.stem
            return title, first_sentence(cell.source)
    return path.stem, ""


def select(only: str | None) -> list[Path]:
    found = experiments()
    if only is None:
        return found
    picked = [p for p in found if p.stem == only or p.stem.split("_", 1)[0] == only or only in p.stem]
    if not picked:
        names = ", ".join(p.stem for p in found)
        raise SystemExit(f"--only: no experiment matches {only!r}; choose from: {names}")
    return picked


def _client(nb, path: Path, bar=None):
    from nbclient import NotebookClient

    def on_cell_executed(**kwargs):
        if bar is not None:
            bar.update(1)

    return NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,
        on_cell_executed=on_cell_executed,
    )


def _strip_volatile(nb) -> None:
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            for out in cell.get("outputs", []):
                out.get("metadata", {}).pop("execution", None)


def execute(path: Path, target: Path, records: Path | None = None, show_progress: bool = True) -> dict:
    """Execute `path` into `target`; returns {"ok", "seconds", "error", "cell"}."""
    import nbformat
    from nbclient.exceptions import CellExecutionError

    from .train import progress

    nb = nbformat.read(path, as_version=4)
    n_code = sum(1 for c in nb.cells if c.cell_type == "code")
    old = {k: os.environ.get(k) for k in ("CH11_PROGRESS", RECORD_ENV)}
    os.environ["CH11_PROGRESS"] = "0"
    if records is not None:
        records.unlink(missing_ok=True)
        os.environ[RECORD_ENV] = str(records)
    bar = progress(total=n_code, desc=path.stem, enabled=show_progress)
    start = time.perf_counter()
    result = {"ok": True, "error": "", "cell": None}
    try:
        _client(nb, path, bar).execute()
    except CellExecutionError as err:
        index = next((i for i, c in enumerate(nb.cells) if any(o.get("output_type") == "error" for o in c.get("outputs", []))), None)
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
        result = {"ok": False, "error": message.splitlines()[-1] if message else repr(err), "cell": index}
    except Exception as err:  # kernel died, timeout, ...
        result = {"ok": False, "error": f"{type(err).__name__}: {err}", "cell": None}
    finally:
        bar.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    result["seconds"] = time.perf_counter() - start
    _strip_volatile(nb)
    atomic_write_text(nbformat.writes(nb), target)
    return result


def extract_figures(notebook: Path, folder: Path) -> list[Path]:
    """Save every PNG output of an executed notebook as folder/cellNN_K.png."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    saved = []
    for i, cell in enumerate(nb.cells):
        for k, out in enumerate(cell.get("outputs", [])):
            data = out.get("data", {})
            if "image/png" in data:
                saved.append(atomic_write_bytes(base64.b64decode(data["image/png"]), folder / f"cell{i:02d}_{k}.png"))
    return saved


def cmd_list(args) -> int:
    for path in experiments():
        title, sentence = describe(path)
        print(f"{path.stem:40s} {title}")
        if sentence:
            print(f"{'':40s}   {sentence}")
    return 0


def cmd_run(args) -> int:
    from .train import progress

    chosen = select(args.only)
    out = BUILD / "notebooks"
    out.mkdir(parents=True, exist_ok=True)
    sections, failed = [], []
    for path in progress(chosen, desc="experiments", enabled=True):
        records = out / f"{path.stem}.records.json"
        target = out / path.name
        print(f"running {path.name} ...", flush=True)
        result = execute(path, target, records)
        status = f"ok in {result['seconds']:.0f} s" if result["ok"] else f"FAILED at cell {result['cell']}: {result['error']}"
        print(f"  {path.stem}: {status}", flush=True)
        if not result["ok"]:
            failed.append(path.stem)
        title, sentence = describe(path)
        figures = extract_figures(target, BUILD / "figures" / path.stem)
        table = headline_table(json.loads(records.read_text())) if records.exists() else "_no headline numbers recorded_"
        figs = "\n".join(f"![{path.stem} figure {k + 1}]({f.relative_to(BUILD).as_posix()})" for k, f in enumerate(figures))
        sections.append(f"## {title}\n\n`{path.name}`: {status}. {sentence}\n\n{table}\n\n{figs or '_no figures_'}\n")
    header = f"# chapter11: experiment summary\n\nMachine: {describe_machine()}.\n\n{len(chosen) - len(failed)} of {len(chosen)} experiments ran cleanly."
    if failed:
        header += f" Failed: {', '.join(failed)}."
    atomic_write_text(header + "\n\n" + "\n".join(sections), BUILD / "summary.md")
    print(f"wrote {BUILD / 'summary.md'}")
    return 1 if failed else 0


def cmd_refresh(args) -> int:
    paths = [Path(p).resolve() for p in args.paths] if args.paths else experiments()
    failed = 0
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"paths: no notebook at {str(path)!r}")
        result = execute(path, path)
        print(f"{path.name}: {'ok' if result['ok'] else 'FAILED at cell ' + str(result['cell']) + ': ' + result['error']} ({result['seconds']:.0f} s)", flush=True)
        failed += not result["ok"]
    return 1 if failed else 0



def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # its options belong to each benchmark, so argparse does not see them
        from .experiments.benchmarks import bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "labs":  # the same: chapter11.labs parses its own options
        from .labs import main as labs_main

        return labs_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m chapter11", description="Run the pruning chapter's experiments headless.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list experiments").set_defaults(func=cmd_list)
    run = sub.add_parser("run", help="execute every experiment into build/ and write build/summary.md")
    run.add_argument("--only", metavar="NAME", help="run one experiment (name, number or part of a name)")
    run.set_defaults(func=cmd_run)
    refresh = sub.add_parser("refresh", help="re-execute committed notebooks in place")
    refresh.add_argument("paths", nargs="*", help="notebooks to refresh (default: all experiments)")
    refresh.set_defaults(func=cmd_refresh)
    sub.add_parser("bench", help="benchmarks: masks, sparse, structured, oneshot, semi (python -m chapter11 bench --help)", add_help=False)
    sub.add_parser("labs", add_help=False,
                   help="nbgrader labs: student release, reference and wrong samples autograded, build/labs/scores.csv (labs --help)")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        from .bench import quiet_pools_missing

        missing = quiet_pools_missing()
        if missing:
            os.execve(sys.executable, [sys.executable, "-m", "chapter11", *sys.argv[1:]], {**os.environ, **missing})
    sys.exit(main())
