"""The lists that name every method, generated from the registry (``gradmod.METHODS``): ``make catalogue``.

Each list sits between two markers in its file and is rewritten from the registry, so that none can drift
from it (``tests/test_catalogue.py`` fails when one is stale):

* ``mkdocs.yml``: the "Methods" section of the nav, one entry per method page, titled by the page's heading;
* ``docs/api.md``: one ``::: gradmod.methods.<module>`` per method module;
* ``docs/index.md``: each kind, how it enters a step, and its methods;
* ``docs/methods/index.md``: every method by kind;
* ``docs/pick-a-method.md``: what each method needs from a loop and what it costs;
* ``README.md`` and ``README.pypi.md``: the method table (name, paper, preset, kind).

``python tools/catalogue.py`` rewrites the files; ``--check`` only reports which are stale (exit 1).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gradmod  # noqa: E402
from gradmod.method import HEADS, MethodInfo  # noqa: E402

__all__ = ["BLOCKS", "api_lines", "kinds_overview", "nav_lines", "needs_table", "preset_name", "readme_table", "render", "stale"]


def preset_name(info: MethodInfo) -> str:
    """``gradmod.<Name>`` where the preset is exported at the top level, else its module path."""
    name = info.preset.__name__
    if getattr(gradmod, name, None) is info.preset:
        return f"gradmod.{name}"
    return f"{info.preset.__module__}.{name}"


def _pages() -> dict[str, list[MethodInfo]]:
    pages: dict[str, list[MethodInfo]] = {}
    for info in gradmod.METHODS.values():
        pages.setdefault(info.page, []).append(info)
    return pages


def page_title(page: str) -> str:
    """The first ``# `` heading of a docs page."""
    for line in (ROOT / "docs" / page).read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    raise ValueError(f"docs/{page} has no '# ' heading to title its nav entry")


def nav_lines() -> list[str]:
    """The nav's method entries (indented for mkdocs.yml's ``Methods:`` list)."""
    return [f"      - {json.dumps(page_title(page), ensure_ascii=False)}: {page}" for page in _pages()]


def api_lines() -> list[str]:
    """One mkdocstrings block per method module, in catalogue order."""
    modules = dict.fromkeys(info.preset.__module__ for info in gradmod.METHODS.values())
    return [line for module in modules for line in (f"::: {module}", "")][:-1]


def _link(info: MethodInfo, prefix: str | None) -> str:
    return info.title if prefix is None else f"[{info.title}]({prefix}{info.page})"


def needs_table() -> list[str]:
    """Pick-a-method's table: what each method reads, what the loop must have, what it costs."""
    lines = [
        "| method | kind | it reads | your loop must have | extra cost |",
        "| --- | --- | --- | --- | --- |",
    ]
    for info in gradmod.METHODS.values():
        lines.append(f"| {_link(info, '')} | {info.kind} | {info.observes} | {HEADS[info.fit.head]} | {info.cost} |")
    return lines


def readme_table(prefix: str | None) -> list[str]:
    """The README's method table; links to the docs pages start with ``prefix`` (``None``: no links)."""
    lines = ["| method | paper | gradmod | kind |", "| --- | --- | --- | --- |"]
    for info in gradmod.METHODS.values():
        lines.append(f"| {_link(info, prefix)} | {info.paper} | `{preset_name(info)}` | {info.kind} |")
    return lines


def kinds_table() -> list[str]:
    """The catalogue page's table: every method by kind, with its paper and preset."""
    lines = ["| kind | method | paper | gradmod |", "| --- | --- | --- | --- |"]
    for kind in gradmod.method.KINDS:
        for info in (i for i in gradmod.METHODS.values() if i.kind == kind):
            lines.append(f"| {kind} | {_link(info, '../')} | {info.paper} | `{preset_name(info)}` |")
    return lines


def kinds_overview() -> list[str]:
    """The home page's table: each kind, how it enters a step (`gradmod.method.KINDS`), and its methods."""
    lines = ["| kind | in a training step | methods |", "| --- | --- | --- |"]
    for kind, meaning in gradmod.method.KINDS.items():
        titles = list(dict.fromkeys(info.title for info in gradmod.METHODS.values() if info.kind == kind))
        lines.append(f"| `{kind}` | {meaning} | {', '.join(titles)} |")
    return lines


#: file → (opening marker, closing marker, generator) of each generated block.
BLOCKS: dict[str, list[tuple[str, str, Callable[[], list[str]]]]] = {
    "mkdocs.yml": [("      # catalogue: methods (make catalogue)", "      # /catalogue", nav_lines)],
    "docs/api.md": [("<!-- catalogue: methods (make catalogue) -->", "<!-- /catalogue -->", api_lines)],
    "docs/index.md": [("<!-- catalogue: kinds (make catalogue) -->", "<!-- /catalogue -->", kinds_overview)],
    "docs/methods/index.md": [("<!-- catalogue: methods (make catalogue) -->", "<!-- /catalogue -->", kinds_table)],
    "docs/pick-a-method.md": [("<!-- catalogue: methods (make catalogue) -->", "<!-- /catalogue -->", needs_table)],
    "README.md": [("<!-- catalogue: methods (make catalogue) -->", "<!-- /catalogue -->", lambda: readme_table("docs/"))],
    "README.pypi.md": [("<!-- catalogue: methods -->", "<!-- /catalogue -->", lambda: readme_table(None))],
}


def render(path: str) -> str:
    """The file ``path`` (relative to the repository) with its generated blocks rewritten."""
    text = (ROOT / path).read_text(encoding="utf-8")
    for opening, closing, lines in BLOCKS[path]:
        pattern = re.compile(re.escape(opening) + r"\n.*?" + re.escape(closing), re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"{path} lacks the markers {opening!r} … {closing!r} of its generated block")
        text = pattern.sub(lambda _: "\n".join([opening, *lines(), closing]), text)
    return text


def stale() -> list[str]:
    """The files whose generated blocks differ from the registry."""
    return [path for path in BLOCKS if render(path) != (ROOT / path).read_text(encoding="utf-8")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report stale files instead of rewriting them")
    args = parser.parse_args(argv)
    outdated = stale()
    if args.check:
        for path in outdated:
            print(f"{path} is out of date with gradmod.METHODS: run make catalogue")
        return 1 if outdated else 0
    for path in outdated:
        (ROOT / path).write_text(render(path), encoding="utf-8")
        print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
