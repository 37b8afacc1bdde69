"""Every attention backend that runs on this GPU, and the FP8 product, at the 14B's own shapes, against
their references (gpu: first light runs them; skipped without CUDA).

The CPU tests check the Triton kernel on the interpreter and the library adapters through their
signatures only; these are the checks that the real libraries (FlashAttention-2/3, PyTorch's SDPA
backends, cuBLASLt's `_scaled_mm`) compute what the references compute at the sizes the engine runs.
Inputs are drawn on a CPU generator. At these sizes the references run on the GPU (the CPU would take
minutes): attention in float32 with TF32 off (asserted), the FP8 product in float64.
"""

from __future__ import annotations

import pytest
import torch
from helios_rt.kernels.testing import assert_within, error_bound

from helios_rt.fp8.format import FP8_DTYPE, quantize_rows
from helios_rt.fp8.linear import FP8Linear
from helios_rt.ops import attention_backends as ab
from helios_rt.ops import reference as ref

NO_CUDA = not torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")]

HEADS, HEAD_DIM = 40, 128  # Helios 14B: 5120 = 40 heads x 128
# 384x640, 1+1+1 steps (HELIOS.md "Cost of one steady-state chunk"): self-attention over history + noisy
# tokens at stage 0 and stage 2, and the noisy tokens' cross-attention to the 512 text tokens; batch 2 is CFG
SHAPES = {"stage 0 self": (1, 2940, 2940), "stage 2 self": (1, 11040, 11040), "cross, CFG": (2, 8640, 512)}


def _runnable() -> list[str]:
    """The backends the engine's own probe accepts on this device for bf16 at head dim 128."""
    if NO_CUDA:
        return []
    env = ab.probe_env("cuda")
    ok = [name for name, b in ab.BACKENDS.items() if b.reason(env, torch.bfloat16, HEAD_DIM) is None]
    return [name for name in ok if name != "reference"]


def _draw(b: int, lq: int, lk: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(lq * 7 + lk)
    q = torch.randn(b, lq, HEADS, HEAD_DIM, generator=g).bfloat16()
    k, v = (torch.randn(b, lk, HEADS, HEAD_DIM, generator=g).bfloat16() for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("backend", _runnable() or ["none"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_attention_backend_at_the_14b_shapes(backend: str, shape: str) -> None:
    """Each runnable backend writes the planned `out` and is within the kernel-test bound of the float32
    reference; the bound's `naive` is the reference run in bfloat16, as for the Triton kernel's tests."""
    if backend == "none":
        pytest.skip("no attention backend runs here")
    b, lq, lk = SHAPES[shape]
    q, k, v = _draw(b, lq, lk)
    qd, kd, vd = (t.cuda() for t in (q, k, v))
    assert not torch.backends.cuda.matmul.allow_tf32, "the float32 reference needs TF32 off"
    ref32 = ref.attention(qd.float(), kd.float(), vd.float()).cpu()
    naive = ref.attention(qd, kd, vd).cpu()  # float32 scores, bf16 output: what bf16 itself delivers
    impl = ab.implementation(backend)
    out = torch.full_like(qd, float("nan"))
    assert impl(qd, kd, vd, out=out).data_ptr() == out.data_ptr()
    assert_within(out, ref32, error_bound(ref32, naive, torch.bfloat16), f"{backend} {shape}")


@pytest.mark.parametrize("m,k,n", [(8640, 5120, 5120), (8640, 5120, 13824), (8640, 13824, 5120)])
def test_scaled_mm_at_the_14b_shapes(m: int, k: int, n: int) -> None:
    """FP8Linear's `_scaled_mm` (e4m3 rows x e4m3 channels, float32 scales, bias, bf16 out) against the
    same dequantised operands multiplied in float64: the difference is the float32 accumulation over K
    terms (K * 2^-24 * sum|a||w|) and the bf16 output's rounding (2^-8 |y|), plus one more bf16 rounding
    of the product (2^-8 |a w^T|) where the epilogue adds the bias after rounding (cuBLASLt may).
    use_fast_accum stays off here, as in FP8Linear."""
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g).bfloat16()
    linear = torch.nn.Linear(k, n, bias=True).to(torch.bfloat16)
    fp8 = FP8Linear.from_linear(linear).cuda()
    y = fp8(x.cuda())
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    xq, xs = quantize_rows(x.cuda())  # what FP8Linear does to a float input
    assert xq.dtype == FP8_DTYPE
    a = xq.double() * xs.double()
    w = fp8.weight.double() * fp8.weight_scale.double()[:, None]
    magnitude = a.abs() @ w.abs().T
    exact = a @ w.T + fp8.bias.double()
    bias = fp8.bias.double()
    bound = k * 2.0**-24 * magnitude + 2.0**-8 * (exact.abs() + (exact - bias).abs()) + 1e-30
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), f"_scaled_mm [{m}x{k}]@[{k}x{n}]: max excess {(err - bound).max().item():.3g}"
