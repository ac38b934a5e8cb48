"""The book promises only what the notebooks deliver, and its numbers come from runs.

Two checks over the chapter pages in `book/`:

1. **Promises.** Where a page says that a notebook shows a figure, a table or
   a recorded number, the sentence is followed by a MyST comment line

       % promise 04_attention_head_pruning: figure "measured speedup"
       % promise 01_iterative_magnitude_pruning: record "iterative_80_test"
       % promise 09_llm_one_shot_pruning: output "calibration sequences"

   and the test checks the notebook keeps it: a code cell whose source holds
   the text and that has an image output (`figure`), a `record("name"` call
   (`record`), or an output holding the text (`output`). Each experiment
   section of `experiments.md` (and each section of `oneshot.md` that links
   its notebook) must make at least one promise about the notebook it
   presents, so no such section describes results without being checked.
2. **Numbers.** Every decimal number on the experiment pages and on the
   advice pages (tips, methods, workflow) (0.612, 23.5,
   1.37x, 0.04-0.81x) must appear, at its printed precision, in a committed
   notebook output or a JSON file under `benchmarks/`, unless its paragraph
   says it is quoted from a paper (a citation, or the words "quoted",
   "reports", "reported", "paper").
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
NOTEBOOKS = ROOT / "notebooks"
PROMISE = re.compile(r'^%\s*promise\s+(\d\d_[a-z0-9_]+):\s*(figure|record|output)\s+"([^"]+)"\s*$')
DOC_LINK = re.compile(r"\{doc\}`notebooks/(\d\d_[a-z0-9_]+)`")
NUMBER = re.compile(r"(?<![\w.:/-])(\d+\.\d+)(?![\w.]*\d)")
QUOTED = re.compile(r"\{cite|quoted|\breports?\b|\breported\b|\bpaper", re.IGNORECASE)
NUMBER_PAGES = ("experiments.md", "oneshot.md", "dimensions.md", "benchmarks.md", "tips.md", "methods.md", "workflow.md")


def _cells(name: str) -> list[dict]:
    path = NOTEBOOKS / f"{name}.ipynb"
    assert path.is_file(), f"the book promises notebooks/{name}.ipynb, which does not exist"
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def _output_text(cell: dict) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append("".join(out.get("text", "")))
        parts.append("".join(out.get("data", {}).get("text/plain", "")))
        parts.append("".join(out.get("data", {}).get("text/markdown", "")))
    return "\n".join(parts)


def _has_image(cell: dict) -> bool:
    return any(k.startswith("image/") for out in cell.get("outputs", []) for k in out.get("data", {}))


def kept(kind: str, name: str, text: str) -> bool:
    """Does notebook `name` keep the promise (kind, text)?"""
    cells = _cells(name)
    if kind == "figure":
        return any(text in "".join(c["source"]) and _has_image(c) for c in cells)
    if kind == "record":
        return any(re.search(r"record\(\s*f?[\"']" + re.escape(text) + r"[\"']", "".join(c["source"])) for c in cells)
    return any(text in _output_text(c) for c in cells)


def promises() -> list[tuple[str, int, str, str, str]]:
    found = []
    for page in sorted(BOOK.glob("*.md")):
        for i, line in enumerate(page.read_text().splitlines(), 1):
            if line.lstrip().startswith("%") and "promise" in line:
                match = PROMISE.match(line.strip())
                assert match, f"{page.name}:{i}: malformed promise {line.strip()!r}"
                found.append((page.name, i, *match.groups()))
    return found


def test_promise_syntax_is_understood():
    assert PROMISE.match('% promise 04_attention_head_pruning: figure "measured speedup"').groups() == (
        "04_attention_head_pruning", "figure", "measured speedup")
    assert not PROMISE.match('% promise 4_x: figure "a"')


@pytest.mark.parametrize("page, line, name, kind, text", promises() or [pytest.param(*[None] * 5, marks=pytest.mark.skip)])
def test_every_promise_is_kept(page, line, name, kind, text):
    assert kept(kind, name, text), f"{page}:{line}: notebooks/{name}.ipynb has no {kind} matching {text!r}"


def _sections(page: Path) -> list[tuple[str, str]]:
    """(heading, body) for every ## section of a page."""
    parts = re.split(r"^(##+ .*)$", page.read_text(), flags=re.MULTILINE)
    return [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def test_every_experiment_section_carries_a_promise():
    missing = []
    for page in (BOOK / "experiments.md", BOOK / "oneshot.md"):
        if not page.is_file():
            continue
        for heading, body in _sections(page):
            if page.name == "experiments.md" and not re.match(r"## \d\.", heading):
                continue  # "More notebooks" is a list of pointers, not results
            linked = set(DOC_LINK.findall(body))
            promised = {m.group(1) for m in map(PROMISE.match, map(str.strip, body.splitlines())) if m}
            missing += [f"{page.name} {heading!r}: notebooks/{n}" for n in sorted(linked - promised)]
    assert not missing, "sections that describe a notebook without a promise line:\n" + "\n".join(missing)


def _measured_values() -> list[float]:
    values = []
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        for cell in _cells(path.stem):
            values += [float(x) for x in re.findall(r"-?\d+\.\d+(?:[eE][-+]?\d+)?", _output_text(cell))]

    def walk(node):
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            values.append(float(node))
        elif isinstance(node, str):
            values.extend(float(x) for x in re.findall(r"-?\d+\.\d+", node))

    for path in sorted((ROOT / "benchmarks").rglob("*.json")):
        walk(json.loads(path.read_text()))
    return values


def _matches(text: str, values: list[float]) -> bool:
    decimals = len(text.split(".")[1])
    target = float(text)
    tolerance = 0.5 * 10**-decimals + 1e-12
    # a number may be shown as a percentage of a stored fraction, or the reverse
    return any(abs(v - target) <= tolerance or abs(100 * v - target) <= tolerance for v in values)


def test_decimal_numbers_on_experiment_pages_come_from_runs_or_are_quoted():
    values = _measured_values()
    unsupported = []
    for name in NUMBER_PAGES:
        page = BOOK / name
        if not page.is_file():
            continue
        for paragraph in re.split(r"\n\s*\n", page.read_text()):
            if paragraph.lstrip().startswith(("```", "$$", "%")) or QUOTED.search(paragraph):
                continue
            prose = re.sub(r"`[^`]*`|\$[^$]*\$", "", paragraph)  # code and formulas are not measurements
            for number in NUMBER.findall(prose):
                if not _matches(number, values):
                    unsupported.append(f"{name}: {number} in {paragraph.strip()[:90]!r}")
    assert not unsupported, "numbers with no run behind them:\n" + "\n".join(unsupported)
