"""The FP8 row of the H100 projection: the FP8 engine's own planned chunk, priced op by op.

`EngineConfig(precision="fp8")` plans another chunk: the block linears are `FP8Linear` (`_scaled_mm` on
e4m3 operands) and their activations are quantised by the ops that produce them. That plan is priced
like the bf16 one: `_scaled_mm` at the achieved e4m3 GEMM rate (`compile.cost.H100_RATES["gemm fp8"]`,
an estimate), the GEMMs that stay bf16 (patch embeddings, time MLP, output projection) at the bf16
rate, the quantise kernels by their bytes. The VAE decode is not quantised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..compile.cost import PlannedChunk, planned_chunk, project, steady_chunk_seconds
from ..compile.cost.projection import H100_SXM, DeviceSpec, Efficiency


@dataclass(frozen=True)
class FP8Projection:
    """Seconds per steady chunk (transformer + sampler, and VAE decode) and FPS, bf16 vs FP8."""

    frames: int
    bf16_seconds: float
    fp8_seconds: float
    vae_seconds: float

    @property
    def fps_bf16_end_to_end(self) -> float:
        """Steady FPS, both lanes on one GPU (`compile.cost.steady_chunk_seconds`)."""
        return self.frames / steady_chunk_seconds(self.bf16_seconds, self.vae_seconds)

    @property
    def fps_fp8_end_to_end(self) -> float:
        return self.frames / steady_chunk_seconds(self.fp8_seconds, self.vae_seconds)

    def line(self, steps: Sequence[int]) -> str:
        tag = "+".join(map(str, steps))
        return (
            f"FP8 (the precision='fp8' plan, e4m3 GEMMs at the fp8 rate), steps {tag}: transformer "
            f"{self.fp8_seconds * 1e3:.0f} ms vs {self.bf16_seconds * 1e3:.0f} ms bf16, VAE decode "
            f"{self.vae_seconds * 1e3:.0f} ms -> {self.fps_fp8_end_to_end:.1f} FPS end to end "
            f"(bf16 {self.fps_bf16_end_to_end:.1f})"
        )


def fp8_chunk(chunk: PlannedChunk, steps: Sequence[int] | None = None) -> PlannedChunk:
    """The FP8 engine's planned chunk for `chunk`'s configuration (same shape, op table and attention)."""
    return planned_chunk(chunk.config, chunk.shape, chunk.dtype, "fp8", chunk.kernels, chunk.attention,
                         tuple(steps or chunk.steps), chunk.label, chunk.vae is not None)  # fmt: skip


def project_fp8(chunk: PlannedChunk, steps: Sequence[int] | None = None, efficiency: Efficiency | None = None,
                device: DeviceSpec = H100_SXM) -> FP8Projection:  # fmt: skip
    """`chunk` (a bf16 plan, with its VAE decode) beside the FP8 engine's plan of the same configuration, at
    `steps` per stage (default: the chunk's; others are planned)."""
    steps = tuple(steps or chunk.steps)
    if steps != chunk.steps:
        chunk = planned_chunk(chunk.config, chunk.shape, chunk.dtype, chunk.precision, chunk.kernels,
                              chunk.attention, steps, chunk.label, chunk.vae is not None)  # fmt: skip
    if chunk.vae is None:
        raise ValueError("project_fp8 needs the VAE decode: plan the chunk with vae=True")
    bf16 = project(chunk, device, efficiency)
    fp8 = project(fp8_chunk(chunk, steps), device, efficiency)
    return FP8Projection(chunk.frames, bf16.seconds, fp8.seconds, bf16.vae_seconds)
