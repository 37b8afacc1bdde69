"""The Helios transformer, written for static shapes.

A forward is split into what changes per call and what does not:
- per prompt: `encode_text` projects the prompt and computes the cross-attention K/V of every block
  once (`TextContext`); they are reused for every step and chunk;
- per shape: `build_layout` / `rope_tables` (in `layout.py`) give the token layout and RoPE tables;
- per weights: the timestep-0 modulation of history tokens (`history_modulation`) is a constant;
- per call: patch embedding of the latents and the blocks.

Module and parameter names follow the checkpoint's keys (diffusers layout) so that weights load
without renaming; the math goes through `helios_rt.ops`, whose references are the spec.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..fp8 import PRECISIONS, FP8Activation, FP8Linear
from ..ops import OpSet
from ..ops.sampler import unpatchify as unpatchify_tokens
from .layout import TokenLayout

Tensor = torch.Tensor

# Parameters that stay float32 whatever the model dtype: the modulation tables, the timestep MLP,
# the affine cross-attention norm and the history-key scales are small and precision-sensitive.
FP32_PARAM_PATTERNS = (
    re.compile(r"(^|\.)scale_shift_table$"),
    re.compile(r"^condition_embedder\.time_embedder\."),
    re.compile(r"\.norm[123]\."),
    re.compile(r"\.history_key_scale$"),
)
HISTORY_KEY_MAX_SCALE = 10.0


def keeps_fp32(name: str) -> bool:
    return any(p.search(name) for p in FP32_PARAM_PATTERNS)


@dataclass
class TextContext:
    """A prompt's cross-attention inputs, computed once: per block, normed keys and values `[B, S, H, Dh]`.

    lengths: per batch row, how many of the S keys are its prompt's own (CFG rows whose positive and
    negative embeddings differ in length are zero-padded to one S); each row attends to its own
    keys only, as the reference, which runs each prompt at its own length. None: every row has S.
    """

    keys: list[Tensor]
    values: list[Tensor]
    lengths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.lengths = normalize_text_lengths(self.lengths, self.keys[0].shape[0], self.keys[0].shape[1])

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]


def normalize_text_lengths(lengths, batch: int, text_len: int) -> tuple[int, ...] | None:
    """Validated per-row key counts; None when every row uses all `text_len` keys (one attention call)."""
    if lengths is None:
        return None
    lengths = tuple(int(n) for n in lengths)
    if len(lengths) != batch or not all(0 < n <= text_len for n in lengths):
        raise ValueError(f"text lengths {lengths} must give 1..{text_len} keys for each of the {batch} rows")
    return None if all(n == text_len for n in lengths) else lengths


@dataclass
class HistoryTokens:
    """Patch-embedded history `[B, n_hist, D]` in token order; fixed for all steps of a chunk."""

    tokens: Tensor


def sinusoidal_embedding(timestep: Tensor, dim: int) -> Tensor:
    """`[cos | sin]` timestep features `[B, dim]` in float32 (max period 10000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    angles = timestep.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class _MLP2(nn.Module):
    """linear_1 -> activation -> linear_2 (the checkpoint's names)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, act: str) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden)
        self.linear_2 = nn.Linear(d_hidden, d_out)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear_1(x)
        h = F.silu(h) if self.act == "silu" else F.gelu(h, approximate="tanh")
        return self.linear_2(h)


class ConditionEmbedder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.dim
        self.freq_dim = config.freq_dim
        self.time_embedder = _MLP2(config.freq_dim, d, d, "silu")
        self.time_proj = nn.Linear(d, 6 * d)
        self.text_embedder = _MLP2(config.text_dim, d, d, "gelu_tanh")

    def time(self, timestep: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(temb `[B, D]`, modulation `[B, 6, D]`) of timesteps `[B]`, in the model dtype."""
        feats = sinusoidal_embedding(timestep, self.freq_dim).to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(feats).to(dtype)
        proj = self.time_proj(F.silu(temb))
        return temb, proj.unflatten(-1, (6, -1))


class Attention(nn.Module):
    """Projections and Q/K norms of one attention; the math lives in the ops."""

    # set by `HeliosTransformer.set_parallel` on self-attention: the attention core then runs over the
    # tokens of every rank (helios_rt.parallel); None: this process holds the whole sequence
    sequence_parallel = None

    def __init__(self, config: ModelConfig, amplify_history: bool) -> None:
        super().__init__()
        d = config.dim
        self.heads = config.num_attention_heads
        self.eps = config.eps
        self.to_q = nn.Linear(d, d)
        self.to_k = nn.Linear(d, d)
        self.to_v = nn.Linear(d, d)
        self.to_out = nn.ModuleList([nn.Linear(d, d)])
        self.norm_q = nn.RMSNorm(d, eps=config.eps)
        self.norm_k = nn.RMSNorm(d, eps=config.eps)
        if amplify_history:
            n = self.heads if config.history_scale_mode == "per_head" else 1
            self.history_key_scale = nn.Parameter(torch.ones(n))

    def key_scale(self) -> Tensor | None:
        """Per-head multiplier `[H]` of history keys: `1 + sigmoid(s) * (max - 1)`."""
        if not hasattr(self, "history_key_scale"):
            return None
        s = 1.0 + torch.sigmoid(self.history_key_scale.float()) * (HISTORY_KEY_MAX_SCALE - 1.0)
        return s.expand(self.heads).contiguous()

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ops: OpSet) -> Tensor:
        """The attention core `[B, L, H, Dh]`; under sequence parallelism, over every rank's tokens."""
        if self.sequence_parallel is None:
            return ops.attention(q, k, v)
        return self.sequence_parallel.attention(q, k, v, ops.attention)


