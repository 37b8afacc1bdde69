"""Op classes, and the FLOPs and bytes of one aten op (see `compile.cost`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

Tensor = torch.Tensor


GEMM, ATTENTION, ELEMENTWISE, OTHER = "gemm", "attention", "elementwise/norm", "other"
KINDS: tuple[str, ...] = (GEMM, ATTENTION, ELEMENTWISE, OTHER)

# ---- op classification ---------------------------------------------------------------------------
_MATMUL = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "_scaled_mm", "addmv", "mv"})
_CONV = frozenset({"convolution", "_convolution", "convolution_overrideable", "cudnn_convolution",
                   "mkldnn_convolution", "conv1d", "conv2d", "conv3d", "slow_conv3d_forward"})  # fmt: skip
# Attention ops with q `[B, H, L, D]`, and with q `[B, L, H, D]`.
_ATTN_BHLD = frozenset({"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                        "_scaled_dot_product_cudnn_attention",
                        "_scaled_dot_product_fused_attention_overrideable"})  # fmt: skip
_ATTN_BLHD = frozenset({"_flash_attention_forward", "_efficient_attention_forward"})
# Ops that alias their input without moving data but whose schema does not say "view".
_ALIASES = frozenset({"_unsafe_view", "lift_fresh", "alias", "_reshape_alias", "detach", "view_as_real",
                      "view_as_complex", "_nested_view_from_buffer"})  # fmt: skip
_ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
                          "resize_", "set_", "_local_scalar_dense", "sym_size", "sym_stride"})  # fmt: skip
_WRITE_ONLY = frozenset({"fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_"})
_MOVES = frozenset({"_to_copy", "copy_", "clone", "cat", "stack", "constant_pad_nd", "replication_pad3d",
                    "replication_pad2d", "index", "index_select", "gather", "repeat", "repeat_interleave",
                    "_unsafe_index", "masked_fill", "where", "expand_copy", "permute_copy",
                    "lift_fresh_copy"})  # fmt: skip
_NORMS = frozenset({"native_layer_norm", "_softmax", "_safe_softmax", "_log_softmax", "native_group_norm",
                    "native_batch_norm", "_fused_rms_norm", "_native_batch_norm_legit_no_training"})  # fmt: skip
_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "var", "var_mean", "std", "prod", "max", "min", "norm",
                         "linalg_vector_norm", "cumsum"})  # fmt: skip


def unique_bytes(t: Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (a broadcast dimension, stride 0, counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if size == 0:
            return 0
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(tree: Any) -> list[Tensor]:
    """The distinct tensors of a pytree, in order (a tensor passed twice is read once)."""
    seen, out = set(), []
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, Tensor) and id(leaf) not in seen:
            seen.add(id(leaf))
            out.append(leaf)
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class OpCost:
    """One recorded aten op (or one caught attention call) with its cost.

    scope: the `helios_rt.ops` op it ran inside (None outside any); call: that op call's index in the
    trace's `scopes` (-1 outside), which groups the aten ops one fused kernel replaces.
    """

    name: str
    kind: str
    flops: int
    bytes_read: int
    bytes_written: int
    dtype: str
    inputs: tuple[tuple[tuple[int, ...], str], ...]
    outputs: tuple[tuple[tuple[int, ...], str], ...]
    scope: str | None = None
    call: int = -1

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclass(frozen=True, slots=True)
class ScopeCall:
    """One call of a `helios_rt.ops` op: the bytes a fused kernel for it reads and writes."""

    name: str
    call: int
    bytes_read: int
    bytes_written: int


def _gemm_flops(op: str, args: Sequence[Any], out: Tensor) -> int:
    if op in ("mm", "_scaled_mm"):
        a, b = args[0], args[1]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if op == "addmm":
        a, b = args[1], args[2]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if op == "bmm":
        a, b = args[0], args[1]
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if op in ("baddbmm", "addbmm"):
        a, b = args[1], args[2]
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if op == "linear":
        x, w = args[0], args[1]
        return 2 * (x.numel() // x.shape[-1]) * w.shape[1] * w.shape[0]
    if op in ("mv", "addmv"):
        m = args[0] if op == "mv" else args[1]
        return 2 * m.shape[0] * m.shape[1]
    if op == "matmul":
        return 2 * out.numel() * args[0].shape[-1]
    # convolutions: input, weight, bias, stride, padding, dilation, transposed, ...
    x, w = args[0], args[1]
    transposed = bool(args[6]) if op in ("convolution", "_convolution", "convolution_overrideable") else False
    per_element = w.shape[1] * math.prod(w.shape[2:])
    return 2 * (x.numel() if transposed else out.numel()) * per_element


def attention_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int], heads_last: bool = False,
                    causal: bool = False) -> int:  # fmt: skip
    """`2 * batch*heads * Lq * Lk * (Dqk + Dv)` (QK^T and PV); `4 B H Lq Lk Dh` when Dqk = Dv = Dh.

    Shapes `[B, H, L, D]`, or `[B, L, H, D]` with heads_last. A causal mask halves the square part.
    """
    if heads_last:
        bh, lq, lk = q_shape[0] * q_shape[2], q_shape[1], k_shape[1]
    else:
        bh, lq, lk = math.prod(q_shape[:-2]), q_shape[-2], k_shape[-2]
    flops = 2 * bh * lq * lk * (q_shape[-1] + v_shape[-1])
    return flops // 2 if causal else flops


def _shapes(ts: Iterable[Tensor]) -> tuple[tuple[tuple[int, ...], str], ...]:
    return tuple((tuple(t.shape), _dtype_name(t.dtype)) for t in ts)


def op_cost(
    func: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any, scope: tuple[str, int] | None = None
) -> OpCost:
    """The cost of one aten op call (`func` an `OpOverload`) from its arguments and result."""
    op = func.overloadpacket.__name__
    kw = {k: v for k, v in kwargs.items() if k != "out"}
    ins = _tensors((args, kw))
    outs = _tensors(out)
    dtype_src = next((t for t in ins if t.is_floating_point()), None)
    if dtype_src is None:
        dtype_src = next(iter(outs or ins), None)
    dtype = _dtype_name(dtype_src.dtype) if dtype_src is not None else "none"
    flops = 0
    if func.is_view or op in _ALIASES or op in _ALLOCATIONS:
        kind, reads, writes = OTHER, 0, 0
    else:
        if op == "copy_":
            reads = unique_bytes(args[1]) if isinstance(args[1], Tensor) else 0
        elif op in _WRITE_ONLY:
            reads = sum(unique_bytes(t) for t in ins[1:])
        else:
            reads = sum(unique_bytes(t) for t in ins)
        writes = sum(unique_bytes(t) for t in outs)
        if op in _MATMUL or op in _CONV:
            kind, flops = GEMM, _gemm_flops(op, args, outs[0])
        elif op in _ATTN_BHLD or op in _ATTN_BLHD:
            q, k, v = args[0], args[1], args[2]
            causal = bool(kwargs.get("is_causal", False))
            kind = ATTENTION
            flops = attention_flops(q.shape, k.shape, v.shape, heads_last=op in _ATTN_BLHD, causal=causal)
        else:
            kind = ELEMENTWISE
            if op in _NORMS:
                flops = 5 * sum(t.numel() for t in ins[:1])
            elif op in _REDUCTIONS:
                flops = sum(t.numel() for t in ins[:1])
            elif op not in _MOVES and torch.Tag.pointwise in func.tags:
                flops = sum(t.numel() for t in outs)
    name, call = scope if scope is not None else (None, -1)
    return OpCost(str(func), kind, flops, reads, writes, dtype, _shapes(ins), _shapes(outs), name, call)


def _sdpa_cost(args: Sequence[Any], kwargs: dict[str, Any], out: Tensor, scope: tuple[str, int] | None) -> OpCost:
    names = ("query", "key", "value", "attn_mask")
    given = {**dict(zip(names, args, strict=False)), **kwargs}
    q, k, v = given["query"], given["key"], given["value"]
    ins = _tensors([q, k, v, given.get("attn_mask")])
    flops = attention_flops(q.shape, k.shape, v.shape, causal=bool(given.get("is_causal", False)))
    name, call = scope if scope is not None else (None, -1)
    return OpCost("aten.scaled_dot_product_attention", ATTENTION, flops, sum(unique_bytes(t) for t in ins),
                  unique_bytes(out), _dtype_name(q.dtype), _shapes(ins), _shapes([out]), name, call)  # fmt: skip
