"""The built HTML book in headless Chromium, page by page, as a reader gets it.

Runs with ``make browser-test`` (which builds the book first when
``_build/html`` is missing, and installs Debian's ``chromium`` when
``/usr/bin/chromium`` is missing); under a plain ``make test`` it is skipped.
For every page of ``_toc.yml`` it checks that

* the page loads with no console error, no uncaught exception and no failed
  request, and asks nothing of the network (the Colab badge image is
  shipped with the book, so an offline reader sees it too);
* every figure the executed notebook produced is on the page, loaded and
  non-empty, and the math is typeset;
* every internal link resolves, to a file that exists and, for a link with
  a ``#fragment``, to an element with that id;
* every image has alt text that says something (never empty, never a file
  name such as myst-nb's hashed ``<sha>.png``), and every image a notebook
  cell drew sits in a ``<figure>`` with a caption;
* no page shows the Colab install cell (it is tagged ``remove-cell``);
* the way-in, paper-comparison and course pages are among the pages visited;

and it saves a full-page screenshot of each page to ``_build/screenshots/``
(not committed), the test's artifact.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import pytest
import yaml

from gilib.book.pages import looks_like_file_name

try:
    from playwright.sync_api import Error as PlaywrightError
except ImportError:  # pragma: no cover - installed by make; the tests skip without it anyway
    PlaywrightError = Exception

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "_build" / "html"
EXECUTED = ROOT / "_build" / "jupyter_execute"
SCREENSHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = os.environ.get("GILIB_CHROMIUM", "/usr/bin/chromium")
# Chromium flags that keep a headless run from waiting on blocked network
# services (component updates, sync, QUIC probes).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = pytest.mark.skipif(
    os.environ.get("GILIB_BROWSER_TEST") != "1",
    reason="the browser test runs with `make browser-test` (it needs the built book and Chromium)",
)


def toc_pages() -> list[str]:
    """Every page of the book, in ``_toc.yml`` order, as a path under ``_build/html`` without ``.html``."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]
    stack = list(toc.get("chapters", [])) + [c for part in toc.get("parts", []) for c in part.get("chapters", [])]
    while stack:
        entry = stack.pop(0)
        if "file" in entry:
            pages.append(entry["file"])
        stack[:0] = entry.get("sections", [])
    return pages


PAGES = toc_pages()


def executed_figures(page: str) -> int:
    """How many images the executed notebook behind ``page`` produced (0 for a markdown page)."""
    path = EXECUTED / f"{page}.ipynb"
    if not path.is_file():
        return 0
    nb = json.loads(path.read_text())
    count = 0
    for cell in nb["cells"]:
        if "remove-output" in cell.get("metadata", {}).get("tags", []):
            continue
        for output in cell.get("outputs", []):
            if any(mime.startswith("image/") for mime in output.get("data", {})):
                count += 1
    return count


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output readable
        pass


@pytest.fixture(scope="module")
def server():
    """The built book over HTTP on a free loopback port."""
    if not (HTML / f"{PAGES[0]}.html").is_file():
        pytest.fail(f"No built book in {HTML}: run `make book` first (make browser-test does).")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"No Chromium at {CHROMIUM}: `make chromium` installs Debian's package.")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


_COLLECT = """() => {
  const images = Array.from(document.images).map(img => ({
    src: img.currentSrc || img.src, complete: img.complete,
    width: img.naturalWidth, height: img.naturalHeight,
    figure: !!img.closest('.cell_output, figure'),
    alt: img.getAttribute('alt'),
    output: !!img.closest('.cell_output'),
    captioned: (() => {
      const fig = img.closest('figure');
      const caption = fig && fig.querySelector('figcaption');
      return !!(caption && caption.textContent.trim());
    })(),
  }));
  const text = document.body ? document.body.textContent : '';
  const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.href);
  const ids = Array.from(document.querySelectorAll('[id]')).map(e => e.id);
  const math = document.querySelectorAll('.math').length;
  const typeset = document.querySelectorAll('mjx-container').length;
  return {images, links, ids, math, typeset, text};
}"""


