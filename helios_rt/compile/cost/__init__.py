"""FLOPs and bytes of every op of a Helios forward and chunk, and a roofline projection for a named GPU.

How the numbers are obtained: the program's code (the transformer forward, the sampler step, the stage
transition, the start noise, the history patch embedding) runs on META tensors, so the 14B model costs
no memory and no arithmetic, under a `TorchDispatchMode` that records every aten op with the shapes
and dtypes of its inputs and outputs. Per op:

- FLOPs: `2 M K N` for mm/addmm/(bmm: times the batch)/linear/_scaled_mm, `2 * out_elements *
  C_in/groups * prod(kernel)` for convolutions (the patch embeddings), `2 * B*H * Lq * Lk * (Dqk + Dv)`
  for attention (= `4 B H Lq Lk Dh`). `F.scaled_dot_product_attention` is caught before it lowers
  (on meta it lowers to the unfused math path: bmm, softmax, bmm) and recorded as one attention op, as
  the FlashAttention kernels that run it on a GPU are; the fused `_scaled_dot_product_*` /
  `_flash_attention_forward` / `_efficient_attention_forward` aten ops are priced the same way when a
  trace meets them. Elementwise FLOPs (one per output element of a pointwise op, one per input element
  of a reduction, five per element of a norm/softmax) are informational: those ops are priced by bytes.
- bytes = reads + writes: every tensor input (once each, counting only the elements it addresses, so a
  broadcast `expand` reads its small source) plus every output. Views cost nothing; `copy_` reads its
  source only; in-place fills and random draws only write.
- class: "gemm" (matmuls, convolutions), "attention", "elementwise/norm" (everything else that moves
  memory: casts, norms, residuals, cats, the sampler's math), "other" (views, allocations: free).

Each op also carries the `helios_rt.ops` op (`OpSet` entry) it ran inside, so the "fused" scenario
can replace the memory-bound aten ops of one fused-op call by one kernel that moves only that call's
external inputs and outputs: exactly the bytes the Triton kernels in `helios_rt.kernels` move (see
`helios_rt.kernels.report`). Ops outside the op table (e.g. the cross-attention residual `cat`) keep
their own bytes in both scenarios.

`project` prices a trace on a `DeviceSpec` with stated `Efficiency` assumptions: per op, time =
max(FLOPs / (peak of its dtype * class efficiency), bytes / (HBM bandwidth * memory efficiency)), summed
(a roofline per op, no overlap between ops, no launch gaps: the program runs as CUDA graphs).
"""

from __future__ import annotations

from .chunk import (
    ChunkCost,
    ChunkShape,
    StageCost,
    meta_transformer,
    stage_layouts,
    trace_chunk,
    trace_forward,
    trace_history_embedding,
    trace_text_encoding,
    trace_vae_decode,
)
from .op_cost import (
    ATTENTION,
    ELEMENTWISE,
    GEMM,
    KINDS,
    OTHER,
    OpCost,
    ScopeCall,
    attention_flops,
    op_cost,
    unique_bytes,
)
from .projection import (
    DEVICES,
    H100_SXM,
    PAPER_FPS,
    ChunkProjection,
    ClassProjection,
    DeviceSpec,
    Efficiency,
    ProjectionRow,
    format_projection,
    helios_14b_chunk,
    op_seconds,
    project,
    project_trace,
    steady_chunk_seconds,
)
from .tracer import CostTracer, Trace, trace

__all__ = [
    "ATTENTION", "DEVICES", "ELEMENTWISE", "GEMM", "H100_SXM", "KINDS", "OTHER", "PAPER_FPS",
    "ChunkCost", "ChunkProjection", "ChunkShape", "ClassProjection", "CostTracer", "DeviceSpec", "Efficiency",
    "OpCost", "ProjectionRow", "ScopeCall", "StageCost", "Trace", "attention_flops", "format_projection",
    "helios_14b_chunk", "meta_transformer", "op_cost", "op_seconds", "project", "project_trace", "stage_layouts",
    "steady_chunk_seconds", "trace", "trace_chunk", "trace_forward", "trace_history_embedding", "trace_text_encoding",
    "trace_vae_decode", "unique_bytes",
]  # fmt: skip
