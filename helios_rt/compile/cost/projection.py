"""Roofline projection of a planned trace on a GPU, each rate with its source."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .op_cost import ATTENTION, GEMM, KINDS, MEMORY_BOUND, VIEW, OpCost
from .planned import PlannedChunk
from .tracer import Trace


@dataclass(frozen=True)
class DeviceSpec:
    """Dense peak rates (TFLOP/s, no sparsity) and HBM bandwidth of a GPU, and its compute capability (the
    attention rates of `attention_rates` are fractions of an sm_90 peak)."""

    name: str
    bf16_tflops: float
    fp8_tflops: float
    fp32_tflops: float  # FP32 without TF32 (PyTorch's default for float32 matmuls)
    hbm_tbps: float
    sm: tuple[int, int] = (9, 0)

    def peak_flops(self, dtype: str) -> float:
        if dtype in ("bfloat16", "float16"):
            return self.bf16_tflops * 1e12
        if dtype.startswith("float8"):
            return self.fp8_tflops * 1e12
        return self.fp32_tflops * 1e12


H100_SXM = DeviceSpec("H100 SXM", bf16_tflops=989.0, fp8_tflops=1979.0, fp32_tflops=67.0, hbm_tbps=3.35)
DEVICES: dict[str, DeviceSpec] = {"h100-sxm": H100_SXM}


@dataclass(frozen=True)
class Rate:
    """An achieved rate on an H100 SXM (TFLOP/s or TB/s) and where the number comes from."""

    value: float
    source: str


# The H100 SXM rates of everything but attention (those are in `H100_ATTENTION`, below).
H100_RATES: dict[str, Rate] = {
    "gemm bf16": Rate(680.0, "estimate: cuBLAS bf16 at the 14B's shapes (M 3.7k-11k, K/N 5120-13824) sustains "
                             "~650-720 TFLOP/s at the 700 W limit (issue 24's review), not the 989 dense peak"),
    "gemm fp8": Rate(1300.0, "estimate: cuBLAS e4m3 `_scaled_mm` with row/column scales, ~0.66 of the 1979 dense "
                             "peak (the bf16 ratio, less for the scale epilogue and the bandwidth-bound shapes)"),
    "conv": Rate(400.0, "estimate: cuDNN 3-D convolutions of the VAE decoder (implicit GEMM, 96-384 channels, "
                        "3x3x3 kernels), ~0.4 of the dense peak; the issue's review puts the decode at 250-400 ms"),
    "memory": Rate(2.68, "estimate: 0.80 of the 3.35 TB/s HBM3 peak, what streaming elementwise kernels reach"),
}  # fmt: skip
H100_TF32_TFLOPS = 494.7  # dense TF32: cuDNN runs float32 convolutions in TF32 by default


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of the peaks: the projection's stated assumptions (`H100_RATES`, sources there).

    gemm / gemm_fp8: of the dense bf16 / e4m3 peak; conv: of the dtype's peak for convolutions (the VAE);
    attention: of the bf16 peak, at the rate of `attention_label`'s backend (`attention_rates`);
    memory: of HBM bandwidth for every op's bytes; launch_us: added per kernel (0: CUDA graphs).
    """

    gemm: float = H100_RATES["gemm bf16"].value / H100_SXM.bf16_tflops
    gemm_fp8: float = H100_RATES["gemm fp8"].value / H100_SXM.fp8_tflops
    conv: float = H100_RATES["conv"].value / H100_SXM.bf16_tflops
    attention: float = 400.0 / H100_SXM.bf16_tflops
    memory: float = H100_RATES["memory"].value / H100_SXM.hbm_tbps
    launch_us: float = 0.0
    attention_label: str = "triton: estimate (see attention_rates)"

    def describe(self, device: DeviceSpec) -> str:
        g, f = self.gemm * device.bf16_tflops, self.gemm_fp8 * device.fp8_tflops
        a, c, m = self.attention * device.bf16_tflops, self.conv * device.bf16_tflops, self.memory * device.hbm_tbps
        s = (f"GEMM {g:.0f} TFLOP/s bf16, {f:.0f} fp8; convolutions {c:.0f} bf16; attention {a:.0f} "
             f"({self.attention_label.split(':')[0]}); memory-bound ops {m:.2f} TB/s; per op max(compute, memory), "
             "summed")  # fmt: skip
        return s + (f"; {self.launch_us} us per kernel launch" if self.launch_us else "; no launch gaps (CUDA graphs)")


