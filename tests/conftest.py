"""Shared test set-up.

- Triton reads TRITON_INTERPRET when it is first imported, so it is set here, before any test module
  imports triton: on a machine without CUDA, kernels run on the interpreter against CPU tensors.
- Every CUDA-only test carries the `gpu` mark (checked at collection, `pytest_collection_modifyitems`).
- The repository root must not be importable: its `kernels/` folder (installed as
  `helios_rt.kernels`) would shadow the unrelated PyPI package `kernels`, which diffusers probes for.
  `python -m pytest` puts the working directory on sys.path, so it is taken off again.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

try:
    from hypothesis import settings
except ImportError:  # a bare GPU machine (first light) may lack the test extras; only property tests need it
    settings = None

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]
sys.modules.pop("kernels", None)

# One thread per worker under pytest-xdist (`-n 2` on CI's 2 cores: most test time is single-threaded
# Python, the Triton interpreter above all); up to two threads in a single process.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

# Property tests draw fresh examples locally; CI replays a fixed, derandomised set so a red run is reproducible.
if settings is not None:
    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    if os.environ.get("CI") == "true":
        settings.load_profile("ci")


def _cuda_only(item) -> bool:
    """A skipif whose condition is "this machine has no CUDA" and whose reason names CUDA."""
    no_cuda = not torch.cuda.is_available()
    return any(
        m.args and isinstance(m.args[0], bool) and m.args[0] == no_cuda and "CUDA" in str(m.kwargs.get("reason", ""))
        for m in item.iter_markers("skipif")
    )


def pytest_collection_modifyitems(config, items) -> None:
    """Every CUDA-only test carries the `gpu` mark, so that `pytest -m gpu` (and first light) selects
    them all: an unmarked one stops the run."""
    unmarked = [item.nodeid for item in items if item.get_closest_marker("gpu") is None and _cuda_only(item)]
    if unmarked:
        raise pytest.UsageError(f"CUDA-only tests without the gpu mark (add @pytest.mark.gpu): {', '.join(unmarked)}")
