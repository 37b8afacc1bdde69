"""`helios-rt plan`: does Helios fit on my GPU at this resolution? Answered before any weight is loaded.

The plan is the chunk the engine runs: `ChunkProgram`, the engine's own compiler, plans each chunk kind
(the amplified first chunk, the steady state) on meta tensors with the op table the target GPU would
use (the Triton kernels by default: attention writes its output into a planned buffer, no score
matrix). The report gives per kind the arena, the lower bound (peak of simultaneously live bytes) and
their ratio, then the static state (history, noise, output, text K/V), the weights and the total
against 24, 48 and 80 GB GPUs. The kinds never run at the same time, so they share one arena.

The VAE decode of a chunk overlaps the next chunk's transformer, so its memory adds: its weights
plus the peak of its activations, planned the same way on meta tensors (its attention has no out=
form, so that plan is for accounting only; the decode runs on the caching allocator). Whole-chunk
activations are the largest buffers of all; with `--gpu-memory` the plan decodes in time slices
(`EngineConfig(decode_slice_frames=N)`, exact) when that is what makes the budget fit.
The umT5 text encoder is resident while the engine holds it (it encodes each new prompt); its
weights are counted separately, so a budget can be checked with and without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from ..config import ModelConfig, preset
from ..fp8 import quantize_blocks_
from ..model.transformer import HeliosTransformer, keeps_fp32
from ..ops import OpSet
from ..sampling.chunk import ChunkSampler, SamplingSpec
from ..sampling.history import HistoryLayout
from ..sampling.schedules import ScheduleConfig
from .chunk_program import META, ChunkKind, ChunkProgram, TextShape
from .cost import ChunkShape, meta_transformer
from .workspace import plan_program

GIB = 1 << 30
GPU_SIZES_GB = (24, 48, 80)
RESERVE_BYTES = 1 * GIB  # CUDA context, cuBLAS workspaces, allocator slack
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}  # fmt: skip


@dataclass(frozen=True)
class KindReport:
    """The plan of one chunk kind: its whole body (every stage and step) in one arena."""

    kind: str
    arena_bytes: int
    lower_bound_bytes: int
    buffers: int
    steps: int

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
    kernels: str  # the op table the plan was made with
    kinds: tuple[KindReport, ...]
    persistent: dict[str, int] = field(hash=False)  # name -> bytes
    weights_bytes: int
    vae_bytes: int  # VAE weights + the planned peak of one chunk's decode
    decode_slice_frames: int | None  # latent frames per decode slice (None: the whole chunk at once)
    text_encoder_bytes: int  # umT5 weights (0 when the model has none)
    plan_seconds: float
    precision: str = "native"  # "fp8": the block linears in e4m3 (EngineConfig(precision="fp8"))

    @property
    def arena_bytes(self) -> int:
        """One arena shared by the chunk kinds, which never run at the same time."""
        return max(k.arena_bytes for k in self.kinds)

    @property
    def persistent_bytes(self) -> int:
        return sum(self.persistent.values())

    @property
    def total_bytes(self) -> int:
        """Transformer, chunk and decode: what generation needs with the text encoder off the GPU."""
        return self.weights_bytes + self.persistent_bytes + self.arena_bytes + self.vae_bytes

    @property
    def total_with_text_encoder_bytes(self) -> int:
        return self.total_bytes + self.text_encoder_bytes

    def fits(self, budgets_gb: tuple[float, ...] = GPU_SIZES_GB) -> dict[str, bool]:
        """GPU size (N GB cards carry about N GiB) -> whether the total with the text encoder resident,
        plus RESERVE_BYTES, fits."""
        need = self.total_with_text_encoder_bytes + RESERVE_BYTES
        return {f"{n:g} GB": need <= n * GIB for n in budgets_gb}

    def fits_without_text_encoder(self, budgets_gb: tuple[float, ...] = GPU_SIZES_GB) -> dict[str, bool]:
        return {f"{n:g} GB": self.total_bytes + RESERVE_BYTES <= n * GIB for n in budgets_gb}

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, kr in zip(d["kinds"], self.kinds, strict=True):
            k.update(ratio=kr.ratio)
        d.update(arena_bytes=self.arena_bytes, persistent_bytes=self.persistent_bytes, total_bytes=self.total_bytes,
                 total_with_text_encoder_bytes=self.total_with_text_encoder_bytes, reserve_bytes=RESERVE_BYTES,
                 fits=self.fits(), fits_without_text_encoder=self.fits_without_text_encoder())  # fmt: skip
        return d

    def format(self) -> str:
        g = format_bytes
        lines = [
            f"helios-rt plan: {self.model}, {self.height}x{self.width}, {self.dtype}{_FP8_NOTE[self.precision]}, "
            f"batch {self.batch}, "
            f"text {self.text_len} tokens, {self.kernels} ops (planned in {self.plan_seconds:.1f} s)",
            "",
            f"{'chunk kind':<50}  arena         lower bound   ratio  buffers    ops",
        ]
        for k in self.kinds:
            lines.append(
                f"{k.kind:<50} {g(k.arena_bytes)}  {g(k.lower_bound_bytes)}  {k.ratio:5.3f}  {k.buffers:>7}  "
                f"{k.steps:>5}"
            )
        lines += ["", "persistent buffers"]
        lines += [f"  {name:<44} {g(b)}" for name, b in self.persistent.items()]
        lines += [
            f"  {'total persistent':<44} {g(self.persistent_bytes)}",
            "",
            f"{'transformer weights':<46} {g(self.weights_bytes)}",
            f"{'arena (largest kind; the kinds share it)':<46} {g(self.arena_bytes)}",
            f"{'VAE weights + planned decode peak':<46} {g(self.vae_bytes)}   ({self.decode_mode})",
            f"{'total (text encoder off the GPU)':<46} {g(self.total_bytes)}",
            f"{'umT5 text encoder weights':<46} {g(self.text_encoder_bytes)}",
            f"{'total (text encoder resident)':<46} {g(self.total_with_text_encoder_bytes)}",
            f"{'+ reserve (CUDA context, cuBLAS, slack)':<46} {g(RESERVE_BYTES)}",
            "",
            "fits, text encoder resident: " + _yes_no(self.fits()),
            "fits, text encoder offloaded after encoding (EngineConfig(offload_text_encoder=True)): "
            + _yes_no(self.fits_without_text_encoder()),
        ]
        return "\n".join(lines)

    @property
    def decode_mode(self) -> str:
        if self.decode_slice_frames is None:
            return "whole-chunk decode"
        return (f"decode in slices of {self.decode_slice_frames} latent frames: "
                f"EngineConfig(decode_slice_frames={self.decode_slice_frames})")  # fmt: skip


def _yes_no(fits: dict[str, bool]) -> str:
    return ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in fits.items())


def format_bytes(n: int) -> str:
    """Right-aligned, in GiB, MiB or KiB, whichever keeps the number above one."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size or unit == "KiB":
            return f"{n / size:8.3f} {unit}"
    raise AssertionError


