"""Mutation testing of gradmod's core modules with mutmut (``make mutation``).

Each mutant is a copy of one function with one small change (an operator, a constant, a comparison, a
removed call); a mutant is *killed* when some test of the selection below fails on it. A mutant that
survives is a missing test, an equivalent change (one no input can tell apart), or dead code.

The run happens in ``build/mutation/`` (git-ignored): the package and the tests are copied there with a
generated ``setup.cfg`` holding mutmut's configuration, so that nothing in the repository's packaging
changes. Without arguments: a fresh run over every module of `MODULES`, the counts per module printed as a
table and written to ``benchmarks/results/mutation.json`` with the diff of every mutant that was not
killed. With mutant names or patterns (``'gradmod.functional.x_ogm_scores*'``): those mutants only are
rerun in the existing run directory, against the current tests, and their verdicts printed.

Mutants run in forked children, bounded by ``--max-children``; OpenMP and MKL use one thread each (a
forked child would deadlock in an OpenMP pool inherited from its parent). mutmut mutates the bodies of
undecorated functions and methods (``@staticmethod`` and ``@classmethod`` included); decorated ones
(``@property``, ``@torch.no_grad()``) and module-level code are left as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutation"
RESULTS = ROOT / "benchmarks" / "results" / "mutation.json"

#: The modules whose kill rate the project tracks ("core": ≥ 90 % killed), and the modules they lean on.
MODULES = {
    "core": ("functional", "measures", "policies", "modulator"),
    "support": ("_internal", "history", "appliers", "_backward", "_hooks"),
}

#: The fast unit, property and seam tests of these modules (no docs, reference-model, distributed,
#: kernel or integration tests). mutmut runs, for each mutant, only the tests that called its function.
TESTS = (
    "tests/test_functional.py",
    "tests/test_measures.py",
    "tests/test_policies.py",
    "tests/test_history.py",
    "tests/test_internal.py",
    "tests/test_hooks.py",
    "tests/test_modulator.py",
    "tests/test_seams.py",
    "tests/test_bookkeeping.py",
    "tests/methods/test_ogm.py",
    "tests/methods/test_agm.py",  # the only tests of the Shapley values in gradmod.functional
    "tests/test_deprecated.py",  # the core modules' __getattr__ (names that moved to their method's module)
)

#: Tests that mutmut's dispatch to the mutant under test breaks. It sets a ``ContextVar``, which dynamo
#: cannot trace: every mutated function called in a compiled region adds a graph break (``fullgraph=True``
#: fails; a feature tensor may stop being a compiled graph's inner value).
DESELECT = (
    "tests/test_seams.py::test_features_mode_with_scale_grad_equals_params_mode[compiled]",
    "tests/test_seams.py::test_features_hooked_on_a_compiled_graphs_output_fail_by_name_at_the_first_step",
    "tests/test_seams.py::test_features_hooked_on_a_compiled_graphs_output_that_an_auxiliary_loss_also_uses_fail_by_name",
    "tests/test_bookkeeping.py::test_modulator_steps_compile_without_graph_breaks_in_gradmods_own_code",
    # mutmut's dispatch adds stack frames between a caller and gradmod, so warnings' stack levels point elsewhere
    "tests/test_seams.py::test_the_once_warnings_point_at_the_callers_line_and_say_so",
    # spawned gloo processes import the unmutated package and would run once per mutant
    "tests/methods/test_agm.py::test_two_gloo_ranks_agree_with_each_other_and_with_the_global_batch",
)

#: Files outside ``tests/`` that the tests import (test_bookkeeping counts operations with this script).
ALSO_COPY = ("benchmarks/op_count.py",)

#: Every process: single-threaded math libraries (see the module docstring); hypothesis's derandomized
#: profile (tests/conftest.py), so that a property test draws the same examples for every mutant and run;
#: the Triton interpreter, so that the tests of the Triton-only paths (capture-safe noise) run in-process on
#: the CPU, where mutmut sees which functions they call ("auto" never picks the interpreted kernel).
ENVIRONMENT = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYPOTHESIS_PROFILE": "ci", "TRITON_INTERPRET": "1"}


def mutated_paths() -> list[str]:
    return [f"gradmod/{module}.py" for modules in MODULES.values() for module in modules]


def setup_cfg() -> str:
    """mutmut's configuration for the run directory (mutmut reads the ``[mutmut]`` section of setup.cfg)."""
    lines = ["[mutmut]", "source_paths = gradmod", "only_mutate ="]
    lines += [f"    {path}" for path in mutated_paths()]
    lines += ["pytest_add_cli_args_test_selection ="]
    lines += [f"    {path}" for path in TESTS]
    lines += ["also_copy ="]
    lines += [f"    {folder}" for folder in sorted({Path(path).parts[0] for path in ALSO_COPY})]  # mutmut copies folders
    lines += ["pytest_add_cli_args =", "    -p", "    no:cacheprovider"]
    lines += [f"    --deselect={test}" for test in DESELECT]
    lines += [
        "use_git_change_detection = false",
    ]
    return "\n".join(lines) + "\n"


