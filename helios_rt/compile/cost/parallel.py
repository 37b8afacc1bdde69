"""Multi-GPU projection: one chunk on N GPUs with sequence (Ulysses) and CFG parallelism.

The steady chunk is planned as rank 0 runs it (the largest token shard): the engine's `ChunkProgram`
with `helios_rt.parallel`'s own hooks on the meta model, so the priced plan holds the per-rank GEMMs
(every rank still reads every weight), the attention over all tokens with its share of the heads, the
packing copies around the exchanges, the balanced noisy-only work, and the sampler's steps, transitions
and history update that every rank runs. The collectives are replaced by a counter of the bytes each
would bring to this rank; their time is `latency + bytes / bandwidth` on the stated interconnect, added
to the compute (the chunk program issues them in order on one stream: no overlap).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from ...config import ModelConfig
from .planned import build_program, planned_chunk, steady_kind, trace_kind
from .projection import H100_SXM, DeviceSpec, Efficiency, trace_seconds
from .shape import ChunkShape
from .tracer import Trace

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


def rank0_chunk(config: ModelConfig, shape: ChunkShape, dtype: torch.dtype, cfg: int, sequence: int,
                steps: Sequence[int] = (1, 1, 1)) -> tuple[Trace, StageComm]:  # fmt: skip
    """Rank 0's planned steady chunk (batch `shape.batch * cfg`) and the bytes its collectives bring in."""
    from ...parallel.forward import ParallelForward
    from ...parallel.group import Mesh

    program = build_program(config, replace(shape, batch=shape.batch * cfg), dtype, "auto", "auto", tuple(steps),
                            "native")  # fmt: skip
    model = program.sampler.model  # the shared meta model: its hooks are copied into the plan's meta copy
    counter = CountingCollectives(cfg * sequence)
    model.set_parallel(ParallelForward(Mesh(0, cfg * sequence, cfg, sequence, None, 1.0), counter))
    try:
        trace = trace_kind(program, steady_kind(), "rank 0 steady chunk")
    finally:
        model.set_parallel(None)
    return trace, StageComm(counter.calls, counter.bytes_in)


def project_parallel(
    config: ModelConfig,
    shape: ChunkShape,
    gpus: int,
    steps: Sequence[int] = (1, 1, 1),
    cfg: int = 1,
    device: DeviceSpec = H100_SXM,
    efficiency: Efficiency | None = None,
    link: Interconnect = NVLINK_H100,
    dtype: torch.dtype = torch.bfloat16,
) -> ParallelProjection:
    """The steady chunk at `shape` (batch per CFG half) on `gpus` GPUs: cfg CFG halves x sequence shards."""
    efficiency = efficiency or Efficiency()
    sequence = gpus // cfg
    if cfg * sequence != gpus or config.num_attention_heads % sequence:
        raise ValueError(f"{gpus} GPUs as {cfg} CFG halves x {sequence} shards: {sequence} must divide the heads")
    if gpus == 1:  # the one-process engine: no hooks, no exchanges
        trace, comm = planned_chunk(config, shape, dtype, steps=tuple(steps), vae=False).steady, StageComm(0, 0.0)
    else:
        trace, comm = rank0_chunk(config, shape, dtype, cfg, sequence, steps)
    compute = trace_seconds(trace, device, efficiency)
    comm_s = link.seconds(comm.calls, comm.bytes_in) if comm.calls else 0.0
    return ParallelProjection(gpus, cfg, sequence, shape.pixel_frames, compute, comm_s, comm.bytes_in, (comm,))


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
        f"{tuple(steps)}, Ulysses sequence parallelism, the planned steady chunk, on {device.name}",
        f"assumptions: {eff.describe(device)}",
        f"interconnect: {link.describe()}; exchanges not overlapped with compute; VAE decode not included",
        "",
        f"{'resolution':>10} {'GPUs':>4} {'ms compute':>10} {'ms comm':>8} {'GB comm':>8} {'ms chunk':>8} "
        f"{'FPS':>6} {'speed-up':>8} {'efficiency':>10}",
    ]
    for shape in shapes:
        base = None
        for n in gpus:
            p = project_parallel(config, shape, n, steps, 1, device, eff, link, dtype)
            base = base or p.seconds
            lines.append(
                f"{shape.height:>4}x{shape.width:<5} {n:>4} {p.compute_s * 1e3:10.1f} {p.comm_s * 1e3:8.1f} "
                f"{p.comm_bytes / 1e9:8.2f} {p.seconds * 1e3:8.1f} {p.fps:6.1f} {base / p.seconds:8.2f} "
                f"{base / p.seconds / n:10.0%}"
            )
    return "\n".join(lines)