def weights_bytes(config: ModelConfig, dtype: torch.dtype, precision: str = "native") -> int:
    """Bytes of the transformer's parameters as loaded (the float32-kept ones in float32; with
    precision="fp8" the block linears' e4m3 weights and float32 scales)."""
    model = _meta_model(config, dtype, precision)
    return sum(p.numel() * (4 if keeps_fp32(n) else p.element_size()) for n, p in model.named_parameters())


@functools.lru_cache(maxsize=16)  # a pure function of its arguments; planning the 14B VAE takes seconds
def vae_decode_bytes(shape: ChunkShape, dtype: torch.dtype, vae_config=None, slice_frames: int | None = None) -> int:
    """VAE weights plus the planned peak of one chunk's decode (meta tensors, accounting-only plan),
    whole or `slice_frames` latent frames at a time."""
    from ..model.vae import VAEConfig, WanVAE

    cfg = vae_config or VAEConfig()
    with torch.device("meta"):
        vae = WanVAE(cfg)
    for p in vae.parameters():
        p.data = p.data.to(dtype)
    vae._init_latent_stats(META, dtype)
    weights = sum(p.numel() for p in vae.parameters()) * torch.empty((), dtype=dtype).element_size()
    z = torch.empty(1, cfg.z_dim, shape.latent_frames, *shape.latent_hw, device=META)
    plan = plan_program(
        lambda latents: vae.decode_frames(latents, normalized=True, slice_frames=slice_frames), z, require_out=False
    )
    return weights + plan.arena_bytes


# umT5-XXL, the encoder of the released Helios checkpoints (google/umt5-xxl's encoder)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)


def text_encoder_bytes(dtype: torch.dtype, config: dict | None = UMT5_XXL) -> int:
    """Bytes of the umT5 encoder's weights in `dtype` (the engine loads it in the model dtype)."""
    if config is None:
        return 0
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**config))
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


def distilled_spec(stages: int = 3, steps: tuple[int, ...] | None = None) -> SamplingSpec:
    """Helios-Distilled's sampling (one DMD step per pyramid stage, amplified first chunk, no CFG)."""
    schedule = ScheduleConfig(kind="dmd", stages=stages)
    return SamplingSpec(schedule, True, True, False, steps or (1,) * stages, 1.0, True)