class FeedForward(nn.Module):
    """`net.0.proj` (up, tanh-GELU) and `net.2` (down), as the checkpoint names them."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        up = nn.Module()
        up.proj = nn.Linear(dim, hidden)
        self.net = nn.ModuleList([up, nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: Tensor | FP8Activation, ops: OpSet) -> Tensor:
        up = self.net[0].proj
        if isinstance(self.net[2], FP8Linear):  # the GELU kernel quantises the down projection's input
            return self.net[2](FP8Activation.of(ops.gelu_tanh_fp8(up(x))))
        return self.net[2](ops.linear_gelu_tanh(x, up.weight, up.bias))  # the GELU in the GEMM's epilogue


@dataclass
class Residual:
    """A sublayer's output not yet added to the residual stream: `x + y * gate` (two-segment gate `[B, 2, D]`).

    The FFN's residual is handed to the next block, whose first norm adds it in the same pass
    (`residual_modulate_layernorm`): the stream is then read once per norm instead of twice."""

    y: Tensor
    gate: Tensor

    def apply(self, x: Tensor, n_hist: int, ops: OpSet) -> Tensor:
        """The residual on its own (after the last block, and where no fused op takes it): a new x."""
        return ops.gate_residual(x, self.y, self.gate, n_hist)


class Block(nn.Module):
    fp8 = False  # set by `quantize_blocks_`: the block's linears are FP8Linear and take quantised inputs

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.eps = config.eps
        self.guidance_cross_attn = config.guidance_cross_attn
        self.attn1 = Attention(config, amplify_history=config.is_amplify_history)
        self.attn2 = Attention(config, amplify_history=False)
        self.norm2 = nn.LayerNorm(config.dim, config.eps) if config.cross_attn_norm else None
        self.ffn = FeedForward(config.dim, config.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, config.dim) / config.dim**0.5)

    def text_kv(self, text: Tensor, ops: OpSet) -> tuple[Tensor, Tensor]:
        a = self.attn2
        k = ops.rmsnorm(a.to_k(text), a.norm_k.weight, a.eps).unflatten(-1, (a.heads, -1))
        return k, a.to_v(text).unflatten(-1, (a.heads, -1))

    def forward(
        self,
        x: Tensor,
        mod: Tensor,
        rope: tuple[Tensor, Tensor],
        text_k: Tensor,
        text_v: Tensor,
        n_hist: int,
        ops: OpSet,
        text_lengths: tuple[int, ...] | None = None,
    ) -> Tensor:
        """x: `[B, L, D]` (not modified); mod: `[B, 2, 6, D]` float32 two-segment modulation (history, noisy)."""
        x, ffn = self.step(x.clone(), None, mod, rope, text_k, text_v, n_hist, ops, text_lengths)
        return ffn.apply(x, n_hist, ops)

    def step(
        self,
        x: Tensor,
        pending: Residual | None,
        mod: Tensor,
        rope: tuple[Tensor, Tensor],
        text_k: Tensor,
        text_v: Tensor,
        n_hist: int,
        ops: OpSet,
        text_lengths: tuple[int, ...] | None = None,
    ) -> tuple[Tensor, Residual]:
        """The block on the residual stream x (updated in place: the caller's own intermediate), with the
        previous block's FFN residual `pending` still to add; returns x and this block's FFN residual."""
        # The six two-segment tables are [B, 2, D] views of the [B, 2, 6, D] sum, unit stride in D and
        # strided in B and segment; the kernels follow those strides, so no copy is made per block.
        table = (self.scale_shift_table.float()[:, None] + mod).transpose(1, 2)
        shift, scale, gate, c_shift, c_scale, c_gate = table.unbind(1)
        if pending is not None and self.fp8:
            x, pending = pending.apply(x, n_hist, ops), None
        h = self._modulated(x, shift, scale, n_hist, ops, pending)
        x, h = self._cross_input(x, Residual(self._self_attention(h, rope, n_hist, ops), gate), n_hist, ops)
        o = self._cross_attention(h, text_k, text_v, ops, text_lengths)
        start = x.shape[1] - o.shape[1]
        if self.fp8:
            x[:, start:].add_(o)
            h = self._modulated(x, c_shift, c_scale, n_hist, ops)
        else:  # the cross-attention's residual (plain add, noisy rows) in the FFN's norm pass
            h = ops.residual_modulate_layernorm(x, o, None, n_hist, c_shift, c_scale, self.eps)
        return x, Residual(self.ffn(h, ops), c_gate)

    def _modulated(
        self, x: Tensor, shift: Tensor, scale: Tensor, n_hist: int, ops: OpSet, pending: Residual | None = None
    ) -> Tensor | FP8Activation:
        """The normed input of a group of linears (after adding `pending` into x in place); FP8 blocks get
        it quantised once, by the norm kernel (and have no pending residual: see `step`)."""
        if self.fp8:
            return FP8Activation.of(ops.modulate_layernorm_fp8(x, shift, scale, n_hist, self.eps))
        if pending is not None:
            return ops.residual_modulate_layernorm(x, pending.y, pending.gate, n_hist, shift, scale, self.eps)
        return ops.modulate_layernorm(x, shift, scale, n_hist, self.eps)

    def _linear_input(self, x: Tensor, ops: OpSet) -> Tensor | FP8Activation:
        """`[B, L, D]` as a linear's input: quantised per token by one op in FP8 blocks (the attention
        output before `to_out`, the cross-attention queries' input)."""
        return FP8Activation.of(ops.fp8_quantize_rows(x)) if self.fp8 else x

    def _self_attention(
        self, h: Tensor | FP8Activation, rope: tuple[Tensor, Tensor], n_hist: int, ops: OpSet
    ) -> Tensor:
        """The self-attention's output projection `[B, L, D]` (before its gated residual)."""
        a = self.attn1
        q, k = ops.qk_norm_rope(
            a.to_q(h),
            a.to_k(h),
            a.norm_q.weight,
            a.norm_k.weight,
            rope[0],
            rope[1],
            a.heads,
            a.eps,
            a.key_scale(),
            n_hist,
        )
        v = a.to_v(h).unflatten(-1, (a.heads, -1))
        return a.to_out[0](self._linear_input(a.attend(q, k, v, ops).flatten(2), ops))

    def _cross_input(self, x: Tensor, attn: Residual, n_hist: int, ops: OpSet) -> tuple[Tensor, Tensor]:
        """The self-attention's residual, then the cross-attention's input: the rows that attend to the text
        (noisy rows only with guidance_cross_attn), LayerNormed when the block has norm2 (in the same pass)."""
        start = n_hist if self.guidance_cross_attn else 0
        if self.norm2 is None:
            x = attn.apply(x, n_hist, ops)
            return x, x[:, start:]
        w, b = self.norm2.weight, self.norm2.bias
        return x, ops.residual_layernorm(x, attn.y, attn.gate, n_hist, start, w, b, self.eps)

    def _cross_attention(self, h: Tensor, text_k: Tensor, text_v: Tensor, ops: OpSet, text_lengths=None) -> Tensor:
        """The cross-attention's output projection for its input rows h: they attend to the cached text K/V.

        With `text_lengths` each batch row attends to its own first keys (one call per row, into
        its slice of one output), so padding never enters a row's softmax.
        """
        a = self.attn2
        q = ops.rmsnorm(a.to_q(self._linear_input(h, ops)), a.norm_q.weight, a.eps).unflatten(-1, (a.heads, -1))
        if text_lengths is None:
            attended = ops.attention(q, text_k, text_v)
        else:
            attended = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            for i, n in enumerate(text_lengths):
                r = slice(i, i + 1)
                ops.attention(q[r], text_k[r, :n], text_v[r, :n], out=attended[r])
        return a.to_out[0](self._linear_input(attended.flatten(2), ops))


class OutputNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: Tensor, temb: Tensor, ops: OpSet) -> Tensor:
        """x: noisy tokens `[B, N, D]`; temb: `[B, D]` of the current timestep."""
        shift, scale = (self.scale_shift_table.float() + temb.float()[:, None, :]).unbind(1)
        seg = lambda t: t[:, None, :].expand(-1, 2, -1).contiguous()  # one segment: every token is noisy
        return ops.modulate_layernorm(x, seg(shift), seg(scale), 0, self.eps)


