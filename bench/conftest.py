"""Benchmark set-up, as in tests/conftest.py: the repository root must not be importable.

Its `kernels/` folder (installed as `helios_rt.kernels`) would shadow the unrelated PyPI package
`kernels`, which diffusers (the baseline of several benchmarks) probes for; `python -m pytest` puts
the working directory on sys.path, so it is taken off again.
"""

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]
sys.modules.pop("kernels", None)
