"""Op classes, and the FLOPs and bytes of one aten or `helios_rt::` op (see `compile.cost`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

Tensor = torch.Tensor


GEMM, ATTENTION, NORM, ELEMENTWISE, COPY, OTHER, VIEW = (
    "gemm", "attention", "norm", "elementwise", "copy/cast", "other", "view")  # fmt: skip
KINDS: tuple[str, ...] = (GEMM, ATTENTION, NORM, ELEMENTWISE, COPY, OTHER, VIEW)
# The classes priced by bytes alone: everything outside GEMMs and attention (views move nothing).
MEMORY_BOUND: tuple[str, ...] = (NORM, ELEMENTWISE, COPY, OTHER)

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
# Copies and casts: what moves or converts a tensor without computing on it.
_COPIES = frozenset({"_to_copy", "copy_", "clone", "cat", "stack", "expand_copy", "permute_copy", "lift_fresh_copy",
                     "repeat", "contiguous"})  # fmt: skip
_MOVES = _COPIES | frozenset({"constant_pad_nd", "replication_pad3d", "replication_pad2d", "index", "index_select",
                              "gather", "repeat_interleave", "_unsafe_index", "masked_fill", "where"})  # fmt: skip
_NORMS = frozenset({"native_layer_norm", "_softmax", "_safe_softmax", "_log_softmax", "native_group_norm",
                    "native_batch_norm", "_fused_rms_norm", "_native_batch_norm_legit_no_training"})  # fmt: skip
# Reductions are priced as norms: in this model they are the pieces of RMSNorms written in aten ops.
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


def _leaves(args: Any, kwargs: dict[str, Any]) -> tuple[tuple[tuple[int, ...], str], ...]:
    """Every tensor argument, in order, repeats included: the planner's `Step.inputs`, to compare with."""
    return _shapes(x for x in tree_flatten((args, kwargs))[0] if isinstance(x, Tensor))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class OpCost:
    """One op of a planned trace with its cost.

    section: the sampler section it ran in ("stage 2", "transition 1"; "" outside any), from the
    sampler's `section_hook`; backend: for attention, which backend's op it is ("triton", "fa3", ...).
    planned: a step of the plan (False for the one attention op that stands for a fused SDPA call's
    lowered steps); priced: counted by the projection (False for those lowered steps).
    """

    name: str
    kind: str
    flops: int
    bytes_read: int
    bytes_written: int
    dtype: str
    inputs: tuple[tuple[tuple[int, ...], str], ...]  # every tensor argument, as the plan's step lists them
    outputs: tuple[tuple[tuple[int, ...], str], ...]
    section: str = ""
    backend: str = ""
    planned: bool = True
    priced: bool = True

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


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


def _custom_kind(name: str) -> str:
    """The class of a `helios_rt::` op from its name (the kernels are named for what they do)."""
    if name.startswith("attention"):
        return ATTENTION
    if "linear" in name or "gemm" in name or name.endswith("_mm"):
        return GEMM
    if "norm" in name:
        return NORM
    if "quantize" in name or "cast" in name or "copy" in name:
        return COPY
    return ELEMENTWISE


def _custom_cost(func: Any, args: Sequence[Any], kwargs: dict[str, Any], section: str) -> OpCost:
    """A `helios_rt::` custom op: it reads its unmutated tensor arguments and writes its mutated ones; a mutated
    argument named with a trailing `_` is updated in place, read and written (`kernels._common.fused_op`)."""
    name = func.overloadpacket.__name__
    schema = func._schema.arguments
    given = {**{a.name: v for a, v in zip(schema, args, strict=False)}, **kwargs}
    written = {a.name for a in schema if a.alias_info is not None and a.alias_info.is_write}
    ins = _tensors([v for k, v in given.items() if k not in written or k.endswith("_")])
    outs = _tensors([v for k, v in given.items() if k in written])
    kind, flops, backend = _custom_kind(name), 0, ""
    if kind == ATTENTION:  # q, k, v [B, L, H, D]
        q, k, v = ins[0], ins[1], ins[2]
        flops = attention_flops(q.shape, k.shape, v.shape, heads_last=True)
        backend = name.removeprefix("attention").removeprefix("_") or "triton"
    elif kind == GEMM:  # x [..., K] against a weight: 2 K per output element
        flops = 2 * sum(t.numel() for t in outs[:1]) * ins[0].shape[-1]
    dtype = next((_dtype_name(t.dtype) for t in ins if t.is_floating_point()), "none")
    return OpCost(str(func), kind, flops, sum(unique_bytes(t) for t in ins), sum(unique_bytes(t) for t in outs),
                  dtype, _leaves(args, kwargs), _shapes(outs), section, backend)  # fmt: skip


