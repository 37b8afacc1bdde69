"""FLOPs and bytes of the chunk the engine plans, op by op, and a roofline projection for a GPU.

One description of a chunk: the compiler's. `planned_chunk` builds the `ChunkProgram` that `helios-rt plan`
reports and plans its kinds (the stream's first chunk, the steady chunk) under a cost recorder that sees
the ops the planner records, in order (`planned.py` checks it step for step); the VAE decode is priced
from its own plan. Per op:

- FLOPs: `2 M K N` for mm/addmm/bmm/linear/_scaled_mm, `2 * out_elements * C_in/groups * prod(kernel)` for
  convolutions, `4 B H Lq Lk Dh` for attention (the `helios_rt::attention*` ops of every backend, and a
  fused `F.scaled_dot_product_attention`, priced as one kernel though meta lowers it to bmm/softmax).
- bytes = reads + writes: every tensor input (the elements it addresses: a broadcast reads its small
  source) plus every output; a `helios_rt::` op reads its unmutated tensors and writes its mutated ones.
  An allocating step whose out= form PyTorch generates (functional op, then a copy) pays that copy too.
- class: gemm, attention, norm (norms, softmax and the reductions RMSNorms are built of), elementwise,
  copy/cast, other (indexing, padding, ...), view (moves nothing).

`project` prices a trace on a `DeviceSpec`: per op max(FLOPs / achieved rate of its class and backend,
bytes / achieved bandwidth), summed (CUDA graphs: no launch gaps). Each rate names its source
(`projection.H100_RATES`, `projection.H100_ATTENTION`).
"""

from __future__ import annotations

from .op_cost import (
    ATTENTION,
    COPY,
    ELEMENTWISE,
    GEMM,
    KINDS,
    MEMORY_BOUND,
    NORM,
    OTHER,
    VIEW,
    OpCost,
    attention_flops,
    op_cost,
    unique_bytes,
)  # fmt: skip
from .planned import PlannedChunk, TraceMismatch, planned_chunk, price_plan, trace_kind, vae_trace
from .projection import (
    DEVICES,
    H100_RATES,
    H100_SXM,
    PAPER_FPS,
    PAPER_STEPS,
    ChunkProjection,
    ClassProjection,
    DeviceSpec,
    Efficiency,
    ProjectionRow,
    Rate,
    bytes_outside_gemm_and_attention,
    op_seconds,
    project,
    project_trace,
    steady_chunk_seconds,
    trace_seconds,
)  # fmt: skip
from .shape import ChunkShape, meta_transformer
from .table import bytes_by_class, format_projection, top_ops, verbose_lines
from .tracer import CostTracer, Trace, trace


def trace_chunk(config, shape: ChunkShape | None = None, dtype=None, label: str = "", vae: bool = True,
                steps: tuple[int, ...] = (1, 1, 1)) -> PlannedChunk:  # fmt: skip
    """`planned_chunk` with the Triton op table and automatic attention (what a CUDA engine plans)."""
    import torch

    return planned_chunk(config, shape or ChunkShape(), dtype or torch.bfloat16, steps=tuple(steps), label=label,
                         vae=vae)  # fmt: skip


def helios_14b_chunk(precision: str = "native", attention: str = "auto") -> PlannedChunk:
    """The 14B model at 384x640, batch 1, bf16 (block linears e4m3 with precision="fp8"), 1+1+1 steps."""
    import torch

    from ...config import HELIOS_14B

    return planned_chunk(HELIOS_14B, ChunkShape(), torch.bfloat16, precision, attention=attention,
                         label="Helios 14B")  # fmt: skip


__all__ = [
    "ATTENTION", "COPY", "DEVICES", "ELEMENTWISE", "GEMM", "H100_RATES", "H100_SXM", "KINDS", "MEMORY_BOUND", "NORM",
    "OTHER", "PAPER_FPS", "PAPER_STEPS", "VIEW", "ChunkProjection", "ChunkShape", "ClassProjection", "CostTracer",
    "DeviceSpec", "Efficiency", "OpCost", "PlannedChunk", "ProjectionRow", "Rate", "Trace", "TraceMismatch",
    "attention_flops", "bytes_by_class", "bytes_outside_gemm_and_attention", "format_projection", "helios_14b_chunk",
    "meta_transformer", "op_cost", "op_seconds", "planned_chunk", "price_plan", "project", "project_trace",
    "steady_chunk_seconds", "top_ops", "trace", "trace_chunk", "trace_kind", "trace_seconds", "unique_bytes",
    "vae_trace", "verbose_lines",
]  # fmt: skip