def rate_sources() -> list[str]:
    return [f"{name}: {r.value:g} {'TB/s' if name == 'memory' else 'TFLOP/s'}: {r.source}"
            for name, r in H100_RATES.items()]  # fmt: skip


def op_seconds(op: OpCost, device: DeviceSpec = H100_SXM, eff: Efficiency = Efficiency()) -> float:
    """Roofline time of one op: max(FLOPs at its class's achieved rate, bytes at the achieved bandwidth)."""
    if op.kind == VIEW or not (op.flops or op.bytes) or not op.priced:
        return 0.0
    memory = op.bytes / (device.hbm_tbps * 1e12 * eff.memory)
    compute = 0.0
    if op.kind == GEMM:
        fraction = eff.gemm_fp8 if op.dtype.startswith("float8") else eff.gemm
        fraction = eff.conv if "convolution" in op.name else fraction
        compute = op.flops / (device.peak_flops(op.dtype) * fraction)
    elif op.kind == ATTENTION:
        compute = op.flops / (device.peak_flops(op.dtype) * eff.attention)
    return max(compute, memory) + eff.launch_us * 1e-6


@dataclass(frozen=True)
class ClassProjection:
    flops: float
    bytes: float
    seconds: float
    kernels: int


def project_trace(trace: Trace, device: DeviceSpec = H100_SXM, eff: Efficiency = Efficiency()
                  ) -> dict[str, ClassProjection]:  # fmt: skip
    """Per op class: FLOPs, bytes, projected seconds and kernel count of one run of `trace`."""
    acc = {k: [0, 0, 0.0, 0] for k in KINDS}
    for o in trace.priced:
        a = acc[o.kind]
        a[0] += o.flops
        a[1] += o.bytes
        a[2] += op_seconds(o, device, eff)
        a[3] += 1 if (o.flops or o.bytes) and o.kind != VIEW else 0
    return {k: ClassProjection(*v) for k, v in acc.items()}


def trace_seconds(trace: Trace, device: DeviceSpec = H100_SXM, eff: Efficiency = Efficiency()) -> float:
    return sum(op_seconds(o, device, eff) for o in trace.priced)


def steady_chunk_seconds(transformer_s: float, vae_s: float) -> float:
    """Seconds per chunk in the steady state of a stream whose two lanes (chunk k+1's transformer, chunk k's
    VAE decode) share one GPU: the sum of both lanes' GPU work.

    Why the sum and not max(transformer, VAE): each lane's projected time is a roofline of kernels that
    each fill the SMs or the HBM bandwidth (the 14B's GEMMs and attention occupy every SM with several
    waves; the decode's convolutions too), so two such kernels on two streams divide the same SMs and
    bandwidth instead of running side by side. max() would hold only if each lane had a GPU of its own.
    What the overlap does hide is the host's share: the handover's synchronisation, the frames' copy to
    the host and the Python between launches, which the roofline does not count in either case.
    """
    return transformer_s + vae_s


@dataclass(frozen=True)
class ProjectionRow:
    group: str  # a sampler section ("stage 0", "transition 1"), "per chunk" (outside them), "VAE decode"
    kind: str
    flops: float
    bytes: float
    seconds: float


def _group(section: str) -> str:
    return section or "per chunk"


def _rows(trace: Trace, device: DeviceSpec, eff: Efficiency) -> tuple[ProjectionRow, ...]:
    acc: dict[tuple[str, str], list[float]] = {}
    for o in trace.priced:
        a = acc.setdefault((_group(o.section), o.kind), [0.0, 0.0, 0.0])
        a[0] += o.flops
        a[1] += o.bytes
        a[2] += op_seconds(o, device, eff)
    return tuple(ProjectionRow(g, k, *v) for (g, k), v in acc.items())


@dataclass(frozen=True)
class ChunkProjection:
    """One chunk kind of a planned chunk on a device: rows per (section, op class), totals and FPS."""

    label: str
    device: DeviceSpec
    efficiency: Efficiency
    steps: tuple[int, ...]
    frames: int
    rows: tuple[ProjectionRow, ...]
    vae_rows: tuple[ProjectionRow, ...] = ()

    def total(self, group: str | None = None, kind: str | None = None, attr: str = "seconds",
              vae: bool = False) -> float:  # fmt: skip
        rows = self.rows + (self.vae_rows if vae else ())
        return sum(getattr(r, attr) for r in rows
                   if (group is None or r.group == group) and (kind is None or r.kind == kind))  # fmt: skip

    @property
    def seconds(self) -> float:
        return self.total()

    @property
    def fps(self) -> float:
        """Frames per second of the transformer and sampler alone (VAE decode not included)."""
        return self.frames / self.seconds

    @property
    def vae_seconds(self) -> float:
        """The VAE decode of one chunk (0 when the chunk was planned without it)."""
        return self.total(vae=True) - self.seconds

    @property
    def fps_end_to_end(self) -> float:
        """Steady frames per second of both lanes on one GPU (`steady_chunk_seconds`): what the paper's
        19.5 FPS measures. Needs a planned VAE decode."""
        if not self.vae_rows:
            raise ValueError("fps_end_to_end needs the VAE decode: plan the chunk with vae=True")
        return self.frames / steady_chunk_seconds(self.seconds, self.vae_seconds)

    @property
    def fps_with_vae(self) -> float | None:
        return self.fps_end_to_end if self.vae_rows else None


