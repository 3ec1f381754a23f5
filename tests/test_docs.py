"""The documentation is executable, builds cleanly and follows the site's conventions.

* Every ```python block of README.md and docs/**/*.md runs: the blocks of one page in order, in one fresh
  namespace, in a temporary working directory (a block that raises fails the test with the page and line).
  Blocks indented inside an admonition or a collapsible block (``??? example``) run too.
* Every ``python -m reference_models.train`` command and every ``make`` target in a ```bash block is valid.
* The API reference covers every public gradmod module, and ``mkdocs build --strict`` succeeds; the built
  pages load nothing from the network and leave no math delimiter in their text.
* Pages of the site keep code lines within 88 characters and cite papers through docs/references.md,
  never through files outside the repository. (``make docs-check`` checks the rendered pages in a browser.)
"""

from __future__ import annotations

import html.parser
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import gradmod
from reference_models.train import parse_args

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: Fenced blocks, at the start of a line or indented inside an admonition or a collapsible block (the
#: closing fence has the same indentation). ```python blocks are executed and ```bash blocks checked;
#: other info strings (text, json, ...) are shown as they are.
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.MULTILINE | re.DOTALL
)
#: Spellings that would let Python code or shell commands escape the checks.
UNCHECKED_ALIASES = {"py", "python3", "pycon", "ipython", "sh", "shell", "console", "zsh"}


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def code_blocks(page: Path, info: str) -> list[tuple[int, str]]:
    """``(first line number, source)`` of every fenced block of ``page`` whose info string is ``info``."""
    text = page.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, match.start()) + 2, _dedent(match["body"], match["indent"]))
        for match in FENCE.finditer(text)
        if match["info"].strip() == info
    ]


def _dedent(body: str, indent: str) -> str:
    return "".join(line.removeprefix(indent) for line in body.splitlines(keepends=True))


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_fence_is_one_the_tests_understand(page: Path) -> None:
    """No block escapes the checks: every fence is matched, no other spelling of python or bash."""
    text = page.read_text(encoding="utf-8")
    fences = [m.start() for m in re.finditer(r"^[ \t]*```", text, re.MULTILINE)]
    blocks = list(FENCE.finditer(text))
    # a block's opening fence starts its match; its closing fence starts the match's last line
    matched = {m.start() for m in blocks} | {m.start() + m.group().rfind("\n") + 1 for m in blocks}
    stray = [text.count("\n", 0, start) + 1 for start in fences if start not in matched]
    assert not stray, f"{_name(page)}: fences at lines {stray} open or close no block the tests see"
    infos = {match["info"].strip() for match in FENCE.finditer(text)}
    aliases = {info for info in infos if info.split(" ")[0] in UNCHECKED_ALIASES}
    assert not aliases, f"{_name(page)}: write ```python or ```bash instead of {sorted(aliases)}"
    decorated = {info for info in infos if info.split(" ")[0] in ("python", "bash") and info not in ("python", "bash")}
    assert not decorated, f"{_name(page)}: fences {sorted(decorated)} would not be checked; use a bare ```python / ```bash"
    assert text.count("```") == 2 * len(FENCE.findall(text)), f"{_name(page)}: unbalanced code fences"


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Run in an empty directory, and leave torch's RNG and torch.distributed as they were."""
    monkeypatch.chdir(tmp_path)
    rng = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(rng)
    left_initialized = dist.is_available() and dist.is_initialized()
    if left_initialized:
        dist.destroy_process_group()
    assert not left_initialized, "a page left torch.distributed initialised"


PYTHON_PAGES = [page for page in PAGES if code_blocks(page, "python")]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=_name)
def test_python_blocks_run(page: Path, isolated) -> None:
    namespace: dict[str, object] = {"__name__": "__main__"}
    for line, source in code_blocks(page, "python"):
        # leading newlines make tracebacks point at the page's own line numbers
        code = compile("\n" * (line - 1) + source, str(page), "exec")
        exec(code, namespace)


def _commands(source: str) -> list[list[str]]:
    """The shell commands of a bash block, continuation lines joined, comments dropped."""
    joined = source.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def _make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {match[1] for match in re.finditer(r"^([A-Za-z][\w-]*):", makefile, re.MULTILINE)}


BASH_PAGES = [page for page in PAGES if code_blocks(page, "bash")]


@pytest.mark.parametrize("page", BASH_PAGES, ids=_name)
def test_bash_commands_are_valid(page: Path) -> None:
    """``make`` targets exist; training-CLI arguments parse and name valid datasets, methods and heads."""
    targets = _make_targets()
    for line, source in code_blocks(page, "bash"):
        for words in _commands(source):
            where = f"{_name(page)}:{line}: {' '.join(words)}"
            if words[0] == "make":
                assert set(words[1:]) <= targets, f"{where}: unknown make target"
            if "reference_models.train" in words:
                argv = words[words.index("reference_models.train") + 1 :]
                try:
                    parse_args(argv).resolved()
                except SystemExit as error:
                    pytest.fail(f"{where}: the CLI rejects these arguments ({error})")


def test_api_reference_covers_every_public_module() -> None:
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: (gradmod[\w.]*)", api, re.MULTILINE))
    public_modules = {f"gradmod.{name}" for name in gradmod.__all__ if type(getattr(gradmod, name)) is type(gradmod)}
    assert public_modules <= documented, f"api.md lacks {sorted(public_modules - documented)}"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as ``mkdocs build --strict`` writes it (the build must succeed)."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def test_site_builds_strictly(site: Path) -> None:
    assert (site / "api" / "index.html").is_file()
    assert (site / "references" / "index.html").is_file()


