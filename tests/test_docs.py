"""The documentation is executable and builds cleanly.

* Every ```python block of README.md and docs/**/*.md runs: the blocks of one page in order, in one fresh
  namespace, in a temporary working directory (a block that raises fails the test with the page and line).
* Every ``python -m reference_models.train`` command and every ``make`` target in a ```bash block is valid.
* The API reference covers every public gradmod module, and ``mkdocs build --strict`` succeeds.
"""

from __future__ import annotations

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
#: Fenced blocks start at the beginning of a line. ```python blocks are executed and ```bash blocks checked;
#: other info strings (text, json, ...) are shown as they are.
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
#: Spellings that would let Python code or shell commands escape the checks.
UNCHECKED_ALIASES = {"py", "python3", "pycon", "ipython", "sh", "shell", "console", "zsh"}


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def code_blocks(page: Path, info: str) -> list[tuple[int, str]]:
    """``(first line number, source)`` of every fenced block of ``page`` whose info string is ``info``."""
    text = page.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, match.start()) + 2, match["body"])
        for match in FENCE.finditer(text)
        if match["info"].strip() == info
    ]


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_fence_is_one_the_tests_understand(page: Path) -> None:
    """No block escapes the checks: no indented fences, no other spelling of python or bash."""
    text = page.read_text(encoding="utf-8")
    indented = [n for n, line in enumerate(text.splitlines(), 1) if re.match(r"^\s+```", line)]
    assert not indented, f"{_name(page)}: indented code fences at lines {indented} would not be checked"
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


def test_site_builds_strictly(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "api" / "index.html").is_file()
