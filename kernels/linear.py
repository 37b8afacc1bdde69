"""The FFN up projection with its tanh-GELU in the GEMM's epilogue (bf16/fp16/fp32), not a Triton kernel.

On CUDA this is cuBLASLt's GELU_BIAS epilogue, reached through `aten._addmm_activation(use_gelu=True)`:
the GELU (tanh approximation) is applied to the float32 accumulator before the one store, so the
`[B, L, ffn_dim]` projection is never written and re-read (41 GB per 14B chunk of 6 forwards). A Triton
GEMM would have to match cuBLAS at these shapes to pay for itself; the library's own epilogue keeps
cuBLAS's GEMM. Where the epilogue is not available PyTorch runs the GEMM then `gelu_(tanh)` in place,
which is still one buffer and no copy.

Elsewhere (CPU, the interpreter machines) `_addmm_activation` applies the *erf* GELU, so the op runs
the reference's own sequence there: addmm into `out`, then tanh-GELU in place, bit-equal to the spec.
"""

from __future__ import annotations

import torch

from helios_rt.ops.registry import register_impl

from ._common import FLOAT_DTYPES, Tensor, check, check_out, check_tensor, fused_op


def _rows(x: Tensor) -> Tensor:
    """`[B, L, D]` as the `[B*L, D]` matrix it already is in memory (no copy: rows must be evenly spaced)."""
    b, n, d = x.shape
    return x.as_strided((b * n, d), (x.stride(1), 1))


@register_impl("linear_gelu_tanh", "triton")
def linear_gelu_tanh(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    """`gelu_tanh(x @ weight.T + bias)`. x: `[B, L, D]`, unit stride in D and batch stride L x row stride
    (any row stride: one matrix); weight: `[H, D]` (nn.Linear's layout, any strides); bias: `[H]` or None;
    all in one dtype; out: `[B, L, H]` contiguous in x.dtype, allocated if None."""
    check_tensor("x", x, dtype=FLOAT_DTYPES, inner_contiguous=True)
    check(x.dim() == 3, f"x must be [B, L, D], got shape {tuple(x.shape)}")
    b, n, d = x.shape
    check(x.stride(0) == n * x.stride(1) or b == 1,
          f"x must be one matrix of rows (batch stride = L x row stride), got strides {x.stride()}; "
          "call .contiguous() first")  # fmt: skip
    check(weight.dim() == 2 and weight.shape[1] == d, f"weight must be [H, {d}], got shape {tuple(weight.shape)}")
    check_tensor("weight", weight, dtype=x.dtype, device=x.device)
    h = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, (h,), x.dtype, device=x.device)
    out = check_out(out, (b, n, h), x.dtype, x.device, contiguous=True)
    if x.numel():
        _linear_gelu_tanh_launch(x, weight, bias, out)
    return out


@fused_op("linear_gelu_tanh", mutates=("out",))
def _linear_gelu_tanh_launch(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> None:
    rows, result = _rows(x), out.view(-1, out.shape[-1])
    if x.device.type == "cuda" and bias is not None:
        torch._addmm_activation(bias, rows, weight.t(), use_gelu=True, out=result)
        return
    if bias is None:
        torch.mm(rows, weight.t(), out=result)
    else:
        torch.addmm(bias, rows, weight.t(), out=result)
    torch.ops.aten.gelu_(result, approximate="tanh")
