"""The chunk the engine plans, as a priced trace: one description of a chunk, the compiler's.

`planned_chunk` builds the `ChunkProgram` that `helios-rt plan` reports (`compile.memory_plan`: the meta model,
the distilled sampling spec, the op table a CUDA engine resolves) and plans its kinds under a
`CostTracer`, which sits under the planner's dispatch mode and so sees the ops the plan records, in order.
`price_plan` then checks the recorded sequence against the plan step for step (op and input shapes) and
raises `TraceMismatch` on any difference: the priced trace *is* the planned trace.

Per-stage figures come from the plan too: the meta sampler's `section_hook` tags every op with the
section it runs in ("stage s", "transition s"; "" for the history embedding, the start noise and the
history update around them).

The VAE decode is priced from its own plan (`memory_plan.vae_decode_bytes`' accounting-only plan on meta
tensors, on the same `meta_vae`): its per-frame attention is `F.scaled_dot_product_attention`, which on
meta lowers to bmm/softmax steps; those stay in the trace, unpriced, and one fused attention op is priced
in their place.

Executed steps that allocate call the op's out= form (`workspace.Executor`); where PyTorch generates that
form (the functional op into a temporary, then a copy), the copy is priced as an extra op
(`op_cost.generated_out_copy`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from ...config import ModelConfig
from ...ops import OpSet
from ..chunk_program import META, STEADY, ChunkKind, ChunkProgram, stream_kinds
from ..memory_plan import meta_vae
from ..meta_program import distilled_spec, meta_chunk_program
from ..workspace import ProgramPlan, Step, plan_program
from .op_cost import OpCost, _dtype_name, generated_out_copy
from .shape import ChunkShape
from .tracer import CostTracer, Trace


class TraceMismatch(RuntimeError):
    """The recorded ops are not the plan's steps."""


def _same(op: OpCost, step: Step) -> bool:
    return op.name == step.op and op.inputs == tuple((s, _dtype_name(d)) for s, d in step.inputs)


def _window(ops: list[OpCost], steps: tuple[Step, ...]) -> int:
    """Where the plan's steps start among the recorded planned ops (setup before planning is recorded too)."""
    n = len(steps)
    for start in range(len(ops) - n + 1):
        if _same(ops[start], steps[0]) and all(_same(ops[start + i], s) for i, s in enumerate(steps)):
            return start
    first = steps[0].describe() if steps else "(empty plan)"
    raise TraceMismatch(f"the recorded ops do not contain the plan's {n} steps (first: {first}); the cost "
                        "recorder must run under the planner's dispatch mode, around plan_program")  # fmt: skip


def _aten_op(name: str):
    """The OpOverload of a step's op string ("aten.add.Tensor")."""
    ns, packet, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, ns), packet), overload)


def price_plan(recorded: Trace, plan: ProgramPlan, label: str, executed: bool = True) -> Trace:
    """The plan's steps with their recorded costs (plus the unplanned attention ops, and with `executed` (a
    plan the `Executor` runs) the generated out= copies); `TraceMismatch` unless the recorded planned ops
    contain the steps exactly."""
    planned = [i for i, o in enumerate(recorded.ops) if o.planned]
    start = _window([recorded.ops[i] for i in planned], plan.steps)
    first, last = planned[start], planned[start + len(plan.steps) - 1]
    out: list[OpCost] = []
    k = start
    for op in recorded.ops[first : last + 1]:
        out.append(op)
        if not op.planned:
            continue
        step = plan.steps[k - start]
        k += 1
        if executed and step.allocs and op.name.startswith("aten."):
            extra = generated_out_copy(_aten_op(op.name), op.bytes_written, op.section)
            if extra is not None:
                out.append(extra)
    return Trace(label, tuple(out))


@dataclass(frozen=True)
class PlannedChunk:
    """The priced plans of one engine configuration: the first chunk of a stream, the steady chunk, the decode.

    steps: steps per pyramid stage; kernels/attention: the op table and attention backend planned with.
    """

    label: str
    config: ModelConfig
    shape: ChunkShape
    dtype: torch.dtype
    precision: str
    kernels: str
    attention: str
    steps: tuple[int, ...]
    first: Trace
    steady: Trace
    vae: Trace | None

    @property
    def frames(self) -> int:
        return self.shape.pixel_frames

    def stage(self, s: int, first: bool = False) -> Trace:
        """Stage `s` of the chunk (its forwards and sampler steps), from the section hook."""
        return (self.first if first else self.steady).section(f"stage {s}")


