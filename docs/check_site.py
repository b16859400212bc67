"""Check the built course site in headless Chromium, as a reader at 980 px would see it.

    python docs/check_site.py [--html docs/_build/html] [--width 980]

Serves the built site on 127.0.0.1 (a local HTTP server in this process), opens every page in Debian's
``chromium`` through ``chromedriver`` (selenium), and checks:

* every page loads (HTTP 200, a title, no JavaScript error from MathJax);
* every equation is typeset: MathJax's ``mjx-container`` output is present on every page that has maths,
  no ``span.math``/``div.math`` is left without it, no MathJax error (``mjx-merror``), and no raw ``$$``,
  ``\\frac``, ``\\(`` or ``\\[`` is left in the text outside code;
* no display equation and no table is wider than the content column;
* every figure is present: each <img> loaded, and a notebook page shows at least as many images as the
  notebook has image outputs;
* no broken internal link (the target file exists and, for ``#anchor``, the id is on that page);
* nothing is fetched from another host (the site works offline), and the search page finds a word.

On the API reference (``api.html``, generated from the docstrings) also: equations are typeset there, no
``:math:`` role, ``.. math::`` or ``$`` is left in its text, no signature and nothing else in the article
reaches past the column's right edge, and docstring paragraphs that still write maths as plain text
(``sigma^2``, ``X^T``) are listed as notes. On every page, a cross-reference Sphinx could not resolve
(code without a link) is a problem.

Screenshots of four pages (the home page, the chapter with the most equations, the one with the most
figures, and the top of the API reference) are written to ``<html>/../screenshots/``; a JSON report to ``<html>/../site_check.json``.
Exit status 0 when every check passes, 1 otherwise (each problem printed on its own line).
"""
from __future__ import annotations

import argparse
import base64
import functools
import http.server
import json
import re
import shutil
import sys
import threading
import time
import urllib.parse
from pathlib import Path

RAW_TEX = re.compile(r"\$\$|\\frac|\\\(|\\\[|\\begin\{")
API_PAGES = {"api.html"}  # generated from the docstrings: checked further (see the module docstring)
IDS = re.compile(r"""\sid=["']([^"']+)["']""")