class _PageScan(html.parser.HTMLParser):
    """Collects what a built page loads and the text of its article outside code and math."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.text: list[str] = []
        self._stack: list[tuple[str, bool]] = []  # (tag, whether its text is skipped)
        self._in_article = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "script" and named.get("src"):
            self.loads.append(named["src"])
        if tag == "link" and "stylesheet" in (named.get("rel") or ""):
            self.loads.append(named.get("href") or "")
        if tag == "img":
            self.loads.append(named.get("src") or "")
        if tag in self.VOID:
            return
        classes = (named.get("class") or "").split()
        skipped = tag in ("code", "pre", "script", "style") or "arithmatex" in classes
        self._stack.append((tag, skipped or (bool(self._stack) and self._stack[-1][1])))
        if tag == "article":
            self._in_article += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        while self._stack:
            open_tag, _ = self._stack.pop()
            if open_tag == "article":
                self._in_article -= 1
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._in_article and not (self._stack and self._stack[-1][1]):
            self.text.append(data)


def _built_pages(site: Path) -> list[Path]:
    return sorted(site.rglob("index.html"))


def test_built_pages_need_no_network(site: Path) -> None:
    """Scripts, stylesheets and images come from the site itself: the math renders offline."""
    remote = {}
    for page in _built_pages(site):
        scan = _PageScan()
        scan.feed(page.read_text(encoding="utf-8"))
        found = [url for url in scan.loads if re.match(r"^(https?:)?//", url)]
        if found:
            remote[str(page.relative_to(site))] = found
    assert not remote, f"pages load files from the network: {remote}"
    katex = site / "assets" / "katex"
    css = (katex / "katex.min.css").read_text(encoding="utf-8")
    fonts = set(re.findall(r"url\((fonts/[^)]+\.woff2)\)", css))
    assert fonts, "katex.min.css names no woff2 font"
    missing = sorted(font for font in fonts if not (katex / font).is_file())
    assert not missing, f"KaTeX fonts missing from docs/assets/katex: {missing}"


def test_math_is_marked_up_for_rendering(site: Path) -> None:
    """Math is written as $...$ / $$...$$ (arithmatex): no delimiter is left in a page's text."""
    leftovers = {}
    for page in _built_pages(site):
        scan = _PageScan()
        scan.feed(page.read_text(encoding="utf-8"))
        text = "".join(scan.text)
        found = [text[max(0, m.start() - 30) : m.end() + 30] for m in re.finditer(r"\$|\\[()\[\]]", text)]
        if found:
            leftovers[str(page.relative_to(site))] = found[:3]
    assert not leftovers, f"math delimiters left in the text (math not recognised): {leftovers}"
    assert "arithmatex" in (site / "methods" / "ogm-ge" / "index.html").read_text(encoding="utf-8")


SITE_PAGES = sorted((ROOT / "docs").rglob("*.md"))
#: A code line of the site fits the content column at 1280 px.
MAX_CODE_LINE = 88


@pytest.mark.parametrize("page", SITE_PAGES, ids=_name)
def test_code_lines_fit_the_column(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    long_lines = []
    for match in FENCE.finditer(text):
        first = text.count("\n", 0, match.start()) + 2
        for offset, line in enumerate(_dedent(match["body"], match["indent"]).splitlines()):
            if len(line) > MAX_CODE_LINE:
                long_lines.append(f"{first + offset} ({len(line)} characters)")
    assert not long_lines, f"{_name(page)}: code lines over {MAX_CODE_LINE} characters at lines {long_lines}"


#: What only a reader with files outside the repository could follow.
OUTSIDE_REFERENCES = re.compile(r"shared/papers|\bpapers? 00\d\b|\b00\d_[0-9a-f]{8,}\b", re.IGNORECASE)


@pytest.mark.parametrize("page", SITE_PAGES, ids=_name)
def test_pages_cite_papers_not_files(page: Path) -> None:
    """Papers are cited by name with a link to references.md, not by a file the reader lacks."""
    text = page.read_text(encoding="utf-8")
    found = [
        f"{text.count(chr(10), 0, match.start()) + 1}: {match[0]!r}" for match in OUTSIDE_REFERENCES.finditer(text)
    ]
    assert not found, f"{_name(page)} refers to files outside the repository: {found}"


def test_the_versions_the_pages_state_are_pyprojects():
    """Every "Python ≥ 3.x" and every stated floor of torch and numpy on the pages is the one pyproject.toml
    declares (a page that said Python ≥ 3.10 while the package needed 3.11 is how this test came to be)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    python = project["requires-python"].removeprefix(">=")
    floors = {dep.split(">=")[0]: dep.split(">=")[1] for dep in project["dependencies"]}
    stated = {"python": [], "torch": [], "numpy": []}
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        stated["python"] += [(page, v) for v in re.findall(r"Python (?:≥|>=) ?(3\.\d+)", text)]
        stated["python"] += [(page, v) for v in re.findall(r"versions? the tests? (?:suite )?runs? against: Python (3\.\d+)", text)]
        for name in ("torch", "numpy"):
            stated[name] += [(page, v) for v in re.findall(rf"\b{name} (\d+\.\d+\.\d+)", text)]
    assert stated["python"] and stated["torch"], "the pages state no versions any more: update this test"
    wrong = [(str(page.relative_to(ROOT)), "python", v) for page, v in stated["python"] if v != python]
    wrong += [(str(page.relative_to(ROOT)), name, v) for name in ("torch", "numpy") for page, v in stated[name] if v != floors[name]]
    assert not wrong, f"pages state versions pyproject.toml does not: {wrong} (pyproject: Python {python}, {floors})"
