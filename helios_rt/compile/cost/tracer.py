"""The cost recorder: every op a function dispatches on META tensors, with its sampler section.

It runs as a `TorchDispatchMode` *under* the planner's (`workspace._Planner`): the planner sees each op
first and hands it down, so the recorder sees exactly the ops the plan records, in the same order, and
keeps what the plan does not (strides, scalar arguments, results) to price them. `planned.py` checks
that the two sequences are the same op for op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .op_cost import KINDS, VIEW, OpCost, op_cost, sdpa_cost

Tensor = torch.Tensor


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[OpCost] = []
        self.section = ""
        self.hidden = 0  # > 0 inside a fused SDPA call: its lowered steps are planned, not priced

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        op = op_cost(func, args, kwargs, out, self.section)
        self.ops.append(replace(op, priced=False) if self.hidden else op)
        return out


class _AttentionCatcher(TorchFunctionMode):
    """`F.scaled_dot_product_attention` priced as the one fused kernel a GPU runs for it.

    On meta it lowers to the math path (bmm, softmax, bmm): those steps stay in the trace (the plan holds
    them) but are not priced; one attention op (`planned=False`) is priced in their place.
    """

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.recorder.hidden += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.recorder.hidden -= 1
        if not self.recorder.hidden:
            self.recorder.ops.append(sdpa_cost(args, kwargs, out, self.recorder.section))
        return out


@dataclass(frozen=True)
class KindTotals:
    count: int  # ops that move memory or compute (views and allocations excluded)
    flops: int
    bytes: int


@dataclass(frozen=True)
class Trace:
    """The recorded ops of one piece of work (a chunk kind, a VAE decode, one op)."""

    label: str
    ops: tuple[OpCost, ...]

    @property
    def priced(self) -> tuple[OpCost, ...]:
        """The ops the projection prices (a fused SDPA call as one op, not its lowered steps)."""
        return tuple(o for o in self.ops if o.priced)

    @property
    def planned(self) -> tuple[OpCost, ...]:
        """The ops that are steps of the plan, in order."""
        return tuple(o for o in self.ops if o.planned)

    def flops(self, kind: str | None = None) -> int:
        return sum(o.flops for o in self.priced if kind is None or o.kind == kind)

    def bytes(self, kind: str | None = None) -> int:
        return sum(o.bytes for o in self.priced if kind is None or o.kind == kind)

    def section(self, name: str) -> Trace:
        """The ops of one sampler section ("stage 2", "transition 1", "" for those outside every section)."""
        return Trace(f"{self.label}: {name or 'outside sections'}", tuple(o for o in self.ops if o.section == name))

    @property
    def sections(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(o.section for o in self.ops))

    def totals(self) -> dict[str, KindTotals]:
        acc = {k: [0, 0, 0] for k in KINDS}
        for o in self.priced:
            a = acc[o.kind]
            a[0] += 1 if o.kind != VIEW else 0
            a[1] += o.flops
            a[2] += o.bytes
        return {k: KindTotals(*v) for k, v in acc.items()}

    def by_name(self) -> list[tuple[str, str, int, int, int]]:
        """(op, class, calls, FLOPs, bytes) per op name, most bytes first."""
        acc: dict[str, list] = {}
        for o in self.priced:
            a = acc.setdefault(o.name, [o.kind, 0, 0, 0])
            a[1] += 1
            a[2] += o.flops
            a[3] += o.bytes
        return sorted(((n, *v) for n, v in acc.items()), key=lambda r: -r[4])


class CostTracer:
    """Records every op run inside it, and the sampler section each ran in (`section_hook`).

    with CostTracer() as tracer:
        y = torch.mm(a, b)
    trace = tracer.trace("mm")
    """

    def __init__(self) -> None:
        self._recorder = _Recorder()
        self._catcher = _AttentionCatcher(self._recorder)

    def __enter__(self) -> CostTracer:
        self._recorder.__enter__()
        self._catcher.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._catcher.__exit__(*exc)
        self._recorder.__exit__(*exc)

    @contextlib.contextmanager
    def section_hook(self, name: str) -> Iterator[None]:
        """A `ChunkSampler.section_hook`: the ops run inside are tagged `name`."""
        saved, self._recorder.section = self._recorder.section, name
        try:
            yield
        finally:
            self._recorder.section = saved

    def trace(self, label: str = "") -> Trace:
        return Trace(label, tuple(self._recorder.ops))


def trace(fn: Callable[..., Any], *args: Any, label: str = "", **kwargs: Any) -> Trace:
    """Run `fn(*args, **kwargs)` under a `CostTracer` and return its trace."""
    with CostTracer() as tracer:
        fn(*args, **kwargs)
    return tracer.trace(label)
