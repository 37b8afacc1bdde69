"""`FP8Linear`: an e4m3 weight with per-output-channel scales, multiplied by `torch._scaled_mm`.

Activations are quantised per token: either by the kernel that produced them (a fused op hands over
an `FP8Activation`) or, for a plain tensor, here with the reference quantisation. The product runs
as one `_scaled_mm` (e4m3 x e4m3, float32 accumulation, the bias added, the model dtype out); it has
an out= form and a meta implementation, so the memory planner plans it like any other op.

Per token, not per 128-block: on a 14B-shaped block with random weights of trained scale and 30x
channel spread (`bench/bench_fp8.py`), 128-blocks lower the per-layer relative error only from 0.037 to
0.036, while per-token (row) scales are what `_scaled_mm`'s row-wise mode applies in its epilogue (a
block-scaled product would need a K-loop of products or a block-scaled GEMM kernel).

Only the linears inside the transformer blocks are quantised (`quantize_blocks_`): they are two
thirds of a chunk's FLOPs and nearly all of its weight bytes. Embeddings, the output projection,
norms and modulation keep the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .format import FP8_DTYPE, quantize_rows, quantize_weight

Tensor = torch.Tensor


@dataclass
class FP8Activation:
    """A per-token quantised activation: e4m3 `data` `[..., K]` and float32 `scale` `[..., 1]`."""

    data: Tensor
    scale: Tensor

    @classmethod
    def of(cls, pair: tuple[Tensor, Tensor]) -> FP8Activation:
        return cls(*pair)


class FP8Linear(nn.Module):
    """`y = (x_q * s_x) @ (w_q * s_w)^T + bias`: e4m3 weight `[N, K]`, float32 `weight_scale` `[N]`.

    The output dtype is the bias dtype (the model dtype). Parameters are named so that a quantised
    checkpoint stores `<linear>.weight` (F8_E4M3), `<linear>.weight_scale` (F32) and `<linear>.bias`.

    use_fast_accum: `_scaled_mm`'s flag, off by default (float32 accumulation). Hopper's fast mode
    accumulates in reduced precision; first light measures it against the gate before it may become a
    default. Set it with `set_fast_accum` before a chunk is captured: a graph keeps the mode it was
    captured with.
    """

    use_fast_accum: bool = False

    def __init__(self, in_features: int, out_features: int, bias_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """Quantise a float `nn.Linear` (with bias); on meta only the shapes and dtypes are made."""
        if linear.bias is None:
            raise ValueError("FP8Linear needs a linear with a bias (every Helios block linear has one)")
        w = linear.weight.detach()
        with torch.device(w.device):
            fp8 = cls(linear.in_features, linear.out_features, linear.bias.dtype)
        if not w.is_meta:
            fp8.set_weight(w)
            fp8.bias.data = linear.bias.detach().clone()
        return fp8

    @torch.no_grad()
    def set_weight(self, weight: Tensor) -> None:
        """Quantise a float `[N, K]` weight into this layer (per output channel)."""
        q, scale = quantize_weight(weight)
        self.weight.data, self.weight_scale.data = q, scale

    def forward(self, x: Tensor | FP8Activation) -> Tensor:
        act = x if isinstance(x, FP8Activation) else FP8Activation.of(quantize_rows(x))
        k = act.data.shape[-1]
        if k != self.in_features:
            raise ValueError(f"FP8Linear expects {self.in_features} input features, got {k}")
        lead = act.data.shape[:-1]
        a = act.data.reshape(-1, k)
        y = torch._scaled_mm(
            a,
            self.weight.t(),
            act.scale.reshape(-1, 1),
            self.weight_scale.view(1, -1),
            bias=self.bias,
            out_dtype=self.bias.dtype,
            use_fast_accum=self.use_fast_accum,
        )
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 per-channel"


def require_fp8_support(device: torch.device | str, dtype: torch.dtype) -> None:
    """Refuse precision="fp8" where `torch._scaled_mm` cannot run this model's products, before any weight
    is read: GPUs before sm_89, a float32 output with a bias on CUDA, CPU PyTorch before 2.13 (no per-row
    scales) each fail deep inside the first chunk otherwise. One tiny product, as FP8Linear runs it."""
    device = torch.device(device)
    a = torch.ones(16, 32, device=device).to(FP8_DTYPE)
    w = torch.ones(16, 32, device=device).to(FP8_DTYPE)
    try:
        torch._scaled_mm(a, w.t(), torch.ones(16, 1, device=device), torch.ones(1, 16, device=device),
                         bias=torch.zeros(16, device=device, dtype=dtype), out_dtype=dtype)  # fmt: skip
    except (RuntimeError, TypeError, NotImplementedError) as err:
        raise ValueError(
            f"precision='fp8' cannot run on {device} with dtype {str(dtype).removeprefix('torch.')} and torch "
            f"{torch.__version__} ({str(err).splitlines()[0][:160]}); use precision='native', or dtype='bfloat16' "
            "on an sm_89+ GPU (Ada, Hopper), or torch >= 2.13 on a CPU"
        ) from err


def set_fast_accum(model: nn.Module, enabled: bool) -> int:
    """Set `use_fast_accum` on every FP8Linear of `model`; returns how many there are."""
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    for layer in layers:
        layer.use_fast_accum = enabled
    return len(layers)


def block_linear_names(model: nn.Module) -> list[str]:
    """Module names of the linears `quantize_blocks_` quantises (every nn.Linear inside `model.blocks`)."""
    return [f"blocks.{name}" for name, m in model.blocks.named_modules() if isinstance(m, (nn.Linear, FP8Linear))]


def quantize_blocks_(model: nn.Module) -> nn.Module:
    """Replace every linear inside `model.blocks` by an `FP8Linear` (in place); mark the blocks as FP8."""
    for name in block_linear_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child) if not child.isdigit() else parent[int(child)]
        if isinstance(old, FP8Linear):
            continue
        new = FP8Linear.from_linear(old)
        if child.isdigit():
            parent[int(child)] = new
        else:
            setattr(parent, child, new)
    for block in model.blocks:
        block.fp8 = True
    model.precision = "fp8"
    return model
