"""setup.py builds helios_rt._planner on a bare CUDA image: no cmake, no pybind11 package.

Such an image installs with `pip install --no-deps --no-build-isolation -e .`, which runs setup.py's
build_ext with the machine's own Python; the tests run that command with cmake taken off PATH and
`import pybind11` made to fail, so the build must use setuptools' compiler and torch's pybind11
headers. They write only under pytest's tmp_path (never into the checkout's helios_rt/).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # compiles the C++ planner from scratch

ROOT = Path(__file__).resolve().parent.parent

# Runs setup.py as pip's backend would, with the pybind11 package unimportable whether or not it is installed.
_SETUP_WITHOUT_PYBIND11 = (
    "import runpy, sys; sys.modules['pybind11'] = None; sys.argv = ['setup.py', *sys.argv[1:]]; "
    "runpy.run_path('setup.py', run_name='__main__')"
)

# Loads the built module as helios_rt._planner, then plans through the public API and checks the plan.
_PLAN_WITH_BUILT_MODULE = """
import importlib.util, sys
so = sys.argv[1]
spec = importlib.util.spec_from_file_location("helios_rt._planner", so)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["helios_rt._planner"] = module
from helios_rt.compile.planner import BufferRequest, plan_memory
plan = plan_memory([BufferRequest(0, 100, 0, 1), BufferRequest(1, 300, 1, 2), BufferRequest(2, 256, 2, 3)])
plan.check()
assert sys.modules["helios_rt._planner"].__file__ == so
print("arena", plan.arena_bytes, "lower bound", plan.lower_bound_bytes)
"""


def _path_without(names: set[str], bin_dir: Path) -> str:
    """A PATH of one folder linking every executable on today's PATH except `names` (first one found wins)."""
    bin_dir.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            target = bin_dir / entry.name
            if entry.name in names or target.exists() or not os.access(entry.path, os.X_OK):
                continue
            target.symlink_to(entry.path)
    return str(bin_dir)


def _build(tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`setup.py build_ext` into tmp/lib with no cmake on PATH and no importable pybind11."""
    path = _path_without({"cmake"}, tmp / "bin")
    assert shutil.which("cmake", path=path) is None
    command = [sys.executable, "-c", _SETUP_WITHOUT_PYBIND11, "build_ext"]
    command += ["--build-temp", str(tmp / "temp"), "--build-lib", str(tmp / "lib")]
    return subprocess.run(
        command, cwd=ROOT, env={**os.environ, "PATH": path, **env}, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    tmp = tmp_path_factory.mktemp("build")
    return _build(tmp), tmp / "lib"


def test_planner_builds_without_cmake_or_pybind11(built: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    result, lib = built
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "with setuptools' compiler (pybind11 headers from torch" in result.stdout
    (so,) = (lib / "helios_rt").glob("_planner*")
    run = subprocess.run(
        [sys.executable, "-c", _PLAN_WITH_BUILT_MODULE, str(so)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # 256 + 512 bytes live at step 1, 512 + 256 at step 2: an optimal plan of three aligned buffers.
    assert run.stdout.split() == ["arena", "768", "lower", "bound", "768"]


def test_a_missing_compiler_names_the_fix(tmp_path: Path) -> None:
    result = _build(tmp_path, CC="helios-no-such-cc", CXX="helios-no-such-c++")
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert "helios-no-such-c" in error and "apt-get install g++" in error, result.stderr[-3000:]
    assert not (tmp_path / "lib").exists()


def test_every_package_is_installed() -> None:
    """A non-editable install copies only the packages pyproject.toml lists: each folder of helios_rt with an
    __init__.py must be there (helios_rt.fp8 once was not)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "helios_rt").rglob("__init__.py")}
    found |= {"helios_rt.kernels"}  # installed from the top-level kernels/ folder (package-dir)
    assert found - listed == set(), f"pyproject.toml does not install {sorted(found - listed)}"
