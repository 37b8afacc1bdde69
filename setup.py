"""Build script: package metadata lives in pyproject.toml; this file builds the native extension
helios_rt._planner, so that `pip install -e .` and `pip install .` both produce an importable module.

Two ways, one per machine:
- cmake and the pybind11 package both present: CMake (CMakeLists.txt at the repository root).
- otherwise (a bare CUDA image, offline, `pip install --no-deps --no-build-isolation -e .`): setuptools'
  own compiler, which needs only what Triton's launcher needs already (a C++17 compiler and Python.h),
  with pybind11's headers from the pybind11 package if importable, else the copy torch ships.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError, PlatformError

ROOT = Path(__file__).resolve().parent
# Relative to ROOT (pip runs this file there); setuptools wants relative paths for sdists.
PLANNER_SOURCES = ["csrc/planner/planner.cpp", "csrc/planner/bindings.cpp"]
# What pybind11_add_module and CMakeLists.txt's Release build use (gcc and clang spellings).
# Appended after Python's own CFLAGS, so -O2 and -g0 override its -O3 and -g.
CXX_FLAGS = ["-std=c++17", "-O2", "-g0", "-DNDEBUG", "-fvisibility=hidden", "-pthread"]
REINSTALL = "`pip install --no-deps --no-build-isolation -e .`"


class PlannerExtension(Extension):
    """helios_rt._planner; `target` is the CMake target of the same (last) name."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=PLANNER_SOURCES, include_dirs=["csrc"], language="c++")
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


def _pybind11():
    """The pybind11 package, or None: a build requirement (pyproject.toml) that
    `--no-build-isolation` on an offline machine may not have."""
    try:
        import pybind11
    except ImportError:
        return None
    return pybind11


def _torch_pybind11_include() -> Path | None:
    """torch's include folder when it holds pybind11's headers (found without importing torch)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    include = Path(spec.origin).parent / "include"
    return include if (include / "pybind11" / "pybind11.h").is_file() else None


def _check_python_h() -> None:
    """Python.h, in the folder setuptools compiles with: a CUDA image's system Python may lack its -dev package."""
    python_h = Path(sysconfig.get_config_var("INCLUDEPY")) / "Python.h"
    if not python_h.is_file():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise PlatformError(
            f"helios_rt._planner needs Python.h ({python_h} is missing): `apt-get install python{version}-dev` "
            f"(or python3-dev), then {REINSTALL}"
        )


def _pybind11_include(pybind11) -> tuple[Path, str]:
    """pybind11's header folder and where it came from: the package if importable, else torch's copy."""
    if pybind11 is not None:
        return Path(pybind11.get_include()), "pybind11"
    include = _torch_pybind11_include()
    if include is None:
        raise PlatformError(
            "helios_rt._planner needs pybind11's headers: install torch first (it ships them) or "
            f"`pip install --no-deps pybind11-*.whl`, then {REINSTALL}"
        )
    return include, "torch"


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


class PlannerBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, PlannerExtension):
            super().build_extension(ext)
            return
        pybind11 = _pybind11()
        if pybind11 is not None and shutil.which("cmake"):
            self._build_with_cmake(ext, pybind11)
        else:
            self._build_with_compiler(ext, pybind11)

    def _build_with_compiler(self, ext: PlannerExtension, pybind11) -> None:
        """setuptools' compiler (the one Python was built with, or CC/CXX): no cmake, no pybind11 package."""
        self._check_compiler()
        _check_python_h()
        include, origin = _pybind11_include(pybind11)
        print(f"building {ext.name} with setuptools' compiler (pybind11 headers from {origin}: {include})", flush=True)
        ext.include_dirs = [str(ROOT / "csrc"), str(include)]
        ext.extra_compile_args = list(CXX_FLAGS)
        ext.extra_link_args = ["-pthread"]
        super().build_extension(ext)

    def _check_compiler(self) -> None:
        """Name the missing compiler and its fix before setuptools fails on it with a bare 'No such file'."""
        commands = ("compiler_so", "compiler_so_cxx", "compiler_cxx", "linker_so", "linker_so_cxx")
        for attr in commands:
            command = getattr(self.compiler, attr, None)
            if command and not shutil.which(command[0]):
                raise PlatformError(
                    f"helios_rt._planner needs a C++17 compiler, but {command[0]!r} (this Python's {attr}, or "
                    f"CC/CXX) is not on PATH: `apt-get install g++` (or set CC and CXX), then {REINSTALL}"
                )

    def _build_with_cmake(self, ext: PlannerExtension, pybind11) -> None:
        cmake, *tool_args = _cmake_tools()
        # Setuptools copies the module from here into the source tree for editable installs.
        built = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / ext.target
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


setup(ext_modules=[PlannerExtension("helios_rt._planner")], cmdclass={"build_ext": PlannerBuild})