# measured in the page: returns everything the checks need in one round trip
PAGE_PROBE = r"""
const column = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
const cs = getComputedStyle(column);
const colRect = column.getBoundingClientRect();
const colLeft = colRect.left + parseFloat(cs.paddingLeft);
const colRight = colRect.right - parseFloat(cs.paddingRight);
const describe = (el) => (el.textContent || '').replace(/\s+/g, ' ').trim().slice(0, 80);
const tooWide = [];
const check = (el, what, inner) => {
  const r = (inner || el).getBoundingClientRect();
  if (r.width === 0) return;
  const width = Math.max(r.width, (inner || el).scrollWidth || 0);
  if (width > colRight - colLeft + 1) {
    tooWide.push({what: what, width: Math.round(width), column: Math.round(colRight - colLeft), text: describe(el)});
  }
};
document.querySelectorAll('mjx-container[display="true"]').forEach(
  (el) => check(el, 'equation', el.querySelector('mjx-math') || el));
document.querySelectorAll('article table, main table').forEach((el) => check(el, 'table'));
// the API page: signatures, and anything else in the article (inline maths, a long literal) reaching past
// the column's right edge; code blocks scroll in their own box and are noted below instead
document.querySelectorAll('dt.sig').forEach((el) => check(el, 'signature'));
const overflow = [];
if (arguments[0]) {
  const seen = new Set();
  column.querySelectorAll('*').forEach((el) => {
    if (el.closest('pre, .highlight, mjx-container[display="true"], mjx-assistive-mml, table, dt.sig')) return;
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.right <= colRight + 1) return;
    const box = el.closest('dd, p, li, section') || el;
    if (seen.has(box)) return;
    seen.add(box);
    const owner = el.closest('dl.py > dd')?.previousElementSibling?.id || '';
    overflow.push({what: el.tagName.toLowerCase(), right: Math.round(r.right - colLeft),
                   column: Math.round(colRight - colLeft), owner: owner, text: describe(el)});
  });
}
// a signature the Python domain could not parse is shown as raw text (``~numpy.ndarray``, ``<factory>``)
const rawSignatures = [...document.querySelectorAll('dt.sig')]
  .filter((el) => /~[A-Za-z_]\w*\.|<factory>/.test(el.textContent)).map(describe);
// cross-references Sphinx could not resolve are rendered as code without a link
const unresolved = [...document.querySelectorAll('code.xref')].filter((el) => !el.closest('a')).map(describe);
const wideCode = [...document.querySelectorAll('article pre, main pre')]
  .filter((el) => el.scrollWidth > el.clientWidth + 1)
  .map((el) => ({width: el.scrollWidth, text: describe(el)}));
const clone = document.body.cloneNode(true);
clone.querySelectorAll('pre, code, script, style, mjx-container, textarea, .highlight').forEach((e) => e.remove());
const text = clone.textContent;
// the API page: docstring paragraphs still writing maths as plain text (sigma^2, X^T, beta_hat ...)
const plainMaths = [];
if (arguments[0]) {
  const PLAIN = /\b(sigma|Sigma|theta|beta|lambda|Lambda|epsilon|alpha|zeta|psi|rho)(_\w+)?\b|\b\w+\^[\w(-]|\b[A-Za-z]_[A-Za-z0-9]\b/;
  document.querySelectorAll('dl.py > dd > p, section > p').forEach((p) => {
    const c = p.cloneNode(true);
    c.querySelectorAll('code, mjx-container, a').forEach((e) => e.remove());
    const m = c.textContent.match(PLAIN);
    if (m) {
      const owner = p.closest('dl.py > dd')?.previousElementSibling?.id || p.closest('section')?.id || '';
      plainMaths.push({owner: owner, match: m[0], text: describe(p)});
    }
  });
}
const untypeset = [...document.querySelectorAll('span.math, div.math')]
  .filter((el) => !el.querySelector('mjx-container')).map(describe);
const images = [...document.querySelectorAll('article img, main img')].map((img) => ({
  src: img.getAttribute('src'), ok: img.complete && img.naturalWidth > 0}));
const links = [...document.querySelectorAll('a[href]')].map((a) => a.href);
const resources = performance.getEntriesByType('resource').map((e) => e.name);
return {
  title: document.title,
  column: Math.round(colRight - colLeft),
  pageWidth: document.documentElement.scrollWidth,
  mathElements: document.querySelectorAll('span.math, div.math').length,
  typeset: document.querySelectorAll('mjx-container').length,
  mathErrors: [...document.querySelectorAll('mjx-merror')].map(describe),
  untypeset: untypeset,
  raw: (text.match(/.{0,40}(\$\$|\\frac|\\\(|\\\[|\\begin\{|:math:|\.\. math::).{0,40}/g) || [])
    .concat(arguments[0] ? (text.match(/.{0,40}\$.{0,40}/g) || []) : []),
  overflow: overflow,
  unresolved: unresolved,
  rawSignatures: rawSignatures,
  plainMaths: plainMaths,
  tooWide: tooWide,
  wideCode: wideCode,
  images: images,
  links: links,
  resources: resources,
};
"""

WAIT_MATHJAX = r"""
const done = arguments[arguments.length - 1];
const fonts = document.fonts ? document.fonts.ready : Promise.resolve();
if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
  MathJax.startup.promise.then(() => fonts).then(() => done('typeset'), (e) => done('error: ' + e));
} else {
  fonts.then(() => done(window.MathJax ? 'mathjax not started' : 'no mathjax'));
}
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A static file server for the built site on a free loopback port, in a daemon thread."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def find_browser() -> tuple[str | None, str | None]:
    """Debian's chromium and chromium-driver (never a downloaded browser)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return browser, driver


