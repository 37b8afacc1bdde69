"""Multi-GPU projection: one chunk on N GPUs with sequence (Ulysses) and CFG parallelism.

Each stage's forward is traced as rank 0 runs it (the largest token shard): the transformer on meta
tensors with `helios_rt.parallel`'s own hooks, so the trace holds the per-rank GEMMs (every rank
still reads every weight), the attention over all tokens with its share of the heads, the packing
copies around the exchanges, and the balanced noisy-only work. The collectives are replaced by a
counter of the bytes each would bring to this rank; their time is `latency + bytes / bandwidth` on
the stated interconnect, added to the compute (the exchanges are not overlapped with compute: the
chunk program issues them in order on one stream). The sampler step, the stage transitions and the
per-chunk work run on every rank, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ...config import ModelConfig
from ...model.layout import TokenLayout
from .chunk import ChunkCost, ChunkShape, meta_transformer, stage_layouts, trace_chunk, trace_forward
from .projection import H100_SXM, DeviceSpec, Efficiency, project

Tensor = torch.Tensor


@dataclass(frozen=True)
class Interconnect:
    """What one GPU can send and receive at once in an all-to-all / all-gather, and the per-call cost.

    bandwidth_gbps: achieved GB/s into one GPU; latency_us: fixed cost of one collective call.
    """

    name: str
    bandwidth_gbps: float
    latency_us: float

    def seconds(self, calls: int, nbytes: float) -> float:
        return calls * self.latency_us * 1e-6 + nbytes / (self.bandwidth_gbps * 1e9)

    def describe(self) -> str:
        return f"{self.name}: {self.bandwidth_gbps:.0f} GB/s into each GPU, {self.latency_us:.0f} us per collective"


# NVLink 4 on H100 SXM: 18 links x 25 GB/s = 450 GB/s per direction per GPU through NVSwitch. NCCL's
# all-to-all inside one 8-GPU node reaches about three quarters of it on tens-of-MB messages.
NVLINK_H100 = Interconnect("NVLink 4 via NVSwitch (450 GB/s per direction peak, 75% achieved)", 337.5, 20.0)


@dataclass
class CountingCollectives:
    """Stands in for torch.distributed while tracing: counts the bytes each collective brings in."""

    ranks: int
    calls: int = 0
    bytes_in: float = 0.0

    def all_to_all(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], group) -> None:
        row = out[0].numel() * out.element_size()
        self.calls += 1
        self.bytes_in += (sum(out_splits) - out_splits[0]) * row  # all but rank 0's own rows arrive

    def all_gather(self, out: Tensor, inp: Tensor) -> None:
        self.calls += 1
        self.bytes_in += (out.numel() - inp.numel()) * out.element_size()


@dataclass(frozen=True)
class StageComm:
    calls: int
    bytes_in: float


@dataclass(frozen=True)
class ParallelProjection:
    """One chunk on `gpus` GPUs (`cfg` CFG halves x `sequence` shards): per-rank compute and exchanges."""

    gpus: int
    cfg: int
    sequence: int
    frames: int
    compute_s: float  # per chunk, per rank (the ranks run in lockstep)
    comm_s: float  # per chunk
    comm_bytes: float  # per chunk, into one GPU
    per_stage_comm: tuple[StageComm, ...] = field(default=())

    @property
    def seconds(self) -> float:
        return self.compute_s + self.comm_s

    @property
    def fps(self) -> float:
        return self.frames / self.seconds


def _rank0_forward(config: ModelConfig, layout: TokenLayout, shape: ChunkShape, dtype, cfg: int, sequence: int):
    """The trace of rank 0's forward and the bytes its collectives bring in."""
    from ...parallel.forward import ParallelForward
    from ...parallel.group import Mesh

    model = meta_transformer(config, dtype)
    counter = CountingCollectives(cfg * sequence)
    model.set_parallel(ParallelForward(Mesh(0, cfg * sequence, cfg, sequence, None, 1.0), counter))
    try:
        trace = trace_forward(config, layout, shape.batch * cfg, dtype, shape.text_len, label="rank 0 forward")
    finally:
        model.set_parallel(None)
    return trace, StageComm(counter.calls, counter.bytes_in)


