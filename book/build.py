"""Build the chapter into static HTML that works with the network off.

    .venv/bin/python book/build.py            # -> book/_build/html/index.html

Steps:
1. Stage: copy the pages in book/ and every executed notebook in notebooks/
   into book/_build/src. A notebook that does not exist yet gets a short
   placeholder page, so the build never breaks on it (the summary lists them).
2. Build with Jupyter Book 1.x (Sphinx). Notebooks are not re-executed.
3. Localise: copy MathJax 2 from Debian's libjs-mathjax into _static/mathjax
   and remove any <script>/<link> that still points at another host.
4. Check: fail (exit 1) on Sphinx warnings about missing references or
   documents, on broken internal links, and on any remaining remote load.

But: it does not open the pages in a browser; book/check_browser.py does.
"""

from __future__ import annotations

import argparse
import html.parser
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
BUILD = BOOK / "_build"
SRC = BUILD / "src"
HTML = BUILD / "html"
MATHJAX_SYSTEM = Path(os.environ.get("CH11_MATHJAX", "/usr/share/javascript/mathjax"))

NOTEBOOKS = [
    "00_sparsity_and_masks",
    "01_iterative_magnitude_pruning",
    "02_lottery_ticket",
    "03_movement_vs_magnitude",
    "04_attention_head_pruning",
    "05_sparse_inference_onnxruntime",
    "06_dynamic_sparsity_rigl",
    "07_channel_pruning_distillation",
    "08_sparse_kernels",
    "09_llm_one_shot_pruning",
]
# The chapter's five experiments: their pages must show figures.
EXPERIMENTS = NOTEBOOKS[1:6]

# What MathJax 2 needs for TeX input and CommonHTML output (about 3 MB).
MATHJAX_PARTS = [
    "MathJax.js",
    "config/TeX-AMS_CHTML.js",
    "extensions",
    "jax/input/TeX",
    "jax/element",
    "jax/output/CommonHTML",
    "fonts/HTML-CSS/TeX/woff",
    "localization/en",
]

# Sphinx warnings that mean a reference or document is missing.
REFERENCE_WARNING = re.compile(
    r"WARNING: .*("
    r"undefined label|unknown document|reference target not found|"
    r"toctree contains reference to nonexisting document|"
    r"document isn't included in any toctree|"
    r"xref_missing|could not find bibtex key|citation not found|"
    r"image file not readable|Unknown target name|duplicate label|"
    r"local id not found|Document or section may not begin with a transition|"
    r"Duplicate explicit target name|nonexisting document|not found"
    r")",
    re.IGNORECASE,
)


def placeholder_page(name: str) -> str:
    """Markdown for a notebook that is not in notebooks/ yet.

    >>> placeholder_page("02_lottery_ticket").splitlines()[0]
    '# 02 Lottery ticket (not available yet)'
    """
    number, _, topic = name.partition("_")
    title = f"{number} {topic.replace('_', ' ').capitalize()}"
    return (
        f"# {title} (not available yet)\n\n"
        f"The executed notebook `notebooks/{name}.ipynb` is not in the repository yet.\n"
        "Rebuild the book once it lands (`make book`).\n"
    )


def stage(src: Path = SRC) -> list[str]:
    """Copy pages and notebooks into `src`; return the names of missing notebooks."""
    if src.exists():
        shutil.rmtree(src)
    (src / "notebooks").mkdir(parents=True)
    for path in sorted(BOOK.iterdir()):
        if path.suffix in {".md", ".bib", ".yml"} and path.is_file():
            shutil.copy2(path, src / path.name)
    shutil.copytree(BOOK / "_static", src / "_static")  # custom.css (Jupyter Book loads every CSS file there)
    missing = []
    for name in NOTEBOOKS:
        notebook = ROOT / "notebooks" / f"{name}.ipynb"
        if notebook.exists():
            shutil.copy2(notebook, src / "notebooks" / notebook.name)
        else:
            missing.append(name)
            (src / "notebooks" / f"{name}.md").write_text(placeholder_page(name))
    return missing


