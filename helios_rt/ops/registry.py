"""One table of fused ops: name -> PyTorch reference (the spec) and the fast backends that match it.

A leaf: it imports nothing from `helios_rt.ops`, so the references (`ops/reference.py`, `ops/sampler.py`,
`ops/fp8.py`) and the kernels (`kernels/`) register here without an import cycle. Which backend runs is
decided above it, once, when an op table is built (`ops/opset.py` `OpSet`; attention in
`ops/attention_backends.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Backend = Literal["triton"]
BACKENDS: tuple[str, ...] = ("triton",)  # the fast backends an op may register besides its reference


@dataclass
class OpEntry:
    """One op: its reference and the backends that implement the same contract."""

    name: str
    reference: Callable
    impls: dict[str, Callable] = field(default_factory=dict)


_TABLE: dict[str, OpEntry] = {}


def register_reference(name: str) -> Callable[[Callable], Callable]:
    """Declare `fn` as the reference (the spec) of op `name`."""

    def wrap(fn: Callable) -> Callable:
        if name in _TABLE:
            raise ValueError(f"op {name!r} already has a reference ({_TABLE[name].reference.__qualname__})")
        _TABLE[name] = OpEntry(name, fn)
        return fn

    return wrap


def register_impl(name: str, backend: Backend) -> Callable[[Callable], Callable]:
    """Register a backend implementation of op `name`; the reference must exist first."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def wrap(fn: Callable) -> Callable:
        if name not in _TABLE:
            raise KeyError(f"op {name!r} has no reference; register the reference before a {backend} impl")
        _TABLE[name].impls[backend] = fn
        return fn

    return wrap


def op_names() -> list[str]:
    """The registered ops, sorted (the references register when `helios_rt.ops` is imported)."""
    return sorted(_TABLE)


def entry(name: str) -> OpEntry:
    """The registered op `name`; an unknown name lists the known ones."""
    if name not in _TABLE:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(op_names())}")
    return _TABLE[name]