class HeliosTransformer(nn.Module):
    """Helios' diffusion transformer over `[long | mid | short | noisy]` tokens."""

    def __init__(self, config: ModelConfig, ops: OpSet | None = None) -> None:
        super().__init__()
        self.config = config
        self.precision = "native"  # "fp8" once `quantize_blocks_` made the block linears e4m3: the one way
        self.ops = ops or OpSet("cpu", "reference")
        d, c, p = config.dim, config.in_channels, config.patch_size
        self.patch_embedding = nn.Conv3d(c, d, kernel_size=p, stride=p)
        self.patch_short = nn.Conv3d(c, d, kernel_size=p, stride=p)
        self.patch_mid = nn.Conv3d(c, d, kernel_size=tuple(2 * k for k in p), stride=tuple(2 * k for k in p))
        self.patch_long = nn.Conv3d(c, d, kernel_size=tuple(4 * k for k in p), stride=tuple(4 * k for k in p))
        self.condition_embedder = ConditionEmbedder(config)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.norm_out = OutputNorm(d, config.eps)
        self.proj_out = nn.Linear(d, config.out_dim * math.prod(p))

    parallel = None  # helios_rt.parallel's hooks (`set_parallel`); None: a one-process model

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def set_parallel(self, parallel) -> None:
        """Run each forward as one rank of a group (a `helios_rt.parallel.forward.ParallelForward`)."""
        self.parallel = parallel
        for block in self.blocks:
            block.attn1.sequence_parallel = parallel

    # ---- constants: per prompt, per weights ------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompt_embeds: Tensor, lengths: tuple[int, ...] | None = None) -> TextContext:
        """Project `[B, S, text_dim]` prompt embeddings and compute every block's cross-attention K/V.

        lengths: per row, the tokens that are the row's own (the rest is padding it must not see).
        """
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != self.config.text_dim:
            raise ValueError(f"prompt_embeds must be [B, S, {self.config.text_dim}], got {list(prompt_embeds.shape)}")
        text = self.condition_embedder.text_embedder(prompt_embeds.to(self.dtype))
        kv = [block.text_kv(text, self.ops) for block in self.blocks]
        return TextContext([k for k, _ in kv], [v for _, v in kv], lengths)

    @torch.no_grad()
    def history_modulation(self) -> Tensor:
        """The timestep-0 modulation `[1, 6, D]` of history tokens: a constant of the weights."""
        zero = torch.zeros(1, device=self.proj_out.weight.device)
        return self.condition_embedder.time(zero, self.dtype)[1]

    # ---- per call --------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_history(
        self, layout: TokenLayout, short: Tensor | None, mid: Tensor | None, long: Tensor | None
    ) -> HistoryTokens | None:
        """Patch-embed the history latents `[B, C, T, H, W]` into `[B, n_hist, D]` (long, mid, short)."""
        latents = {"short": short, "mid": mid, "long": long}
        parts = []
        for seg in layout.history:
            x = latents[seg.name]
            if x is None:
                raise ValueError(f"the layout has a {seg.name} history term but no {seg.name} latents were given")
            conv = getattr(self, f"patch_{seg.name}")
            x = _replicate_pad_to(x.to(self.dtype), conv.kernel_size)
            parts.append(conv(x).flatten(2).transpose(1, 2))
        for name, x in latents.items():
            if x is not None and layout.segment(name) is None:
                raise ValueError(f"{name} history latents were given but the layout has no {name} term")
        return HistoryTokens(torch.cat(parts, dim=1)) if parts else None

    @torch.no_grad()
    def forward(
        self,
        latents: Tensor,
        timestep: Tensor,
        text: TextContext,
        layout: TokenLayout,
        rope: tuple[Tensor, Tensor],
        history: HistoryTokens | None = None,
        history_mod: Tensor | None = None,
        unpatchify: bool = True,
    ) -> Tensor:
        """Predict the flow of noisy latents `[B, C, T, H, W]` at `timestep` `[B]`.

        Returns `[B, C_out, T, H, W]`, or the patch-layout `[B, N, C_out*pt*ph*pw]` when
        `unpatchify=False` (the sampler kernels read that layout directly).
        """
        b = latents.shape[0]
        x = self.patch_embedding(latents.to(self.dtype)).flatten(2).transpose(1, 2)
        n_hist = layout.n_hist
        if history is not None:
            x = torch.cat([history.tokens.expand(b, -1, -1), x], dim=1)
        if x.shape[1] != layout.n_tokens:
            raise ValueError(f"{x.shape[1]} tokens but the layout expects {layout.n_tokens}")
        temb, proj = self.condition_embedder.time(timestep, self.dtype)
        mod = self._two_segment_modulation(proj, history_mod, b)
        if self.parallel is not None:  # this rank's half of a CFG batch, then its slice of the tokens
            x, temb, mod, text = self.parallel.split_batch(x, temb, mod, text)
            x, rope, n_hist = self.parallel.shard_tokens(x, rope, n_hist)
        pending = None  # each block's FFN residual is added by the next block's first norm
        for block, k, v in zip(self.blocks, text.keys, text.values, strict=True):
            x, pending = block.step(x, pending, mod, rope, k, v, n_hist, self.ops, text.lengths)
        x = pending.apply(x, n_hist, self.ops) if pending is not None else x
        out = self.proj_out(self.norm_out(x[:, n_hist:], temb, self.ops))
        if self.parallel is not None:  # every rank: all noisy tokens of the whole batch
            out = self.parallel.gather(out)
        return self.unpatchify(out, layout) if unpatchify else out

    def _two_segment_modulation(self, proj: Tensor, history_mod: Tensor | None, batch: int) -> Tensor:
        """`[B, 2, 6, D]` float32: row 0 modulates history tokens, row 1 noisy tokens."""
        noisy = proj.float()
        if self.config.zero_history_timestep:
            hist = (history_mod if history_mod is not None else self.history_modulation()).float()
            hist = hist.expand(batch, -1, -1)
        else:
            hist = noisy
        return torch.stack([hist, noisy], dim=1)

    def unpatchify(self, out: Tensor, layout: TokenLayout) -> Tensor:
        """`[B, N, C*pt*ph*pw]` in (t, h, w) token order -> `[B, C, T, H, W]`."""
        t, h, w = layout.noisy_grid
        pt, ph, pw = self.config.patch_size
        shape = (out.shape[0], self.config.out_dim, t * pt, h * ph, w * pw)
        return unpatchify_tokens(out, shape, self.config.patch_size)  # the layout the fused flow step reads


