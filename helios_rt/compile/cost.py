"""FLOPs and bytes of every op of a Helios forward and chunk, and a roofline projection for a named GPU.

How the numbers are obtained: the program's code (the transformer forward, the sampler step, the stage
transition, the start noise, the history patch embedding) runs on META tensors, so the 14B model costs
no memory and no arithmetic, under a `TorchDispatchMode` that records every aten op with the shapes
and dtypes of its inputs and outputs. Per op:

- FLOPs: `2 M K N` for mm/addmm/(bmm: times the batch)/linear/_scaled_mm, `2 * out_elements *
  C_in/groups * prod(kernel)` for convolutions (the patch embeddings), `2 * B*H * Lq * Lk * (Dqk + Dv)`
  for attention (= `4 B H Lq Lk Dh`). `F.scaled_dot_product_attention` is caught before it lowers
  (on meta it lowers to the unfused math path: bmm, softmax, bmm) and recorded as one attention op, as
  the FlashAttention kernels that run it on a GPU are; the fused `_scaled_dot_product_*` /
  `_flash_attention_forward` / `_efficient_attention_forward` aten ops are priced the same way when a
  trace meets them. Elementwise FLOPs (one per output element of a pointwise op, one per input element
  of a reduction, five per element of a norm/softmax) are informational: those ops are priced by bytes.
- bytes = reads + writes: every tensor input (once each, counting only the elements it addresses, so a
  broadcast `expand` reads its small source) plus every output. Views cost nothing; `copy_` reads its
  source only; in-place fills and random draws only write.
- class: "gemm" (matmuls, convolutions), "attention", "elementwise/norm" (everything else that moves
  memory: casts, norms, residuals, cats, the sampler's math), "other" (views, allocations: free).

Each op also carries the `helios_rt.ops` op (`OpSet` entry) it ran inside, so the "fused" scenario
can replace the memory-bound aten ops of one fused-op call by one kernel that moves only that call's
external inputs and outputs: exactly the bytes the Triton kernels in `helios_rt.kernels` move (see
`helios_rt.kernels.report`). Ops outside the op table (e.g. the cross-attention residual `cat`) keep
their own bytes in both scenarios.

`project` prices a trace on a `DeviceSpec` with stated `Efficiency` assumptions: per op, time =
max(FLOPs / (peak of its dtype * class efficiency), bytes / (HBM bandwidth * memory efficiency)), summed
(a roofline per op, no overlap between ops, no launch gaps: the program runs as CUDA graphs).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..config import ModelConfig
from ..model.layout import TokenLayout, build_layout
from ..model.transformer import HeliosTransformer, HistoryTokens, TextContext, keeps_fp32
from ..ops import OpSet

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


# ---- the tracer ------------------------------------------------------------------------------------
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
                out = fn(*args, **kwargs)
            finally:
                call, rec.scope = rec.scope[1], None
            reads = sum(unique_bytes(t) for t in _tensors((args, {k: v for k, v in kwargs.items() if k != "out"})))
            rec.scopes.append(ScopeCall(name, call, reads, sum(unique_bytes(t) for t in _tensors(out))))
            return out

        return scoped


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


# ---- the model on META tensors ---------------------------------------------------------------------
META = torch.device("meta")


@functools.lru_cache(maxsize=4)
def meta_transformer(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> HeliosTransformer:
    """The transformer on the meta device, in `dtype` except the float32-kept parameters (as loaded)."""
    ops = OpSet("cpu", "reference")
    with torch.device("meta"):
        model = HeliosTransformer(config, ops)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
    return model.eval()


def _empty(*shape: int, dtype: torch.dtype) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


def noisy_latent_shape(config: ModelConfig, layout: TokenLayout) -> tuple[int, int, int]:
    return tuple(g * p for g, p in zip(layout.noisy_grid, config.patch_size, strict=True))


def trace_forward(
    config: ModelConfig,
    layout: TokenLayout,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    text_len: int = 512,
    label: str = "forward",
    unpatchify: bool = False,
) -> Trace:
    """One transformer forward on meta tensors, as a compiled stage runs it.

    Constants are inputs, not work: the prompt's per-block text K/V (`TextContext`), the RoPE tables,
    the patch-embedded history (computed once per chunk: see `trace_history_embedding`) and the
    timestep-0 history modulation. Latents and timesteps are float32 as the sampler holds them;
    `unpatchify=False` returns the patch layout that the fused sampler step reads.
    """
    model = meta_transformer(config, dtype)
    d, h, dh = config.dim, config.num_attention_heads, config.attention_head_dim
    latents = _empty(batch, config.in_channels, *noisy_latent_shape(config, layout), dtype=torch.float32)
    kv = _empty(batch, text_len, h, dh, dtype=dtype)
    text = TextContext([kv] * config.num_layers, [kv] * config.num_layers)
    history = HistoryTokens(_empty(batch, layout.n_hist, d, dtype=dtype)) if layout.n_hist else None
    rope = (
        _empty(layout.n_tokens, dh // 2, dtype=torch.float32),
        _empty(layout.n_tokens, dh // 2, dtype=torch.float32),
    )
    with CostTracer(model.ops) as tracer, _model_ops(model, tracer.ops):
        model(latents, _empty(batch, dtype=torch.float32), text, layout, rope, history,
              _empty(1, 6, d, dtype=dtype), unpatchify=unpatchify)  # fmt: skip
    return tracer.trace(label)


def trace_history_embedding(
    config: ModelConfig, layout: TokenLayout, batch: int = 1, dtype: torch.dtype = torch.bfloat16
) -> Trace:
    """Patch embedding of the history latents (once per chunk: the history changes between chunks)."""
    model = meta_transformer(config, dtype)
    hh, hw = layout.history_latent_hw or (0, 0)
    latents = {s.name: _empty(batch, config.in_channels, len(s.frame_indices), hh, hw, dtype=torch.float32)
               for s in layout.history}  # fmt: skip
    with CostTracer(model.ops) as tracer:
        if layout.history:
            model.embed_history(layout, latents.get("short"), latents.get("mid"), latents.get("long"))
    return tracer.trace("history patch embedding")


def trace_text_encoding(
    config: ModelConfig, batch: int = 1, dtype: torch.dtype = torch.bfloat16, text_len: int = 512
) -> Trace:
    """Per prompt (not per chunk): text projection and every block's cross-attention K and V."""
    model = meta_transformer(config, dtype)
    with CostTracer(model.ops) as tracer, _model_ops(model, tracer.ops):
        model.encode_text(_empty(batch, text_len, config.text_dim, dtype=dtype))
    return tracer.trace("text K/V (per prompt)")


