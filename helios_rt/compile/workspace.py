"""Planning and executing the intermediate memory of a static program in one arena.

A static program (one chunk of one kind: `ChunkSampler.run_chunk`, every stage and step of it)
always runs the same aten ops on tensors of the same shapes. That lets its memory be planned once:

- **planning** (`plan_program`): the program runs on META tensors (no memory, no arithmetic, so the
  14B model plans in seconds) under `_Planner`, a `TorchDispatchMode` that sees every aten op. An
  op output whose storage is new is an intermediate buffer (views, in-place and `out=` results share
  an input's storage and are not); its lifetime runs from the step that creates it to the last step
  that reads or writes its storage. Storages the program did not create (weights, RoPE tables, text
  K/V, history tokens, static inputs and outputs) are persistent and stay out of the arena. The C++
  planner (`plan_memory`) then places the buffers in one arena.
- **execution** (`Executor`): the same program runs on real tensors; at each step that allocates in
  the plan, the op's `.out` overload writes into a view of the arena at the planned offset (the
  `empty*` factories simply return the view). Every step is checked against the plan (op, input
  shapes and dtypes) and a difference raises `PlanMismatch` at once; an op without an out variant, a
  random op or a host read of a tensor value raises `UnplannableOp` naming the op. A step that does
  not allocate in the plan must return tensors that alias its inputs, or it raises.

Every op of the op tables can be planned: the references are written with ops that have out=
forms (attention included), and the fused kernels are custom ops that write into outputs their
launchers allocated (see `kernels/_common.fused_op`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .planner import BufferRequest, MemoryPlan, plan_memory

Tensor = torch.Tensor
aten = torch.ops.aten

# Allocation factories: the arena view is the result, nothing is computed.
_EMPTY = frozenset({aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
                    aten.new_empty.default, aten.new_empty_strided.default, aten.empty_permuted.default})  # fmt: skip
# Functional arguments that an out variant takes from its `out` tensor instead.
_OUT_IMPLIED = frozenset({"dtype", "layout", "device", "pin_memory"})
# Ops that would make the op sequence depend on tensor values (a host read).
_HOST_READS = frozenset({aten._local_scalar_dense.default, aten.nonzero.default, aten.item.default})
# Random draws (fused attention kernels also carry the `nondeterministic_seeded` tag, for dropout).
_RANDOM = frozenset({"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal",
                     "normal_", "uniform_", "random_", "bernoulli", "bernoulli_", "exponential_", "cauchy_",
                     "geometric_", "log_normal_", "multinomial", "poisson", "native_dropout"})  # fmt: skip


class PlanMismatch(RuntimeError):
    """The executed op sequence differs from the planned one."""


class UnplannableOp(RuntimeError):
    """An op that a static program cannot run from a planned arena."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape, strides, storage offset and dtype of a planned buffer's tensor; `nbytes` of its storage."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    nbytes: int

    def __str__(self) -> str:
        return f"{_dtype(self.dtype)}{list(self.shape)}"


@dataclass(frozen=True)
class Step:
    """One aten op of the program: its inputs `((shape, dtype), ...)` and the buffers it allocates."""

    index: int
    op: str
    inputs: tuple[tuple[tuple[int, ...], torch.dtype], ...]
    allocs: tuple[tuple[int, TensorSpec], ...] = ()  # (buffer id, tensor), one per output

    def describe(self) -> str:
        ins = ", ".join(f"{_dtype(d)}{list(s)}" for s, d in self.inputs)
        outs = ", ".join(f"buffer {b}: {spec}" for b, spec in self.allocs)
        return f"{self.op}({ins})" + (f" -> {outs}" if outs else "")


@dataclass(frozen=True)
class ProgramPlan:
    """The planned op sequence of a program and where its intermediates live in the arena.

    persistent: bytes of the storages the program reads but did not create (weights, constants,
    static inputs and outputs), for reports.
    """

    steps: tuple[Step, ...]
    memory: MemoryPlan
    persistent_bytes: int

    @property
    def arena_bytes(self) -> int:
        return self.memory.arena_bytes

    @property
    def lower_bound_bytes(self) -> int:
        return self.memory.lower_bound_bytes

    @property
    def ratio(self) -> float:
        return self.memory.ratio

    @property
    def buffers(self) -> int:
        return len(self.memory.requests)


def _dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _tensors(tree: Any) -> list[Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, Tensor)]


