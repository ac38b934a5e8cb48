"""The book: builds offline, no missing references, no broken links, no remote loads."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"book_{name}", BOOK / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BOOK))
    spec.loader.exec_module(module)
    return module


build = _load("build")


def test_reference_warnings_are_recognised():
    log = ("x.md:3: WARNING: undefined label: 'nope'\n"
           "x.md:4: WARNING: unknown document: 'notebooks/99'\n"
           "x.md:5: WARNING: image file not readable: a.png\n"
           "x.md:6: WARNING: Pygments lexer name 'foo' is not known\n")
    assert len(build.reference_warnings(log)) == 3


def test_broken_links_and_anchors_are_found(tmp_path):
    (tmp_path / "a.html").write_text('<h1 id="top">A</h1><a href="b.html#here">b</a><a href="#top">t</a>'
                                     '<a href="missing.html">m</a><a href="b.html#gone">g</a>'
                                     '<a href="https://example.org/">ext</a>')
    (tmp_path / "b.html").write_text('<p id="here">B</p>')
    broken = build.broken_links(tmp_path)
    assert len(broken) == 2
    assert any("missing.html" in b for b in broken) and any("#gone" in b for b in broken)


def test_remote_loads_found_and_dropped(tmp_path):
    page = tmp_path / "p.html"
    page.write_text('<head><script src="https://cdn.x.org/a.js"></script>'
                    '<link rel="stylesheet" href="//fonts.x.org/f.css" />'
                    '<script src="_static/local.js"></script></head><a href="https://arxiv.org/abs/1">paper</a>')
    assert len(build.remote_loads(tmp_path)) == 2
    assert len(build.drop_remote_tags(tmp_path)) == 2
    assert build.remote_loads(tmp_path) == []
    assert "_static/local.js" in page.read_text() and "arxiv.org" in page.read_text()


def test_every_chapter_page_is_in_the_toc():
    toc = (BOOK / "_toc.yml").read_text()
    for page in BOOK.glob("*.md"):
        assert page.stem in toc, f"{page.name} is not in book/_toc.yml"
    for name in build.NOTEBOOKS:
        assert f"notebooks/{name}" in toc


@pytest.mark.slow
def test_book_builds_offline_without_reference_warnings_or_broken_links():
    if not (build.MATHJAX_SYSTEM / "MathJax.js").exists():
        pytest.skip("libjs-mathjax not installed (scripts/book_tools.sh installs it)")
    summary = build.build()
    assert summary["exit_code"] == 0, summary["log"][-3000:]
    assert summary["reference_warnings"] == []
    assert summary["broken_links"] == []
    assert summary["remote_loads"] == []
    assert (build.HTML / "_static" / "mathjax" / "MathJax.js").exists()
    for page in ("intro", "math", "methods", "experiments", "benchmarks", "references"):
        assert (build.HTML / f"{page}.html").exists()
    assert "Zhu" in (build.HTML / "references.html").read_text()  # the bibliography rendered


@pytest.mark.slow
def test_browser_check_passes():
    if shutil.which("chromium") is None:
        pytest.skip("chromium not installed (scripts/book_tools.sh installs it)")
    if not (build.HTML / "index.html").exists():
        pytest.skip("book not built")
    check_browser = _load("check_browser")
    assert check_browser.main(["--allow-missing"]) == 0
