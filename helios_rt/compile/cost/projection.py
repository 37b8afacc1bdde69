"""Roofline projection of a trace or a chunk on a named GPU, with stated efficiencies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .chunk import ChunkCost, ChunkShape, trace_chunk
from .op_cost import ATTENTION, ELEMENTWISE, GEMM, KINDS, OTHER, OpCost, _dtype_name
from .tracer import Trace

Tensor = torch.Tensor


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
class Efficiency:
    """Achieved fraction of peak per op class: the projection's stated assumptions.

    gemm: of the dtype's dense peak (0.80: ~790 TFLOP/s bf16 in large cuBLAS GEMMs on H100);
    attention: of the bf16 peak (0.647: ~640 TFLOP/s, FlashAttention-3 forward at head dim 128);
    memory: of HBM bandwidth for every op's bytes (0.80: ~2.7 TB/s, what streaming kernels reach);
    launch_us: added per kernel (0: the program replays as CUDA graphs);
    gemm_dtype: price bf16 GEMMs at another dtype's peak (e.g. "float8_e4m3fn": an FP8 what-if);
    attention_label: which attention backend `attention` prices, and its source (`cost.attention_rates`).
    """

    gemm: float = 0.80
    attention: float = 0.647
    memory: float = 0.80
    launch_us: float = 0.0
    gemm_dtype: str | None = None
    attention_label: str = "fa3: FlashAttention-3 at head dim 128"

    def describe(self, device: DeviceSpec) -> str:
        g = self.gemm * device.peak_flops(self.gemm_dtype or "bfloat16") / 1e12
        a = self.attention * device.peak_flops("bfloat16") / 1e12
        m = self.memory * device.hbm_tbps
        s = (f"GEMM {self.gemm:.0%} of dense peak ({g:.0f} TFLOP/s {self.gemm_dtype or 'bf16'}), attention "
             f"{self.attention:.1%} of bf16 peak ({a:.0f} TFLOP/s, {self.attention_label}), memory-bound ops "
             f"{self.memory:.0%} of HBM ({m:.2f} TB/s); per op max(compute, memory) time, summed")  # fmt: skip
        return s + (f"; {self.launch_us} us per kernel launch" if self.launch_us else "; no launch gaps (CUDA graphs)")


def op_seconds(op: OpCost, device: DeviceSpec = H100_SXM, eff: Efficiency = Efficiency()) -> float:
    """Roofline time of one op: max(FLOPs at the class's achieved rate, bytes at the achieved bandwidth)."""
    if op.kind == OTHER or not (op.flops or op.bytes):
        return 0.0
    memory = op.bytes / (device.hbm_tbps * 1e12 * eff.memory)
    compute = 0.0
    if op.kind == GEMM:
        dtype = eff.gemm_dtype if eff.gemm_dtype and op.dtype in ("bfloat16", "float16") else op.dtype
        compute = op.flops / (device.peak_flops(dtype) * eff.gemm)
    elif op.kind == ATTENTION:
        compute = op.flops / (device.peak_flops(op.dtype) * eff.attention)
    return max(compute, memory) + eff.launch_us * 1e-6


@dataclass(frozen=True)
class ClassProjection:
    flops: float
    bytes: float
    seconds: float
    kernels: int


def project_trace(
    trace: Trace, device: DeviceSpec = H100_SXM, eff: Efficiency = Efficiency()
) -> dict[str, ClassProjection]:
    """Per op class: FLOPs, bytes, projected seconds and kernel count of one run of `trace`."""
    acc = {k: [0, 0, 0.0, 0] for k in KINDS}
    for o in trace.ops:
        a = acc[o.kind]
        a[0] += o.flops
        a[1] += o.bytes
        a[2] += op_seconds(o, device, eff)
        a[3] += 1 if (o.flops or o.bytes) and o.kind != OTHER else 0
    return {k: ClassProjection(*v) for k, v in acc.items()}


def steady_chunk_seconds(transformer_s: float, vae_s: float) -> float:
    """Seconds per chunk in the steady state of a stream whose two lanes (chunk k+1's transformer, chunk k's
    VAE decode) share one GPU: the sum of both lanes' GPU work.

    Why the sum and not max(transformer, VAE): each lane's projected time is a roofline of kernels that
    each fill the SMs or the HBM bandwidth (the 14B's GEMMs and attention occupy every SM with several
    waves; the decode's convolutions too), so two such kernels on two streams divide the same SMs and
    bandwidth instead of running side by side. max() would hold only if each lane had a GPU of its own.
    What the overlap does hide is the host's share: the handover's synchronisation, the frames' copy to
    the host and the Python between launches, which the roofline does not count in either case. The sum
    is therefore the model's floor for both overlapped and serial decode; a measured overlapped stream
    faster than it would mean the kernels leave the SMs idle (tails, launch gaps), which the first-light
    figures show as measured / projected.
    """
    return transformer_s + vae_s


@dataclass(frozen=True)
class ProjectionRow:
    group: str  # "stage 0", ..., "per chunk", "VAE decode"
    kind: str
    flops: float
    bytes: float
    seconds: float


@dataclass(frozen=True)
class ChunkProjection:
    """A chunk projected on a device: rows per (group, op class), totals and FPS."""

    label: str
    device: DeviceSpec
    efficiency: Efficiency
    steps: tuple[int, ...]
    fused: bool
    frames: int
    rows: tuple[ProjectionRow, ...]
    vae_rows: tuple[ProjectionRow, ...] = ()

    def total(
        self, group: str | None = None, kind: str | None = None, attr: str = "seconds", vae: bool = False
    ) -> float:
        rows = self.rows + (self.vae_rows if vae else ())
        return sum(
            getattr(r, attr) for r in rows if (group is None or r.group == group) and (kind is None or r.kind == kind)
        )

    @property
    def seconds(self) -> float:
        return self.total()

    @property
    def fps(self) -> float:
        """Frames per second of the transformer and sampler alone (VAE decode not included)."""
        return self.frames / self.seconds

    @property
    def vae_seconds(self) -> float:
        """The VAE decode of one chunk (0 when the chunk was traced without it)."""
        return self.total(vae=True) - self.seconds

    @property
    def fps_end_to_end(self) -> float:
        """Steady frames per second of both lanes on one GPU (`steady_chunk_seconds`): what the paper's
        19.5 FPS measures. Needs a traced VAE."""
        if not self.vae_rows:
            raise ValueError("fps_end_to_end needs the VAE decode: trace the chunk with vae=True")
        return self.frames / steady_chunk_seconds(self.seconds, self.vae_seconds)

    @property
    def fps_with_vae(self) -> float | None:
        """`fps_end_to_end`, or None when the chunk was traced without its VAE decode."""
        return self.fps_end_to_end if self.vae_rows else None


def project(
    cost: Trace | ChunkCost,
    device: DeviceSpec = H100_SXM,
    efficiency: Efficiency = Efficiency(),
    steps: Sequence[int] = (1, 1, 1),
    fused: bool = False,
) -> dict[str, ClassProjection] | ChunkProjection:
    """Project a trace (per op class, one run) or a chunk (per stage and class, `steps[s]` steps in stage s).

    fused=False prices every aten op of the PyTorch reference path as traced; fused=True prices each
    `helios_rt.ops` call as one kernel moving its external bytes (the Triton kernels).
    """
    if isinstance(cost, Trace):
        return project_trace(cost.fused() if fused else cost, device, efficiency)
    acc: dict[tuple[str, str], list[float]] = {}
    for group, trace_, n in cost.pieces(steps, fused):
        for kind, p in project_trace(trace_, device, efficiency).items():
            a = acc.setdefault((group, kind), [0.0, 0.0, 0.0])
            a[0] += n * p.flops
            a[1] += n * p.bytes
            a[2] += n * p.seconds
    rows = tuple(ProjectionRow(g, k, *v) for (g, k), v in acc.items())
    vae_rows: tuple[ProjectionRow, ...] = ()
    if cost.vae is not None:
        vt = cost.vae.fused() if fused else cost.vae
        vae_rows = tuple(ProjectionRow("VAE decode", k, p.flops, p.bytes, p.seconds)
                         for k, p in project_trace(vt, device, efficiency).items())  # fmt: skip
    return ChunkProjection(cost.label, device, efficiency, tuple(steps), fused, cost.shape.pixel_frames, rows, vae_rows)


PAPER_FPS = 19.5  # Helios paper, distilled, one H100, 384x640, end to end
PAPER_STEPS = (1, 1, 1)  # the paper's real-time setting: one step per pyramid stage


def format_projection(cost: ChunkCost, steps: Sequence[int] = (1, 1, 1), device: DeviceSpec = H100_SXM,
                      efficiency: Efficiency = Efficiency()) -> str:  # fmt: skip
    """The projection table: per stage and op class TFLOP, GB and ms, for the reference and fused paths."""
    ref = project(cost, device, efficiency, steps, fused=False)
    fus = project(cost, device, efficiency, steps, fused=True)
    s = cost.shape
    lines = [
        f"{cost.label or 'Helios'} at {s.height}x{s.width}, {_dtype_name(cost.dtype)}, batch {s.batch}, "
        f"steps per stage {tuple(steps)}, one chunk = {s.pixel_frames} frames, on {device.name} "
        f"({device.bf16_tflops:.0f} TFLOP/s dense bf16, {device.fp8_tflops:.0f} fp8, {device.hbm_tbps} TB/s)",
        f"assumptions: {efficiency.describe(device)}",
        "reference = every aten op of the PyTorch reference path; fused = each helios_rt op one kernel (Triton)",
        "",
        f"{'group':11} {'tokens':>12} {'steps':>5} {'class':17} {'TFLOP':>8} {'GB ref':>8} {'ms ref':>8} "
        f"{'GB fused':>8} {'ms fused':>8}",
    ]  # fmt: skip
    groups = [f"stage {st.index}" for st in cost.stages] + ["per chunk"]
    tokens = {f"stage {st.index}": f"{st.layout.n_noisy}+{st.layout.n_hist}" for st in cost.stages}
    nsteps = {f"stage {st.index}": str(n) for st, n in zip(cost.stages, steps, strict=True)}

    def line(group: str, tok: str, n: str, kind: str, r: list[ProjectionRow], f: list[ProjectionRow]) -> str:
        fl = sum(x.flops for x in r) / 1e12
        return (f"{group:11} {tok:>12} {n:>5} {kind:17} {fl:8.2f} {sum(x.bytes for x in r) / 1e9:8.1f} "
                f"{sum(x.seconds for x in r) * 1e3:8.1f} {sum(x.bytes for x in f) / 1e9:8.1f} "
                f"{sum(x.seconds for x in f) * 1e3:8.1f}")  # fmt: skip

    for g in groups:
        for kind in (GEMM, ATTENTION, ELEMENTWISE):
            r = [x for x in ref.rows if x.group == g and x.kind == kind]
            f = [x for x in fus.rows if x.group == g and x.kind == kind]
            lines.append(line(g, tokens.get(g, ""), nsteps.get(g, ""), kind, r, f))
        lines.append(line(g, "", "", "= total", [x for x in ref.rows if x.group == g],
                          [x for x in fus.rows if x.group == g]))  # fmt: skip
    lines.append(line("chunk", "", "", "= total", list(ref.rows), list(fus.rows)))
    if ref.vae_rows:
        lines.append(line("VAE decode", "(estimate)", "", "= total", list(ref.vae_rows), list(fus.vae_rows)))
    paper = (f"paper: {PAPER_FPS} FPS end to end at steps {'+'.join(map(str, PAPER_STEPS))} "
             f"(= {s.pixel_frames / PAPER_FPS * 1e3:.0f} ms per chunk)")  # fmt: skip
    lines.append("")
    if ref.vae_rows:
        lines.append(
            f"END TO END (VAE decode included, both lanes on one GPU), steps {'+'.join(map(str, steps))}: "
            f"{fus.fps_end_to_end:.1f} FPS fused, {ref.fps_end_to_end:.1f} FPS reference ops; {paper}"
        )
    lines.append(
        f"per chunk: {ref.total(attr='flops') / 1e15:.3f} PFLOP; projected {ref.seconds * 1e3:.0f} ms reference, "
        f"{fus.seconds * 1e3:.0f} ms fused -> {ref.fps:.1f} / {fus.fps:.1f} FPS (transformer + sampler only, no VAE"
        + ("" if ref.vae_rows else f"; {paper}")
        + ")"
    )
    lines.append(f"per prompt (not per chunk): text K/V {cost.per_prompt.flops() / 1e12:.2f} TFLOP")
    last = cost.stages[-1]
    lines += ["", f"memory-bound bytes of one stage {last.index} forward by helios_rt op (GB):",
              f"{'op':24} {'calls':>5} {'reference':>10} {'fused':>8}"]  # fmt: skip
    for name, calls, ref_b, fused_b in last.forward.by_scope():
        n = f"{calls:5d}" if calls else f"{'-':>5}"
        lines.append(f"{name:24} {n} {ref_b / 1e9:10.2f} {fused_b / 1e9:8.2f}")
    return "\n".join(lines)


def helios_14b_chunk(dtype: torch.dtype = torch.bfloat16, vae: bool = True) -> ChunkCost:
    """The 14B model at 384x640, batch 1: the issue's projection target."""
    from ...config import HELIOS_14B

    return trace_chunk(HELIOS_14B, ChunkShape(), dtype, label="Helios 14B", vae=vae)