def start_browser(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_browser()
    if browser is None or driver is None:
        raise RuntimeError("chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--hide-scrollbars", "--force-device-scale-factor=1", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--lang=en-GB",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    chrome.set_page_load_timeout(60)
    chrome.set_script_timeout(60)
    set_viewport(chrome, width, height)
    return chrome


def notebook_images(html_root: Path, page: str) -> int | None:
    """How many image outputs the page's notebook has (None when the page is not a notebook)."""
    source = html_root.parent.parent / "notebooks" / (Path(page).stem + ".ipynb")
    if not page.startswith("notebooks/") or not source.exists():
        return None
    nb = json.loads(source.read_text(encoding="utf-8"))
    return sum(1 for cell in nb.get("cells", []) for out in cell.get("outputs", [])
               if any(k.startswith("image/") for k in out.get("data", {})))


def set_viewport(chrome, width: int, height: int) -> None:
    chrome.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


def screenshot(chrome, path: Path, width: int, height: int, max_height: int = 6000) -> None:
    """A full-page PNG at the emulated width: the viewport grown to the page's height (capped), then shot.

    (Capturing beyond a short viewport instead shifts the theme's sticky sidebar.)
    """
    full = min(int(chrome.execute_script("return document.documentElement.scrollHeight")), max_height)
    set_viewport(chrome, width, full)
    time.sleep(0.3)
    shot = chrome.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    path.write_bytes(base64.b64decode(shot["data"]))
    set_viewport(chrome, width, height)


def check_links(html_root: Path, base: str, page: str, links: list[str], ids: dict, problems: list) -> int:
    """Internal links: the target file exists and the #fragment is an id on it. Returns links checked."""
    checked = 0
    for href in set(links):
        if not href.startswith(base):
            continue                      # external links are the reader's to follow; not fetched here
        parsed = urllib.parse.urlparse(href)
        rel = urllib.parse.unquote(parsed.path[len(urllib.parse.urlparse(base).path):])
        target = html_root / rel
        if target.is_dir():
            target = target / "index.html"
        checked += 1
        if not target.exists():
            problems.append(f"{page}: broken link to {rel}")
            continue
        frag = urllib.parse.unquote(parsed.fragment)
        if frag and target.suffix == ".html":
            if target not in ids:
                ids[target] = set(IDS.findall(target.read_text(encoding="utf-8", errors="replace")))
            if frag not in ids[target]:
                problems.append(f"{page}: broken anchor {rel}#{frag}")
    return checked


def run(html_root: Path, width: int = 980, shots: Path | None = None, widths_as_notes: bool = False) -> dict:
    html_root = html_root.resolve()
    shots = shots or html_root.parent / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    pages = sorted(p.relative_to(html_root).as_posix() for p in html_root.rglob("*.html")
                   if "_static" not in p.parts and "_sources" not in p.parts)
    server, base = serve(html_root)
    chrome = start_browser(width, 1200)
    problems: list[str] = []
    notes: list[str] = []
    report: dict = {"width": width, "pages": {}, "screenshots": []}
    ids: dict = {}
    started = time.perf_counter()
    try:
        for page in pages:
            chrome.get(base + page)
            state = chrome.execute_async_script(WAIT_MATHJAX)
            api = page in API_PAGES
            probe = chrome.execute_script(PAGE_PROBE, api)
            info = {k: probe[k] for k in ("title", "column", "pageWidth", "mathElements", "typeset")}
            info["images"] = len(probe["images"])
            info["tooWide"] = probe["tooWide"]
            info["wideCode"] = probe["wideCode"]  # scrolls inside its box: noted, not a failure
            if api:
                info["plainMaths"] = probe["plainMaths"]  # noted: docstring maths not yet written as :math:
                for over in probe["overflow"]:
                    (notes if widths_as_notes else problems).append(
                        f"{page}: {over['what']} reaches {over['right']} px in a {over['column']} px column"
                        f" ({over['owner'] or 'page'}): {over['text']}")
                if not probe["typeset"]:
                    problems.append(f"{page}: no docstring equation typeset")
            for text in probe["rawSignatures"]:
                problems.append(f"{page}: signature left as raw text (not parsed): {text}")
            for text in probe["unresolved"]:
                # a private name (``_assemble``, ``ThetaDeviance._hessian()``) is not on the site by design
                # (conf.py's nitpick_ignore_regex): noted, so the docstring can name it as code instead
                private = re.match(r"(\w+\.)*_", text)
                (notes if private else problems).append(f"{page}: unresolved cross-reference (no link): {text}")
            if not probe["title"]:
                problems.append(f"{page}: no title (did the page load?)")
            if state != "typeset" and (state != "no mathjax" or probe["mathElements"]):
                problems.append(f"{page}: MathJax {state}")
            if probe["mathElements"] and not probe["typeset"]:
                problems.append(f"{page}: {probe['mathElements']} equations and no MathJax output")
            for text in probe["untypeset"]:
                problems.append(f"{page}: equation not typeset: {text}")
            for text in probe["mathErrors"]:
                problems.append(f"{page}: MathJax error: {text}")
            for text in probe["raw"]:
                problems.append(f"{page}: raw TeX left in the text: {text!r}")
            for wide in probe["tooWide"]:
                (notes if widths_as_notes else problems).append(f"{page}: {wide['what']} {wide['width']} px wide in a {wide['column']} px "
                                f"column: {wide['text']}")
            if probe["pageWidth"] > width + 1:
                problems.append(f"{page}: the page scrolls sideways ({probe['pageWidth']} px at {width} px)")
            for img in probe["images"]:
                if not img["ok"]:
                    problems.append(f"{page}: figure missing: {img['src']}")
            expected = notebook_images(html_root, page)
            if expected is not None:
                info["notebookImages"] = expected
                loaded = sum(img["ok"] for img in probe["images"])
                if loaded < expected:
                    problems.append(f"{page}: {loaded} figures shown, the notebook has {expected}")
            for url in probe["resources"]:
                if not url.startswith(base) and not url.startswith(("data:", "blob:")):
                    problems.append(f"{page}: fetched from outside the site: {url}")
            info["links"] = check_links(html_root, base, page, probe["links"], ids, problems)
            report["pages"][page] = info

        # search works offline: the search page finds a word every chapter uses
        if "search.html" in pages:
            chrome.get(base + "search.html?q=likelihood")
            hits = 0
            for _ in range(100):
                hits = chrome.execute_script("return document.querySelectorAll('#search-results li').length")
                if hits:
                    break
                time.sleep(0.1)
            report["searchHits"] = hits
            if not hits:
                problems.append("search.html?q=likelihood: no results")

        # three screenshots: home, the chapter with most equations, the chapter with most figures
        chapters = [p for p in pages if p.startswith("notebooks/")]
        chosen = ["index.html"]
        if chapters:
            chosen.append(max(chapters, key=lambda p: report["pages"][p]["typeset"]))
            rest = [p for p in chapters if p not in chosen] or chapters
            chosen.append(max(rest, key=lambda p: report["pages"][p]["images"]))
        chosen += [p for p in sorted(API_PAGES) if p in pages]
        for page in chosen:
            chrome.get(base + page)
            chrome.execute_async_script(WAIT_MATHJAX)
            out = shots / (page.replace("/", "_").removesuffix(".html") + f"_{width}px.png")
            screenshot(chrome, out, width, 1200)
            report["screenshots"].append(str(out))
    finally:
        chrome.quit()
        server.shutdown()
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["problems"] = problems
    report["notes"] = notes
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--html", type=Path, default=here / "_build" / "html")
    parser.add_argument("--width", type=int, default=980)
    parser.add_argument("--widths-as-notes", action="store_true",
                        help="report equations and tables wider than the column without failing")
    parser.add_argument("--report", type=Path, default=None, help="JSON report (default <html>/../site_check.json)")
    args = parser.parse_args(argv)
    if not (args.html / "index.html").exists():
        print(f"no built site at {args.html} (sphinx-build -b html docs docs/_build/html)", file=sys.stderr)
        return 2
    report = run(args.html, args.width, widths_as_notes=args.widths_as_notes)
    out = args.report or args.html.resolve().parent / "site_check.json"
    out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    pages = report["pages"]
    print(f"site check at {args.width} px: {len(pages)} pages, "
          f"{sum(p['typeset'] for p in pages.values())} equations typeset, "
          f"{sum(p['images'] for p in pages.values())} figures, "
          f"{sum(p['links'] for p in pages.values())} internal links, "
          f"search hits {report.get('searchHits')}, {report['seconds']} s")
    for page, info in pages.items():
        print(f"  {page:45s} {info['typeset']:4d} equations {info['images']:3d} figures  column {info['column']} px")
    for shot in report["screenshots"]:
        print(f"  screenshot: {shot}")
    for page, info in pages.items():
        for code in info["wideCode"]:
            print(f"NOTE {page}: code or output {code['width']} px wide (scrolls in its box): {code['text'][:60]}")
        plain = info.get("plainMaths") or []
        if plain:
            owners = sorted({p["owner"] for p in plain})
            print(f"NOTE {page}: {len(plain)} docstring paragraphs write maths as plain text "
                  f"(e.g. {plain[0]['match']!r} in {plain[0]['owner']}); in: {', '.join(owners[:12])}"
                  + (f" and {len(owners) - 12} more" if len(owners) > 12 else ""))
    for note in report["notes"]:
        print(f"NOTE {note}" if "cross-reference" in note else f"WIDE (not failing: --widths-as-notes) {note}")
    for problem in report["problems"]:
        print(f"PROBLEM {problem}")
    print("site check passed" if not report["problems"] else f"site check failed: {len(report['problems'])} problems")
    return 0 if not report["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
