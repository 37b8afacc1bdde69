"""What first light needs, checked in one table before any GPU minute is spent.

A bare CUDA image installed with `pip install --no-deps --no-build-isolation -e .` may lack a compiler,
Python.h (Triton builds its launcher with both), the wheels `--no-deps` leaves out, or the built planner;
each would otherwise surface as a traceback minutes into the run. Each probe is a small function
returning (found?, what was found or why not), so tests can simulate any machine.
"""

from __future__ import annotations

import importlib
import os
import shlex
import shutil
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Probe = Callable[[], tuple[bool, str]]

_WHEEL = "copy the wheel over and `pip install --no-deps {}` (README: Offline GPU machine)"
_PYTHON_DEV = f"python{sys.version_info.major}.{sys.version_info.minor}-dev"


@dataclass(frozen=True)
class Requirement:
    """One thing first light needs: `found` says what is there (or why not), `fix` how to get it."""

    name: str
    ok: bool
    found: str
    fix: str


def probe_c_compiler() -> tuple[bool, str]:
    """The C compiler Triton builds its launcher with: $CC, else gcc, else clang (triton.runtime.build).

    The planner's C++ compiler is needed only to build it (setup.py names it); the planner row covers that.
    """
    cc = os.environ.get("CC")
    if cc:
        path = shutil.which(shlex.split(cc)[0])
        return (True, f"CC={cc} ({path})") if path else (False, f"CC={cc} is not on PATH")
    path = shutil.which("gcc") or shutil.which("clang")
    return (True, path) if path else (False, "no gcc or clang on PATH")


def probe_python_h() -> tuple[bool, str]:
    """Python.h where Triton looks for it (sysconfig's include dir; Debian's posix_local read as posix_prefix)."""
    scheme = sysconfig.get_default_scheme()
    scheme = "posix_prefix" if scheme == "posix_local" else scheme
    header = Path(sysconfig.get_paths(scheme=scheme)["include"]) / "Python.h"
    return (True, str(header)) if header.is_file() else (False, f"{header} is missing")


def probe_module(name: str) -> tuple[bool, str]:
    """Import `name` (a broken install fails here, not mid-run); found is its version or file."""
    try:
        module = importlib.import_module(name)
    except Exception as err:  # an install broken in any way is a missing requirement, reported with its error
        return False, f"{type(err).__name__}: {err}"
    return True, str(getattr(module, "__version__", None) or getattr(module, "__file__", name))


def probe_cuda() -> tuple[bool, str]:
    """A CUDA device that torch can use."""
    import torch

    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    return True, f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"


def _module(name: str, fix: str) -> tuple[str, Probe, str]:
    return name, lambda: probe_module(name), fix


def _table() -> list[tuple[str, Probe, str]]:
    """(what, probe, fix) for everything but the CUDA device; probes are looked up when called, so tests can patch."""
    pytest_wheels = "pytest-*.whl iniconfig-*.whl pluggy-*.whl packaging-*.whl pygments-*.whl"
    return [
        ("C compiler (Triton)", lambda: probe_c_compiler(), "`apt-get install gcc g++` (or point CC at a compiler)"),
        ("Python.h", lambda: probe_python_h(), f"`apt-get install {_PYTHON_DEV}` (or python3-dev)"),
        _module("numpy", _WHEEL.format("numpy-*.whl")),
        _module("safetensors", _WHEEL.format("safetensors-*.whl")),
        _module("pytest", _WHEEL.format(pytest_wheels)),
        _module("triton", _WHEEL.format("triton-*.whl") + ", the version this torch pins"),
        _module(
            "helios_rt._planner",
            "`pip install --no-deps --no-build-isolation -e .` in the checkout (needs g++ and Python.h)",
        ),
    ]


def preflight(dry_run: bool) -> list[Requirement]:
    """Probe everything first light needs; a CUDA device is not needed for a dry run."""
    reqs = []
    for name, probe, fix in _table():
        ok, found = probe()
        reqs.append(Requirement(name, ok, found, fix))
    ok, found = probe_cuda()
    if dry_run and not ok:
        ok, found = True, f"not needed for --dry-run ({found})"
    reqs.append(Requirement("CUDA device", ok, found, "run on the GPU machine, or pass --dry-run to rehearse on CPU"))
    return reqs


def missing(reqs: list[Requirement]) -> list[Requirement]:
    """The requirements not met, in table order."""
    return [r for r in reqs if not r.ok]


def preflight_table(reqs: list[Requirement]) -> str:
    """A markdown table, what | found | fix; the fix column is filled only where something is missing."""
    rows = ["| what | found | fix |", "|---|---|---|"]
    for r in reqs:
        found = r.found if r.ok else f"MISSING: {r.found}"
        rows.append(f"| {r.name} | {_cell(found)} | {_cell(r.fix) if not r.ok else ''} |")
    return "\n".join(rows)


def _cell(text: str) -> str:
    """One table cell: a pipe or a newline in an error message would break the row."""
    return text.replace("|", "\\|").replace("\n", " ")
