"""Shared test set-up.

- Triton reads TRITON_INTERPRET when it is first imported, so it is set here, before any test module
  imports triton: on a machine without CUDA, kernels run on the interpreter against CPU tensors.
- The repository root must not be importable: its `kernels/` folder (installed as
  `helios_rt.kernels`) would shadow the unrelated PyPI package `kernels`, which diffusers probes for.
  `python -m pytest` puts the working directory on sys.path, so it is taken off again.
"""

import os
import sys
from pathlib import Path

import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]
sys.modules.pop("kernels", None)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Property tests draw fresh examples locally; CI replays a fixed, derandomised set so a red run is reproducible.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")
