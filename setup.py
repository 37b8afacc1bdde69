"""Build script: package metadata lives in pyproject.toml; this file builds the native extension
helios_rt._planner with CMake (CMakeLists.txt at the repository root), so that `pip install -e .`
and `pip install .` both produce an importable helios_rt._planner.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError, PlatformError

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension module built by the CMake target of the same (last) name."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])
        self.target = name.rsplit(".", 1)[-1]


def _find_tool(names: list[str], what: str, install: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise PlatformError(
        f"helios_rt needs {what} to build its C++ extension helios_rt._planner, but found none of "
        f"{', '.join(names)} on PATH. Install it (e.g. `{install}`) and reinstall with "
        "`pip install -e .`."
    )


def _cmake_tools() -> list[str]:
    """cmake, the compiler and the build program, checked up front for errors that say what to install."""
    cmake = _find_tool(["cmake"], "CMake >= 3.18", "apt-get install cmake")
    args = [cmake]
    cxx = os.environ.get("CXX", "")
    if cxx:  # CMake reads CXX itself (a launcher such as "ccache g++" included)
        if not shutil.which(shlex.split(cxx)[0]):
            raise PlatformError(f"CXX={cxx!r} is not an executable on PATH: fix or unset CXX")
    else:
        cxx = _find_tool(["c++", "g++", "clang++"], "a C++17 compiler", "apt-get install g++")
        args.append(f"-DCMAKE_CXX_COMPILER={cxx}")
    if not os.environ.get("CMAKE_GENERATOR") and not shutil.which("make"):
        _find_tool(["make", "ninja"], "a build program", "apt-get install make")
        args += ["-G", "Ninja"]
    return args


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        cmake, *tool_args = _cmake_tools()
        # Setuptools copies the module from here into the source tree for editable installs.
        built = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / ext.target
        try:
            import pybind11  # a build requirement (pyproject.toml), so only importable here
        except ImportError:  # e.g. `--no-build-isolation` on an offline GPU machine without it
            raise PlatformError(
                "helios_rt needs pybind11 to build helios_rt._planner and it is not installed here: "
                "`pip install pybind11` (offline: `pip install --no-deps pybind11-*.whl` from a wheel you "
                "copied over), then `pip install --no-deps --no-build-isolation -e .`"
            ) from None

        config = "Debug" if self.debug else "Release"
        configure = [
            cmake,
            *("-S", str(ROOT), "-B", str(build_dir)),
            *tool_args,
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={built.parent}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{config.upper()}={built.parent}",
            *shlex.split(os.environ.get("CMAKE_ARGS", "")),
        ]
        build = [cmake, "--build", str(build_dir), "--config", config, "--target", ext.target]
        build += ["--parallel", str(self.parallel or os.cpu_count() or 1)]
        for step, command in (("configure", configure), ("build", build)):
            print(" ".join(command), flush=True)
            if subprocess.run(command).returncode != 0:
                raise CompileError(f"CMake {step} of {ext.name} failed: see its output above")
        if not built.exists():
            raise CompileError(f"CMake built {ext.target} but {built} does not exist")


setup(ext_modules=[CMakeExtension("helios_rt._planner")], cmdclass={"build_ext": CMakeBuild})
