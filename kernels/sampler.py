"""Sampler kernels: the flow step (unpatchify fused into the load), the stage transition, CFG combine.

All three are memory-bound elementwise passes over latents `[B, C, T, H, W]` (a few MB); fusing them
removes the unpatchify copy, the float64 temporaries and the upsampled intermediate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from helios_rt.ops.registry import register_impl

from ._common import FLOAT_DTYPES, Tensor, check, check_out, check_tensor, fused_op, next_pow2


@triton.jit
def _flow_step_kernel(
    v_ptr, x_ptr, start_ptr, out_ptr, sigma_t_ptr, sigma_next_ptr,
    C, T, H, W, svb, svl,
    PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    # One program: all channels of one latent row (b, t, h) x BLOCK_W columns. The latents side is
    # contiguous along w; the token side is contiguous along c (channels are fastest in a token).
    row = tl.program_id(0)
    b = row // (T * H)
    t = (row // H) % T
    h = row % H
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.arange(0, BLOCK_C)
    token = ((t // PT) * (H // PH) + h // PH) * (W // PW) + w // PW
    sub = ((t % PT) * PH + h % PH) * PW + w % PW
    mask = (c[:, None] < C) & (w[None, :] < W)
    v_off = b.to(tl.int64) * svb + token[None, :].to(tl.int64) * svl + sub[None, :] * C + c[:, None]
    x_off = ((b * C + c[:, None]).to(tl.int64) * T + t) * H * W + h * W + w[None, :]
    v = tl.load(v_ptr + v_off, mask=mask, other=0.0).to(tl.float32).to(tl.float64)
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32).to(tl.float64)
    st = tl.load(sigma_t_ptr).to(tl.float64)
    sn = tl.load(sigma_next_ptr).to(tl.float64)
    # float64 like the DMD scheduler (via fp32: bf16 widens exactly); the pass is memory-bound.
    x0 = x - st * v
    s = tl.load(start_ptr + x_off, mask=mask, other=0.0).to(tl.float32).to(tl.float64)
    r = tl.where(sn < 0, x0, (1.0 - sn) * x0 + sn * s)
    tl.store(out_ptr + x_off, r.to(tl.float32).to(out_ptr.dtype.element_ty), mask=mask)


def flow_step_config(c: int, w: int) -> dict:
    block_c = next_pow2(c)
    return {"BLOCK_C": block_c, "BLOCK_W": max(1, min(next_pow2(w), 2048 // block_c)), "num_warps": 4}


@register_impl("flow_step", "triton")
def flow_step(
    v_patch: Tensor,
    x: Tensor,
    start: Tensor,
    sigma_t: Tensor,
    sigma_next: Tensor,
    patch: tuple[int, int, int],
    out: Tensor | None = None,
) -> Tensor:
    """Triton `flow_step`. v_patch: `[B, T/pt*H/ph*W/pw, pt*ph*pw*C]` (unit stride last); x, start, out:
    `[B, C, T, H, W]` contiguous; sigma_t, sigma_next: 1-element float32 or float64 (the sampler's plan
    values; read as float64 either way; sigma_next < 0: return x0)."""
    check_tensor("x", x, dtype=FLOAT_DTYPES, contiguous=True)
    check(x.dim() == 5, f"x must be [B, C, T, H, W], got shape {tuple(x.shape)}")
    b, c, t, h, w = x.shape
    pt, ph, pw = (int(p) for p in patch)
    check(t % pt == 0 and h % ph == 0 and w % pw == 0, f"x shape {tuple(x.shape)} not divisible by patch {patch}")
    n_tok, n_ch = (t // pt) * (h // ph) * (w // pw), pt * ph * pw * c
    check_tensor("v_patch", v_patch, (b, n_tok, n_ch), FLOAT_DTYPES, inner_contiguous=True, device=x.device)
    check_tensor("start", start, tuple(x.shape), FLOAT_DTYPES, contiguous=True, device=x.device)
    for name, s in (("sigma_t", sigma_t), ("sigma_next", sigma_next)):
        check_tensor(name, s, dtype=(torch.float32, torch.float64), device=x.device)
        check(s.numel() == 1, f"{name} must have exactly one element, got shape {tuple(s.shape)}")
    out = check_out(out, tuple(x.shape), x.dtype, x.device, contiguous=True)
    if x.numel():
        _flow_step_launch(v_patch, x, start, sigma_t, sigma_next, [pt, ph, pw], out)
    return out


@fused_op("flow_step", mutates=("out",))
def _flow_step_launch(
    v_patch: Tensor, x: Tensor, start: Tensor, sigma_t: Tensor, sigma_next: Tensor, patch: list[int], out: Tensor
) -> None:
    b, c, t, h, w = x.shape
    cfg = flow_step_config(c, w)
    grid = (b * t * h, triton.cdiv(w, cfg["BLOCK_W"]))
    _flow_step_kernel[grid](
        v_patch, x, start, out, sigma_t, sigma_next, c, t, h, w,
        v_patch.stride(0), v_patch.stride(1), PT=patch[0], PH=patch[1], PW=patch[2], **cfg,
    )  # fmt: skip


@triton.jit
def _stage_transition_kernel(
    x_ptr, noise_ptr, out_ptr, H, W, alpha, beta, BLOCK_W: tl.constexpr
):  # fmt: skip
    orow = tl.program_id(0)  # over B*C*T*2H output rows
    ow = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = ow < 2 * W
    irow = (orow // (2 * H)) * H + (orow % (2 * H)) // 2
    x = tl.load(x_ptr + irow.to(tl.int64) * W + ow // 2, mask=mask, other=0.0).to(tl.float32)
    o_off = orow.to(tl.int64) * 2 * W + ow
    n = tl.load(noise_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + o_off, (alpha * x + beta * n).to(out_ptr.dtype.element_ty), mask=mask)


def stage_transition_config(w: int) -> dict:
    return {"BLOCK_W": min(1024, next_pow2(2 * w)), "num_warps": 4}


@register_impl("stage_transition", "triton")
def stage_transition(x: Tensor, block_noise: Tensor, alpha: float, beta: float, out: Tensor | None = None) -> Tensor:
    """Triton `stage_transition`. x: `[B, C, T, H, W]`; block_noise, out: `[B, C, T, 2H, 2W]`; all
    contiguous; alpha, beta: Python floats (per-stage constants)."""
    check_tensor("x", x, dtype=FLOAT_DTYPES, contiguous=True)
    check(x.dim() == 5, f"x must be [B, C, T, H, W], got shape {tuple(x.shape)}")
    b, c, t, h, w = x.shape
    up = (b, c, t, 2 * h, 2 * w)
    check_tensor("block_noise", block_noise, up, FLOAT_DTYPES, contiguous=True, device=x.device)
    out = check_out(out, up, x.dtype, x.device, contiguous=True)
    if x.numel():
        _stage_transition_launch(x, block_noise, float(alpha), float(beta), out)
    return out


@fused_op("stage_transition", mutates=("out",))
def _stage_transition_launch(x: Tensor, block_noise: Tensor, alpha: float, beta: float, out: Tensor) -> None:
    b, c, t, h, w = x.shape
    cfg = stage_transition_config(w)
    grid = (b * c * t * 2 * h, triton.cdiv(2 * w, cfg["BLOCK_W"]))
    _stage_transition_kernel[grid](x, block_noise, out, h, w, alpha, beta, **cfg)


CFG_CHUNK = 4096


@triton.jit
def _cfg_partials_kernel(pred_ptr, part_ptr, N, B, NC, BLOCK: tl.constexpr):
    # Pass 1 of CFG-Zero*: per (sample, chunk) partial <cond, uncond> and ||uncond||^2, no atomics.
    # pred is [cond (B); uncond (B)], the order of sampling.guidance.split_cond_uncond.
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    off = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = off < N
    c = tl.load(pred_ptr + b.to(tl.int64) * N + off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(pred_ptr + (b + B).to(tl.int64) * N + off, mask=mask, other=0.0).to(tl.float32)
    base = (b * NC + chunk) * 2
    tl.store(part_ptr + base, tl.sum(u * c, axis=0))
    tl.store(part_ptr + base + 1, tl.sum(u * u, axis=0))


@triton.jit
def _cfg_apply_kernel(
    pred_ptr, part_ptr, out_ptr, N, B, NC, scale,
    ZERO_STAR: tl.constexpr, NC_POW2: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    off = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = off < N
    c = tl.load(pred_ptr + b.to(tl.int64) * N + off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(pred_ptr + (b + B).to(tl.int64) * N + off, mask=mask, other=0.0).to(tl.float32)
    if ZERO_STAR:
        j = tl.arange(0, NC_POW2)
        pm = j < NC
        dot = tl.sum(tl.load(part_ptr + (b * NC + j) * 2, mask=pm, other=0.0), axis=0)
        nrm = tl.sum(tl.load(part_ptr + (b * NC + j) * 2 + 1, mask=pm, other=0.0), axis=0)
        # The pipeline rounds the optimised scale to the prediction dtype before using it.
        a = (dot / (nrm + 1e-8)).to(out_ptr.dtype.element_ty).to(tl.float32)
        u = u * a
    tl.store(out_ptr + b.to(tl.int64) * N + off, (u + scale * (c - u)).to(out_ptr.dtype.element_ty), mask=mask)


@register_impl("cfg_combine", "triton")
def cfg_combine(pred: Tensor, scale: float, zero_star: bool, out: Tensor | None = None) -> Tensor:
    """Triton `cfg_combine`. pred: `[2B, ...]` = `[cond; uncond]` contiguous; out: `[B, ...]` in
    pred.dtype contiguous. CFG-Zero* runs two passes: per-chunk partial sums, then combine."""
    check_tensor("pred", pred, dtype=FLOAT_DTYPES, contiguous=True)
    check(pred.dim() >= 1 and pred.shape[0] % 2 == 0, f"pred must be [2B, ...], got {tuple(pred.shape)}")
    b = pred.shape[0] // 2
    shape = (b, *pred.shape[1:])
    out = check_out(out, shape, pred.dtype, pred.device, contiguous=True)
    n = pred[0].numel() if b else 0
    if n == 0:
        return out
    nc = triton.cdiv(n, CFG_CHUNK)
    part = torch.empty((b, nc, 2), dtype=torch.float32, device=pred.device)  # scratch, planned like out
    _cfg_combine_launch(pred, float(scale), bool(zero_star), part, out)
    return out


@fused_op("cfg_combine", mutates=("part", "out"))
def _cfg_combine_launch(pred: Tensor, scale: float, zero_star: bool, part: Tensor, out: Tensor) -> None:
    b, nc = part.shape[0], part.shape[1]
    n = pred[0].numel()
    if zero_star:
        _cfg_partials_kernel[(b, nc)](pred, part, n, b, nc, BLOCK=CFG_CHUNK, num_warps=8)
    _cfg_apply_kernel[(b, nc)](
        pred, part, out, n, b, nc, scale,
        ZERO_STAR=zero_star, NC_POW2=next_pow2(nc), BLOCK=CFG_CHUNK, num_warps=8,
    )  # fmt: skip
