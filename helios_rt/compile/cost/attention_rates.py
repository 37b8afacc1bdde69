"""The backend a plain install runs, the backend rows, and the calibration row that prices the
reference pipeline's op sequence against the paper's 19.5 FPS.

The attention rates (`projection.H100_ATTENTION`) are H100 SXM, bf16, head dim 128, long non-causal
sequences (the 14B stage-2 shape is 11040 tokens); each says where it comes from. Only FA3's and FA2's
are published measurements; ours is an estimate until a GPU measures it (`helios-rt bench --suite gpu`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from ...ops.attention_backends import AttentionEnv, AttentionSelection, select_attention
from .planned import PlannedChunk, vae_trace
from .projection import (  # the attention rates live beside the other rates; named here for the callers
    H100_ATTENTION,
    H100_SXM,
    H100_TF32_TFLOPS,
    PAPER_FPS,
    PAPER_STEPS,
    efficiency_for,
    project,
    trace_seconds,
)  # fmt: skip
from .shape import meta_transformer
from .tracer import CostTracer, Trace

H100_INSTALLED = frozenset({"triton"})  # `pip install helios_rt` on an H100: no flash-attn
H100_WITH_FA3 = frozenset({"flash_attn_interface", "flash_attn", "triton"})  # helios_rt[fa] + FA3's hopper/ build


def h100_selection(installed: frozenset[str] = H100_INSTALLED) -> AttentionSelection:
    """What the backend table runs on an H100 for the 14B (bf16, head dim 128) with `installed` (default: a
    plain install, no flash-attn)."""
    env = AttentionEnv("cuda", (9, 0), installed, "triton" in installed, "H100 SXM")
    return select_attention("auto", env, torch.bfloat16, 128)


def backend_lines(chunk: PlannedChunk, selected: str | None = None) -> list[str]:
    """One line per backend: the steady chunk's attention ops priced at its rate, and the end-to-end FPS.

    The plans of the backends differ only in the attention op's name (each is a `helios_rt::attention*` op
    with q, k, v and out), so pricing the plan's attention ops at another backend's rate prices its plan.
    """
    selected = selected or chunk.attention
    lines = [f"{'attention':9} {'TFLOP/s':>7} {'attn ms':>8} {'chunk ms':>8} {'FPS e2e':>7}  source"]
    for name, rate in H100_ATTENTION.items():
        p = project(chunk, efficiency=efficiency_for(name))
        mark = " <- a plain install runs this" if name == selected else ""
        lines.append(f"{name:9} {rate.tflops:7.0f} {p.total(kind='attention') * 1e3:8.1f} "
                     f"{p.total(vae=True) * 1e3:8.0f} {p.fps_end_to_end:7.1f}  {rate.source}{mark}")  # fmt: skip
    return lines


@dataclass(frozen=True)
class Calibration:
    """The reference pipeline priced by this cost model, beside the paper's measured FPS."""

    label: str
    transformer_s: float
    text_kv_s: float
    vae_s: float
    frames: int

    @property
    def seconds(self) -> float:
        return self.transformer_s + self.text_kv_s + self.vae_s

    @property
    def fps(self) -> float:
        return self.frames / self.seconds

    def line(self) -> str:
        steps = "+".join(map(str, PAPER_STEPS))
        return (
            f"{self.label}: transformer {self.transformer_s * 1e3:.0f} ms + text K/V {self.text_kv_s * 1e3:.0f} ms"
            f" + VAE {self.vae_s * 1e3:.0f} ms = {self.seconds * 1e3:.0f} ms -> {self.fps:.1f} FPS vs the paper's "
            f"{PAPER_FPS} FPS at steps {steps} ({self.fps / PAPER_FPS:.2f}x)"
        )


@functools.lru_cache(maxsize=2)
def text_kv_trace(config, dtype: torch.dtype = torch.bfloat16, text_len: int = 512) -> Trace:
    """Per prompt: the text projection and every block's cross-attention K and V (`encode_text`, on meta)."""
    model = meta_transformer(config, dtype)
    with CostTracer() as tracer:
        model.encode_text(torch.empty(1, text_len, config.text_dim, dtype=dtype, device="meta"))
    return tracer.trace("text K/V")


def calibrate(chunk: PlannedChunk) -> Calibration:
    """The official pipeline's op sequence on an H100: FA3 attention, one step per stage, the cross-attention
    K/V recomputed in every forward (no text K/V cache), a float32 VAE decode (its convolutions in TF32), the
    decode after the transformer (no second lane). The transformer is the planned steady chunk with the
    Triton op table: torch.compile fuses the same pointwise chains between GEMMs into one kernel each."""
    eff = efficiency_for("fa3")
    p = project(chunk, efficiency=eff)
    text_s = trace_seconds(text_kv_trace(chunk.config, chunk.dtype, chunk.shape.text_len), H100_SXM, eff)
    text_s *= sum(chunk.steps)
    tf32 = replace(H100_SXM, fp32_tflops=H100_TF32_TFLOPS)
    vae_s = trace_seconds(vae_trace(chunk.shape, torch.float32), tf32, eff)
    return Calibration("reference pipeline (torch.compile, FA3, fp32 VAE)", p.seconds, text_s, vae_s, p.frames)