def _replicate_pad_to(x: Tensor, kernel: tuple[int, int, int]) -> Tensor:
    """Pad `[B, C, T, H, W]` at the end of each axis to a multiple of the kernel by repetition."""
    pads = []
    for size, k in zip(reversed(x.shape[2:]), reversed(kernel), strict=True):
        pads += [0, (k - size % k) % k]
    return F.pad(x, pads, mode="replicate") if any(pads) else x


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_transformer(
    path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    ops: OpSet | None = None,
    precision: str = "native",
) -> HeliosTransformer:
    """Load the transformer of a diffusers-layout checkpoint (or a `transformer/` folder itself).

    Weights are cast to `dtype` except the float32-kept parameters (see `FP32_PARAM_PATTERNS`).
    precision="fp8": the block linears in e4m3, read from an FP8 checkpoint (`helios-rt quantize`) or
    quantised layer by layer from a float one (see `helios_rt.fp8.loading`).
    """
    from ..checkpoint import find_component, load_module
    from ..fp8.loading import load_fp8_module, stored_quantization

    folder = find_component(path, "transformer")
    config = ModelConfig.from_json(folder / "config.json")
    ops = ops or OpSet(device, "auto")
    dtype_of = lambda name: torch.float32 if keeps_fp32(name) else dtype  # noqa: E731
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    build = lambda: HeliosTransformer(config, ops)  # noqa: E731
    if precision == "fp8":  # the block linears made e4m3 there (`quantize_blocks_`); the rest keeps its dtype
        return load_fp8_module(build, folder, dtype_of, device)
    stored_quantization(folder, precision)  # an FP8 checkpoint needs precision="fp8": refuse it by name
    return load_module(build, folder, dtype_of, device)
