"""`helios-rt plan`: does Helios fit on my GPU at this resolution? Answered before any weight is loaded.

Every pyramid stage's program (one forward plus the sampler step) is planned on meta tensors with
the attention modelled as a fused kernel that writes its output into a planned buffer (the
FlashAttention footprint: no score matrix). The report gives per stage the tokens, the arena, the
lower bound (peak of simultaneously live bytes) and their ratio, then the persistent buffers, the
weights and the total against 24, 48 and 80 GB GPUs.

Totals: the stages run one after another, so they share one arena (the largest); the VAE decode of
a chunk overlaps the next chunk's transformer, so its memory adds. The VAE decode is an ESTIMATE
until the VAE is planned like the transformer:

    vae decode = VAE weights + frames (3 x F x H x W) + 6 x C_full x F x H x W      (elements x bytes)

with F = 1 + 4 (latent frames - 1) pixel frames (the chunk decodes in one pass), C_full =
decoder_base_dim x dim_mult[0] channels at full resolution; 6 feature maps of C_full channels is the
peak of the full-resolution up block (its 2 C_full-channel upsampled input, a residual block's
input, norm and conv outputs). The umT5 text encoder (once per prompt, offloadable) is not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from ..config import ModelConfig, preset
from ..model.transformer import keeps_fp32
from .cost import ChunkShape, meta_transformer, stage_layouts
from .program import make_io, plan_step

GIB = 1 << 30
GPU_SIZES_GB = (24, 48, 80)
RESERVE_BYTES = 1 * GIB  # CUDA context, cuBLAS workspaces, allocator slack
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}  # fmt: skip


@dataclass(frozen=True)
class StageReport:
    index: int
    latent_hw: tuple[int, int]
    noisy_tokens: int
    history_tokens: int
    arena_bytes: int
    lower_bound_bytes: int
    buffers: int
    steps: int

    @property
    def tokens(self) -> int:
        return self.noisy_tokens + self.history_tokens

    @property
    def ratio(self) -> float:
        return self.arena_bytes / self.lower_bound_bytes if self.lower_bound_bytes else 1.0


@dataclass(frozen=True)
class PlanReport:
    """The memory of one engine configuration, from its compiled stages' plans (`plan_engine`)."""

    model: str
    height: int
    width: int
    dtype: str
    batch: int
    text_len: int
    stages: tuple[StageReport, ...]
    persistent: dict[str, int] = field(hash=False)  # name -> bytes
    weights_bytes: int
    vae_bytes: int  # estimate (see the module docstring)
    plan_seconds: float

    @property
    def arena_bytes(self) -> int:
        """One arena shared by the stages, which never run at the same time."""
        return max(s.arena_bytes for s in self.stages)

    @property
    def persistent_bytes(self) -> int:
        return sum(self.persistent.values())

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.persistent_bytes + self.arena_bytes + self.vae_bytes

    def fits(self) -> dict[str, bool]:
        """GPU size (N GB cards carry about N GiB) -> whether total + RESERVE_BYTES fits."""
        return {f"{n} GB": self.total_bytes + RESERVE_BYTES <= n * GIB for n in GPU_SIZES_GB}

    def to_dict(self) -> dict:
        d = asdict(self)
        for s, st in zip(d["stages"], self.stages, strict=True):
            s.update(tokens=st.tokens, ratio=st.ratio)
        d.update(arena_bytes=self.arena_bytes, persistent_bytes=self.persistent_bytes, total_bytes=self.total_bytes,
                 reserve_bytes=RESERVE_BYTES, fits=self.fits())  # fmt: skip
        return d

    def format(self) -> str:
        g = format_bytes
        lines = [
            f"helios-rt plan: {self.model}, {self.height}x{self.width}, {self.dtype}, batch {self.batch}, "
            f"text {self.text_len} tokens (planned in {self.plan_seconds:.1f} s)",
            "",
            "stage  latent   tokens (noisy+history)   arena         lower bound   ratio  buffers    ops",
        ]
        for s in self.stages:
            lines.append(
                f"{s.index:>5}  {f'{s.latent_hw[0]}x{s.latent_hw[1]}':<7} {s.tokens:>7} "
                f"{f'({s.noisy_tokens}+{s.history_tokens})':<15} {g(s.arena_bytes)}  "
                f"{g(s.lower_bound_bytes)}  {s.ratio:5.3f}  {s.buffers:>7}  {s.steps:>5}"
            )
        lines += ["", "persistent buffers"]
        lines += [f"  {name:<44} {g(b)}" for name, b in self.persistent.items()]
        lines += [
            f"  {'total persistent':<44} {g(self.persistent_bytes)}",
            "",
            f"{'transformer weights':<46} {g(self.weights_bytes)}",
            f"{'arena (largest stage; the stages share it)':<46} {g(self.arena_bytes)}",
            f"{'VAE decode (ESTIMATE, see --help)':<46} {g(self.vae_bytes)}",
            f"{'total':<46} {g(self.total_bytes)}",
            f"{'+ reserve (CUDA context, cuBLAS, slack)':<46} {g(RESERVE_BYTES)}",
            "",
            "fits: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in self.fits().items()),
        ]
        return "\n".join(lines)


