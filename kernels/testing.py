"""Error bounds and device placement for kernel tests (FlashAttention-3's `attention_ref` idea, Liger's
verbose allclose).

Where: the kernels run on `kernel_device()`, the GPU when they are compiled for one, else the CPU
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 only without CUDA). Inputs are drawn on the CPU
from a seeded torch.Generator and handed to the kernel through `to_device`, so both machines feed it
the same numbers in the same layout. The references (`ref32` and `naive` below) are computed on the
CPU from those same CPU tensors, never on the GPU: the bound is then a function of the inputs alone,
identical on both machines, and cannot move with the GPU's library choices (TF32 matmuls, cuBLAS
reduced-precision bf16/fp16 reductions, which SDPA backend runs the float32 attention reference).
Only the kernel's output differs between the two runs, which is the thing under test.

Bound: a kernel's output in dtype `d` is compared with the float32 reference `ref32` computed from the
same (already rounded) inputs. It passes when `|out - ref32| <= 2 * max|naive - ref32| + floor`, where
`naive` is the same computation done plainly in `d` (so the bound scales with what that precision
can deliver) and `floor` is the rounding floor: a few units in the last place of the largest
reference value (16 ulps in float32 for reduction-order differences over the short test rows; 2 ulps
in 16-bit types, because the CPU interpreter of triton 3.9 rounds float32 -> bfloat16 toward zero
while GPUs round to nearest even, which costs one more ulp than the reference's own rounding; the
same floor applies on a GPU, where it is one ulp looser than needed, not a widening of the bound).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
_FLOOR_ULPS = {torch.float32: 16.0, torch.bfloat16: 2.0, torch.float16: 2.0}


def to_device(obj, device: torch.device | str):
    """Every tensor of a (nested) argument structure on `device`, with its layout kept.

    A tensor already there is returned as is (on the interpreter machine nothing is copied, so a
    kernel writing in place also writes the CPU tensor: compute references first). Otherwise its
    whole storage is copied once and the tensor re-viewed with the same shape, strides and storage
    offset, so a strided view stays strided (and as misaligned) on the GPU, and tensors that share
    a storage in one call (q and k as slices of one fused QKV output) share it there too;
    `Tensor.to` would give each a contiguous copy of its own.
    """
    device = torch.device(device)
    storages: dict[tuple[int, torch.dtype], Tensor] = {}

    def move(t: Tensor) -> Tensor:
        if t.device == device or (device.index is None and t.device.type == device.type):
            return t
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in storages:  # the storage as one flat tensor of t's dtype, copied element for element
            storages[key] = t.new_empty(0).set_(t.untyped_storage()).to(device)
        return storages[key].as_strided(t.shape, t.stride(), t.storage_offset())

    def walk(o):
        if isinstance(o, torch.Tensor):
            return move(o)
        if isinstance(o, (tuple, list)):
            return type(o)(walk(x) for x in o)
        return o

    return walk(obj)


def upcast(obj):
    """float32 copies of every floating tensor in a (nested) argument structure."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(upcast(o) for o in obj)
    return obj


def error_bound(ref32: Tensor, naive: Tensor, dtype: torch.dtype) -> float:
    ref32 = ref32.cpu()
    scale = max(1.0, ref32.abs().max().item()) if ref32.numel() else 1.0
    floor = _FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * scale
    return 2.0 * (naive.float().cpu() - ref32).abs().max().item() + floor


def assert_within(out: Tensor, ref32: Tensor, bound: float, name: str) -> None:
    """Fail with the count and first positions of the elements farther than `bound` from `ref32`.

    Compared on the CPU: `out` may live on the GPU, the reference does not (module docstring)."""
    out, ref32 = out.detach().cpu(), ref32.cpu()
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref32.shape)}"
    err = (out.float() - ref32).abs()
    bad = ~(err <= bound)  # NaN counts as bad
    n_bad = int(bad.sum())
    if n_bad:
        idx = bad.nonzero()[:5].tolist()
        worst = err.nan_to_num(float("inf")).argmax().item()
        worst_idx = list(torch.unravel_index(torch.tensor(worst), err.shape))
        raise AssertionError(
            f"{name}: {n_bad}/{err.numel()} elements differ by more than {bound:.3g} "
            f"(max {err.max().item():.3g} at {[int(i) for i in worst_idx]}); first at {idx}; "
            f"out={out.flatten()[worst].item():.6g} ref={ref32.flatten()[worst].item():.6g}"
        )


def check_op(name: str, out: Tensor, ref32: Tensor, naive: Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype, f"{name}: output dtype {out.dtype}, expected {dtype}"
    assert_within(out, ref32, error_bound(ref32, naive, dtype), name)


def kernel_device() -> torch.device:
    """Where the kernel tests run: the GPU when the kernels are compiled for it, else the CPU interpreter.

    tests/conftest.py sets TRITON_INTERPRET=1 only on machines without CUDA, so on a GPU machine the
    same tests compare the compiled kernels with their references (inputs are drawn on a CPU
    generator and moved, so both machines test the same numbers).
    """
    from triton.runtime.interpreter import InterpretedFunction

    from . import norm

    interpreted = isinstance(norm._modulate_layernorm_kernel, InterpretedFunction)
    return torch.device("cpu" if interpreted or not torch.cuda.is_available() else "cuda")
