"""The FP8 row of the H100 projection: the same traced chunk with its GEMMs priced at the FP8 rate.

Stated assumption: FP8 GEMMs reach `FP8_GEMM_EFFICIENCY` = 0.70 of the 1979 TFLOP/s dense e4m3 peak
(~1385 TFLOP/s; below bf16's 0.80 because the per-token and per-channel scales are applied in the
GEMM epilogue and FP8 GEMMs are more often bandwidth-limited at these shapes). Every GEMM of the
transformer is priced so, including the few that stay bf16 (patch embeddings, time MLP, output
projection: under 1% of the FLOPs), so the row is slightly optimistic there; attention, the
memory-bound ops and the VAE decode keep their bf16 prices (the VAE is not quantised).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..compile.cost import ChunkCost, project, steady_chunk_seconds
from ..compile.cost.projection import H100_SXM, DeviceSpec, Efficiency

FP8_GEMM_EFFICIENCY = 0.70


@dataclass(frozen=True)
class FP8Projection:
    """Seconds per chunk (transformer + sampler, and VAE decode) and FPS, bf16 vs FP8 GEMMs."""

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
            f"FP8 (e4m3 GEMMs at {FP8_GEMM_EFFICIENCY:.0%} of the dense fp8 peak), steps {tag}: transformer "
            f"{self.fp8_seconds * 1e3:.0f} ms vs {self.bf16_seconds * 1e3:.0f} ms bf16, VAE decode "
            f"{self.vae_seconds * 1e3:.0f} ms -> {self.fps_fp8_end_to_end:.1f} FPS end to end "
            f"(bf16 {self.fps_bf16_end_to_end:.1f})"
        )


def project_fp8(chunk: ChunkCost, steps: Sequence[int], efficiency: Efficiency | None = None,
                device: DeviceSpec = H100_SXM, fused: bool = True) -> FP8Projection:  # fmt: skip
    """`chunk` (the fused Triton path, or with fused=False every aten op) on `device` with bf16 GEMMs and
    with FP8 GEMMs; needs a chunk traced with its VAE."""
    efficiency = efficiency or Efficiency()
    bf16 = project(chunk, device, efficiency, steps=steps, fused=fused)
    fp8_eff = replace(efficiency, gemm=FP8_GEMM_EFFICIENCY, gemm_dtype="float8_e4m3fn")
    fp8 = project(chunk, device, fp8_eff, steps=steps, fused=fused)
    if not bf16.vae_rows:
        raise ValueError("project_fp8 needs the VAE decode: trace the chunk with vae=True")
    vae = bf16.total(vae=True) - bf16.seconds
    return FP8Projection(bf16.frames, bf16.seconds, fp8.seconds, vae)