def plan_chunk(
    config: ModelConfig,
    shape: ChunkShape,
    dtype: torch.dtype,
    ops: OpSet,
    spec: SamplingSpec,
    precision: str = "native",
) -> ChunkProgram:
    """The engine's compiled chunk for `config` at `shape`, built and planned on meta tensors."""
    model = _meta_model(config, dtype, precision)
    model.ops = ops
    layout = HistoryLayout(shape.history_sizes, shape.latent_frames, shape.keep_first_frame)
    sampler = ChunkSampler(model, spec, layout, shape.latent_hw, META, ops)
    if spec.pyramid:  # the factor's values do not matter to the plan, only its shape
        n = config.patch_size[1] * config.patch_size[2]
        sampler.set_block_factor(torch.empty(n, n, device=META))
    program = ChunkProgram(sampler, shape.batch, TextShape(shape.text_len), cuda_graph=False)
    first = ChunkKind(spec.amplify_first_chunk, shape.keep_first_frame)
    for kind in dict.fromkeys([first, ChunkKind(spec.amplify_first_chunk, False), ChunkKind(False, False)]):
        program.plan(kind)
    return program


def plan_engine(
    config: ModelConfig,
    height: int,
    width: int,
    dtype: torch.dtype,
    batch: int = 1,
    text_len: int = 512,
    model_name: str = "",
    shape: ChunkShape | None = None,
    kernels: str = "auto",
    spec: SamplingSpec | None = None,
    text_encoder: dict | None = UMT5_XXL,
    gpu_memory_gb: float | None = None,
    precision: str = "native",
    attention: str = "auto",
) -> PlanReport:
    """Plan the chunk kinds of `config` at `height` x `width` pixels and total the engine's memory.

    kernels: the op table as a CUDA engine resolves it ("auto": the Triton kernels).
    attention: `EngineConfig.attention` ("auto": Triton, what a CUDA engine runs without flash-attn).
    gpu_memory_gb: a budget; when the whole-chunk decode does not fit it, the largest decode slice
    that does is chosen (see `choose_decode_slices`).
    """
    t0 = time.perf_counter()
    shape = shape or ChunkShape(height=height, width=width, batch=batch, text_len=text_len)
    ops = OpSet.for_planning(kernels, attention=attention)
    program = plan_chunk(config, shape, dtype, ops, spec or distilled_spec(shape.stages), precision)
    kinds = tuple(
        KindReport(_kind_name(kind), p.arena_bytes, p.lower_bound_bytes, p.buffers, len(p.steps))
        for kind, p in program.plans.items()
    )
    state = program.state
    c, (h, w) = config.in_channels, shape.latent_hw
    history_frames = state.history.buffer.shape[2]
    persistent = {
        f"history latents [B,{c},{history_frames},{h},{w}] f32": _nbytes(state.history.buffer),
        "chunk noise (start point + block normals) f32": _nbytes(*state.noise.buffers),
        "chunk output f32": _nbytes(state.output),
        f"text K/V: {config.num_layers} blocks x {text_len} tokens": _nbytes(*state.text.keys, *state.text.values),
        "RoPE tables, schedules, history modulation": _constants_bytes(program),
    }
    report = PlanReport(
        model=model_name or "custom",
        height=height,
        width=width,
        dtype=str(dtype).removeprefix("torch."),
        batch=batch,
        text_len=text_len,
        kernels=ops.backend_of("attention"),
        kinds=kinds,
        persistent=persistent,
        weights_bytes=weights_bytes(config, dtype, precision),
        vae_bytes=vae_decode_bytes(shape, dtype),
        decode_slice_frames=None,
        text_encoder_bytes=text_encoder_bytes(dtype, text_encoder),
        plan_seconds=0.0,
        precision=precision,
    )
    if gpu_memory_gb is not None:
        report = choose_decode_slices(report, shape, dtype, gpu_memory_gb)
    return dataclasses.replace(report, plan_seconds=time.perf_counter() - t0)


# Latent frames per decode slice, tried in order when the whole-chunk decode does not fit a budget.
# Fewer frames per slice always need less (the reference's own loop decodes one latent frame at a
# time), but cost more launches; the causal-conv carry (2 frames per conv) is the floor.
DECODE_SLICE_CANDIDATES = (3, 2, 1)


