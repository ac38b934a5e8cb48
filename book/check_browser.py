"""Open every built page in headless Chromium and check it works offline.

    .venv/bin/python book/check_browser.py [--allow-missing]

For each page of book/_build/html (opened as file://, the way a reader
offline opens it), over the Chrome DevTools Protocol:
- no console error, uncaught exception or failed load;
- no request to any other host (anything but file:, data:, blob:, about:);
- every formula typeset by MathJax, and no raw `$...$`, `\\(` or `\\[` left
  in the text outside code; every display formula centred in its block;
- every image shown (loaded, non-zero width); an experiment notebook page
  shows at least one figure, and as many as its notebook has image outputs.
Saves a screenshot of the first experiment page to build/book_experiment_01.png.

A notebook page that is still a placeholder fails the check unless
--allow-missing is given.

But: it checks what a browser shows, not what the text says; the Sphinx
warnings and internal links are checked by book/build.py.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import websocket  # websocket-client, a dependency of jupyter_server

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import EXPERIMENTS, HTML, ROOT, _pages  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-default-apps", "--disable-extensions", "--mute-audio",
    "--remote-debugging-port=0", "--window-size=1280,1600",
]
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome-error:", "devtools:")

# Runs in the page: formulas, leftover TeX, images.
PAGE_PROBE = r"""
(() => {
  const maths = [...document.querySelectorAll('span.math, div.math')];
  const untypeset = maths.filter(e => !e.querySelector('.MathJax_CHTML, .mjx-chtml, mjx-container, .MathJax'))
                         .map(e => e.textContent.slice(0, 60));
  const walker = document.createTreeWalker(document.querySelector('main') || document.body, NodeFilter.SHOW_TEXT);
  const raw = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (n.parentElement.closest('pre, code, script, style, .MathJax_CHTML, .mjx-chtml, .math, textarea')) continue;
    const t = n.textContent;
    if (/\$\$|\$[^$\s][^$]*\$|\\\(|\\\[/.test(t)) raw.push(t.trim().slice(0, 80));
  }
  // A display formula is centred when the gaps left and right of the typeset
  // formula inside its block differ by a few pixels at most.
  const offcentre = [...document.querySelectorAll('div.math')].map(d => {
    const f = d.querySelector('.MathJax_CHTML, mjx-container, .MathJax');
    if (!f) return null;
    const b = d.getBoundingClientRect(), r = f.getBoundingClientRect();
    if (r.width >= b.width - 4) return null;  // as wide as its block: nothing to centre
    const gap = Math.abs((r.left - b.left) - (b.right - r.right));
    return gap > 8 ? `${d.textContent.trim().slice(0, 40)} (off by ${Math.round(gap)} px)` : null;
  }).filter(x => x);
  const imgs = [...document.querySelectorAll('main img')];
  return {
    mathjax: typeof MathJax !== 'undefined' && !!MathJax.Hub,
    maths: maths.length, untypeset, raw, offcentre,
    images: imgs.length,
    broken_images: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
    placeholder: /not available yet/.test(document.title + (document.querySelector('h1') || {textContent: ''}).textContent),
  };
})()
"""

MATHJAX_DONE = r"""
new Promise(resolve => {
  if (typeof MathJax === 'undefined' || !MathJax.Hub) { resolve(false); return; }
  MathJax.Hub.Queue(() => resolve(true));
})
"""


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("chromium not found: run scripts/book_tools.sh (apt-get install -y chromium)")


class Browser:
    """A headless Chromium and one page target, driven over CDP."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="ch11-chromium-")
        self.proc = subprocess.Popen(
            [find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start (no DevToolsActivePort)")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=1280, height=1600, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == my_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for(self, event: str, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        if any(e["method"] == event for e in self.events):
            return
        self.ws.settimeout(timeout)
        while time.time() < deadline:
            message = json.loads(self.ws.recv())
            if "method" in message:
                self.events.append(message)
                if message["method"] == event:
                    return
        raise TimeoutError(event)

    def evaluate(self, expression: str, await_promise: bool = False):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=await_promise, timeout=20000)
        if "exceptionDetails" in result:
            raise RuntimeError(f"probe failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def problems_in_events(events: list[dict]) -> list[str]:
    """Console errors, exceptions, failed loads and remote requests among CDP events.

    >>> problems_in_events([{"method": "Network.requestWillBeSent",
    ...                      "params": {"request": {"url": "https://cdn.example.org/x.js"}}}])
    ['request to another host: https://cdn.example.org/x.js']
    >>> problems_in_events([{"method": "Network.requestWillBeSent",
    ...                      "params": {"request": {"url": "file:///b/_static/x.js"}}}])
    []
    """
    found = []
    for e in events:
        method, p = e["method"], e.get("params", {})
        if method == "Network.requestWillBeSent":
            url = p["request"]["url"]
            if not url.startswith(LOCAL_SCHEMES):
                found.append(f"request to another host: {url[:150]}")
        elif method == "Network.loadingFailed" and p.get("errorText") != "net::ERR_ABORTED":
            found.append(f"failed load: {p.get('errorText')} (request {p.get('requestId')})")
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            found.append(f"console error: {text[:200]}")
        elif method == "Runtime.exceptionThrown":
            details = p.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            found.append(f"uncaught exception: {str(text)[:200]}")
        elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
            found.append(f"console error: {p['entry'].get('text', '')[:200]} {p['entry'].get('url', '')}")
    return found


def notebook_image_count(name: str) -> int:
    """Image outputs in notebooks/<name>.ipynb (0 if it does not exist)."""
    path = ROOT / "notebooks" / f"{name}.ipynb"
    if not path.exists():
        return 0
    cells = json.loads(path.read_text())["cells"]
    return sum(1 for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])
               if any(k.startswith("image/") for k in o.get("data", {})))


def check_page(browser: Browser, page: Path, html_dir: Path, allow_missing: bool) -> tuple[list[str], dict]:
    browser.events.clear()
    browser.call("Page.navigate", url=page.resolve().as_uri())
    browser.wait_for("Page.loadEventFired")
    browser.evaluate(MATHJAX_DONE, await_promise=True)
    time.sleep(0.2)  # late console messages
    probe = browser.evaluate(PAGE_PROBE)
    browser.call("Runtime.evaluate", expression="0")  # flush pending events
    problems = problems_in_events(browser.events)
    if probe["maths"] and not probe["mathjax"]:
        problems.append("MathJax did not load")
    problems += [f"formula not typeset: {t!r}" for t in probe["untypeset"][:3]]
    problems += [f"raw TeX in text: {t!r}" for t in probe["raw"][:3]]
    problems += [f"display formula not centred: {t!r}" for t in probe["offcentre"][:3]]
    problems += [f"image not shown: {s}" for s in probe["broken_images"][:3]]
    rel = page.relative_to(html_dir)
    name = rel.stem
    if rel.parts[0] == "notebooks":
        if probe["placeholder"]:
            if not allow_missing:
                problems.append("placeholder page: the notebook is not committed yet")
        else:
            expected = notebook_image_count(name)
            if name in EXPERIMENTS and expected == 0:
                problems.append("experiment notebook has no figure")
            if probe["images"] < expected:
                problems.append(f"{probe['images']} images shown, the notebook has {expected}")
    return problems, probe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, default=HTML, help="the built book (default book/_build/html)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="do not fail on placeholder pages of notebooks not committed yet")
    parser.add_argument("--screenshot", type=Path, default=ROOT / "build" / "book_experiment_01.png")
    args = parser.parse_args(argv)
    if not (args.html / "index.html").exists():
        print(f"no book at {args.html}: run book/build.py first", file=sys.stderr)
        return 2
    start = time.perf_counter()
    browser = Browser()
    failures = 0
    try:
        for page in _pages(args.html):
            if re.search(r'http-equiv="refresh"', page.read_text(errors="replace"), re.IGNORECASE):
                print(f"skip {page.relative_to(args.html)}: a redirect (its target is checked)")
                continue
            problems, probe = check_page(browser, page, args.html, args.allow_missing)
            status = "FAIL" if problems else "ok"
            print(f"{status:4} {page.relative_to(args.html)}: {probe['maths']} formulas, {probe['images']} images")
            for p in problems:
                print(f"     {p}")
            failures += bool(problems)
        first = args.html / "notebooks" / f"{EXPERIMENTS[0]}.html"
        browser.call("Page.navigate", url=first.resolve().as_uri())
        browser.events.clear()
        browser.wait_for("Page.loadEventFired")
        browser.evaluate(MATHJAX_DONE, await_promise=True)
        shot = browser.call("Page.captureScreenshot", format="png")
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.screenshot.with_suffix(".tmp")
        tmp.write_bytes(base64.b64decode(shot["data"]))
        os.replace(tmp, args.screenshot)
    finally:
        browser.close()
    print(f"browser check: {failures} page(s) failed; screenshot {args.screenshot}; "
          f"{time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