def sphinx_build(src: Path = SRC) -> tuple[int, str]:
    """Run Jupyter Book on the staged sources; return (exit code, log)."""
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(src),
           "--path-output", str(BOOK), "--keep-going", "--quiet"]
    env = dict(os.environ, PYDEVD_DISABLE_FILE_VALIDATION="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return done.returncode, done.stdout + done.stderr


def reference_warnings(log: str) -> list[str]:
    """The warning lines of a Sphinx log that name a missing reference or document.

    >>> reference_warnings("ok\\n/x/a.md:3: WARNING: undefined label: 'foo'\\n")
    ["/x/a.md:3: WARNING: undefined label: 'foo'"]
    >>> reference_warnings("/x/a.md: WARNING: Pygments lexer name 'foo' is not known")
    []
    """
    return [line.strip() for line in log.splitlines() if REFERENCE_WARNING.search(line)]


class _Links(html.parser.HTMLParser):
    """Collects ids and the URLs a page links to or loads."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, url)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name"):
            if attrs.get(key) and (key == "id" or tag == "a"):
                self.ids.add(attrs[key])
        for key in ("href", "src"):
            if attrs.get(key) is not None:
                self.links.append((tag, key, attrs[key]))


def is_remote(url: str) -> bool:
    """True for a URL on another host.

    >>> [is_remote(u) for u in ["https://a.org/x.js", "//cdn.org/x", "_static/x.js", "#top"]]
    [True, True, False, False]
    """
    parts = urlsplit(url)
    return bool(parts.netloc) or parts.scheme in {"http", "https"}


def _pages(html_dir: Path = HTML) -> list[Path]:
    """The book's pages (not the theme's template snippets under _static/)."""
    return sorted(p for p in html_dir.rglob("*.html") if "_static" not in p.relative_to(html_dir).parts)


def _parse(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8", errors="replace"))
    return parser


def remote_loads(html_dir: Path = HTML) -> list[str]:
    """Every <script src>, <link href>, <img src>, <iframe src> on another host."""
    found = []
    for page in _pages(html_dir):
        for tag, key, url in _parse(page).links:
            if tag != "a" and is_remote(url):
                found.append(f"{page.relative_to(html_dir)}: <{tag} {key}={url!r}>")
    return found


_REMOTE_TAG = re.compile(
    r"<script[^>]*\bsrc=\"(?:https?:)?//[^\"]*\"[^>]*>\s*</script>\s*"
    r"|<link[^>]*\bhref=\"(?:https?:)?//[^\"]*\"[^>]*/?>\s*"
    # sphinx-thebe (always loaded by Jupyter Book) would fetch thebe from unpkg
    # on a click; the book has no live code, so its scripts go too.
    r"|<script[^>]*\bsrc=\"[^\"]*sphinx-thebe\.js[^\"]*\"[^>]*>\s*</script>\s*"
    r"|<script[^>]*>[^<]*THEBE_JS_URL[^<]*</script>\s*"
    r"|<script type=\"text/x-thebe-config\">[^<]*</script>\s*"
    # MyST-NB writes a MathJax 3 configuration; MathJax 2 would take it as its
    # own and then load no input or output jax.
    r"|<script>\s*window\.MathJax = [^<]*</script>\s*",
    re.IGNORECASE,
)


# pydata-sphinx-theme logs a console error when no colour mode is stored yet.
_EMPTY_MODE = 'localStorage.getItem("mode") || ""'


def drop_remote_tags(html_dir: Path = HTML) -> list[str]:
    """Remove <script src=remote> and <link href=remote> from every page; return what went.

    Also gives the theme a default colour mode (see `_EMPTY_MODE`).
    """
    dropped = []
    for page in _pages(html_dir):
        text = page.read_text(encoding="utf-8")
        if _EMPTY_MODE in text:
            text = text.replace(_EMPTY_MODE, _EMPTY_MODE[:-2] + '"light"')
            page.write_text(text, encoding="utf-8")
        hits = _REMOTE_TAG.findall(text)
        if hits:
            page.write_text(_REMOTE_TAG.sub("", text), encoding="utf-8")
            dropped += [f"{page.relative_to(html_dir)}: {h.strip()[:120]}" for h in hits]
    return dropped


def copy_mathjax(html_dir: Path = HTML, system: Path = MATHJAX_SYSTEM) -> Path:
    """Copy the parts of MathJax 2 the pages use into _static/mathjax."""
    if not (system / "MathJax.js").exists():
        raise FileNotFoundError(
            f"MathJax not found at {system}: install Debian's libjs-mathjax "
            "(scripts/book_tools.sh) or set CH11_MATHJAX to a MathJax 2 folder")
    target = html_dir / "_static" / "mathjax"
    if target.exists():
        shutil.rmtree(target)
    for part in MATHJAX_PARTS:
        source = system / part
        if source.is_dir():
            shutil.copytree(source, target / part, symlinks=False)
        elif source.exists():
            (target / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / part)
    return target


def broken_links(html_dir: Path = HTML) -> list[str]:
    """Internal links and loads whose file or #anchor does not exist."""
    pages = {p.resolve(): _parse(p) for p in _pages(html_dir)}
    broken = []
    for page, parsed in sorted(pages.items()):
        for tag, key, url in parsed.links:
            if not url or is_remote(url) or url.startswith(("mailto:", "javascript:", "data:")):
                continue
            parts = urlsplit(url)
            target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            where = f"{page.relative_to(html_dir.resolve())}: {url}"
            if not target.exists():
                broken.append(f"{where} (no file {target.name})")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{where} (no anchor #{parts.fragment})")
    return broken


def build(check: bool = True) -> dict:
    """Stage, build, localise and check; return a summary dictionary."""
    start = time.perf_counter()
    missing = stage()
    for old in (HTML, BUILD / ".doctrees", BUILD / "jupyter_execute"):
        if old.exists():  # always a fresh build: no stale notebook pages
            shutil.rmtree(old)
    code, log = sphinx_build()
    (BUILD / "build.log").write_text(log)
    summary = {"exit_code": code, "missing_notebooks": missing, "log": log,
               "reference_warnings": reference_warnings(log)}
    if code == 0 and (HTML / "index.html").exists():
        copy_mathjax()
        summary["dropped_remote"] = drop_remote_tags()
        summary["remote_loads"] = remote_loads()
        summary["broken_links"] = broken_links()
    summary["seconds"] = time.perf_counter() - start
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    s = build()
    problems = []
    if s["exit_code"] != 0:
        problems.append(f"jupyter-book exited with {s['exit_code']}:\n{s['log'][-3000:]}")
    problems += [f"missing reference: {w}" for w in s["reference_warnings"]]
    problems += [f"broken link: {b}" for b in s.get("broken_links", [])]
    problems += [f"remote load: {r}" for r in s.get("remote_loads", [])]
    for d in s.get("dropped_remote", []):
        print(f"dropped remote tag: {d}")
    for name in s["missing_notebooks"]:
        print(f"placeholder page (notebook not yet committed): notebooks/{name}.ipynb")
    for p in problems:
        print(p, file=sys.stderr)
    print(f"book: {HTML / 'index.html'} in {s['seconds']:.1f} s, "
          f"{len(problems)} problem(s), {len(s['missing_notebooks'])} placeholder(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
