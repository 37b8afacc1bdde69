"""The op table: every fused op resolved once, when the table is built, to the function that runs it.

`OpSet` declares one typed attribute per op; its constructor picks, for each, the backend that runs on
the device (`kernels`: "auto", "reference" or "triton") and stores that backend's function there, the
Triton launcher (`kernels/`) or the PyTorch reference (`ops/reference.py`, `ops/sampler.py`,
`ops/fp8.py`). A block's `ops.modulate_layernorm(...)` is then a plain call of that function: nothing
is looked up by name per call (vLLM's `CustomOp.dispatch_forward` binds `forward_native` or
`forward_cuda` at construction the same way). Attention may instead hold the backend table's dispatch
(`ops/attention_backends.py`), which binds one launcher per (dtype, head dim).

Selection sits here, above the leaf registry (`ops/registry.py`) that the references and the kernels
register in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from . import fp8, reference, sampler  # noqa: F401  (the references register on import)
from .attention_backends import AttentionDispatch, AttentionFn, AttentionSelection, attention_dispatch, pinned_note
from .launch import load_triton, on_device, triton_runs
from .registry import OpEntry, entry, op_names

Tensor = torch.Tensor
KernelChoice = Literal["auto", "reference", "triton"]
KERNEL_CHOICES: tuple[str, ...] = ("auto", "reference", "triton")
Op = Callable[..., Tensor]  # the reference's signature, with `out=`: see the reference of the same name
PairOp = Callable[..., tuple[Tensor, Tensor]]  # an op returning two tensors (q/k, or FP8 data and scales)


class OpSet:
    """The ops resolved for one device and kernel choice: each attribute below is the function that runs
    that op (its reference, in `ops/reference.py`, `ops/sampler.py` or `ops/fp8.py`, is the spec).

    `kernels="auto"` takes the fastest registered backend that runs on `device` (Triton on CUDA,
    the reference elsewhere); `"triton"` demands Triton for every op that has it and fails loudly
    where Triton cannot run; `"reference"` runs the spec everywhere. `attention` picks the attention
    backend (`ops/attention_backends.py`: "auto", "fa3", "fa2", "triton", "sdpa", "reference"); "auto"
    follows `kernels`, and on CUDA with `kernels="auto"` takes the best backend that runs.
    """

    # The class annotations are the ops, exactly the registered ones (`_bind_ops` checks): nothing else.
    # the transformer block (Triton launchers in kernels/norm.py, residual.py, residual_norm.py, attention.py,
    # linear.py)
    modulate_layernorm: Op
    layernorm: Op
    rmsnorm: Op
    gate_residual: Op
    residual_modulate_layernorm: Op
    residual_layernorm: Op
    qk_norm_rope: PairOp
    attention: AttentionFn  # a launcher, or the per-(dtype, head dim) `AttentionDispatch`
    gelu_tanh: Op
    linear_gelu_tanh: Op
    # FP8 activations (kernels/quantize.py)
    fp8_quantize_rows: PairOp
    modulate_layernorm_fp8: PairOp
    gelu_tanh_fp8: PairOp
    # the sampler (kernels/sampler.py)
    flow_step: Op
    stage_transition: Op
    cfg_combine: Op

    def __init__(
        self, device: torch.device | str = "cpu", kernels: KernelChoice = "auto", attention: str = "auto"
    ) -> None:
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be 'auto', 'reference' or 'triton', got {kernels!r}")
        device = torch.device(device)
        use_triton = kernels == "triton" or (kernels == "auto" and device.type == "cuda")
        if use_triton and not triton_runs(device):
            raise ValueError(f"kernels='triton' needs a CUDA device or TRITON_INTERPRET=1; device is {device}")
        self._build(device, kernels, use_triton, attention, None)

    @classmethod
    def for_planning(cls, kernels: KernelChoice = "auto", target: str = "cuda", attention: str = "auto") -> OpSet:
        """The op table a `target` device would resolve, on meta tensors: nothing runs, so the
        backends need not run here (plan the GPU's Triton path on a CPU machine)."""
        ops = cls.__new__(cls)
        use_triton = kernels == "triton" or (kernels == "auto" and target == "cuda")
        ops._build(torch.device("meta"), kernels, use_triton, attention, target)
        return ops

    def _build(self, device: torch.device, kernels: str, use_triton: bool, attention: str, target: str | None) -> None:
        self.device: torch.device = device
        self.kernels: str = kernels
        if use_triton:
            load_triton()
        self._chosen: dict[str, str] = {}  # op -> the backend the table resolved (for reports and tests)
        self._bind_ops(use_triton)
        self._table_attention: AttentionFn = self.attention
        self._bind_attention(kernels, attention, target)

    def _bind_ops(self, use_triton: bool) -> None:
        """Each op's function, once: the Triton launcher when the table uses Triton and the op has one."""
        declared, registered = set(OpSet.__annotations__), set(op_names())
        if declared != registered:
            raise TypeError(
                f"OpSet declares {sorted(declared - registered)} without a registered reference and lacks "
                f"{sorted(registered - declared)}: declare each registered op as a typed attribute of OpSet"
            )
        for name in op_names():
            fn, backend = self._pick(entry(name), use_triton)
            setattr(self, name, fn)
            self._chosen[name] = backend

    def _pick(self, op: OpEntry, use_triton: bool) -> tuple[Callable, str]:
        impl = op.impls.get("triton") if use_triton else None
        if impl is None:
            return op.reference, "reference"
        return on_device(impl, self.device), "triton"

    def _bind_attention(self, kernels: str, choice: str, target: str | None) -> None:
        """An explicit attention choice, or "auto" on CUDA with kernels="auto", installs the backend
        table's dispatch; otherwise attention stays the op the table resolved from `kernels`."""
        self._attention_note = pinned_note(self.device, kernels, choice, target)
        self._dispatch: AttentionDispatch | None = (
            None if self._attention_note else attention_dispatch(self.device, choice, target)
        )
        self.attention = self._dispatch or self._table_attention

    def use_attention(self, choice: str) -> None:
        """Re-pick the attention backend (`EngineConfig.attention`) for this table's device and kernels."""
        self._bind_attention(self.kernels, choice, None)

    def attention_selection(self, dtype: torch.dtype, head_dim: int) -> AttentionSelection:
        """Which attention backend runs for (dtype, head dim), and why not the others (the dispatch binds
        its launcher for that pair now)."""
        if self._dispatch is not None:
            return self._dispatch.select(dtype, head_dim)
        return AttentionSelection(self._chosen["attention"], "auto", dtype, head_dim, note=self._attention_note)

    def backend_of(self, name: str) -> str:
        """Which backend runs op `name` (for reports and tests)."""
        if name == "attention" and self._dispatch is not None:
            return self._dispatch.backend
        return self._chosen[name]
