"""The Wan VAE's channel RMS norm followed by SiLU, in one pass over a full-resolution activation.

Spec: `helios_rt.model.vae_blocks.rms_norm_silu` (`silu(x / max(|x|_C, eps) * scale * gamma)`, |x|_C the L2
norm over channels). The PyTorch form reads the activation once for the norm and then makes three more
read+write passes (scale, gain, SiLU); at 384x640 the decoder's last level holds 96 channels x 33 frames x
384 x 640 values (1.6 GB in bf16) per activation, so those passes are the memory-bound part of a residual
block. Here one program loads a tile of pixels with all their channels, reduces in float32, and writes the
activated result once, in the output dtype: 1 read + 1 write.

Layout: `[B, C, T, H, W]` with any strides; channels-last (`torch.channels_last_3d`, channel stride 1) is
the fast one (each pixel's channels are one contiguous, coalesced row). The output may be a strided view,
such as the body of a causal conv's time-padded input buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, Tensor, check, check_out, check_tensor, fused_op, next_pow2

EPS = 1e-12  # F.normalize's eps, as the reference (diffusers `WanRMS_norm`) uses it
MAX_C = 2048
TILE_ELEMS = 4096  # values per program: BLOCK_R pixels x BLOCK_C channels (32 fp32 per thread at 4 warps)


@triton.jit
def _rms_norm_silu_kernel(
    x_ptr, g_ptr, out_ptr,
    n_rows, C, T, H, W, scale, eps,
    sxb, sxc, sxt, sxh, sxw, sob, soc, sot, soh, sow,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: B*T*H*W*C can pass 2^31
    w = rows % W
    r = rows // W
    h = r % H
    r = r // H
    t = r % T
    b = r // T
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < C)[None, :]
    x_row = b * sxb + t * sxt + h * sxh + w * sxw
    x = tl.load(x_ptr + x_row[:, None] + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    factor = scale / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)
    g = tl.load(g_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    y = x * factor[:, None] * g[None, :]
    y = y * tl.sigmoid(y)
    o_row = b * sob + t * sot + h * soh + w * sow
    tl.store(out_ptr + o_row[:, None] + cols[None, :] * soc, y.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(c: int) -> dict:
    """Tile sizes for `c` channels: the whole channel row in one block, pixels to fill TILE_ELEMS."""
    block_c = next_pow2(c)
    return {"BLOCK_R": max(1, TILE_ELEMS // block_c), "BLOCK_C": block_c, "num_warps": 4}


def rms_norm_silu(x: Tensor, gamma: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
    """Triton `rms_norm_silu`. x: `[B, C, T, H, W]` in any float dtype and any strides (channel stride 1,
    i.e. `channels_last_3d`, is the fast layout); gamma: C values (`[C]` or the module's `[C, 1, 1, 1]`),
    contiguous, any float dtype (upcast in the kernel); out: `[B, C, T, H, W]` in x.dtype with any strides,
    allocated like x (channels-last stays channels-last) if None. Statistics and affine in float32."""
    check_tensor("x", x, dtype=FLOAT_DTYPES)
    check(x.dim() == 5, f"x must be [B, C, T, H, W], got shape {tuple(x.shape)}")
    c = x.shape[1]
    check(c <= MAX_C, f"x: C={c} exceeds the single-block limit {MAX_C}")
    check_tensor("gamma", gamma, dtype=FLOAT_DTYPES, contiguous=True, device=x.device)
    check(gamma.numel() == c, f"gamma must have C={c} values, got shape {tuple(gamma.shape)}")
    if out is None:
        out = torch.empty_like(x)  # preserve_format: a channels-last x gives a channels-last out
    check_out(out, tuple(x.shape), x.dtype, x.device)
    if x.numel():
        _rms_norm_silu_launch(x, gamma.reshape(c), float(scale), out)
    return out


@fused_op("vae_rms_norm_silu", mutates=("out",))
def _rms_norm_silu_launch(x: Tensor, gamma: Tensor, scale: float, out: Tensor) -> None:
    b, c, t, h, w = x.shape
    cfg = launch_config(c)
    n_rows = b * t * h * w
    _rms_norm_silu_kernel[(triton.cdiv(n_rows, cfg["BLOCK_R"]),)](
        x, gamma, out, n_rows, c, t, h, w, scale, EPS,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3), out.stride(4), **cfg,
    )  # fmt: skip
