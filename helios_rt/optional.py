"""Optional packages, imported where they are used and not before.

The engine runs with torch, triton, safetensors and numpy alone; video files need PyAV (`av`) and
NVTX ranges need `nvtx`. A GPU machine set up with `pip install --no-deps -e .` may lack either, so
they are never imported at package import: the feature that needs one imports it through `require`,
which names the feature and the install command when the package is missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> (pip package, what needs it)
PACKAGES: dict[str, tuple[str, str]] = {
    "av": ("av", "reading and writing video files (mp4 output, --video input)"),
    "nvtx": ("nvtx", "NVTX ranges (helios-rt profile, HELIOS_RT_NVTX=1)"),
}


class MissingDependencyError(ImportError):
    """An optional package that a feature needs is not installed; the message says how to install it."""


def require(module: str) -> ModuleType:
    """Import an optional `module`, or raise `MissingDependencyError` naming the feature and the fix."""
    package, purpose = PACKAGES[module]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{purpose} needs the Python package {package!r}, which is not installed here "
            f"({err}): install it with `pip install {package}`"
        ) from None
