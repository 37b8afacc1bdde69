"""Bytes moved by a planned chunk, per op class, read from its plan's steps (the trace the engine runs).

Per step: reads = every tensor input (shape x dtype; an out= buffer handed to a custom op counts as its
write), writes = every buffer the step allocates. An aten op whose out= form is codegen-generated
(`torch.Tag.generated`: `_to_copy.out`, `native_layer_norm.out`, ...) computes into a temporary and
copies it into the planned buffer, so its allocation is written twice and read once more. Views and
allocation factories move nothing. GEMMs (matmuls, convolutions) and attention are counted apart:
what is left to cut is the bytes outside them (norms, casts, copies).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from helios_rt.compile.workspace import ProgramPlan, Step

GEMM = ("aten.mm.", "aten.addmm.", "aten.bmm.", "aten._scaled_mm.", "aten.convolution.", "aten.linear.",
        "helios_rt.linear_gelu_tanh")  # a GEMM with its GELU epilogue
ATTENTION = ("helios_rt.attention", "helios_rt::attention", "aten._softmax.")
FREE = ("aten.empty", "aten.new_empty", "aten.empty_like", "aten.empty_strided", "aten.empty_permuted")


def _overload(name: str):
    """The OpOverload of a step's op name (`aten.mul.Tensor`, `helios_rt.norm.default`), or None."""
    ns, _, rest = name.partition(".")
    packet_name, _, overload = rest.rpartition(".")
    try:
        return getattr(getattr(getattr(torch.ops, ns), packet_name), overload)
    except AttributeError:
        return None


def _is_view(name: str) -> bool:
    op = _overload(name)
    if op is None or op._schema.is_mutable:
        return False
    return any(r.alias_info is not None for r in op._schema.returns)


def _generated_out(name: str) -> bool:
    from helios_rt.compile.workspace import out_variant

    op = _overload(name)
    variant = None if op is None else out_variant(op)
    return variant is not None and torch.Tag.generated in variant.overload.tags


def op_class(step: Step) -> str:
    """gemm, attention, free (views, allocations) or the op's own name (its packet, e.g. aten._to_copy)."""
    if step.op.startswith(GEMM):
        return "gemm"
    if step.op.startswith(ATTENTION):
        return "attention"
    if step.op.startswith(FREE) or _is_view(step.op):
        return "free"
    return step.op.rsplit(".", 1)[0]


def step_bytes(step: Step) -> int:
    reads = sum(torch.Size(s).numel() * d.itemsize for s, d in step.inputs)
    writes = sum(spec.nbytes for _, spec in step.allocs)
    if writes and _generated_out(step.op):
        writes *= 3  # the generated out= form: write a temporary, read it, write the planned buffer
    return reads + writes


@dataclass(frozen=True)
class TraceBytes:
    """Steps and bytes per op class of one plan."""

    steps: dict[str, int]
    bytes: dict[str, int]

    @property
    def outside_gemm_attention(self) -> int:
        return sum(b for c, b in self.bytes.items() if c not in ("gemm", "attention", "free"))

    def format(self, top: int = 20) -> str:
        rows = sorted(self.bytes.items(), key=lambda kv: -kv[1])[:top]
        lines = [f"{c:48s} {self.steps[c]:7d} steps {b / 1e9:9.3f} GB" for c, b in rows]
        lines.append(f"{'outside GEMM and attention':48s} {'':13s} {self.outside_gemm_attention / 1e9:9.3f} GB")
        return "\n".join(lines)


def trace_bytes(plan: ProgramPlan) -> TraceBytes:
    steps: dict[str, int] = defaultdict(int)
    moved: dict[str, int] = defaultdict(int)
    for step in plan.steps:
        c = op_class(step)
        steps[c] += 1
        moved[c] += 0 if c == "free" else step_bytes(step)
    return TraceBytes(dict(steps), dict(moved))
