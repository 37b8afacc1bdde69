"""The FP8 numeric gate: how far FP8 may move a layer, a video's latents and its frames.

The bounds come from e4m3's precision, u = 2^-4 (half the spacing of 3 mantissa bits):
- per layer: a linear's output from two rounded operands moves each product x_k w_k by at most
  (2u + u^2)|x_k||w_k|; without cancellation that is the relative error of the sum, so
  `LAYER_REL_BOUND` = 2u + u^2 ~ 0.129 bounds the relative L2 error of any one linear. Rounding errors
  are independent and centred, so measured errors sit far below it (about u/sqrt(3) ~ 0.036);
- end to end: the latents after 3 chunks (every block, step and stage, fed back through the history)
  may not drift further than one such product, `LATENT_DRIFT_BOUND` = 2u = 0.125 relative L2: errors
  must not accumulate through the 40 blocks and the autoregressive history;
- frames: decoded frames span [-1, 1] (peak 2) with RMS at most 1, so a relative error of 2u gives
  an RMS error of at most 2u and a PSNR of at least 20 log10(2 / 2u) = 24.1 dB (`FRAME_PSNR_MIN`,
  in uint8 terms the same ratio).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .format import UNIT_ROUNDOFF
from .linear import FP8Linear, block_linear_names

LAYER_REL_BOUND = 2 * UNIT_ROUNDOFF + UNIT_ROUNDOFF**2
LATENT_DRIFT_BOUND = 2 * UNIT_ROUNDOFF
FRAME_PSNR_MIN = 20 * math.log10(2 / (2 * UNIT_ROUNDOFF))


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error `|x - ref| / |ref|` in float64."""
    ref = ref.double()
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def psnr(frames: np.ndarray, ref: np.ndarray) -> float:
    """PSNR in dB of uint8 frames against reference uint8 frames (inf when equal)."""
    mse = float(np.mean((frames.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@dataclass(frozen=True)
class GateResult:
    """One gate run: the worst per-layer error (and its layer), the latent drift and the frame PSNR."""

    worst_layer: str
    worst_layer_error: float
    mean_layer_error: float
    latent_drift: float | None = None
    frame_psnr: float | None = None

    def passes(self) -> bool:
        ok = self.worst_layer_error <= LAYER_REL_BOUND
        if self.latent_drift is not None:
            ok &= self.latent_drift <= LATENT_DRIFT_BOUND
        if self.frame_psnr is not None:
            ok &= self.frame_psnr >= FRAME_PSNR_MIN
        return bool(ok)


FFN_UP = ".net.0.proj"  # the FFN up-projection, inside `linear_gelu_tanh` in the reference model


def layer_errors(reference: nn.Module, fp8: nn.Module, run: Callable[[], object]) -> dict[str, float]:
    """Per block linear: the relative error of the FP8 layer against the reference layer, both fed the
    reference model's own input to it while `run()` drives the reference model (so the errors do not
    compound: each layer is measured in isolation, on realistic activations).

    The reference FFN's up-projection runs inside the fused `linear_gelu_tanh` op (its GELU in the GEMM's
    epilogue), not as a module call: its input is the FFN's input, taken by a pre-hook on the FFN, and its
    reference output is the layer called on it."""
    names = block_linear_names(reference)
    errors: dict[str, list[float]] = {n: [] for n in names}
    handles = []
    for name in names:
        layer = fp8.get_submodule(name)
        if not isinstance(layer, FP8Linear):
            raise ValueError(f"{name} of the FP8 model is a {type(layer).__name__}, not an FP8Linear")
        ref_layer = reference.get_submodule(name)
        if name.endswith(FFN_UP):

            def pre_hook(_m, args, name=name, layer=layer, ref_layer=ref_layer):
                errors[name].append(relative_error(layer(args[0]), ref_layer(args[0])))

            handles.append(reference.get_submodule(name.removesuffix(FFN_UP)).register_forward_pre_hook(pre_hook))
            continue

        def hook(_m, args, out, name=name, layer=layer):
            errors[name].append(relative_error(layer(args[0]), out))

        handles.append(ref_layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return {n: max(e) for n, e in errors.items() if e}