def project_parallel(
    config: ModelConfig,
    single: ChunkCost,
    gpus: int,
    steps: Sequence[int],
    cfg: int = 1,
    device: DeviceSpec = H100_SXM,
    efficiency: Efficiency | None = None,
    link: Interconnect = NVLINK_H100,
) -> ParallelProjection:
    """Project `single` (a one-GPU chunk trace, batch 1 per CFG half) on `gpus` GPUs, fused kernels.

    cfg=2 puts the two halves of a CFG batch on two rank groups; the one-GPU baseline then runs both
    halves in one batch (`single.shape.batch` is per half).
    """
    efficiency = efficiency or Efficiency()
    sequence = gpus // cfg
    if cfg * sequence != gpus or config.num_attention_heads % sequence:
        raise ValueError(f"{gpus} GPUs as {cfg} CFG halves x {sequence} shards: {sequence} must divide the heads")
    layouts = stage_layouts(config, single.shape)
    compute = comm = comm_bytes = 0.0
    per_stage = []
    for st, layout, n in zip(single.stages, layouts, steps, strict=True):
        if gpus == 1:  # the one-process engine: no hooks, no exchanges
            fwd, c = st.forward, StageComm(0, 0.0)
        else:
            fwd, c = _rank0_forward(config, layout, single.shape, single.dtype, cfg, sequence)
        compute += n * _seconds(fwd, device, efficiency)
        compute += n * _seconds(st.step, device, efficiency) * cfg  # the step runs on the whole CFG batch
        if st.transition is not None:
            compute += _seconds(st.transition, device, efficiency) * cfg
        comm += n * link.seconds(c.calls, c.bytes_in) if c.calls else 0.0
        comm_bytes += n * c.bytes_in
        per_stage.append(c)
    compute += _seconds(single.per_chunk, device, efficiency)
    return ParallelProjection(
        gpus, cfg, sequence, single.shape.pixel_frames, compute, comm, comm_bytes, tuple(per_stage)
    )


def _seconds(trace, device: DeviceSpec, efficiency: Efficiency) -> float:
    return sum(p.seconds for p in project(trace, device, efficiency, fused=True).values())


def parallel_table(
    config: ModelConfig,
    shapes: Sequence[ChunkShape],
    gpus: Sequence[int] = (1, 2, 4, 8),
    steps: Sequence[int] = (1, 1, 1),
    dtype: torch.dtype = torch.bfloat16,
    device: DeviceSpec = H100_SXM,
    link: Interconnect = NVLINK_H100,
) -> str:
    """The table of the issue: per resolution and GPU count, compute and exchange time per chunk, FPS."""
    eff = Efficiency()
    lines = [
        f"{config.num_layers}-block Helios ({config.num_attention_heads} heads), {dtype}, steps per stage "
        f"{tuple(steps)}, Ulysses sequence parallelism, fused kernels, on {device.name}",
        f"assumptions: {eff.describe(device)}",
        f"interconnect: {link.describe()}; exchanges not overlapped with compute; VAE decode not included",
        "",
        f"{'resolution':>10} {'GPUs':>4} {'ms compute':>10} {'ms comm':>8} {'GB comm':>8} {'ms chunk':>8} "
        f"{'FPS':>6} {'speed-up':>8} {'efficiency':>10}",
    ]
    for shape in shapes:
        single = trace_chunk(config, shape, dtype)
        base = None
        for n in gpus:
            p = project_parallel(config, single, n, steps, 1, device, eff, link)
            base = base or p.seconds
            lines.append(
                f"{shape.height:>4}x{shape.width:<5} {n:>4} {p.compute_s * 1e3:10.1f} {p.comm_s * 1e3:8.1f} "
                f"{p.comm_bytes / 1e9:8.2f} {p.seconds * 1e3:8.1f} {p.fps:6.1f} {base / p.seconds:8.2f} "
                f"{base / p.seconds / n:10.0%}"
            )
    return "\n".join(lines)
