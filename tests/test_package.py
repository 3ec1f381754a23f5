"""The package as users get it: ``python -m build`` makes the sdist and the wheel (the wheel from the sdist),
``twine check --strict`` accepts both, their metadata says what ships, and the wheel installed into a fresh
virtual environment runs the README's example.

The fresh environment takes torch, numpy and the trainer libraries from this test environment (a ``.pth``
line naming its site-packages: a clean install would download gigabytes), but gradmod only from the wheel:
the environment's interpreter runs isolated (``-I``: no working directory, no ``PYTHONPATH``), the ``.pth``
files of the borrowed site-packages (the editable install of the repository among them) are not processed,
and the test checks where ``gradmod`` is imported from. pip installs the wheel with its extras without an
index, so the versions this test environment holds satisfy every requirement the wheel declares.
"""

from __future__ import annotations

import email.parser
import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from test_docs import code_blocks

import gradmod

ROOT = Path(__file__).resolve().parents[1]
#: The integrations (each a gradmod.integrations module) and the extras of single features, with what they import.
INTEGRATIONS = {"lightning", "transformers"}
FEATURES = {"relearning": "sklearn", "plot": "matplotlib"}
EXTRAS = INTEGRATIONS | set(FEATURES)


def run(*command, **options) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=300, **options)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}"
    return result


def source_tree(dest: Path) -> Path:
    """The repository's files as a fresh clone has them, plus files not yet committed (``git`` decides what
    is ignored): a build in the working tree would pick up files listed by a stale ``gradmod.egg-info``."""
    listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a file deleted but not yet committed is gone
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """``{"sdist": path, "wheel": path}`` built from the source tree without network (``--no-isolation``)."""
    out = tmp_path_factory.mktemp("dist")
    source = source_tree(tmp_path_factory.mktemp("source"))
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, source)
    built = {"sdist": list(out.glob("gradmod-*.tar.gz")), "wheel": list(out.glob("gradmod-*-py3-none-any.whl"))}
    assert all(len(paths) == 1 for paths in built.values()), f"expected one sdist and one wheel, got {built}"
    return {kind: paths[0] for kind, paths in built.items()}


@pytest.fixture(scope="module")
def metadata(dist) -> email.message.Message:
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(wheel.read(name).decode("utf-8"))


def test_twine_accepts_the_sdist_and_the_wheel(dist):
    run(sys.executable, "-m", "twine", "check", "--strict", dist["sdist"], dist["wheel"])


def test_the_metadata_describes_the_package(metadata):
    assert metadata["Name"] == "gradmod" and metadata["Version"] == gradmod.__version__
    assert metadata["License-Expression"] == "MIT" and metadata["License-File"] == "LICENSE"
    classifiers = set(metadata.get_all("Classifier"))
    assert {"Programming Language :: Python :: 3.11", "Typing :: Typed"} <= classifiers
    assert metadata["Requires-Python"] == ">=3.11"
    assert metadata["Description-Content-Type"] == "text/markdown"
    description = metadata.get_payload()
    assert "pip install 'gradmod[lightning]'" in description and "```python" in description
    assert "make " not in description, "the long description is for pip users: no repository commands"


def test_the_requirements_are_torch_numpy_and_the_extras_that_ship(metadata):
    requirements = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    assert {str(r) for r in requirements if r.marker is None} == {"torch>=2.14.1", "numpy>=2.4.6"}
    assert set(metadata.get_all("Provides-Extra")) == EXTRAS  # the integrations' (below) and FEATURES
    optional = [r for r in requirements if r.marker is not None]
    assert all(any(r.marker.evaluate({"extra": extra}) for extra in EXTRAS) for r in optional)


def test_the_wheel_ships_gradmod_only_and_the_sdist_what_builds_it(dist):
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        tops = {name.split("/")[0] for name in wheel.namelist()}
        names = set(wheel.namelist())
    assert tops == {"gradmod", f"gradmod-{gradmod.__version__}.dist-info"}
    assert {"gradmod/py.typed", "gradmod/integrations/lightning.py", "gradmod/integrations/transformers.py",
            "gradmod/diagnose/benchmarks.json"} <= names
    with tarfile.open(dist["sdist"]) as sdist:
        files = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"LICENSE", "README.pypi.md", "CHANGELOG.md", "pyproject.toml", "gradmod/__init__.py"} <= files
    assert not {name for name in files if name.startswith(("tests/", "reference_models/", "benchmarks/", "docs/"))}


#: Runs in the fresh environment: where gradmod comes from, what it ships, then the README examples.
CHECK = """
import importlib.util, json, sys, sysconfig
from pathlib import Path
import gradmod
site = Path(sysconfig.get_paths()["purelib"]).resolve()
assert Path(gradmod.__file__).resolve().is_relative_to(site), f"gradmod imported from {gradmod.__file__}"
assert importlib.util.find_spec("reference_models") is None, "the wheel must not ship reference_models"
optional = sorted({m.split(".")[0] for m in sys.modules} & {"lightning", "transformers", "accelerate"})
assert not optional, f"import gradmod imported {optional}: the core needs torch and numpy only"
import gradmod.integrations.lightning, gradmod.integrations.transformers
assert gradmod.diagnose.load_benchmarks()["schema"] == 1  # the package data shipped
pages = json.loads(sys.argv[1])
for page, blocks in pages.items():
    namespace = {"__name__": "__main__"}
    for line, source in blocks:
        exec(compile("\\n" * (line - 1) + source, page, "exec"), namespace)
print(gradmod.__version__, gradmod.__file__)
"""


def test_the_wheel_installed_alone_runs_the_readme_examples(dist, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "borrowed_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    # no index and no configuration: the wheel's requirements must be met by what this environment holds
    pip_env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_NO_INPUT": "1"}
    requirement = f"gradmod[{','.join(sorted(INTEGRATIONS))}] @ {dist['wheel'].as_uri()}"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-cache-dir", requirement,
        env=pip_env)  # fmt: skip

    pages = {name: code_blocks(ROOT / name, "python") for name in ("README.md", "README.pypi.md")}
    assert all(pages.values()), f"no python example in {[name for name, blocks in pages.items() if not blocks]}"
    work = tmp_path / "work"  # an empty working directory: nothing of the repository is importable
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = run(python, "-I", "-c", CHECK, json.dumps(pages), cwd=work, env=env).stdout
    assert out.strip().endswith(f"{gradmod.__version__} {site / 'gradmod' / '__init__.py'}")


@pytest.mark.parametrize("extra", sorted(INTEGRATIONS))
def test_an_integration_without_its_library_names_the_extra(extra, monkeypatch):
    module = f"gradmod.integrations.{extra}"
    monkeypatch.delitem(sys.modules, module, raising=False)
    # As if the library were not installed, even where another test imported it already.
    for name in [name for name in sys.modules if name == extra or name.startswith(f"{extra}.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, extra, None)
    with pytest.raises(ImportError, match=rf"pip install 'gradmod\[{extra}\]'"):
        importlib.import_module(module)
