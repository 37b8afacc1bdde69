"""Launcher helpers shared by the kernels: input validation with errors that name the tensor, and the
registration of each kernel launch as a PyTorch operator."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_tensor(
    name: str,
    t: Tensor,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype | tuple[torch.dtype, ...] | None = None,
    contiguous: bool = False,
    inner_contiguous: bool = False,
    device: torch.device | None = None,
) -> None:
    """Raise ValueError naming `name` when `t` has the wrong shape, dtype, layout or device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            names = ", ".join(str(d) for d in allowed)
            raise ValueError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first), got strides {t.stride()}")
    if inner_contiguous and t.dim() and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must have unit stride in its last dim, got strides {t.stride()}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def check_out(out: Tensor | None, like_shape: tuple[int, ...], dtype: torch.dtype, device, **kw) -> Tensor:
    """Validate a caller-owned `out`, or allocate one."""
    if out is None:
        return torch.empty(like_shape, dtype=dtype, device=device)
    check_tensor("out", out, like_shape, dtype, device=device, **kw)
    return out


def row_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel: about 16 fp32 values per thread, 4..16 warps."""
    return max(4, min(16, block // 512))


def fused_op(name: str, mutates: tuple[str, ...]) -> Callable[[Callable], Callable]:
    """Register a kernel launch as the PyTorch operator `helios_rt::<name>`.

    The launch writes only into the `mutates` arguments, which the public launcher validated and
    allocated (with `torch.empty`, so a dispatch mode sees the allocation) before calling it. That
    makes the op a plain, allocation-free dispatcher op: the memory planner's tracing mode records
    it as one step and the executor replays it on arena views; on meta tensors its fake does
    nothing (the outputs already have their shapes), so a whole chunk runs on meta whatever the op
    table. The schema is inferred from the launch's type hints. A mutated argument whose name ends in
    `_` (`x_`, as PyTorch names in-place ops) is updated in place, read and then written; the others
    are write-only outputs (the cost model prices them so: `compile.cost.op_cost`).
    """

    def wrap(launch: Callable) -> Callable:
        op = torch.library.custom_op(f"helios_rt::{name}", launch, mutates_args=mutates)
        op.register_fake(_writes_nothing_new)
        return op

    return wrap


def _writes_nothing_new(*args, **kwargs) -> None:
    return None