def format_bytes(n: int) -> str:
    """Right-aligned, in GiB, MiB or KiB, whichever keeps the number above one."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size or unit == "KiB":
            return f"{n / size:8.3f} {unit}"
    raise AssertionError


def weights_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the transformer's parameters as loaded (the float32-kept ones in float32)."""
    model = meta_transformer(config, dtype)
    return sum(p.numel() * (4 if keeps_fp32(n) else p.element_size()) for n, p in model.named_parameters())


def vae_decode_bytes(shape: ChunkShape, dtype: torch.dtype) -> int:
    """The VAE decode ESTIMATE of the module docstring (weights, frames, full-resolution activations)."""
    from ..model.vae import VAEConfig, WanVAE

    cfg = VAEConfig()
    with torch.device("meta"):
        vae = WanVAE(cfg)
    item = torch.empty((), dtype=dtype).element_size()
    weights = sum(p.numel() for p in vae.parameters()) * item
    pixels = shape.pixel_frames * shape.height * shape.width
    c_full = (cfg.decoder_base_dim or cfg.base_dim) * cfg.dim_mult[0]
    return weights + (cfg.out_channels + 6 * c_full) * pixels * item


def plan_engine(
    config: ModelConfig,
    height: int,
    width: int,
    dtype: torch.dtype,
    batch: int = 1,
    text_len: int = 512,
    model_name: str = "",
    shape: ChunkShape | None = None,
) -> PlanReport:
    """Plan every pyramid stage of `config` at `height` x `width` pixels and total the engine's memory."""
    t0 = time.perf_counter()
    shape = shape or ChunkShape(height=height, width=width, batch=batch, text_len=text_len)
    model = meta_transformer(config, dtype)
    item = torch.empty((), dtype=dtype).element_size()
    stages, rope, statics, hist_tokens = [], 0, 0, 0
    for s, layout in enumerate(stage_layouts(config, shape)):
        io = make_io(model, layout, batch, text_len)
        plan = plan_step(model, layout, io, attention="kernel")
        hw = tuple(g * p for g, p in zip(layout.noisy_grid[1:], config.patch_size[1:], strict=True))
        stages.append(StageReport(s, hw, layout.n_noisy, layout.n_hist, plan.arena_bytes,
                                  plan.lower_bound_bytes, plan.buffers, len(plan.steps)))  # fmt: skip
        rope += _nbytes(io.rope_cos, io.rope_sin)
        statics += _nbytes(io.latents, io.start, io.output, io.timestep, io.sigma_t, io.sigma_next, io.history_mod)
        hist_tokens = max(hist_tokens, _nbytes(io.history) if io.history is not None else 0)
    latent_hw = shape.latent_hw
    c = config.in_channels
    history_frames = sum(shape.history_sizes) + (1 if shape.keep_first_frame else 0)
    persistent = {
        f"history latents [B,{c},{history_frames},{latent_hw[0]},{latent_hw[1]}] f32": batch
        * c
        * history_frames
        * math.prod(latent_hw)
        * 4,
        "chunk noise (full-res start point) f32": batch * c * shape.latent_frames * math.prod(latent_hw) * 4,
        "per-stage latents, start, output, t, sigmas": statics,
        "history tokens (shared by the stages)": hist_tokens,
        f"text K/V: {config.num_layers} blocks x {text_len} tokens": 2
        * config.num_layers
        * batch
        * text_len
        * config.dim
        * item,
        "RoPE tables (all stages)": rope,
    }
    return PlanReport(
        model=model_name or "custom",
        height=height,
        width=width,
        dtype=str(dtype).removeprefix("torch."),
        batch=batch,
        text_len=text_len,
        stages=tuple(stages),
        persistent=persistent,
        weights_bytes=weights_bytes(config, dtype),
        vae_bytes=vae_decode_bytes(shape, dtype),
        plan_seconds=time.perf_counter() - t0,
    )


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- command line --------------------------------------------------------------------------------------
def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Add `plan` to the CLI's subparsers; `run_plan(args)` runs it."""
    p = subparsers.add_parser(
        "plan",
        help="plan the memory of every stage at a resolution and say which GPUs it fits (no weights loaded)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="helios-14b", help="'helios-14b', 'tiny' or a checkpoint folder")
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_plan)
    return p


def _model_config(name: str) -> ModelConfig:
    if name in ("helios-14b", "tiny"):
        return preset(name)
    from ..checkpoint import find_component

    return ModelConfig.from_json(find_component(name, "transformer") / "config.json")


def run_plan(args: argparse.Namespace) -> int:
    config = _model_config(args.model)
    report = plan_engine(config, args.height, args.width, _DTYPES[args.dtype], args.batch, args.text_len, args.model)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format(), file=sys.stdout)
    return 0


__all__ = ["PlanReport", "StageReport", "add_plan_parser", "plan_engine", "run_plan", "vae_decode_bytes",
           "weights_bytes"]  # fmt: skip