# ---- one chunk ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkShape:
    """What fixes the shapes of a chunk: resolution, chunk and history sizes, batch, text length."""

    height: int = 384
    width: int = 640
    latent_frames: int = 9
    history_sizes: tuple[int, int, int] = (16, 2, 1)  # long, mid, short (+ the prefix frame)
    keep_first_frame: bool = True
    stages: int = 3
    batch: int = 1
    text_len: int = 512
    vae_scale: int = 8  # pixels per latent, spatially
    frames_per_latent: int = 4  # pixel frames per latent frame after the first

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae_scale, self.width // self.vae_scale

    @property
    def pixel_frames(self) -> int:
        return 1 + self.frames_per_latent * (self.latent_frames - 1)


def stage_layouts(config: ModelConfig, shape: ChunkShape) -> list[TokenLayout]:
    """The token layout of every pyramid stage, with the sampler's frame indices."""
    from ..sampling.history import HistoryLayout
    from ..sampling.pyramid import stage_hw

    idx = {k: tuple(v[0].tolist()) for k, v in HistoryLayout(shape.history_sizes, shape.latent_frames,
                                                               shape.keep_first_frame).indices().items()}  # fmt: skip
    history = {"short": idx["indices_latents_history_short"], "mid": idx["indices_latents_history_mid"],
               "long": idx["indices_latents_history_long"]}  # fmt: skip
    return [
        build_layout(config, (shape.latent_frames, *hw), idx["indices_hidden_states"], shape.latent_hw, history)
        for hw in stage_hw(*shape.latent_hw, shape.stages)
    ]


