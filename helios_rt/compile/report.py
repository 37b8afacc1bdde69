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
Two phases are totalled and a budget must hold both (`PlanReport.phases`):
- generate a chunk: transformer weights, static state, the arena, the VAE (and umT5 if resident);
- encode a prompt (stream start, prompt switch): all of that plus umT5 on the GPU and its activations
  for one 512-token prompt (planned on meta tensors through `model.text.run_umt5`, the engine's own
  encode). The engine encodes at `generate_stream` and at `Stream.set_prompt`; at a switch the arena
  is live (the program holds it from the first chunk or `Engine.warmup()` on, and the next chunk is
  running in it) and the decode's memory is held by the caching allocator (the chunk just handed
  over still has its frames there), so `offload_text_encoder` lowers the memory between prompts,
  never this peak. The encode phase is the peak of both: what makes it fit is the text encoder's
  precision (`EngineConfig(text_encoder_precision="fp8")`: e4m3 weight-only linears, 4.3 GiB instead
  of 10.6) or a smaller decode.

The plan is `compile.memory_plan` (runtime: the engine applies it to a `gpu_memory` budget); this module
is the command over it, and re-exports its names for the tools and tests that import them from here.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..config import ATTENTION_CHOICES
from .memory_plan import (
    DECODE_SLICE_CANDIDATES,
    GIB,
    GPU_SIZES_GB,
    RESERVE_BYTES,
    TEXT_ENCODER_PRECISIONS,
    UMT5_XXL,
    ChunkShape,
    KindReport,
    PlanReport,
    choose_decode_slices,
    choose_settings,
    distilled_spec,
    format_bytes,
    model_config,
    plan_chunk,
    plan_engine,
    plan_memory,
    text_encode_bytes,
    text_encoder_bytes,
    text_encoder_config,
    vae_decode_bytes,
    weights_bytes,
)

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}  # fmt: skip


# ---- command line --------------------------------------------------------------------------------------
def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Add `plan` to the CLI's subparsers; `run_plan(args)` runs it."""
    p = subparsers.add_parser(
        "plan",
        help="plan the memory of every chunk kind at a resolution and say which GPUs it fits (no weights loaded)",
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
    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="the attention backend to plan with (auto: Triton, as without flash-attn)")  # fmt: skip
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                   help="also answer whether it fits a budget of this many GB (decoding in exact time "
                   "slices if that is what makes it fit)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--precision", default="native", choices=["native", "fp8"],
                   help="fp8: the block linears in e4m3 (EngineConfig(precision='fp8'))")  # fmt: skip
    p.add_argument("--text-encoder-precision", default="native", choices=list(TEXT_ENCODER_PRECISIONS),
                   help="fp8: umT5's linears in e4m3 weight-only (EngineConfig(text_encoder_precision='fp8')); "
                   "with --gpu-memory it is chosen when the model dtype does not fit")  # fmt: skip
    p.set_defaults(func=run_plan)
    return p


def run_plan(args: argparse.Namespace) -> int:
    config = model_config(args.model)
    encoder = None if args.model == "tiny" else text_encoder_config(args.model)
    report = plan_engine(config, args.height, args.width, _DTYPES[args.dtype], args.batch, args.text_len, args.model,
                         kernels=args.kernels, text_encoder=encoder, gpu_memory_gb=args.gpu_memory,
                         precision=args.precision, attention=args.attention,
                         text_encoder_precision=args.text_encoder_precision)  # fmt: skip
    if args.json:
        out = report.to_dict()
        if args.gpu_memory is not None:
            out["budget"] = _budget(report, args.gpu_memory)
        print(json.dumps(out, indent=2), file=sys.stdout)
    else:
        print(report.format(), file=sys.stdout)
        if args.gpu_memory is not None:
            budget = _budget(report, args.gpu_memory)
            verdict = "fits" if budget["fits"] else "does not fit"
            peak = format_bytes(report.peak_bytes).strip()
            print(f"budget {args.gpu_memory:g} GB: {verdict} (every phase, peak {peak} + reserve) "
                  f"with {budget['setting']}", file=sys.stdout)  # fmt: skip
    return 0


def _budget(report: PlanReport, gb: float) -> dict:
    """Whether every phase fits `gb`, and the engine settings the answer holds for."""
    return {"fits": report.fits((gb,))[f"{gb:g} GB"], "setting": report.setting}



__all__ = ["DECODE_SLICE_CANDIDATES", "GIB", "GPU_SIZES_GB", "RESERVE_BYTES", "TEXT_ENCODER_PRECISIONS", "UMT5_XXL",
           "ChunkShape", "KindReport", "PlanReport", "add_plan_parser", "choose_decode_slices", "choose_settings",
           "distilled_spec", "format_bytes", "model_config", "plan_chunk", "plan_engine", "plan_memory", "run_plan",
           "text_encode_bytes", "text_encoder_bytes", "text_encoder_config", "vae_decode_bytes",
           "weights_bytes"]  # fmt: skip
