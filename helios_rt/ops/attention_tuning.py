"""Warm-up tuning of `attention="auto"` on CUDA: time every backend that runs at the engine's own shapes and
keep the fastest.

The shapes are read from the chunk's plans (`plan_shapes`: every attention op of every planned kind, with
its q and k shapes, counted), the op sequence the engine runs, whether planned now or loaded from the plan
cache; so the trial covers each pyramid stage's self-attention and the cross-attention to the prompt at the
engine's batch, lengths, heads, head dim and dtype (per rank under sequence parallelism), each weighted by
how often a chunk makes it. A backend's score is the sum of (median ms x calls) over those shapes.

Tuning allocates, synchronises and lets the Triton kernel autotune at each shape, so it belongs to warm-up,
before any capture; inside a capture it raises. A backend that cannot run (the table's reason), fails the
dispatch's probe, or raises at one of the shapes is passed over with that reason; the selection keeps the
times of the others, fastest first, for `Engine.attention.describe()`.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .attention_backends import (
    AUTO_ORDER,
    BACKENDS,
    AttentionDispatch,
    AttentionSelection,
    implementation,
)

Tensor = torch.Tensor
Timer = Callable[[str, Callable[[], object]], float]  # (backend, one call) -> ms per call
Key = tuple[torch.dtype, int]
AttentionShape = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]  # q shape, k shape, dtype
ATTENTION_OP = re.compile(r"helios_rt\.attention(_\w+)?\.default")  # the Triton op and the library ops


def plan_shapes(plans: Iterable) -> Counter[AttentionShape]:
    """The attention calls of `plans` (`compile.workspace.ProgramPlan`s) by (q shape, k shape, dtype)."""
    shapes: Counter[AttentionShape] = Counter()
    for plan in plans:
        for step in plan.steps:
            if ATTENTION_OP.fullmatch(step.op):
                (q, dtype), (k, _) = step.inputs[:2]
                shapes[(q, k, dtype)] += 1
    return shapes


@dataclass(frozen=True)
class Tuning:
    """What `tune_attention` decided: the timed selection per (dtype, head dim), and whether any backend
    changed (then every plan made with the previous pick names the wrong op and must be remade)."""

    selections: dict[Key, AttentionSelection] = field(default_factory=dict)
    changed: bool = False


def tune_attention(
    attention: object,
    shapes: Mapping[AttentionShape, int],
    timer: Timer | None = None,
    lookup: Callable[[str], Callable] | None = None,
) -> Tuning:
    """Time the backends of `attention` (an op table's `attention`) at `shapes` (calls per chunk, e.g.
    `plan_shapes(program.plans.values())`) and adopt the fastest per (dtype, head dim). Does nothing unless
    `attention` is the backend table's dispatch for `attention="auto"` on CUDA; a (dtype, head dim) already
    timed is kept (its graphs may be captured)."""
    if not isinstance(attention, AttentionDispatch) or attention.choice != "auto" or not attention.env.cuda:
        return Tuning()
    if _capturing(attention.device):
        raise RuntimeError("attention tuning cannot run while a CUDA graph is being captured; "
                           "tune in warm-up, before ChunkProgram.capture()")  # fmt: skip
    groups: dict[Key, dict[AttentionShape, int]] = defaultdict(dict)
    for shape, calls in shapes.items():
        groups[(shape[2], shape[0][-1])][shape] = calls
    tuned: dict[Key, AttentionSelection] = {}
    changed = False
    with _device(attention.device):
        for key, group in groups.items():
            before = attention.selections.get(key)
            if before is not None and before.timings:
                continue
            sel = _tune_one(attention, key, group, timer or event_timer(attention.device), lookup or implementation)
            attention.adopt(sel)
            tuned[key] = sel
            changed |= before is None or before.backend != sel.backend
    return Tuning(tuned, changed)


def _tune_one(
    dispatch: AttentionDispatch, key: Key, shapes: dict[AttentionShape, int], timer: Timer,
    lookup: Callable[[str], Callable],
) -> AttentionSelection:  # fmt: skip
    dtype, head_dim = key
    passed: list[tuple[str, str]] = []
    candidates = []
    for name in AUTO_ORDER:
        why = BACKENDS[name].reason(dispatch.env, dtype, head_dim)
        if why is None and dispatch.probe is not None:
            why = dispatch.probe(name, dtype, head_dim)
        (passed.append((name, why)) if why else candidates.append(name))
    totals, failed = _time_all(candidates, shapes, dispatch.device, timer, lookup)
    passed += [(name, failed[name]) for name in candidates if name in failed]
    timings = tuple(sorted(totals.items(), key=lambda item: item[1]))
    calls = sum(shapes.values())
    if not timings:
        note = "no backend passed its trial at the chunk's shapes"
        return AttentionSelection("reference", "auto", dtype, head_dim, tuple(passed), note)
    note = f"fastest in warm-up over the chunk's {calls} calls at {len(shapes)} shapes, ms per chunk"
    return AttentionSelection(timings[0][0], "auto", dtype, head_dim, tuple(passed), note, timings)


def _time_all(
    candidates: list[str], shapes: dict[AttentionShape, int], device: torch.device, timer: Timer,
    lookup: Callable[[str], Callable],
) -> tuple[dict[str, float], dict[str, str]]:  # fmt: skip
    """Sum of ms x calls per backend; a backend that raises at any shape is out, with the shape and error.
    One shape's inputs live at a time (the 14B's largest is a few hundred MB)."""
    totals: dict[str, float] = {}
    failed: dict[str, str] = {}
    for shape, calls in shapes.items():
        q, k, v = _inputs(shape, device)
        out = torch.empty_like(q)
        for name in candidates:
            if name in failed:
                continue
            try:
                ms = timer(name, functools.partial(lookup(name), q, k, v, out=out))
            except Exception as err:  # passed over with the reason, like a failed probe
                failed[name] = f"failed its trial at {describe_shape(shape)} ({type(err).__name__}: {err})"
                totals.pop(name, None)
                continue
            totals[name] = totals.get(name, 0.0) + ms * calls
        del q, k, v, out
    return totals, failed


def describe_shape(shape: AttentionShape) -> str:
    (b, lq, h, d), (_, lk, _, _), dtype = shape
    return f"q [{b}, {lq}, {h}, {d}] x k [{lk}] {str(dtype).removeprefix('torch.')}"


def _inputs(shape: AttentionShape, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Unit-variance q, k, v (seeded on the CPU generator: the same inputs on every machine)."""
    q_shape, k_shape, dtype = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(q_shape, generator=g).to(device, dtype)
    k, v = (torch.randn(k_shape, generator=g).to(device, dtype) for _ in range(2))
    return q, k, v


def event_timer(device: torch.device, iters: int = 5) -> Timer:
    """Median ms of `iters` calls after one untimed call (Triton autotunes, cuDNN builds its plan)."""

    def timer(name: str, call: Callable[[], object]) -> float:
        call()
        return median_ms(call, device, iters)

    return timer


def median_ms(call: Callable[[], object], device: torch.device, iters: int) -> float:
    """Median of `iters` timings: CUDA events on a GPU (device time, not launch time), else the host clock."""
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            call()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph capture is under way on the current stream (of `device` when it is a GPU)."""
    if not torch.cuda.is_available():
        return False
    with _device(device):
        return torch.cuda.is_current_stream_capturing()


def _device(device: torch.device) -> contextlib.AbstractContextManager:
    """`device` as the current CUDA device: the libraries and Triton launch on the current one."""
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device)
    return contextlib.nullcontext()