@dataclass
class StageCost:
    index: int
    layout: TokenLayout
    forward: Trace  # one transformer forward
    step: Trace  # the sampler step after each forward
    transition: Trace | None  # into this stage (block noise, upsample and mix), once per chunk

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.layout.noisy_grid[1:]


@dataclass
class ChunkCost:
    """Traces of one chunk's work; step counts are applied when it is projected or totalled."""

    label: str
    config: ModelConfig
    shape: ChunkShape
    dtype: torch.dtype
    stages: list[StageCost]
    per_chunk: Trace  # start noise and its downsampling, history patch embedding
    per_prompt: Trace  # text K/V: not part of a chunk
    vae: Trace | None = None  # decode of the chunk's latents (an estimate), when traced

    def pieces(self, steps: Sequence[int], fused: bool = False) -> list[tuple[str, Trace, int]]:
        """(group, trace, times per chunk) of everything a chunk runs, with `steps[s]` steps in stage s."""
        if len(steps) != len(self.stages):
            raise ValueError(f"steps={tuple(steps)}: one step count per stage ({len(self.stages)} stages)")
        f = (lambda t: t.fused()) if fused else (lambda t: t)
        out = []
        for st, n in zip(self.stages, steps, strict=True):
            name = f"stage {st.index}"
            out.append((name, f(st.forward), n))
            out.append((name, f(st.step), n))
            if st.transition is not None:
                out.append((name, f(st.transition), 1))
        out.append(("per chunk", f(self.per_chunk), 1))
        return out

    def flops(self, steps: Sequence[int], kind: str | None = None) -> int:
        """FLOPs of one chunk's transformer and sampler work (no VAE)."""
        return sum(t.flops(kind) * n for _, t, n in self.pieces(steps))

    def bytes(self, steps: Sequence[int], kind: str | None = None, fused: bool = False) -> int:
        return sum(t.bytes(kind) * n for _, t, n in self.pieces(steps, fused))


def _trace_sampler_step(config: ModelConfig, layout: TokenLayout, batch: int, dtype: torch.dtype) -> Trace:
    c = config.in_channels
    p = config.patch_size
    latent = noisy_latent_shape(config, layout)
    v = _empty(batch, layout.n_noisy, config.out_dim * math.prod(p), dtype=dtype)
    x = _empty(batch, c, *latent, dtype=torch.float32)
    start = _empty(batch, c, *latent, dtype=torch.float32)
    sigma = _empty(1, dtype=torch.float32)
    with CostTracer() as tracer:
        tracer.ops.flow_step(v, x, start, sigma, sigma, p)
    return tracer.trace("sampler step")