def build_program(config: ModelConfig, shape: ChunkShape, dtype: torch.dtype, kernels: str, attention: str,
                  steps: tuple[int, ...], precision: str) -> ChunkProgram:  # fmt: skip
    """`memory_plan.plan_chunk`'s program (the one `helios-rt plan` reports), before any kind is planned."""
    ops = OpSet.for_planning(kernels, attention=attention)
    return meta_chunk_program(config, shape, dtype, ops, distilled_spec(shape.stages, steps), precision)


def trace_kind(program: ChunkProgram, kind: ChunkKind, label: str) -> Trace:
    """Plan `kind` under the cost recorder (with the meta sampler's sections) and price the plan."""
    if kind in program.plans:
        raise ValueError(f"{kind} is planned already: trace_kind must see it planned (use a fresh program)")
    tracer = CostTracer()
    meta_sampler = program._meta_copy()[0]  # the sampler the plan runs (ChunkProgram keeps no hook of its own)
    meta_sampler.section_hook = tracer.section_hook
    try:
        with tracer:
            plan = program.plan(kind)
    finally:
        meta_sampler.section_hook = None
    return price_plan(tracer.trace(label), plan, label)


def steady_kind() -> ChunkKind:
    """Every chunk after a stream's first (`chunk_program.STEADY`)."""
    return STEADY


def first_kind(shape: ChunkShape) -> ChunkKind:
    """The first chunk of a text-to-video stream, as the engine runs it (`stream_kinds`): amplified (the
    distilled spec the cost model plans) and writing the prefix frame when the layout keeps one."""
    return stream_kinds(True, shape.keep_first_frame, prefix_set=False)[0]


@functools.lru_cache(maxsize=16)  # planning the 14B takes ~30 s per kind on a CPU
def planned_chunk(config: ModelConfig, shape: ChunkShape | None = None, dtype: torch.dtype = torch.bfloat16,
                  precision: str = "native", kernels: str = "auto", attention: str = "auto",
                  steps: tuple[int, ...] = (1, 1, 1), label: str = "", vae: bool = True) -> PlannedChunk:  # fmt: skip
    """Plan and price the first and the steady chunk kinds (and the VAE decode) of one configuration."""
    shape = shape or ChunkShape()
    program = build_program(config, shape, dtype, kernels, attention, tuple(steps), precision)
    steady = trace_kind(program, steady_kind(), "steady chunk")
    first = trace_kind(program, first_kind(shape), "first chunk")
    decode = vae_trace(shape, dtype) if vae else None
    return PlannedChunk(label or "Helios", config, shape, dtype, precision, kernels,
                        program.sampler.ops.backend_of("attention"), tuple(steps), first, steady, decode)  # fmt: skip


@functools.lru_cache(maxsize=4)
def vae_trace(shape: ChunkShape, dtype: torch.dtype = torch.bfloat16, slice_frames: int | None = None) -> Trace:
    """The VAE decode of one chunk, planned as `memory_plan.vae_decode_bytes` plans it (its meta VAE), and priced."""
    vae = meta_vae(dtype)
    cfg = vae.config
    vae.use_norm_silu("triton")  # what a CUDA engine decodes with (`WanVAE.prepare_decode`): the fused norm + SiLU
    z = torch.empty(shape.batch, cfg.z_dim, shape.latent_frames, *shape.latent_hw, device=META)
    tracer = CostTracer()
    with tracer:
        plan = plan_program(lambda latents: vae.decode_frames(latents, normalized=True, slice_frames=slice_frames),
                            z, require_out=False)  # fmt: skip
    # the decode runs on the caching allocator, not from the arena: its ops run in their functional forms
    return price_plan(tracer.trace("VAE decode"), plan, "VAE decode", executed=False)


def with_section(trace: Trace, name: str) -> Trace:
    """`trace` with every op tagged `name` (for a trace priced as one group)."""
    return Trace(trace.label, tuple(replace(o, section=name) for o in trace.ops))