def _input_specs(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[tuple[tuple[int, ...], torch.dtype], ...]:
    return tuple((tuple(t.shape), t.dtype) for t in _tensors((args, kwargs)))


def _describe_call(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    return Step(-1, str(func), _input_specs(args, kwargs)).describe()


def _check_plannable(func: Any) -> None:
    if func in _HOST_READS:
        raise UnplannableOp(
            f"{func} reads a tensor value on the host: a static program cannot branch on data; "
            "keep the decision out of the program or make it a tensor op"
        )
    if func.overloadpacket.__name__ in _RANDOM:
        raise UnplannableOp(f"{func} draws random numbers: draw them outside the program into a static input")


# ---- out variants --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _OutVariant:
    overload: Any
    names: tuple[str, ...]  # the functional schema's argument names, in order
    kept: frozenset[str]  # the ones the out overload takes
    outs: tuple[str, ...]  # the out overload's out arguments, in output order


_OUT_CACHE: dict[Any, _OutVariant | None] = {}


def out_variant(func: Any) -> _OutVariant | None:
    """The `.out` overload of an aten op (same arguments plus kwarg-only `out` tensors), or None."""
    if func in _OUT_CACHE:
        return _OUT_CACHE[func]
    schema = func._schema
    args = {a.name: str(a.type) for a in schema.arguments}
    found = None
    for name in func.overloadpacket.overloads():
        cand = getattr(func.overloadpacket, name)._schema
        outs = tuple(
            a.name for a in cand.arguments if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write
        )
        if len(outs) != len(schema.returns) or not outs:
            continue
        rest = {a.name: str(a.type) for a in cand.arguments if a.name not in outs}
        if any(args.get(n) != t for n, t in rest.items()) or not set(args) - set(rest) <= _OUT_IMPLIED:
            continue
        found = _OutVariant(getattr(func.overloadpacket, name), tuple(args), frozenset(rest), outs)
        break
    _OUT_CACHE[func] = found
    return found


def _copy_into(args: Sequence[Any], kwargs: dict[str, Any], outs: list[Tensor]) -> Tensor:
    return outs[0].copy_(args[0])


# Ops whose generated out= form (`torch.Tag.generated`) would compute into a temporary and then copy it:
# what they compute is a copy, so the planned buffer is written directly (one pass, no allocation
# outside the arena, none inside a CUDA graph capture). Dtype, device and layout are the planned view's.
_DIRECT_OUT: dict[Any, Callable[[Sequence[Any], dict[str, Any], list[Tensor]], Tensor]] = {
    aten._to_copy.default: _copy_into,
    aten.clone.default: _copy_into,
}


def _require_out_variant(func: Any) -> _OutVariant | None:
    if func in _EMPTY:
        return None
    variant = out_variant(func)
    if variant is None:
        raise UnplannableOp(
            f"{func} allocates its result but has no out= variant, so it cannot write into the arena; "
            "route it through an op of the op table (they all have out= contracts)"
        )
    return variant


def _call_out(func: Any, variant: _OutVariant, args: Sequence[Any], kwargs: dict[str, Any], outs: list[Tensor]):
    bound = dict(zip(variant.names, args, strict=False))
    bound.update(kwargs)
    call = {n: v for n, v in bound.items() if n in variant.kept}
    call.update(zip(variant.outs, outs, strict=True))
    return variant.overload(**call)


# ---- planning ----------------------------------------------------------------------------------------
def _storage_key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


class _Planner(TorchDispatchMode):
    """Records the op sequence and the lifetime of every storage the program creates.

    require_out: refuse an allocating op without an out= form (a program the Executor will run);
    False measures a computation that only needs its memory accounted (e.g. the VAE decode's peak).
    """

    def __init__(self, require_out: bool = True) -> None:
        super().__init__()
        self.require_out = require_out
        self.steps: list[Step] = []
        self.buffer_of: dict[int, int] = {}  # storage key -> buffer id
        self.sizes: list[int] = []
        self.first: list[int] = []
        self.last: list[int] = []
        self.external: dict[int, int] = {}  # storage key -> bytes, for storages the program did not create
        self._alive: list[Any] = []  # created storages stay referenced so that no key is reused

    def touch(self, t: Tensor, step: int) -> None:
        key = _storage_key(t)
        buffer = self.buffer_of.get(key)
        if buffer is not None:
            self.last[buffer] = step
        elif key not in self.external:
            self.external[key] = t.untyped_storage().nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        _check_plannable(func)
        i = len(self.steps)
        out = func(*args, **kwargs)
        ins = _tensors((args, kwargs))
        for t in ins:
            self.touch(t, i)
        in_keys = {_storage_key(t) for t in ins}
        outs = _tensors(out)
        allocs = []
        for t in outs:
            key = _storage_key(t)
            if key in in_keys or key in self.buffer_of:
                self.touch(t, i)
                continue
            buffer = len(self.sizes)
            storage = t.untyped_storage()
            self.buffer_of[key] = buffer
            self._alive.append(storage)
            self.sizes.append(storage.nbytes())
            self.first.append(i)
            self.last.append(i)
            allocs.append(
                (buffer, TensorSpec(tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, storage.nbytes()))
            )
        if allocs:
            if len(allocs) != len(outs) and self.require_out:
                raise UnplannableOp(f"{func} returns both new and aliased tensors; a static program cannot plan it")
            if self.require_out:
                _require_out_variant(func)
        self.steps.append(Step(i, str(func), _input_specs(args, kwargs), tuple(allocs)))
        return out


def plan_program(
    fn: Callable[..., Any], *args: Any, alignment: int = 256, require_out: bool = True, **kwargs: Any
) -> ProgramPlan:
    """Run `fn(*args, **kwargs)` (on meta tensors) and plan its intermediates in one arena.

    Tensors that `fn` returns stay live to the end of the program. require_out=False plans memory
    only (ops without out= forms allowed: the plan cannot be executed, only reported).
    """
    planner = _Planner(require_out)
    with planner:
        result = fn(*args, **kwargs)
    end = max(len(planner.steps) - 1, 0)
    for t in _tensors(result):
        buffer = planner.buffer_of.get(_storage_key(t))
        if buffer is not None:
            planner.last[buffer] = end
    requests = [
        BufferRequest(b, size, first, last)
        for b, (size, first, last) in enumerate(zip(planner.sizes, planner.first, planner.last, strict=True))
    ]
    memory = plan_memory(requests, alignment)
    return ProgramPlan(tuple(planner.steps), memory, sum(planner.external.values()))


# ---- execution ----------------------------------------------------------------------------------------
def allocate_arena(plan: ProgramPlan, device: torch.device | str) -> Tensor:
    """The program's arena: one uint8 tensor of `plan.arena_bytes` (at least one byte)."""
    return torch.empty(max(plan.arena_bytes, 1), dtype=torch.uint8, device=device)


class Executor(TorchDispatchMode):
    """Runs a program against its plan, handing out views of `arena` at the planned offsets.

    record_ranges: keep `(step, op, start, end)` of the storage behind every op output, so a test can
    check that every intermediate lies inside the arena.
    """

    def __init__(self, plan: ProgramPlan, arena: Tensor, record_ranges: bool = False) -> None:
        super().__init__()
        if arena.dtype != torch.uint8 or arena.dim() != 1 or arena.numel() < plan.arena_bytes:
            raise ValueError(f"arena must be a uint8 vector of at least {plan.arena_bytes} bytes")
        self.plan = plan
        self.arena = arena
        self.cursor = 0
        self.ranges: list[tuple[int, str, int, int]] | None = [] if record_ranges else None
        self._typed: dict[torch.dtype, Tensor] = {}
        self._arena_ptr = arena.untyped_storage().data_ptr()

    def view(self, buffer: int, spec: TensorSpec) -> Tensor:
        """A tensor `spec` over buffer `buffer`'s bytes of the arena."""
        typed = self._typed.get(spec.dtype)
        if typed is None:
            typed = self._typed[spec.dtype] = self.arena.view(spec.dtype)
        item = typed.element_size()
        base = self.arena.storage_offset() + self.plan.memory.offsets[buffer]
        return typed.as_strided(spec.shape, spec.stride, base // item + spec.offset)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        i = self.cursor
        _check_plannable(func)
        if i >= len(self.plan.steps):
            executed = _describe_call(func, args, kwargs)
            raise PlanMismatch(f"step {i}: the plan ended after {len(self.plan.steps)} steps, executed {executed}")
        step = self.plan.steps[i]
        if str(func) != step.op or _input_specs(args, kwargs) != step.inputs:
            raise PlanMismatch(f"step {i}: planned {step.describe()}, executed {_describe_call(func, args, kwargs)}")
        self.cursor += 1
        if step.allocs:
            outs = [self.view(b, spec) for b, spec in step.allocs]
            variant = _require_out_variant(func)
            if func in _DIRECT_OUT:
                result = _DIRECT_OUT[func](args, kwargs, outs)
            else:
                result = outs[0] if variant is None else _call_out(func, variant, args, kwargs, outs)
        else:
            result = func(*args, **kwargs)
            self._check_aliases(step, args, kwargs, result)
        if self.ranges is not None:
            for t in _tensors(result):
                s = t.untyped_storage()
                self.ranges.append((i, step.op, s.data_ptr(), s.data_ptr() + s.nbytes()))
        return result

    def _check_aliases(self, step: Step, args: Sequence[Any], kwargs: dict[str, Any], result: Any) -> None:
        ptrs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))} | {self._arena_ptr}
        for t in _tensors(result):
            if t.untyped_storage().data_ptr() not in ptrs:
                raise PlanMismatch(f"step {step.index}: {step.op} allocated a tensor the plan did not foresee")

    def finish(self) -> None:
        """Raise unless the whole plan ran."""
        if self.cursor != len(self.plan.steps):
            nxt = self.plan.steps[self.cursor].describe()
            raise PlanMismatch(f"step {self.cursor}: the program ended early; planned {nxt}")

    def __exit__(self, exc_type, exc, tb):
        super().__exit__(exc_type, exc, tb)
        if exc_type is None:
            self.finish()
