"""Attention backends timed at the 14B stage-2 self-attention shape: TFLOP/s from the shape, GPU work timed
with CUDA events (the projection's rates in `compile.cost.attention_rates` are what this measures)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import attention_backends as AB
from ..ops.attention_tuning import median_ms
from ..ops.reference import attention_flops
from .table import Row

STAGE2 = (1, 11040, 40, 128)  # batch, tokens (2400 history + 8640 noisy), heads, head dim


@dataclass(frozen=True)
class AttentionTiming:
    backend: str
    ms: float  # median of `iters` calls
    tflops: float


def time_backend(name: str, q: torch.Tensor, iters: int = 10) -> AttentionTiming:
    """Median time of `iters` calls of backend `name` on q = k = v (a warm-up call first: Triton autotunes),
    timed like the engine's warm-up times them (`ops.attention_tuning.median_ms`)."""
    fn = AB.implementation(name)
    out = torch.empty_like(q)
    fn(q, q, q, out=out)
    ms = median_ms(lambda: fn(q, q, q, out=out), q.device, iters)
    b, n, h, d = q.shape
    return AttentionTiming(name, ms, attention_flops(b, n, n, h, d) / (ms * 1e-3) / 1e12)


def measure_backends(
    device: str = "cuda", shape: tuple[int, int, int, int] = STAGE2, dtype: torch.dtype = torch.bfloat16
) -> tuple[list[AttentionTiming], dict[str, str]]:
    """Every backend that can run on `device`, timed at `shape`; and why each other one was skipped."""
    env = AB.probe_env(device)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(shape, generator=g).to(device, dtype)
    timings, skipped = [], {}
    for name in (*AB.AUTO_ORDER, "reference"):
        why = AB.BACKENDS[name].reason(env, dtype, shape[-1])
        if why is None:
            timings.append(time_backend(name, q))
        else:
            skipped[name] = why
    return timings, skipped


def attention_rows(device: str = "cuda") -> list[Row]:
    timings, _ = measure_backends(device)
    return [Row("gpu", f"attention {t.backend} at stage 2 (11040 tokens, 40x128)", t.tflops, None, "TFLOP/s")
            for t in timings]  # fmt: skip
