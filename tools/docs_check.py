"""Check the documentation site as a reader sees it, in headless Chromium.

``make docs-check`` runs this. It builds the site (``mkdocs build --strict``), serves it on
127.0.0.1, opens every page at 1280 px in light and dark mode, saves a full-page screenshot of
each, and fails when a page

* overflows horizontally: the main column, or an element in it (a table, a code block, an
  equation), is wider than the space it has, so that a scrollbar appears or content spills out;
* links to an internal page, file or anchor that does not exist;
* shows math that did not render: an equation KaTeX did not process or reported an error for, or
  ``$``, ``\\(``, ``\\)``, ``\\[``, ``\\]`` left in the text outside code;
* needs the network (a request that leaves 127.0.0.1), fails to load one of its own files, or
  raises a JavaScript error.

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``), so
the check needs nothing beyond Python's standard library and a ``chromium`` binary (Debian:
``apt-get install chromium``).

Usage: ``python tools/docs_check.py [--out site-check] [--width 1280] [--chromium PATH]``.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import functools
import html.parser
import http.server
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Screenshots stop there (the API page is longer; Chromium's textures are limited to 16384 px).
MAX_SCREENSHOT_HEIGHT = 16000

#: prefers-color-scheme → the Material palette it selects (mkdocs.yml)
SCHEMES = {"light": "default", "dark": "slate"}

#: Runs in the page once it has loaded: everything the checks need, as one JSON-able object.
INSPECT = r"""
(() => {
  const main = document.querySelector("article.md-content__inner");
  if (!main) return {error: "no article.md-content__inner on the page"};
  // the main column: the article with its margins, into which tables and code blocks may extend
  const box = main.closest(".md-content").getBoundingClientRect();
  const describe = (el) => {
    let text = el.tagName.toLowerCase();
    if (el.id) text += "#" + el.id;
    const cls = [...el.classList].slice(0, 2).join(".");
    if (cls) text += "." + cls;
    const snippet = (el.textContent || "").trim().replace(/\s+/g, " ").slice(0, 60);
    return snippet ? `${text} "${snippet}"` : text;
  };
  const overflow = [];
  const doc = document.documentElement;
  if (doc.scrollWidth > window.innerWidth + 1) {
    overflow.push(`the page is ${doc.scrollWidth}px wide in a ${window.innerWidth}px window`);
  }
  for (const el of [main, ...main.querySelectorAll("*")]) {
    const style = getComputedStyle(el);
    if (style.display === "none" || style.visibility === "hidden") continue;
    const scrolls = ["auto", "scroll"].includes(style.overflowX);
    if (scrolls && el.scrollWidth > el.clientWidth + 1) {
      overflow.push(`${describe(el)} scrolls: ${el.scrollWidth}px of content in ${el.clientWidth}px`);
      continue;
    }
    // content that spills over the column's right edge without a scrollbar
    let clipped = false;
    for (let p = el.parentElement; p && p !== main; p = p.parentElement) {
      const o = getComputedStyle(p).overflowX;
      if (o !== "visible") { clipped = true; break; }
    }
    const rect = el.getBoundingClientRect();
    if (!clipped && rect.width > 0 && rect.right > box.right + 1) {
      overflow.push(`${describe(el)} reaches ${Math.round(rect.right)}px, the column ends at ${Math.round(box.right)}px`);
    }
  }
  const math = [];
  for (const el of document.querySelectorAll(".arithmatex")) {
    if (el.dataset.mathError) math.push(`KaTeX error: ${el.dataset.mathError}: ${describe(el)}`);
    else if (!el.querySelector(".katex")) math.push(`not rendered: ${describe(el)}`);
  }
  for (const el of document.querySelectorAll(".katex-error")) {
    math.push(`KaTeX error: ${el.getAttribute("title") || describe(el)}`);
  }
  const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
  const skip = "code, pre, script, style, .katex, .arithmatex";
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!parent || parent.closest(skip)) continue;
    const text = node.textContent;
    const found = text.match(/\$|\\[()\[\]]/);
    if (found) {
      const at = Math.max(0, found.index - 30);
      math.push(`delimiter ${found[0]} left in the text: "${text.slice(at, at + 60).trim()}"`);
    }
  }
  const links = [...document.querySelectorAll("a[href]")].map((a) => a.href);
  const images = [...main.querySelectorAll("img")]
    .filter((img) => !img.complete || img.naturalWidth === 0)
    .map((img) => img.currentSrc || img.src);
  return {
    title: document.title,
    scheme: document.body.getAttribute("data-md-color-scheme"),
    overflow, math, links, images,
    equations: document.querySelectorAll(".arithmatex").length,
    height: Math.ceil(doc.scrollHeight),
  };
})()
"""

#: Resolves once the math is rendered (or after 10 s) and the fonts have loaded.
SETTLE = r"""
new Promise((resolve) => {
  const start = Date.now();
  const done = () => [...document.querySelectorAll(".arithmatex")]
    .every((el) => el.dataset.mathError || el.querySelector(".katex, .katex-error"));
  const poll = () => {
    if (done() || Date.now() - start > 10000) document.fonts.ready.then(() => resolve(true));
    else setTimeout(poll, 50);
  };
  poll();
})
"""


class Chromium:
    """A headless Chromium, driven with the DevTools protocol over ``--remote-debugging-pipe``."""

    def __init__(self, binary: str, profile: str) -> None:
        # Chromium reads commands from fd 3 and writes replies and events to fd 4. The child's
        # ends are first moved to fds >= 10, so that putting them on 3 and 4 cannot overwrite
        # one with the other. (preexec_fn: start the browser before any thread.)
        read_end, self._to_browser = os.pipe()
        self._from_browser, write_end = os.pipe()
        to_browser_r = fcntl.fcntl(read_end, fcntl.F_DUPFD_CLOEXEC, 10)
        from_browser_w = fcntl.fcntl(write_end, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(read_end)
        os.close(write_end)
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
            "--force-color-profile=srgb",
            f"--user-data-dir={profile}",
            # every host but the local server is unreachable: the site must not need the network
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--remote-debugging-pipe",
            "about:blank",
        ]

        def child_fds() -> None:
            os.dup2(to_browser_r, 3)  # dup2 makes 3 and 4 inheritable; every other fd closes on exec
            os.dup2(from_browser_w, 4)

        self.process = subprocess.Popen(
            [binary, *flags],
            preexec_fn=child_fds,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)  # the child's ends
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        self.session = ""

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_browser], [], [], remaining)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, timeout: float = 60.0, session: bool = True, **params) -> dict:
        """Send one command and return its result; events that arrive meanwhile are kept."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session and self.session:
            message["sessionId"] = self.session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to_browser, data) :]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, event: str, timeout: float = 60.0) -> dict:
        """Wait for an event of this session (or take it from the ones already received)."""
        deadline = time.monotonic() + timeout
        while True:
            for index, message in enumerate(self.events):
                if message.get("method") == event and message.get("sessionId") == self.session:
                    return self.events.pop(index)
            self.events.append(self._read_message(deadline))

    def open_tab(self) -> None:
        target = self.send("Target.createTarget", session=False, url="about:blank")["targetId"]
        attached = self.send("Target.attachToTarget", session=False, targetId=target, flatten=True)
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{domain}.enable")

    def evaluate(self, expression: str, timeout: float = 60.0):
        result = self.send(
            "Runtime.evaluate", timeout=timeout, expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False, timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass


@functools.lru_cache(maxsize=None)
def fetch(url: str) -> tuple[int, str]:
    """HTTP status and (for HTML) text of a URL on the local server."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            kind = response.headers.get_content_type()
            body = response.read().decode("utf-8", "replace") if kind == "text/html" else ""
            return response.status, body
    except urllib.error.HTTPError as error:
        return error.code, ""


class _Ids(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("id", "name") and value:
                self.ids.add(value)


@functools.lru_cache(maxsize=None)
def anchors(url: str) -> frozenset[str]:
    parser = _Ids()
    parser.feed(fetch(url)[1])
    return frozenset(parser.ids)


@dataclass
class PageResult:
    path: str
    problems: list[str] = field(default_factory=list)
    screenshots: list[str] = field(default_factory=list)
    equations: int = 0


def pages(site: Path) -> Iterator[str]:
    """URL paths of the built pages, home first."""
    found = sorted(p.relative_to(site).as_posix() for p in site.rglob("index.html"))
    for path in found:
        yield "" if path == "index.html" else path[: -len("index.html")]


def check_links(origin: str, page_url: str, links: list[str]) -> list[str]:
    problems = []
    for link in sorted(set(links)):
        if not link.startswith(origin + "/"):
            continue  # external links are allowed; the site just must not need them to render
        target, _, fragment = link.partition("#")
        status, _ = fetch(target)
        where = link[len(origin) :]
        if status != 200:
            problems.append(f"broken link {where} (HTTP {status})")
        elif fragment and urllib.parse.unquote(fragment) not in anchors(target):
            problems.append(f"broken anchor {where}")
    return problems


def _load(browser: Chromium, url: str) -> dict:
    """Navigate to ``url``, wait until the page has settled, and inspect it."""
    browser.send("Page.navigate", url=url)
    browser.wait_for("Page.loadEventFired")
    browser.evaluate(SETTLE, timeout=30)
    return browser.evaluate(INSPECT)


def check_page(browser: Chromium, origin: str, path: str, width: int, out: Path) -> PageResult:
    result = PageResult(path or "/")
    url = f"{origin}/{path}"
    for scheme in SCHEMES:
        # The palette of the page before is stored per origin (Material writes it again while the
        # page unloads) and would override the media query: leave the site, then forget it.
        browser.send("Page.navigate", url="about:blank")
        browser.wait_for("Page.loadEventFired")
        browser.send("Storage.clearDataForOrigin", origin=origin, storageTypes="local_storage")
        browser.events.clear()
        browser.send(
            "Emulation.setEmulatedMedia",
            features=[{"name": "prefers-color-scheme", "value": scheme}],
        )
        browser.send(
            "Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1, mobile=False
        )
        found = _load(browser, url)
        if found.get("scheme") not in (None, SCHEMES[scheme]):
            # the previous page's unload can still write its palette after the storage was cleared
            # (seen on a loaded machine): clear it once more and reload, so the media query decides
            browser.send("Storage.clearDataForOrigin", origin=origin, storageTypes="local_storage")
            found = _load(browser, url)
        if "error" in found:
            result.problems.append(f"[{scheme}] {found['error']}")
            continue
        first = scheme == next(iter(SCHEMES))
        prefix = "" if first else f"[{scheme}] "
        if found["scheme"] != SCHEMES[scheme]:
            result.problems.append(f"{prefix}palette {found['scheme']!r}, not {SCHEMES[scheme]!r}")
        if first:  # layout and content do not depend on the colour scheme
            result.problems += found["overflow"] + found["math"]
            result.problems += [f"image did not load: {src}" for src in found["images"]]
            result.problems += check_links(origin, url, found["links"])
            result.equations = found["equations"]
        height = min(found["height"], MAX_SCREENSHOT_HEIGHT)
        shot = browser.send(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        )
        name = (path.strip("/").replace("/", "_") or "index") + f"-{scheme}.png"
        (out / name).write_bytes(base64.b64decode(shot["data"]))
        result.screenshots.append(name)
        time.sleep(0.2)  # requests the page makes after it has loaded (the search index)
        browser.evaluate("0")  # reads the events that arrived meanwhile
        result.problems += [prefix + problem for problem in network_problems(browser, origin)]
    return result


def network_problems(browser: Chromium, origin: str) -> list[str]:
    """Requests that left the local server or failed, JavaScript exceptions and console errors."""
    problems = []
    requests = {}
    for event in browser.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            requests[params["requestId"]] = url
            if not url.startswith((origin + "/", "data:", "blob:", "about:")):
                problems.append(f"needs the network: {url}")
        elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
            problems.append(f"HTTP {params['response']['status']}: {params['response']['url']}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            url = requests.get(params["requestId"], "?")
            if url.startswith(origin + "/"):
                problems.append(f"failed to load {url}: {params.get('errorText')}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            problems.append(f"JavaScript exception: {text}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            problems.append(f"console error: {params['entry']['text']}")
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning"):
            # KaTeX warns about input that is not portable LaTeX or a glyph it has no metrics for
            text = " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            problems.append(f"console {params['type']}: {text}")
    return sorted(set(problems))


def build(site: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "--site-dir", str(site)],
        cwd=ROOT,
        check=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "site-check", help="site and screenshots")
    parser.add_argument("--width", type=int, default=1280, help="window width in CSS pixels")
    parser.add_argument("--chromium", default=None, help="the Chromium binary (default: from PATH)")
    parser.add_argument("--no-build", action="store_true", help="check the site already in OUT/site")
    args = parser.parse_args(argv)

    binary = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        print("docs-check: no chromium binary (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    site, shots = args.out / "site", args.out / "screenshots"
    if not args.no_build:
        build(site)
    if shots.exists():
        shutil.rmtree(shots)
    shots.mkdir(parents=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="docs-check-profile-") as profile:
        browser = Chromium(binary, profile)  # before the server's thread starts (preexec_fn)
        handler = functools.partial(_QuietHandler, directory=str(site))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        origin = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            browser.open_tab()
            for path in pages(site):
                result = check_page(browser, origin, path, args.width, shots)
                results.append(result)
                status = "ok" if not result.problems else f"{len(result.problems)} problem(s)"
                print(f"{result.path:<40} {result.equations:>4} equations  {status}")
                for problem in result.problems:
                    print(f"    {problem}")
        finally:
            browser.close()
            server.shutdown()

    report = {
        "width": args.width,
        "pages": [vars(result) for result in results],
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    failed = [r.path for r in results if r.problems]
    print(f"docs-check: {len(results)} pages at {args.width}px, light and dark; screenshots in {shots}")
    if failed:
        print(f"docs-check: problems on {', '.join(failed)}")
    ok = not failed
    print("docs-check: " + ("all checks passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