def op_cost(func: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any, section: str = "") -> OpCost:
    """The cost of one op call (`func` an `OpOverload`: aten or `helios_rt::`) from its arguments and result."""
    if func.namespace == "helios_rt":
        return _custom_cost(func, args, kwargs, section)
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
        kind, reads, writes = VIEW, 0, 0
    else:
        if op == "copy_":
            reads = unique_bytes(args[1]) if isinstance(args[1], Tensor) else 0
        elif op in _WRITE_ONLY:
            reads = sum(unique_bytes(t) for t in ins[1:])
        else:
            reads = sum(unique_bytes(t) for t in ins)
        writes = sum(unique_bytes(t) for t in outs)
        kind, flops = _aten_kind(func, op, args, kwargs, ins, outs)
    return OpCost(str(func), kind, flops, reads, writes, dtype, _leaves(args, kwargs), _shapes(outs), section)


def _aten_kind(func: Any, op: str, args: Sequence[Any], kwargs: dict[str, Any], ins: list[Tensor],
               outs: list[Tensor]) -> tuple[str, int]:  # fmt: skip
    """(class, FLOPs) of an aten op that moves memory or computes."""
    if op in _MATMUL or op in _CONV:
        return GEMM, _gemm_flops(op, args, outs[0])
    if op in _ATTN_BHLD or op in _ATTN_BLHD:
        q, k, v = args[0], args[1], args[2]
        causal = bool(kwargs.get("is_causal", False))
        return ATTENTION, attention_flops(q.shape, k.shape, v.shape, heads_last=op in _ATTN_BLHD, causal=causal)
    if op in _NORMS:
        return NORM, 5 * sum(t.numel() for t in ins[:1])
    if op in _REDUCTIONS:
        return NORM, sum(t.numel() for t in ins[:1])
    if op in _COPIES:
        return COPY, 0
    if op in _MOVES or torch.Tag.pointwise not in func.tags:
        return OTHER, 0
    return ELEMENTWISE, sum(t.numel() for t in outs)


def generated_out_copy(func: Any, written: int, section: str) -> OpCost | None:
    """The extra pass of an allocating step whose out= form is generated: the functional op into a temporary,
    then a copy into the planned buffer (the executor calls the out= form). None for a native out= kernel.

    Generated out= forms have only a CompositeExplicitAutograd kernel (`autogen:` in PyTorch's
    native_functions.yaml); native ones have backend (CPU, CUDA) kernels.
    """
    from ..workspace import out_variant

    variant = out_variant(func) if func.namespace == "aten" else None
    if variant is None:
        return None
    name = variant.overload.name()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    if not has(name, "CompositeExplicitAutograd") or has(name, "CPU") or has(name, "CUDA"):
        return None
    return OpCost(f"copy into out= ({func})", COPY, 0, written, written, "", (), (), section, planned=False)


def sdpa_cost(args: Sequence[Any], kwargs: dict[str, Any], out: Tensor, section: str = "") -> OpCost:
    """`F.scaled_dot_product_attention` as the one fused kernel a GPU runs for it (cuDNN or flash)."""
    names = ("query", "key", "value", "attn_mask")
    given = {**dict(zip(names, args, strict=False)), **kwargs}
    q, k, v = given["query"], given["key"], given["value"]
    ins = _tensors([q, k, v, given.get("attn_mask")])
    flops = attention_flops(q.shape, k.shape, v.shape, causal=bool(given.get("is_causal", False)))
    return OpCost("aten.scaled_dot_product_attention", ATTENTION, flops, sum(unique_bytes(t) for t in ins),
                  unique_bytes(out), _dtype_name(q.dtype), _shapes(ins), _shapes([out]), section, "sdpa",
                  planned=False)  # fmt: skip
