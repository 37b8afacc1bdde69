"""One table of fused ops: name -> PyTorch reference (the spec) and optional fast backends.

The model never calls a kernel directly. It asks an `OpSet` (built once per engine from the device
and `EngineConfig.kernels`) for an op by name, so that adding a Triton or CUDA implementation, or
an FP8 variant later, changes one registration and nothing in the model.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

Backend = Literal["reference", "triton", "cuda"]
KernelChoice = Literal["auto", "reference", "triton"]
BACKENDS: tuple[str, ...] = ("reference", "triton", "cuda")


@dataclass
class OpEntry:
    """One op: its reference and the backends that implement the same contract."""

    name: str
    reference: Callable
    impls: dict[str, Callable] = field(default_factory=dict)


_TABLE: dict[str, OpEntry] = {}
# Modules that register fast backends on import; a failed import is remembered, not swallowed.
_BACKEND_MODULES: dict[str, str] = {"triton": "helios_rt.kernels"}
_IMPORT_ERRORS: dict[str, BaseException] = {}


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
    if backend not in BACKENDS or backend == "reference":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")

    def wrap(fn: Callable) -> Callable:
        if name not in _TABLE:
            raise KeyError(f"op {name!r} has no reference; register the reference before a {backend} impl")
        _TABLE[name].impls[backend] = fn
        return fn

    return wrap


def op_names() -> list[str]:
    return sorted(_TABLE)


def entry(name: str) -> OpEntry:
    _ensure_references()
    if name not in _TABLE:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(op_names())}")
    return _TABLE[name]


def _ensure_references() -> None:
    importlib.import_module("helios_rt.ops.reference")


def _load_backend(backend: str) -> None:
    """Import the module that registers `backend`; re-raise its failure with a fix when asked for."""
    module = _BACKEND_MODULES.get(backend)
    if module is None:
        return
    if backend in _IMPORT_ERRORS:
        err = _IMPORT_ERRORS[backend]
        raise RuntimeError(
            f"kernels={backend!r} was requested but {module} failed to import ({err!r}); "
            f"install a working {backend} or use kernels='reference'"
        ) from err
    try:
        importlib.import_module(module)
    except ImportError as err:
        _IMPORT_ERRORS[backend] = err
        _load_backend(backend)


def _triton_usable(device: torch.device) -> bool:
    import os

    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _on_device(impl: Callable, device: torch.device) -> Callable:
    """Launch a Triton kernel on `device`: Triton launches on the *current* CUDA device, which for an
    engine on cuda:1 is usually cuda:0 (a wrong-device launch faults or reads garbage)."""

    @functools.wraps(impl)
    def launch(*args, **kwargs):
        with torch.cuda.device(device):
            return impl(*args, **kwargs)

    return launch


class OpSet:
    """The ops resolved for one device and kernel choice; attribute access returns the callable.

    `kernels="auto"` takes the fastest registered backend that runs on `device` (Triton on CUDA,
    the reference elsewhere); `"triton"` demands Triton for every op that has it and fails loudly
    where Triton cannot run; `"reference"` runs the spec everywhere. `attention` picks the attention
    backend (`ops/attention_backends.py`: "auto", "fa3", "fa2", "triton", "sdpa", "reference"); "auto"
    follows `kernels`, and on CUDA with `kernels="auto"` takes the best backend that runs.
    """

    def __init__(
        self, device: torch.device | str = "cpu", kernels: KernelChoice = "auto", attention: str = "auto"
    ) -> None:
        if kernels not in ("auto", "reference", "triton"):
            raise ValueError(f"kernels must be 'auto', 'reference' or 'triton', got {kernels!r}")
        _ensure_references()
        self.device = torch.device(device)
        self.kernels = kernels
        use_triton = kernels == "triton" or (kernels == "auto" and self.device.type == "cuda")
        if use_triton:
            if not _triton_usable(self.device):
                raise ValueError(f"kernels='triton' needs a CUDA device or TRITON_INTERPRET=1; device is {self.device}")
            _load_backend("triton")
        self._resolve(use_triton)
        self._resolve_attention(kernels, attention, None)

    @classmethod
    def for_planning(cls, kernels: KernelChoice = "auto", target: str = "cuda", attention: str = "auto") -> OpSet:
        """The op table a `target` device would resolve, on meta tensors: nothing runs, so the
        backends need not run here (plan the GPU's Triton path on a CPU machine)."""
        ops = cls.__new__(cls)
        _ensure_references()
        ops.device, ops.kernels = torch.device("meta"), kernels
        use_triton = kernels == "triton" or (kernels == "auto" and target == "cuda")
        if use_triton:
            _load_backend("triton")
        ops._resolve(use_triton)
        ops._resolve_attention(kernels, attention, target)
        return ops

    def _resolve(self, use_triton: bool) -> None:
        self._resolved: dict[str, Callable] = {}
        self._chosen: dict[str, str] = {}
        for name, op in _TABLE.items():
            impl = op.impls.get("triton") if use_triton else None
            if impl is not None and self.device.type == "cuda" and self.device.index is not None:
                impl = _on_device(impl, self.device)
            self._resolved[name] = impl or op.reference
            self._chosen[name] = "triton" if impl else "reference"

    def use_attention(self, choice: str) -> None:
        """Re-pick the attention backend (`EngineConfig.attention`) for this table's device and kernels."""
        self._resolve_attention(self.kernels, choice, None)

    def attention_selection(self, dtype: torch.dtype, head_dim: int):
        """Which attention backend runs for (dtype, head dim), and why the others do not
        (`ops.attention_backends.AttentionSelection`)."""
        from .attention_backends import AttentionSelection

        if self._attention is not None:
            return self._attention.select(dtype, head_dim)
        return AttentionSelection(self._chosen["attention"], "auto", dtype, head_dim, note=self._attention_note)

    def _resolve_attention(self, kernels: str, choice: str, target: str | None) -> None:
        """An explicit attention choice, or "auto" on CUDA with kernels="auto", installs the backend
        table's dispatch; otherwise attention stays the op the table resolved from `kernels`."""
        from .attention_backends import attention_dispatch, pinned_note

        self.__dict__.setdefault("_table_attention", self._resolved["attention"])
        self._attention_note = pinned_note(self.device, kernels, choice, target)
        self._attention = None if self._attention_note else attention_dispatch(self.device, choice, target)
        self._resolved["attention"] = self._attention or self._table_attention

    def __getattr__(self, name: str) -> Callable:
        resolved = self.__dict__.get("_resolved", {})
        if name in resolved:
            return resolved[name]
        raise AttributeError(f"unknown op {name!r}; known ops: {', '.join(sorted(resolved))}")

    def backend_of(self, name: str) -> str:
        """Which backend runs op `name` (for reports and tests)."""
        if name == "attention" and self._attention is not None:
            return self._attention.backend
        return self._chosen[name]