def _watch(page, server: str) -> dict[str, list[str]]:
    """Record what a page logs and requests; let only loopback requests through."""
    seen: dict[str, list[str]] = {"console": [], "errors": [], "failed": [], "external": []}

    def route(r):  # one parameter: Playwright passes (route, request) to a handler that takes two
        url = r.request.url
        if url.startswith(server):
            r.continue_()
        else:
            seen["external"].append(url)
            r.abort()

    def console(message):
        if message.type == "error":
            seen["console"].append(f"{message.text} ({message.location['url']})")

    def failed(request):
        if request.url.startswith(server):
            seen["failed"].append(f"{request.url}: {request.failure}")

    def response(reply):
        if reply.status >= 400:
            seen["failed"].append(f"{reply.url}: HTTP {reply.status}")

    page.route("**/*", route)
    page.on("console", console)
    page.on("pageerror", lambda error: seen["errors"].append(str(error)))
    page.on("requestfailed", failed)
    page.on("response", response)
    return seen


@pytest.fixture(scope="module")
def visits(server, browser):
    """Load every page once; what each showed and logged."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    results = {}
    for page_name in PAGES:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        seen = _watch(page, server)
        shot = SCREENSHOTS / f"{page_name.replace('/', '__')}.png"
        visit = {"status": None, "load_error": None, "shot": shot, "images": [], "links": [], "ids": [],
                 "math": 0, "typeset": 0, "text": ""}
        try:
            response = page.goto(f"{server}/{page_name}.html", wait_until="load", timeout=60_000)
            visit["status"] = response.status if response else None
            page.wait_for_load_state("networkidle", timeout=60_000)
            if page.evaluate("() => document.querySelectorAll('.math').length && !!window.MathJax"):
                page.wait_for_function("() => window.MathJax.startup && window.MathJax.startup.promise",
                                       timeout=30_000)
                page.evaluate("() => window.MathJax.startup.promise")
            visit.update(page.evaluate(_COLLECT))
            page.screenshot(path=str(shot), full_page=True)
        except PlaywrightError as err:  # reported by test_page_loads_cleanly, page by page
            visit["load_error"] = str(err).splitlines()[0]
        results[page_name] = {**visit, **seen}
        context.close()
    return results


@pytest.mark.parametrize("page", PAGES)
def test_page_loads_cleanly(visits, page):
    visit = visits[page]
    assert visit["load_error"] is None
    assert visit["status"] == 200
    assert visit["console"] == [], "console errors"
    assert visit["errors"] == [], "uncaught exceptions"
    assert visit["failed"] == [], "failed requests"
    assert visit["external"] == [], "requests that leave the machine (the Colab badge is shipped with the book)"


@pytest.mark.parametrize("page", PAGES)
def test_every_figure_is_present_and_non_empty(visits, page):
    visit = visits[page]
    broken = [img["src"] for img in visit["images"] if not (img["complete"] and img["width"] > 0 and img["height"] > 0)]
    assert broken == [], "images that did not load or are empty"
    for img in visit["images"]:
        url = urlparse(img["src"])
        if url.hostname == "127.0.0.1":
            local = HTML / unquote(url.path).lstrip("/")
            assert local.is_file() and local.stat().st_size > 0, f"{img['src']} is missing or empty on disk"
    figures = sum(img["figure"] for img in visit["images"])
    assert figures >= executed_figures(page), (
        f"{page}: the executed notebook made {executed_figures(page)} figure(s), the page shows {figures}"
    )


@pytest.mark.parametrize("page", PAGES)
def test_math_is_typeset(visits, page):
    visit = visits[page]
    if visit["math"]:
        assert visit["typeset"] > 0, f"{page} has {visit['math']} formulas but MathJax typeset none"


def test_chapters_have_figures(visits):
    # A guard on the guard above: the chapters and the intro do draw figures.
    pages_with_figures = [p for p in PAGES if executed_figures(p)]
    assert {"chapters/intro", "chapters/01_full_model_inversion"} <= set(pages_with_figures)


def test_no_broken_internal_links(visits, server):
    ids = {page: set(visit["ids"]) for page, visit in visits.items()}
    broken, checked = [], 0
    status: dict[str, int] = {}
    for page, visit in visits.items():
        for href in visit["links"]:
            if not href.startswith(server):
                continue
            target, fragment = urldefrag(href)
            path = unquote(urlparse(target).path).lstrip("/")
            checked += 1
            if target not in status:
                try:
                    with urllib.request.urlopen(target, timeout=10) as reply:
                        status[target] = reply.status
                except urllib.error.HTTPError as err:
                    status[target] = err.code
            if status[target] != 200:
                broken.append(f"{page}: {href} (HTTP {status[target]})")
                continue
            name = path.removesuffix(".html")
            if fragment and name in ids and fragment not in ids[name]:
                broken.append(f"{page}: {href} (no element with id {fragment!r})")
    assert checked > len(PAGES), "expected the pages to link to each other"
    assert broken == []


@pytest.mark.parametrize("page", PAGES)
def test_screenshot_saved(visits, page):
    shot = visits[page]["shot"]
    assert shot.is_file() and shot.stat().st_size > 10_000


@pytest.mark.parametrize("chapter", [p for p in PAGES if Path(p).name[:2].isdigit()])
def test_exercises_show_the_prompt_and_hide_the_grading(chapter):
    # The chapters are otter's master notebooks too: on the page a reader sees
    # each exercise and its folded explanation, never otter's markers, the
    # tests or the hidden tests' code (raw cells are not rendered, test cells
    # are removed). The worked answers' own "# SOLUTION" comments are part of
    # their code, folded away (hide-input).
    import html as html_module

    import nbformat

    from gilib.book.assignments import parse_questions

    page = html_module.unescape((HTML / f"{chapter}.html").read_text())
    questions = parse_questions(nbformat.read(str(ROOT / f"{chapter}.ipynb"), as_version=4))
    assert questions
    for marker in ("BEGIN QUESTION", "END QUESTION", "BEGIN TESTS", "END TESTS", "# HIDDEN",
                   "grader.check", "ASSIGNMENT CONFIG", "manual: true"):
        assert marker not in page, (chapter, marker)
    for q in questions:
        assert f"Exercise {q.number}." in page and f"Solution to {q.number}" in page, (chapter, q.name)
        for test in q.public + q.hidden:
            asserts = [line.strip() for line in test.splitlines() if line.strip().startswith("assert ")]
            assert not any(line in page for line in asserts), (chapter, q.name, asserts)


NEW_PAGES = ("chapters/primer", "chapters/paper", "chapters/course")
"""The pages issue 24 added: a way in, the paper comparison, the course."""


INSTALL_CELL_TEXT = "clone the book's repository and install gilib"
"""A phrase of the Colab install cell (gilib.book.upkeep.colab_install_source), never on a page."""


def test_the_new_pages_are_visited(visits):
    for page in NEW_PAGES:
        assert page in PAGES, f"{page} is not in _toc.yml"
        assert visits[page]["status"] == 200 and visits[page]["load_error"] is None, page


def _alt_problem(alt: str | None) -> str | None:
    """Why an image's alt text tells a reader nothing, or None when it is fine."""
    text = (alt or "").strip()
    if not text:
        return "empty alt"
    if looks_like_file_name(text):
        return "a file name"
    return None