@dataclass(frozen=True)
class AttentionRate:
    backend: str
    tflops: float
    source: str


H100_ATTENTION: dict[str, AttentionRate] = {
    r.backend: r
    for r in (
        AttentionRate(
            "fa3",
            640.0,
            "FlashAttention-3 paper (Shah et al. 2024), H100 SXM5 bf16 forward, head dim "
            "128, non-causal, 8k-16k tokens: 610-661 TFLOP/s",
        ),  # fmt: skip
        AttentionRate(
            "fa2", 335.0, "FlashAttention-2 measured in the FlashAttention-3 paper, same setting: ~324-338 TFLOP/s"
        ),  # fmt: skip
        AttentionRate(
            "triton",
            400.0,
            "estimate, not measured: this kernel is FlashAttention-2 class (wgmma, "
            "no warp specialisation or ping-pong), 0.55-0.7x FA3 by review",
        ),  # fmt: skip
        AttentionRate("sdpa", 335.0, "PyTorch SDPA's default CUDA backend is FlashAttention-2 code: the FA2 rate"),
        AttentionRate("cudnn", 560.0, "estimate: cuDNN's fused attention (SDPA's cuDNN backend) is FA3 class on "
                      "H100 (the FA3 paper's comparison puts it below FA3 at head dim 128)"),  # fmt: skip
        AttentionRate("reference", 200.0, "estimate: bmm + float32 softmax per query chunk, scores through HBM"),
    )
}
def efficiency_for(backend: str, device: DeviceSpec = H100_SXM, base: Efficiency | None = None) -> Efficiency:
    """`base` with attention priced at `backend`'s rate, as a fraction of the bf16 peak.

    The rates are H100 SXM measurements; a fraction of the peak carries over to any sm_90 part (the same
    SM and tensor cores at another SM count and clock: H100 PCIe/NVL, H200), not to another architecture.
    """
    if device.sm != H100_SXM.sm:
        raise ValueError(f"attention rates are stated for sm_90 (H100) only, not {device.name} "
                         f"(sm_{device.sm[0]}{device.sm[1]}): add that architecture's rates")  # fmt: skip
    if backend not in H100_ATTENTION:
        raise ValueError(f"no attention rate for backend {backend!r}; known: {', '.join(H100_ATTENTION)}")
    rate = H100_ATTENTION[backend]
    return replace(
        base or Efficiency(), attention=rate.tflops / H100_SXM.bf16_tflops, attention_label=f"{backend}: {rate.source}"
    )


def project(chunk: PlannedChunk, device: DeviceSpec = H100_SXM, efficiency: Efficiency | None = None,
            first: bool = False) -> ChunkProjection:  # fmt: skip
    """The steady chunk (or the stream's first, `first=True`) of `chunk` on `device`, with its VAE decode.

    efficiency: default: `Efficiency()` with attention at the rate of the backend the plan resolved.
    """
    efficiency = efficiency or efficiency_for(chunk.attention, device)
    trace = chunk.first if first else chunk.steady
    vae = _rows(chunk.vae, device, efficiency) if chunk.vae is not None else ()
    vae = tuple(ProjectionRow("VAE decode", r.kind, r.flops, r.bytes, r.seconds) for r in vae)
    return ChunkProjection(chunk.label, device, efficiency, chunk.steps, chunk.frames,
                           _rows(trace, device, efficiency), vae)  # fmt: skip


def bytes_outside_gemm_and_attention(trace: Trace) -> int:
    """Bytes of the memory-bound ops (norms, elementwise, copies and casts, other) of one run of `trace`."""
    return sum(trace.bytes(k) for k in MEMORY_BOUND)


PAPER_FPS = 19.5  # Helios paper, distilled, one H100, 384x640, end to end
PAPER_STEPS = (1, 1, 1)  # the paper's real-time setting: one step per pyramid stage
