"""Classifier-free guidance for Helios: plain CFG (base) and CFG-Zero* (mid, pyramid pipeline).

The reference runs the conditional and unconditional forwards separately; a runtime that batches
them gets one `[2B, ...]` output. `split_cond_uncond` documents our stacking order, `[cond; uncond]`,
and returns views, so the combine functions take the two halves and never copy.
Arithmetic follows the reference's dtypes: CFG-Zero*'s scale is computed in float32 and rounded
to the prediction's dtype before it is applied.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def split_cond_uncond(pred: Tensor) -> tuple[Tensor, Tensor]:
    """Views (cond, uncond) of a batch-2 prediction stacked `[cond (B); uncond (B)]` along dim 0."""
    if pred.shape[0] % 2:
        raise ValueError(f"pred must stack [cond; uncond] along dim 0, got an odd batch of {pred.shape[0]}")
    half = pred.shape[0] // 2
    return pred[:half], pred[half:]


def _check_pair(cond: Tensor, uncond: Tensor, out: Tensor | None) -> None:
    if cond.shape != uncond.shape or cond.dtype != uncond.dtype:
        raise ValueError(
            f"cond {tuple(cond.shape)} {cond.dtype} and uncond {tuple(uncond.shape)} {uncond.dtype} must match"
        )
    if out is not None and out.shape != cond.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(cond.shape)}")


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
    """Plain CFG: `uncond + scale * (cond - uncond)`, in the predictions' dtype."""
    _check_pair(cond, uncond, out)
    r = uncond + scale * (cond - uncond)
    return r if out is None else out.copy_(r)


def optimized_scale(cond: Tensor, uncond: Tensor) -> Tensor:
    """CFG-Zero*'s per-sample projection `<cond, uncond> / (||uncond||^2 + 1e-8)`, float32 `[B, 1]`.

    The scale s* that best explains cond by uncond: guiding from `s* uncond` instead of `uncond`
    keeps early, inaccurate velocity estimates from being amplified.
    """
    b = cond.shape[0]
    pos, neg = cond.reshape(b, -1).float(), uncond.reshape(b, -1).float()
    return torch.sum(pos * neg, dim=1, keepdim=True) / (torch.sum(neg**2, dim=1, keepdim=True) + 1e-8)


def cfg_zero_star(
    cond: Tensor, uncond: Tensor, scale: float, zero: Tensor | bool = False, out: Tensor | None = None
) -> Tensor:
    """CFG-Zero*: `s* uncond + scale * (cond - s* uncond)`, or zeros on a zero-init step.

    zero: a bool (planned on the host) or a 0-dim bool tensor (graph-safe, from
    `zero_init_steps`); on those steps the reference returns `cond * 0.0` (signed zeros, NaN kept).
    """
    _check_pair(cond, uncond, out)
    shape = (cond.shape[0],) + (1,) * (cond.dim() - 1)
    a = optimized_scale(cond, uncond).view(shape).to(cond.dtype)
    guided = uncond * a + scale * (cond - uncond * a)
    if isinstance(zero, Tensor):
        r = torch.where(zero.reshape(()), cond * 0.0, guided)
    else:
        r = cond * 0.0 if zero else guided
    return r if out is None else out.copy_(r)


def zero_init_steps(stage: int, num_steps: int, zero_steps: int = 1, use_zero_init: bool = True) -> Tensor:
    """Bool `[num_steps]`: which steps of `stage` CFG-Zero* zeroes. As the reference: only stage 0 and
    steps `i <= zero_steps` (so zero_steps=1 zeroes the first two steps)."""
    if num_steps < 1 or zero_steps < 0:
        raise ValueError(f"num_steps={num_steps} must be >= 1 and zero_steps={zero_steps} >= 0")
    i = torch.arange(num_steps)
    return (i <= zero_steps) & bool(use_zero_init and stage == 0)
