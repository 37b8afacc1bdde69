"""PyTorch references of the fused sampler ops (the spec their Triton kernels are tested against).

Latents are `[B, C, T, H, W]`. Scalars that change from step to step (sigmas) are 1-element float32
tensors so that a captured CUDA graph reads them from static buffers instead of baking them in.
"""

from __future__ import annotations

import torch

from .reference import _write
from .registry import register_reference

Tensor = torch.Tensor


def unpatchify(v_patch: Tensor, latent_shape: tuple[int, ...], patch: tuple[int, int, int]) -> Tensor:
    """`[B, T'*H'*W', pt*ph*pw*C]` tokens (channel fastest) -> `[B, C, T, H, W]`, as the Helios transformer."""
    b, c, t, h, w = latent_shape
    pt, ph, pw = patch
    v = v_patch.reshape(b, t // pt, h // ph, w // pw, pt, ph, pw, c)
    return v.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, t, h, w)


@register_reference("flow_step")
def flow_step(
    v_patch: Tensor,
    x: Tensor,
    start: Tensor,
    sigma_t: Tensor,
    sigma_next: Tensor,
    patch: tuple[int, int, int],
    out: Tensor | None = None,
) -> Tensor:
    """One few-step flow-matching step: `x0 = x - sigma_t * v`, then re-noise towards `start`.

    v_patch: `[B, L_noisy, pt*ph*pw*C]` transformer output before unpatchify (token order t, h, w;
    channels fastest within a token); x, start: `[B, C, T, H, W]`, same dtype; sigma_t, sigma_next:
    1-element float32 or float64 tensors (the sampler passes its float64 plan values). Returns
    `(1 - sigma_next) * x0 + sigma_next * start`, or `x0` when `sigma_next < 0` (the stage's last
    step), in x.dtype. Rounding as HeliosDMDScheduler (and `sampling.schedules.dmd_step`): x0 is
    computed in float64 and rounded to v's dtype, the re-noise is computed in float64 from that
    rounded x0 and rounded once to x.dtype.
    """
    v = unpatchify(v_patch, tuple(x.shape), patch).double()
    st = sigma_t.double().reshape(())
    sn = sigma_next.double().reshape(())
    x0 = (x.double() - st * v).to(v_patch.dtype)
    renoised = ((1 - sn) * x0.double() + sn * start.double()).to(x.dtype)
    r = torch.where(sn < 0, x0.to(x.dtype), renoised)
    return _write(r, out)


@register_reference("stage_transition")
def stage_transition(x: Tensor, block_noise: Tensor, alpha: float, beta: float, out: Tensor | None = None) -> Tensor:
    """Pyramid stage change: nearest 2x spatial upsample, then `alpha * up + beta * block_noise`.

    x: `[B, C, T, H, W]`; block_noise: `[B, C, T, 2H, 2W]` (the pipeline rounds it to the transformer
    dtype first). Rounding as the pipeline: `alpha * x` is rounded to x.dtype and `beta * block_noise`
    to block_noise.dtype, their sum is taken in float32 and the result is in x.dtype (exact for the
    float32 latents the sampler keeps).
    """
    up = (alpha * x).float().repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    r = up + (beta * block_noise).float()
    return _write(r.to(x.dtype), out)


@register_reference("cfg_combine")
def cfg_combine(pred: Tensor, scale: float, zero_star: bool, out: Tensor | None = None) -> Tensor:
    """Classifier-free guidance over a batch-2 prediction `[2B, ...]` = `[cond (B) ; uncond (B)]`.

    The stacking order is `sampling.guidance.split_cond_uncond`'s (the batched forward runs the
    conditional text first). Plain: `uncond + scale * (cond - uncond)`. CFG-Zero*: per sample
    `a = <cond, uncond> / (||uncond||^2 + 1e-8)` in float32, rounded to pred.dtype, then
    `a * uncond + scale * (cond - a * uncond)`. Each operation rounds to pred.dtype, as the Helios
    pipelines compute it (exact in float32); result `[B, ...]` in pred.dtype.
    """
    if pred.shape[0] % 2:
        raise ValueError(f"pred must stack [cond; uncond] along dim 0, got odd batch {pred.shape[0]}")
    cond, uncond = pred.chunk(2)
    if zero_star:
        b = uncond.shape[0]
        c, u = cond.reshape(b, -1).float(), uncond.reshape(b, -1).float()
        a = torch.sum(c * u, dim=1, keepdim=True) / (torch.sum(u**2, dim=1, keepdim=True) + 1e-8)
        a = a.view(b, *([1] * (pred.dim() - 1))).to(pred.dtype)
        uncond = uncond * a
    r = uncond + scale * (cond - uncond)
    return _write(r, out)