def choose_decode_slices(report: PlanReport, shape: ChunkShape, dtype: torch.dtype, gb: float) -> PlanReport:
    """The report with the largest decode slice that fits `gb` (the text encoder resident if some
    slice allows it, else offloaded after encoding); unchanged if the whole chunk fits or nothing does."""
    key = f"{gb:g} GB"
    for fits in (lambda r: r.fits((gb,))[key], lambda r: r.fits_without_text_encoder((gb,))[key]):
        if fits(report):
            return report
        for frames in DECODE_SLICE_CANDIDATES:
            if frames >= shape.latent_frames:
                continue
            sliced = dataclasses.replace(
                report, vae_bytes=vae_decode_bytes(shape, dtype, slice_frames=frames), decode_slice_frames=frames
            )
            if fits(sliced):
                return sliced
    return report


_FP8_NOTE = {"native": "", "fp8": " (block linears fp8 e4m3)"}


def _meta_model(config: ModelConfig, dtype: torch.dtype, precision: str):
    """The transformer on meta as the engine loads it: FP8 block linears with precision="fp8"."""
    return _meta_fp8_model(config, dtype) if precision == "fp8" else meta_transformer(config, dtype)


@functools.lru_cache(maxsize=2)  # a fresh model: `meta_transformer`'s cached one must stay float
def _meta_fp8_model(config: ModelConfig, dtype: torch.dtype):
    with torch.device("meta"):
        model = HeliosTransformer(config, OpSet("cpu", "reference"))
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
    return quantize_blocks_(model).eval()


def _kind_name(kind: ChunkKind) -> str:
    steps = "first chunk (amplified)" if kind.amplified else "chunk"
    return steps + (", writes the prefix frame" if kind.set_prefix else "")


def _constants_bytes(program: ChunkProgram) -> int:
    """Bytes of the tables a chunk reads that are neither weights nor state (RoPE, sigmas, modulation)."""
    sampler = program.sampler
    tables = sampler.rope_tables()
    return _nbytes(*tables, program.state.history_mod)


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
    p.add_argument("--kernels", default="auto", choices=["auto", "reference", "triton"],
                   help="the op table to plan with, as a CUDA engine resolves it (auto: Triton)")  # fmt: skip
    p.add_argument("--attention", default="auto", choices=["auto", "fa3", "fa2", "triton", "sdpa", "reference"],
                   help="the attention backend to plan with (auto: Triton, as without flash-attn)")  # fmt: skip
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                   help="also answer whether it fits a budget of this many GB (decoding in exact time "
                   "slices if that is what makes it fit)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--precision", default="native", choices=["native", "fp8"],
                   help="fp8: the block linears in e4m3 (EngineConfig(precision='fp8'))")  # fmt: skip
    p.set_defaults(func=run_plan)
    return p


def _model_config(name: str) -> ModelConfig:
    if name in ("helios-14b", "tiny"):
        return preset(name)
    from ..checkpoint import find_component

    return ModelConfig.from_json(find_component(name, "transformer") / "config.json")


def run_plan(args: argparse.Namespace) -> int:
    config = _model_config(args.model)
    encoder = None if args.model == "tiny" else _text_encoder_config(args.model)
    report = plan_engine(config, args.height, args.width, _DTYPES[args.dtype], args.batch, args.text_len, args.model,
                         kernels=args.kernels, text_encoder=encoder, gpu_memory_gb=args.gpu_memory,
                         precision=args.precision, attention=args.attention)  # fmt: skip
    if args.json:
        out = report.to_dict()
        if args.gpu_memory is not None:
            out["budget"] = _budget(report, args.gpu_memory)
        print(json.dumps(out, indent=2), file=sys.stdout)
    else:
        print(report.format(), file=sys.stdout)
        if args.gpu_memory is not None:
            budget = {k: "fits" if v else "does not fit" for k, v in _budget(report, args.gpu_memory).items()}
            print(f"budget {args.gpu_memory:g} GB: text encoder resident {budget['resident']}, "
                  f"offloaded after encoding {budget['offloaded']}", file=sys.stdout)  # fmt: skip
    return 0


def _budget(report: PlanReport, gb: float) -> dict[str, bool]:
    key = f"{gb:g} GB"
    return {"resident": report.fits((gb,))[key], "offloaded": report.fits_without_text_encoder((gb,))[key]}


def _text_encoder_config(name: str) -> dict | None:
    """umT5-XXL for the 14B preset; a checkpoint folder's own text_encoder/config.json (None without one)."""
    if name == "helios-14b":
        return UMT5_XXL
    from ..checkpoint import find_component

    try:
        raw = json.loads((find_component(name, "text_encoder") / "config.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    keys = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
    return {k: raw[k] for k in keys if k in raw}


__all__ = ["KindReport", "PlanReport", "add_plan_parser", "distilled_spec", "plan_chunk", "plan_engine", "run_plan",
           "vae_decode_bytes", "weights_bytes", "choose_decode_slices"]  # fmt: skip