def _trace_transition(config: ModelConfig, layout: TokenLayout, batch: int) -> Trace:
    """Block noise at the stage's size (drawn on CPU: the real function, tiny) and the stage transition."""
    from ..sampling.pyramid import sample_block_noise

    c = config.in_channels
    t, h, w = noisy_latent_shape(config, layout)
    gen = torch.Generator().manual_seed(0)
    with CostTracer() as tracer:
        noise = sample_block_noise(batch, c, t, h, w, 1 / 3, config.patch_size, gen)
        x = torch.zeros(batch, c, t, h // 2, w // 2)
        tracer.ops.stage_transition(x, noise, 1.0, 1.0)
    return tracer.trace("stage transition")


def _trace_chunk_start(config: ModelConfig, shape: ChunkShape) -> Trace:
    from ..sampling.pyramid import chunk_noise, downsample_noise

    gen = torch.Generator().manual_seed(0)
    with CostTracer() as tracer:
        noise = chunk_noise(shape.batch, config.in_channels, shape.latent_frames, *shape.latent_hw, gen)
        downsample_noise(noise, shape.stages)
    return tracer.trace("start noise")


def trace_vae_decode(shape: ChunkShape, dtype: torch.dtype = torch.bfloat16) -> Trace:
    """The Wan 2.1 VAE decode of one chunk's latents, default config, on meta tensors (an estimate)."""
    from ..model.vae import VAEConfig, WanVAE

    with torch.device("meta"):
        vae = WanVAE(VAEConfig())
    vae = vae.to(dtype)
    z = _empty(shape.batch, vae.config.z_dim, shape.latent_frames, *shape.latent_hw, dtype=torch.float32)
    with CostTracer() as tracer:
        vae.decode(z, normalized=True)
    return tracer.trace("VAE decode")


def trace_chunk(
    config: ModelConfig,
    shape: ChunkShape | None = None,
    dtype: torch.dtype = torch.bfloat16,
    label: str = "",
    vae: bool = False,
) -> ChunkCost:
    """Trace every piece of one chunk: per stage a forward, a sampler step and the transition into it;
    per chunk the start noise and the history embedding; per prompt the text K/V; optionally the VAE."""
    shape = shape or ChunkShape()
    layouts = stage_layouts(config, shape)
    stages = []
    for s, layout in enumerate(layouts):
        fwd = trace_forward(config, layout, shape.batch, dtype, shape.text_len, label=f"stage {s} forward")
        step = _trace_sampler_step(config, layout, shape.batch, dtype)
        transition = _trace_transition(config, layout, shape.batch) if s else None
        stages.append(StageCost(s, layout, fwd, step, transition))
    start = _trace_chunk_start(config, shape)
    hist = trace_history_embedding(config, layouts[-1], shape.batch, dtype)
    hist = _shift(hist, len(start.scopes))
    per_chunk = Trace("per chunk", start.ops + hist.ops, start.scopes + hist.scopes)
    prompt = trace_text_encoding(config, shape.batch, dtype, shape.text_len)
    vae_trace = trace_vae_decode(shape, dtype) if vae else None
    return ChunkCost(label, config, shape, dtype, stages, per_chunk, prompt, vae_trace)


def _shift(t: Trace, by: int) -> Trace:
    """Renumber a trace's op calls so that it can be concatenated after `by` calls of another."""
    if not by:
        return t
    ops = [o if o.call < 0 else replace(o, call=o.call + by) for o in t.ops]
    return Trace(t.label, ops, [replace(s, call=s.call + by) for s in t.scopes])


# ---- projection ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSpec:
    """Dense peak rates (TFLOP/s, no sparsity) and HBM bandwidth of a GPU."""

    name: str
    bf16_tflops: float
    fp8_tflops: float
    fp32_tflops: float  # FP32 without TF32 (PyTorch's default for float32 matmuls)
    hbm_tbps: float

    def peak_flops(self, dtype: str) -> float:
        if dtype in ("bfloat16", "float16"):
            return self.bf16_tflops * 1e12
        if dtype.startswith("float8"):
            return self.fp8_tflops * 1e12
        return self.fp32_tflops * 1e12


H100_SXM = DeviceSpec("H100 SXM", bf16_tflops=989.0, fp8_tflops=1979.0, fp32_tflops=67.0, hbm_tbps=3.35)
DEVICES: dict[str, DeviceSpec] = {"h100-sxm": H100_SXM}


@dataclass(frozen=True)
class Efficiency:
    """Achieved fraction of peak per op class: the projection's stated assumptions.

    gemm: of the dtype's dense peak (0.80: ~790 TFLOP/s bf16 in large cuBLAS GEMMs on H100);
    attention: of the bf16 peak (0.647: ~640 TFLOP/s, FlashAttention-3 forward at head dim 128);
    memory: of HBM bandwidth for every op's bytes (0.80: ~2.7 TB/s, what streaming kernels reach);
    launch_us: added per kernel (0: the program replays as CUDA graphs);
    gemm_dtype: price bf16 GEMMs at another dtype's peak (e.g. "float8_e4m3fn": an FP8 what-if).
    """

    gemm: float = 0.80
    attention: float = 0.647
    memory: float = 0.80
    launch_us: float = 0.0
    gemm_dtype: str | None = None

    def describe(self, device: DeviceSpec) -> str:
        g = self.gemm * device.peak_flops(self.gemm_dtype or "bfloat16") / 1e12
        a = self.attention * device.peak_flops("bfloat16") / 1e12
        m = self.memory * device.hbm_tbps
        s = (f"GEMM {self.gemm:.0%} of dense peak ({g:.0f} TFLOP/s {self.gemm_dtype or 'bf16'}), attention "
             f"{self.attention:.1%} of bf16 peak ({a:.0f} TFLOP/s, FA3 at head dim 128), memory-bound ops "
             f"{self.memory:.0%} of HBM ({m:.2f} TB/s); per op max(compute, memory) time, summed")  # fmt: skip
        return s + (f"; {self.launch_us} us per kernel launch" if self.launch_us else "; no launch gaps (CUDA graphs)")


def op_seconds(op: OpCost, device: DeviceSpec = H100_SXM, eff: Efficiency = Efficiency()) -> float:
    """Roofline time of one op: max(FLOPs at the class's achieved rate, bytes at the achieved bandwidth)."""
    if op.kind == OTHER or not (op.flops or op.bytes):
        return 0.0
    memory = op.bytes / (device.hbm_tbps * 1e12 * eff.memory)
    compute = 0.0
    if op.kind == GEMM:
        dtype = eff.gemm_dtype if eff.gemm_dtype and op.dtype in ("bfloat16", "float16") else op.dtype
        compute = op.flops / (device.peak_flops(dtype) * eff.gemm)
    elif op.kind == ATTENTION:
        compute = op.flops / (device.peak_flops(op.dtype) * eff.attention)
    return max(compute, memory) + eff.launch_us * 1e-6


@dataclass(frozen=True)
class ClassProjection:
    flops: float
    bytes: float
    seconds: float
    kernels: int


def project_trace(
    trace: Trace, device: DeviceSpec = H100_SXM, eff: Efficiency = Efficiency()
) -> dict[str, ClassProjection]:
    """Per op class: FLOPs, bytes, projected seconds and kernel count of one run of `trace`."""
    acc = {k: [0, 0, 0.0, 0] for k in KINDS}
    for o in trace.ops:
        a = acc[o.kind]
        a[0] += o.flops
        a[1] += o.bytes
        a[2] += op_seconds(o, device, eff)
        a[3] += 1 if (o.flops or o.bytes) and o.kind != OTHER else 0
    return {k: ClassProjection(*v) for k, v in acc.items()}


@dataclass(frozen=True)
class ProjectionRow:
    group: str  # "stage 0", ..., "per chunk", "VAE decode"
    kind: str
    flops: float
    bytes: float
    seconds: float


@dataclass(frozen=True)
class ChunkProjection:
    """A chunk projected on a device: rows per (group, op class), totals and FPS."""

    label: str
    device: DeviceSpec
    efficiency: Efficiency
    steps: tuple[int, ...]
    fused: bool
    frames: int
    rows: tuple[ProjectionRow, ...]
    vae_rows: tuple[ProjectionRow, ...] = ()

    def total(
        self, group: str | None = None, kind: str | None = None, attr: str = "seconds", vae: bool = False
    ) -> float:
        rows = self.rows + (self.vae_rows if vae else ())
        return sum(
            getattr(r, attr) for r in rows if (group is None or r.group == group) and (kind is None or r.kind == kind)
        )

    @property
    def seconds(self) -> float:
        return self.total()

    @property
    def fps(self) -> float:
        """Frames per second of the transformer and sampler alone (VAE decode not included)."""
        return self.frames / self.seconds

    @property
    def fps_with_vae(self) -> float | None:
        """FPS with the (estimated) VAE decode run serially after the chunk; None when not traced."""
        return self.frames / self.total(vae=True) if self.vae_rows else None


def project(
    cost: Trace | ChunkCost,
    device: DeviceSpec = H100_SXM,
    efficiency: Efficiency = Efficiency(),
    steps: Sequence[int] = (1, 1, 1),
    fused: bool = False,
) -> dict[str, ClassProjection] | ChunkProjection:
    """Project a trace (per op class, one run) or a chunk (per stage and class, `steps[s]` steps in stage s).

    fused=False prices every aten op of the PyTorch reference path as traced; fused=True prices each
    `helios_rt.ops` call as one kernel moving its external bytes (the Triton kernels).
    """
    if isinstance(cost, Trace):
        return project_trace(cost.fused() if fused else cost, device, efficiency)
    acc: dict[tuple[str, str], list[float]] = {}
    for group, trace_, n in cost.pieces(steps, fused):
        for kind, p in project_trace(trace_, device, efficiency).items():
            a = acc.setdefault((group, kind), [0.0, 0.0, 0.0])
            a[0] += n * p.flops
            a[1] += n * p.bytes
            a[2] += n * p.seconds
    rows = tuple(ProjectionRow(g, k, *v) for (g, k), v in acc.items())
    vae_rows: tuple[ProjectionRow, ...] = ()
    if cost.vae is not None:
        vt = cost.vae.fused() if fused else cost.vae
        vae_rows = tuple(ProjectionRow("VAE decode", k, p.flops, p.bytes, p.seconds)
                         for k, p in project_trace(vt, device, efficiency).items())  # fmt: skip
    return ChunkProjection(cost.label, device, efficiency, tuple(steps), fused, cost.shape.pixel_frames, rows, vae_rows)


PAPER_FPS = 19.5  # Helios paper, distilled, one H100, 384x640, end to end


def format_projection(cost: ChunkCost, steps: Sequence[int] = (1, 1, 1), device: DeviceSpec = H100_SXM,
                      efficiency: Efficiency = Efficiency()) -> str:  # fmt: skip
    """The projection table: per stage and op class TFLOP, GB and ms, for the reference and fused paths."""
    ref = project(cost, device, efficiency, steps, fused=False)
    fus = project(cost, device, efficiency, steps, fused=True)
    s = cost.shape
    lines = [
        f"{cost.label or 'Helios'} at {s.height}x{s.width}, {_dtype_name(cost.dtype)}, batch {s.batch}, "
        f"steps per stage {tuple(steps)}, one chunk = {s.pixel_frames} frames, on {device.name} "
        f"({device.bf16_tflops:.0f} TFLOP/s dense bf16, {device.fp8_tflops:.0f} fp8, {device.hbm_tbps} TB/s)",
        f"assumptions: {efficiency.describe(device)}",
        "reference = every aten op of the PyTorch reference path; fused = each helios_rt op one kernel (Triton)",
        "",
        f"{'group':11} {'tokens':>12} {'steps':>5} {'class':17} {'TFLOP':>8} {'GB ref':>8} {'ms ref':>8} "
        f"{'GB fused':>8} {'ms fused':>8}",
    ]  # fmt: skip
    groups = [f"stage {st.index}" for st in cost.stages] + ["per chunk"]
    tokens = {f"stage {st.index}": f"{st.layout.n_noisy}+{st.layout.n_hist}" for st in cost.stages}
    nsteps = {f"stage {st.index}": str(n) for st, n in zip(cost.stages, steps, strict=True)}

    def line(group: str, tok: str, n: str, kind: str, r: list[ProjectionRow], f: list[ProjectionRow]) -> str:
        fl = sum(x.flops for x in r) / 1e12
        return (f"{group:11} {tok:>12} {n:>5} {kind:17} {fl:8.2f} {sum(x.bytes for x in r) / 1e9:8.1f} "
                f"{sum(x.seconds for x in r) * 1e3:8.1f} {sum(x.bytes for x in f) / 1e9:8.1f} "
                f"{sum(x.seconds for x in f) * 1e3:8.1f}")  # fmt: skip

    for g in groups:
        for kind in (GEMM, ATTENTION, ELEMENTWISE):
            r = [x for x in ref.rows if x.group == g and x.kind == kind]
            f = [x for x in fus.rows if x.group == g and x.kind == kind]
            lines.append(line(g, tokens.get(g, ""), nsteps.get(g, ""), kind, r, f))
        lines.append(line(g, "", "", "= total", [x for x in ref.rows if x.group == g],
                          [x for x in fus.rows if x.group == g]))  # fmt: skip
    lines.append(line("chunk", "", "", "= total", list(ref.rows), list(fus.rows)))
    if ref.vae_rows:
        lines.append(line("VAE decode", "(estimate)", "", "= total", list(ref.vae_rows), list(fus.vae_rows)))
    lines += [
        "",
        f"per chunk: {ref.total(attr='flops') / 1e15:.3f} PFLOP; projected {ref.seconds * 1e3:.0f} ms reference, "
        f"{fus.seconds * 1e3:.0f} ms fused -> {ref.fps:.1f} / {fus.fps:.1f} FPS (transformer + sampler; "
        f"paper end to end: {PAPER_FPS} FPS = {s.pixel_frames / PAPER_FPS * 1e3:.0f} ms per chunk)",
    ]
    if ref.vae_rows:
        lines.append(
            f"with the VAE decode estimate run serially: {ref.fps_with_vae:.1f} FPS reference, "
            f"{fus.fps_with_vae:.1f} FPS fused"
        )
    lines.append(f"per prompt (not per chunk): text K/V {cost.per_prompt.flops() / 1e12:.2f} TFLOP")
    last = cost.stages[-1]
    lines += ["", f"memory-bound bytes of one stage {last.index} forward by helios_rt op (GB):",
              f"{'op':24} {'calls':>5} {'reference':>10} {'fused':>8}"]  # fmt: skip
    for name, calls, ref_b, fused_b in last.forward.by_scope():
        n = f"{calls:5d}" if calls else f"{'-':>5}"
        lines.append(f"{name:24} {n} {ref_b / 1e9:10.2f} {fused_b / 1e9:8.2f}")
    return "\n".join(lines)


def helios_14b_chunk(dtype: torch.dtype = torch.bfloat16, vae: bool = True) -> ChunkCost:
    """The 14B model at 384x640, batch 1: the issue's projection target."""
    from ..config import HELIOS_14B

    return trace_chunk(HELIOS_14B, ChunkShape(), dtype, label="Helios 14B", vae=vae)


__all__ = [
    "ATTENTION", "DEVICES", "ELEMENTWISE", "GEMM", "H100_SXM", "KINDS", "OTHER", "PAPER_FPS",
    "ChunkCost", "ChunkProjection", "ChunkShape", "ClassProjection", "CostTracer", "DeviceSpec", "Efficiency",
    "OpCost", "ProjectionRow", "ScopeCall", "StageCost", "Trace", "attention_flops", "format_projection",
    "helios_14b_chunk", "meta_transformer", "op_cost", "op_seconds", "project", "project_trace", "stage_layouts",
    "trace", "trace_chunk", "trace_forward", "trace_history_embedding", "trace_text_encoding",
    "trace_vae_decode", "unique_bytes",
]  # fmt: skip