def prepare(fresh: bool) -> None:
    """Copy the package, the tests and the pytest configuration into the run directory.

    A fresh run starts from an empty directory. Otherwise mutmut's cache is kept: a mutated file is copied
    with its modification time (mutmut regenerates the mutants of a file newer than its mutants), and the
    unmutated modules' copies are removed so that mutmut copies them again.
    """
    if fresh:
        shutil.rmtree(WORK, ignore_errors=True)
    elif not (WORK / "mutants").is_dir():
        raise SystemExit(f"no earlier run in {WORK.relative_to(ROOT)}: run without mutant names first")
    WORK.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("gradmod", "tests"):
        shutil.rmtree(WORK / name, ignore_errors=True)
        shutil.copytree(ROOT / name, WORK / name, ignore=ignore)
    for path in ("pyproject.toml", *ALSO_COPY):  # pytest's options and markers; what the tests import
        (WORK / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, WORK / path)
    (WORK / "setup.cfg").write_text(setup_cfg())
    mutated = set(mutated_paths())
    for copy in (WORK / "mutants" / "gradmod").rglob("*.py"):
        path = str(copy.relative_to(WORK / "mutants"))
        if path not in mutated or not copy.with_name(copy.name + ".meta").exists():
            copy.unlink()


def run_mutmut(patterns: list[str], max_children: int) -> None:
    mutmut = Path(sys.executable).with_name("mutmut")
    command = [str(mutmut), "run", "--max-children", str(max_children), *patterns]
    print("$", " ".join(command), f"(in {WORK.relative_to(ROOT)})", flush=True)
    subprocess.run(command, cwd=WORK, env={**os.environ, **ENVIRONMENT}, check=True)


def collect() -> dict:
    """Per module: mutants by mutmut's status, the kill rate, and the diff of every mutant not killed."""
    os.chdir(WORK)  # mutmut reads its configuration and its results relative to the run directory
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    report = {"tests": list(TESTS), "groups": {}, "modules": {}, "not_killed": {}}
    for group, modules in MODULES.items():
        report["groups"][group] = [f"gradmod/{module}.py" for module in modules]
        for module in modules:
            path = f"gradmod/{module}.py"
            meta = json.loads((WORK / "mutants" / f"{path}.meta").read_text())
            status = {name: status_by_exit_code[code] for name, code in meta["exit_code_by_key"].items()}
            counts = Counter(status.values())
            total = len(status)
            detected = counts["killed"] + counts["timeout"]
            report["modules"][path] = {
                "mutants": total,
                **{key: counts[key] for key in sorted(counts)},
                "kill_rate": round(detected / total, 4) if total else None,
            }
            report["not_killed"][path] = [
                {"mutant": name, "status": verdict, "diff": get_diff_for_mutant(name, path=path)}
                for name, verdict in sorted(status.items(), key=lambda item: _number(item[0]))
                if verdict not in ("killed", "timeout")
            ]
    return report


def _number(mutant: str) -> tuple[str, int]:
    function, _, number = mutant.rpartition("__mutmut_")
    return function, int(number)


def table(report: dict) -> str:
    """The counts as a Markdown table (``other``: any other mutmut status, e.g. a crashed or unchecked mutant)."""
    rows = ["| module | mutants | killed | timeout | survived | no tests | other | kill rate |", "|" + "---|" * 8]
    for group, paths in report["groups"].items():
        for path in paths:
            m = report["modules"][path]
            counted = {"killed", "timeout", "survived", "no tests"}
            other = sum(value for key, value in m.items() if key not in counted | {"mutants", "kill_rate"})
            rate = "–" if m["kill_rate"] is None else f"{100 * m['kill_rate']:.1f} %"
            rows.append(
                f"| `{path}` ({group}) | {m['mutants']} | {m.get('killed', 0)} | {m.get('timeout', 0)} | "
                f"{m.get('survived', 0)} | {m.get('no tests', 0)} | {other} | {rate} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mutants", nargs="*", help="mutant names or patterns to rerun in the existing run directory")
    parser.add_argument("--max-children", type=int, default=min(2, os.cpu_count() or 1), help="parallel mutants")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON report of a full run")
    args = parser.parse_args()
    args.out = args.out.resolve()
    prepare(fresh=not args.mutants)
    run_mutmut(args.mutants, args.max_children)
    if args.mutants:
        return
    report = collect()
    report["command"] = "make mutation"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print()
    print(table(report))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
