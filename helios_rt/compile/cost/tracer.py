"""The dispatch-mode tracer: every aten op of a function on META tensors, with its op-table scope."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ...model.transformer import HeliosTransformer
from ...ops import OpSet
from .op_cost import ATTENTION, ELEMENTWISE, GEMM, KINDS, OpCost, ScopeCall, _sdpa_cost, _tensors, op_cost, unique_bytes

Tensor = torch.Tensor


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[OpCost] = []
        self.scopes: list[ScopeCall] = []
        self.scope: tuple[str, int] | None = None
        self.quiet = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.quiet:
            self.ops.append(op_cost(func, args, kwargs, out, self.scope))
        return out


class _AttentionCatcher(TorchFunctionMode):
    """Records `F.scaled_dot_product_attention` as one op and silences the aten ops it lowers to.

    The result gets the memory layout the GPU kernels (FlashAttention, cuDNN, PyTorch's flash and
    efficient backends) give it, `[B, L, H, D]` in memory, so that the usual `.transpose(1, 2)
    .flatten(2)` afterwards is a view, as on a GPU, and not the copy the math path would need.
    """

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.recorder.quiet += 1
        try:
            out = func(*args, **kwargs)
            if out.dim() == 4:  # FlashAttention's layout: [B, H, L, D] over [B, L, H, D] memory
                out = out.transpose(1, 2).contiguous().transpose(1, 2)
        finally:
            self.recorder.quiet -= 1
        if not self.recorder.quiet:
            self.recorder.ops.append(_sdpa_cost(args, kwargs, out, self.recorder.scope))
        return out


class _ScopedOps:
    """An `OpSet` whose op calls open a scope in the recorder (nested calls belong to the outer one)."""

    def __init__(self, ops: OpSet, recorder: _Recorder) -> None:
        self._ops = ops
        self._recorder = recorder

    def __getattr__(self, name: str) -> Callable:
        fn = getattr(self._ops, name)
        if not callable(fn) or name.startswith("_") or name == "backend_of":
            return fn
        rec = self._recorder

        def scoped(*args: Any, **kwargs: Any) -> Any:
            if rec.scope is not None:
                return fn(*args, **kwargs)
            rec.scope = (name, len(rec.scopes))
            try:
                out = _attention(fn, args, kwargs, rec) if name == "attention" else fn(*args, **kwargs)
            finally:
                call, rec.scope = rec.scope[1], None
            reads = sum(unique_bytes(t) for t in _tensors((args, {k: v for k, v in kwargs.items() if k != "out"})))
            rec.scopes.append(ScopeCall(name, call, reads, sum(unique_bytes(t) for t in _tensors(out))))
            return out

        return scoped


def _attention(fn: Callable, args: Sequence[Any], kwargs: dict[str, Any], rec: _Recorder) -> Any:
    """The op table's attention `[B, L, H, D]` as one attention op, whatever it lowers to (the reference's
    query-chunked bmm/softmax, a fused kernel): the cost of the FlashAttention-style kernel it stands for."""
    rec.quiet += 1
    try:
        out = fn(*args, **kwargs)
    finally:
        rec.quiet -= 1
    if not rec.quiet:
        q, k, v = (t.transpose(1, 2) for t in args[:3])  # the SDPA layout the cost model reads
        rec.ops.append(_sdpa_cost((q, k, v), {}, out.transpose(1, 2), rec.scope))
    return out


@dataclass(frozen=True)
class KindTotals:
    count: int  # ops that move memory or compute (views and allocations excluded)
    flops: int
    bytes: int


@dataclass
class Trace:
    """The recorded ops of one piece of work (a forward, a sampler step, ...)."""

    label: str
    ops: list[OpCost]
    scopes: list[ScopeCall] = field(default_factory=list)

    def flops(self, kind: str | None = None) -> int:
        return sum(o.flops for o in self.ops if kind is None or o.kind == kind)

    def bytes(self, kind: str | None = None) -> int:
        return sum(o.bytes for o in self.ops if kind is None or o.kind == kind)

    def totals(self) -> dict[str, KindTotals]:
        acc = {k: [0, 0, 0] for k in KINDS}
        for o in self.ops:
            a = acc[o.kind]
            a[0] += 1 if (o.flops or o.bytes) else 0
            a[1] += o.flops
            a[2] += o.bytes
        return {k: KindTotals(*v) for k, v in acc.items()}

    def by_name(self) -> list[tuple[str, str, int, int, int]]:
        """(aten op, class, calls, FLOPs, bytes) per op name, most bytes first."""
        acc: dict[str, list] = {}
        for o in self.ops:
            a = acc.setdefault(o.name, [o.kind, 0, 0, 0])
            a[1] += 1
            a[2] += o.flops
            a[3] += o.bytes
        return sorted(((n, *v) for n, v in acc.items()), key=lambda r: -r[4])

    def by_scope(self) -> list[tuple[str, int, int, int]]:
        """(helios_rt op or "(outside ops)", calls, reference bytes, fused bytes) of memory-bound work."""
        ref: dict[str, int] = defaultdict(int)
        for o in self.ops:
            if o.kind == ELEMENTWISE:
                ref[o.scope or "(outside ops)"] += o.bytes
        fused: dict[str, int] = defaultdict(int)
        calls: dict[str, int] = defaultdict(int)
        for o in self.fused().ops:
            if o.kind == ELEMENTWISE:
                fused[o.scope or "(outside ops)"] += o.bytes
        for s in self.scopes:
            calls[s.name] += 1
        return sorted(((n, calls.get(n, 0), b, fused.get(n, 0)) for n, b in ref.items()), key=lambda r: -r[2])

    def fused(self) -> Trace:
        """The same work with every `helios_rt.ops` call's memory-bound ops replaced by one fused kernel.

        That kernel reads the call's tensor arguments and writes its results once (what the Triton
        kernels do); GEMM and attention ops inside a call are kept as they are, and a call that
        contains one (attention) drops its memory-bound ops: they are its prologue.
        """
        has_compute = {o.call for o in self.ops if o.call >= 0 and o.kind in (GEMM, ATTENTION)}
        moves = {o.call for o in self.ops if o.call >= 0 and o.kind == ELEMENTWISE}
        flops: dict[int, int] = defaultdict(int)
        for o in self.ops:
            if o.call >= 0 and o.kind == ELEMENTWISE:
                flops[o.call] += o.flops
        out: list[OpCost] = []
        emitted: set[int] = set()
        for o in self.ops:
            if o.call < 0 or o.kind in (GEMM, ATTENTION):
                out.append(o)
            elif o.call not in has_compute and o.call in moves and o.call not in emitted:
                s = self.scopes[o.call]
                emitted.add(o.call)
                out.append(OpCost(f"fused.{s.name}", ELEMENTWISE, flops[o.call], s.bytes_read, s.bytes_written,
                                  o.dtype, (), (), s.name, s.call))  # fmt: skip
        return Trace(f"{self.label} (fused)", out, list(self.scopes))


class CostTracer:
    """Records every aten op run inside it; `ops` is an `OpSet` whose calls are scoped for `Trace.fused`.

    with CostTracer() as tracer:
        y = tracer.ops.gelu_tanh(x)
    trace = tracer.trace("gelu")
    """

    def __init__(self, ops: OpSet | None = None) -> None:
        self._recorder = _Recorder()
        self.ops = _ScopedOps(ops or OpSet("cpu", "reference"), self._recorder)
        self._catcher = _AttentionCatcher(self._recorder)

    def __enter__(self) -> CostTracer:
        self._recorder.__enter__()
        self._catcher.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._catcher.__exit__(*exc)
        self._recorder.__exit__(*exc)

    def trace(self, label: str = "") -> Trace:
        return Trace(label, list(self._recorder.ops), list(self._recorder.scopes))


def trace(fn: Callable[..., Any], *args: Any, label: str = "", **kwargs: Any) -> Trace:
    """Run `fn(*args, **kwargs)` under a `CostTracer` and return its trace."""
    with CostTracer() as tracer:
        fn(*args, **kwargs)
    return tracer.trace(label)


@contextmanager
def _model_ops(model: HeliosTransformer, ops: Any):
    saved = model.ops
    model.ops = ops
    try:
        yield model
    finally:
        model.ops = saved
