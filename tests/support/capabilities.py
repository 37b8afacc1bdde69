"""What the installed PyTorch can do, probed rather than inferred from its version number.

The dependency floor (torch 2.11) runs the whole engine, but a few CPU paths that the tests use arrived
later; such tests skip, with the reason, where the probe fails, and run everywhere else.
"""

from __future__ import annotations

import functools

import pytest
import torch


@functools.cache
def cpu_rowwise_scaled_mm() -> bool:
    """Whether CPU `torch._scaled_mm` takes per-row / per-column scales (the FP8 linear's); torch 2.11's
    CPU kernel takes per-tensor scales only (an internal assert otherwise)."""
    a = torch.ones(2, 16).to(torch.float8_e4m3fn)
    b = torch.ones(16, 16).to(torch.float8_e4m3fn).t()
    try:
        torch._scaled_mm(a, b, scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


needs_cpu_fp8 = pytest.mark.skipif(
    not cpu_rowwise_scaled_mm(),
    reason=f"torch {torch.__version__}: CPU torch._scaled_mm has no per-row scales (torch >= 2.13 has them)",
)
