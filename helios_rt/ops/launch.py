"""Where a fast backend can launch, and loading it: shared by the op table (`ops/opset.py`) and the
attention backends (`ops/attention_backends.py`), below both.

The Triton kernels live in `helios_rt.kernels` (installed from `kernels/`); importing it registers each
launcher in `ops/registry.py`. The import is deferred to the first table that asks for Triton (the kernels
import the registry, so this module must not import them at load), and a failure is remembered and raised
again, with the fix, whenever Triton is asked for.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

_KERNELS_IMPORT_ERROR: list[ImportError] = []  # the failed import of helios_rt.kernels, once seen


def triton_runs(device: torch.device) -> bool:
    """Triton launches on CUDA devices, and on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def load_triton() -> None:
    """Import the Triton kernels (registering them); a failed import raises, now and on every later ask."""
    if not _KERNELS_IMPORT_ERROR:
        try:
            import helios_rt.kernels  # noqa: F401  (registers the "triton" impls)
        except ImportError as err:
            _KERNELS_IMPORT_ERROR.append(err)
    if _KERNELS_IMPORT_ERROR:
        err = _KERNELS_IMPORT_ERROR[0]
        raise RuntimeError(
            f"kernels='triton' was requested but helios_rt.kernels failed to import ({err!r}); "
            "install a working triton or use kernels='reference'"
        ) from err


def on_device(impl: Callable, device: torch.device) -> Callable:
    """`impl` launched with `device` current. Triton and the attention libraries launch on the *current*
    CUDA device, which for an engine on cuda:1 is usually cuda:0 (a wrong-device launch faults or reads
    garbage); off CUDA, or on a device without an index, `impl` itself."""
    if device.type != "cuda" or device.index is None:
        return impl

    @functools.wraps(impl)
    def launch(*args, **kwargs):
        with torch.cuda.device(device):
            return impl(*args, **kwargs)

    return launch