def test_alt_problem_recognises_file_names():
    # A guard on the guard below: myst-nb's hashed names and plain file names are refused.
    assert _alt_problem("3e5ec46cdc336e486ae30bd420755a626d27daebc33510c70b23d9f6079d94c8.png") == "a file name"
    assert _alt_problem("../docs/threat_model.png") == "a file name"
    assert _alt_problem("  ") == "empty alt" and _alt_problem(None) == "empty alt"
    assert _alt_problem("Horizontal bars of mean ROUGE-1 per row.") is None


@pytest.mark.parametrize("page", PAGES)
def test_every_image_has_alt_text_that_says_what_it_shows(visits, page):
    bad = [(img["src"].rsplit("/", 1)[-1], img["alt"], _alt_problem(img["alt"]))
           for img in visits[page]["images"] if _alt_problem(img["alt"])]
    assert bad == [], f"{page}: images whose alt text is empty or a file name"


@pytest.mark.parametrize("page", PAGES)
def test_every_notebook_figure_is_a_captioned_figure(visits, page):
    uncaptioned = [img["src"].rsplit("/", 1)[-1] for img in visits[page]["images"]
                   if img["output"] and not img["captioned"]]
    assert uncaptioned == [], (
        f"{page}: cell outputs drawn without a numbered, captioned figure "
        "(give the cell mystnb figure metadata: name and caption)"
    )


@pytest.mark.parametrize("page", PAGES)
def test_no_page_shows_the_install_cell(visits, page):
    from gilib.book.upkeep import colab_install_source

    assert INSTALL_CELL_TEXT in colab_install_source(), "the install cell's wording changed: update INSTALL_CELL_TEXT"
    text = " ".join(visits[page]["text"].replace("\u2019", "'").split())
    assert visits[page]["load_error"] is None, page
    assert INSTALL_CELL_TEXT not in text, f"{page} shows the Colab install cell"
    assert "REPO_URL =" not in text, f"{page} shows the Colab install cell's code"
