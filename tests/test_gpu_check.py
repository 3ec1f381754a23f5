"""`benchmarks/gpu_check.py`, the one command for the first GPU run, rehearsed on the CPU.

The dry run executes every stage (capture, speed, tests, compile) under the Triton interpreter with tiny
sizes, so that the script cannot rot before a GPU runs it; the helpers that judge and report a run are
tested on their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check

PAGE = ROOT / "docs" / "benchmarks" / "speed.md"


def test_dry_run_measures_every_stage_and_fills_the_docs_section(tmp_path):
    page = tmp_path / "speed.md"
    original = PAGE.read_text(encoding="utf-8")
    page.write_text(original, encoding="utf-8")
    out = tmp_path / "results" / "gpu.json"
    command = [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--dry-run", "--out", str(out),
               "--docs", str(page)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and list(report["stages"]) == ["capture", "speed", "tests", "compile"]
    assert {name: record["status"] for name, record in report["stages"].items()} == dict.fromkeys(
        report["stages"], "passed"
    )
    capture = report["stages"]["capture"]["results"]
    assert capture["launches per step"] == 2 and capture["device step equals host step"]
    assert report["stages"]["compile"]["results"]["graph breaks added by the kernels"] == 0
    speed = report["stages"]["speed"]["results"]
    workloads = [r["workload"] for r in speed["results"]]
    assert workloads[0].startswith("CREMA-D") and len(workloads) == 3, workloads
    assert "triton" in [row["name"] for row in speed["results"][1]["modulation"]], "the interpreted backend runs"
    assert speed["bookkeeping"]["validate=False"]["compute_ops"] > 0
    assert report["stages"]["tests"]["counts"].get("passed", 0) > 0
    text = page.read_text(encoding="utf-8")
    head, rest = original.split(gpu_check.BEGIN)
    tail = rest.split(gpu_check.END)[1]
    assert text.startswith(head + gpu_check.BEGIN) and text.endswith(gpu_check.END + tail), "only the section changes"
    section = text[len(head) + len(gpu_check.BEGIN) : len(text) - len(tail) - len(gpu_check.END)]
    assert "Dry run" in section and "| workload | case | ms | / floor | / official |" in section
    assert "| capture | passed |" in section and "CREMA-D" in section


def test_a_stage_past_its_limit_is_killed_with_what_it_printed():
    code = "import time; print('started', flush=True); time.sleep(60)"
    started = time.perf_counter()
    status, output = gpu_check._run([sys.executable, "-c", code], limit_s=3, env=dict(os.environ))
    assert status is None and output == "started\n"
    assert time.perf_counter() - started < 30, "the stage must be killed at its limit, not waited for"


def test_pytest_summary_counts_and_names_failures():
    output = "FAILED tests/test_kernels.py::test_a - AssertionError\n..\n1 failed, 12 passed, 3 skipped in 2.0s\n"
    summary = gpu_check._pytest_summary(output)
    assert summary == {"counts": {"failed": 1, "passed": 12, "skipped": 3},
                       "failed": ["tests/test_kernels.py::test_a - AssertionError"]}


@pytest.mark.parametrize(
    "results, passes",
    [
        ({"deterministic part exact": True, "launches per step": 2, "noise std / σ (median, expected 1)": 1.01}, True),
        ({"deterministic part exact": False}, False),
        ({"launches per step": 3}, False),
        ({"kernels per step (profiler)": 4}, False),
        ({"noise std / σ (median, expected 1)": 1.3}, False),
        ({"no host synchronisation": "failed: synchronizing"}, False),
        ({"graph breaks in the kernel call": 1}, False),
        ({"graph breaks added by the kernels": 2, "graph breaks of optimizer.step() with gradmod's hook": 5}, False),
        ({"graph breaks added by the kernels": 0, "graph breaks of optimizer.step() with gradmod's hook": 5}, True),
        (None, False),
    ],
)
def test_stage_checks_are_judged(results, passes):
    assert gpu_check._checks_pass(results) == passes


def test_report_of_a_failed_run_still_renders():
    report = {
        "command": "python benchmarks/gpu_check.py",
        "environment": {"torch": "2", "triton": "3", "gpu": "NVIDIA H200"},
        "seconds": 12.0,
        "stages": {"capture": {"status": "failed", "seconds": 3.0,
                               "results": {"launches per step": 2, "times": {"eager step host ms": 0.25}}},
                   "speed": {"status": "timed out", "seconds": 200.0, "results": None},
                   "tests": {"status": "skipped", "reason": "4 s left"}},
    }
    section = gpu_check.markdown(report)
    assert "| capture | failed | 3.0 |" in section and "| tests | skipped |  |" in section
    assert "- capture: launches per step: 2" in section and "- capture: eager step host ms: 0.250" in section
    assert "NVIDIA H200" in section


def test_docs_update_needs_exactly_one_marked_section(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nno markers\n")
    with pytest.raises(SystemExit, match="expected one"):
        gpu_check.update_docs(page, "table\n")
    page.write_text(f"before\n{gpu_check.BEGIN}\nold\n{gpu_check.END}\nafter\n")
    gpu_check.update_docs(page, "new\n")
    assert page.read_text() == f"before\n{gpu_check.BEGIN}\nnew\n{gpu_check.END}\nafter\n"


def test_synthetic_workloads_have_resnet18_conv_weight_sizes():
    """`benchmarks/speed.py` builds its synthetic lists without torchvision; the sizes are ResNet-18's."""
    resnet18 = pytest.importorskip("torchvision.models").resnet18
    from benchmarks.speed import resnet18_conv_sizes

    assert resnet18_conv_sizes() == [p.numel() for p in resnet18(weights=None).parameters() if p.dim() == 4]
