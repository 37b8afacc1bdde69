"""The engine's memory, planned before any weight is loaded: the plan behind `helios-rt plan` (what it
counts: `compile/report.py`'s description) and the settings a GPU memory budget decides (`plan_memory`,
which `Engine.from_pretrained` applies for Python callers and the command line applies for its own).

Runtime, not tooling: the engine plans a budget with it, so it imports no tool (the cost model's
`ChunkShape` is `meta_program.ChunkShape`); `compile/report.py` is the `helios-rt plan` command over it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import asdict, dataclass, field

import torch

from ..config import EngineConfig, ModelConfig, preset
from ..model.transformer import keeps_fp32
from ..ops import OpSet
from ..sampling.chunk import SamplingSpec
from .chunk_program import META, ChunkKind, ChunkProgram, stream_kinds
from .meta_program import ChunkShape, distilled_spec, meta_chunk_program, meta_model
from .workspace import plan_program

GIB = 1 << 30
GPU_SIZES_GB = (24, 48, 80)
RESERVE_BYTES = 1 * GIB  # CUDA context, cuBLAS workspaces, allocator slack


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
    """The memory of one engine configuration, from the plans of its compiled chunk's kinds (`plan_engine`)."""

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
    text_encoder_bytes: int  # umT5's weights on the GPU while it encodes (0 when the model has none)
    plan_seconds: float
    precision: str = "native"  # "fp8": the block linears in e4m3 (EngineConfig(precision="fp8"))
    text_encoder_precision: str = "native"  # "fp8": umT5's linears e4m3 weight-only, its embedding on the host
    encode_activation_bytes: int = 0  # planned peak of umT5's activations for one 512-token prompt

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

    @property
    def encode_parts(self) -> dict[str, int]:
        """What is on the GPU while a prompt is encoded, at a prompt switch (the larger of the two
        encodes: at a stream's start the arena and the decode memory are live only after a warm-up or an
        earlier stream)."""
        return {
            "transformer weights": self.weights_bytes,
            "static state": self.persistent_bytes,
            "arena (live: the chunk in flight runs in it)": self.arena_bytes,
            "VAE weights + planned decode peak (held)": self.vae_bytes,
            f"umT5 on the GPU ({_TEXT_NOTE[self.text_encoder_precision]})": self.text_encoder_bytes,
            "umT5 activations, one 512-token prompt": self.encode_activation_bytes,
        }

    @property
    def encode_bytes(self) -> int:
        return sum(self.encode_parts.values())

    def phases(self, resident: bool = True) -> dict[str, int]:
        """Phase -> bytes; umT5 resident between prompts or offloaded (`offload_text_encoder`)."""
        generate = self.total_with_text_encoder_bytes if resident else self.total_bytes
        return {"generate a chunk": generate, "encode a prompt (stream start, prompt switch)": self.encode_bytes}

    @property
    def peak_bytes(self) -> int:
        """The largest phase: the encode phase (it holds everything generation holds, and umT5)."""
        return max(self.phases(resident=True).values())

    def fits(self, budgets_gb: tuple[float, ...] = GPU_SIZES_GB) -> dict[str, bool]:
        """GPU size (N GB cards carry about N GiB) -> whether every phase, plus RESERVE_BYTES, fits."""
        return {f"{n:g} GB": self.peak_bytes + RESERVE_BYTES <= n * GIB for n in budgets_gb}

    @property
    def setting(self) -> str:
        """The engine settings this report was made for, as EngineConfig arguments."""
        args = [f"precision={self.precision!r}"] if self.precision != "native" else []
        if self.text_encoder_precision != "native":
            args.append(f"text_encoder_precision={self.text_encoder_precision!r}")
        if self.decode_slice_frames is not None:
            args.append(f"decode_slice_frames={self.decode_slice_frames}")
        return f"EngineConfig({', '.join(args)})"

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, kr in zip(d["kinds"], self.kinds, strict=True):
            k.update(ratio=kr.ratio)
        d.update(arena_bytes=self.arena_bytes, persistent_bytes=self.persistent_bytes, total_bytes=self.total_bytes,
                 total_with_text_encoder_bytes=self.total_with_text_encoder_bytes, reserve_bytes=RESERVE_BYTES,
                 encode_parts=self.encode_parts, encode_bytes=self.encode_bytes, phases=self.phases(),
                 peak_bytes=self.peak_bytes, fits=self.fits(), setting=self.setting)  # fmt: skip
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
            f"{'phase: generate a chunk (text encoder off)':<46} {g(self.total_bytes)}",
            f"{'phase: generate a chunk (text encoder resident)':<46} {g(self.total_with_text_encoder_bytes)}",
            "phase: encode a prompt (stream start, prompt switch; umT5 resident or offloaded alike)",
        ]
        lines += [f"  {name:<44} {g(b)}" for name, b in self.encode_parts.items()]
        lines += [
            f"  {'total':<44} {g(self.encode_bytes)}",
            f"{'+ reserve (CUDA context, cuBLAS, slack)':<46} {g(RESERVE_BYTES)}",
            "",
            f"fits, every phase, {self.setting}: " + _yes_no(self.fits()),
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
    model = meta_model(config, dtype, precision)
    return sum(p.numel() * (4 if keeps_fp32(n) else p.element_size()) for n, p in model.named_parameters())


@functools.lru_cache(maxsize=16)  # a pure function of its arguments; planning the 14B VAE takes seconds
def vae_decode_bytes(shape: ChunkShape, dtype: torch.dtype, vae_config=None, slice_frames: int | None = None) -> int:
    """VAE weights plus the planned peak of one chunk's decode (meta tensors, accounting-only plan),
    whole or `slice_frames` latent frames at a time."""
    vae = meta_vae(dtype, vae_config)
    cfg = vae.config
    weights = sum(p.numel() for p in vae.parameters()) * torch.empty((), dtype=dtype).element_size()
    z = torch.empty(1, cfg.z_dim, shape.latent_frames, *shape.latent_hw, device=META)
    plan = plan_program(
        lambda latents: vae.decode_frames(latents, normalized=True, slice_frames=slice_frames), z, require_out=False
    )
    return weights + plan.arena_bytes


def meta_vae(dtype: torch.dtype, vae_config=None):
    """The Wan VAE on the meta device in `dtype` (its latent statistics too), as the decode plans see it.

    A fresh one per call: the cost model switches its norm + SiLU to the fused kernel, and no other caller
    may see that."""
    from ..model.vae import VAEConfig, WanVAE

    with torch.device(META):
        vae = WanVAE(vae_config or VAEConfig())
    for p in vae.parameters():
        p.data = p.data.to(dtype)
    vae._init_latent_stats(META, dtype)
    return vae


# umT5-XXL, the encoder of the released Helios checkpoints (google/umt5-xxl's encoder)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)


TEXT_ENCODER_PRECISIONS = ("native", "fp8")
_TEXT_NOTE = {"native": "model dtype", "fp8": "e4m3 linears, host embedding"}


def text_encoder_bytes(dtype: torch.dtype, config: dict | None = UMT5_XXL, precision: str = "native") -> int:
    """Bytes of the umT5 encoder's weights on the GPU while it encodes, as the engine loads it: the whole
    encoder in `dtype`, or with precision="fp8" its stack (e4m3 linears, float32 scales, norms and
    position bias in `dtype`) without the token embedding, which stays in host memory."""
    if config is None:
        return 0
    model = _meta_umt5(dtype, tuple(sorted(config.items())), precision)
    on_gpu = model.encoder if precision == "fp8" else model
    return sum(p.numel() * p.element_size() for p in on_gpu.parameters())


@functools.lru_cache(maxsize=8)  # a pure function of its arguments; planning umT5-XXL takes a second
def text_encode_bytes(dtype: torch.dtype, config: tuple | None, precision: str = "native") -> int:
    """Planned peak of umT5's activations while it encodes one 512-token prompt (`run_umt5`, the engine's
    encode body, on meta tensors; accounting only). `config`: the sorted items of a umT5 config dict."""
    if config is None:
        return 0
    from ..model.text import MAX_TEXT_TOKENS, run_umt5

    model = _meta_umt5(dtype, config, precision)
    ids = torch.zeros(1, MAX_TEXT_TOKENS, dtype=torch.long, device=META)
    # a padded prompt's [B, 1, S, S] mask, as transformers builds it (built outside: its "any padding?"
    # test reads a value on the host)
    mask = torch.ones(1, 1, MAX_TEXT_TOKENS, MAX_TEXT_TOKENS, dtype=torch.bool, device=META)
    with torch.no_grad():
        plan = plan_program(run_umt5, model, ids, mask, META, require_out=False)
    return plan.arena_bytes


@functools.lru_cache(maxsize=4)
def _meta_umt5(dtype: torch.dtype, config: tuple, precision: str):
    """umT5's encoder on meta as the engine holds it (`quantize_umt5_` with precision="fp8")."""
    from transformers import UMT5Config, UMT5EncoderModel

    from ..model.text import quantize_umt5_

    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**dict(config))).to(dtype).eval()
    return quantize_umt5_(model, META) if precision == "fp8" else model


def plan_chunk(
    config: ModelConfig,
    shape: ChunkShape,
    dtype: torch.dtype,
    ops: OpSet,
    spec: SamplingSpec,
    precision: str = "native",
) -> ChunkProgram:
    """The engine's compiled chunk for `config` at `shape`, built and planned on meta tensors: every kind a
    stream runs, text-to-video (the first chunk writes the prefix frame) and image/video-to-video."""
    program = meta_chunk_program(config, shape, dtype, ops, spec, precision)
    amplify, keep = spec.amplify_first_chunk, shape.keep_first_frame
    text_to_video, given_prefix = stream_kinds(amplify, keep, False), stream_kinds(amplify, keep, True)
    for kind in dict.fromkeys([text_to_video[0], *given_prefix, *text_to_video]):
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
    text_encoder_precision: str = "native",
) -> PlanReport:
    """Plan the chunk kinds of `config` at `height` x `width` pixels and total the engine's memory.

    kernels: the op table as a CUDA engine resolves it ("auto": the Triton kernels).
    attention: `EngineConfig.attention` ("auto": Triton, what a CUDA engine runs without flash-attn).
    text_encoder_precision: umT5's precision on the GPU ("fp8": `EngineConfig(text_encoder_precision="fp8")`).
    gpu_memory_gb: a budget; when every phase does not fit it, the settings that make it fit are chosen
    (see `choose_settings`).
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
        text_encoder_bytes=text_encoder_bytes(dtype, text_encoder, text_encoder_precision),
        plan_seconds=0.0,
        precision=precision,
        text_encoder_precision=text_encoder_precision,
        encode_activation_bytes=_encode_bytes(dtype, text_encoder, text_encoder_precision),
    )
    if gpu_memory_gb is not None:
        report = choose_settings(report, shape, dtype, gpu_memory_gb, text_encoder)
    return dataclasses.replace(report, plan_seconds=time.perf_counter() - t0)


# Latent frames per decode slice, tried in order when the whole-chunk decode does not fit a budget.
# Fewer frames per slice always need less (the reference's own loop decodes one latent frame at a
# time), but cost more launches; the causal-conv carry (2 frames per conv) is the floor.
DECODE_SLICE_CANDIDATES = (3, 2, 1)


def choose_settings(
    report: PlanReport, shape: ChunkShape, dtype: torch.dtype, gb: float, text_encoder: dict | None = UMT5_XXL
) -> PlanReport:
    """The report with the first settings under which every phase fits `gb`; unchanged if it fits or
    nothing does. Exact settings first: the text encoder in the model dtype with the whole-chunk decode,
    then the largest decode slice; then umT5 in FP8 weight-only form (if the model has umT5), the
    same way. Offloading umT5 is never a candidate: it leaves the encode phase, the peak, as it is."""
    if report.fits((gb,))[f"{gb:g} GB"]:
        return report
    precisions = [report.text_encoder_precision]
    if text_encoder is not None and "fp8" not in precisions:
        precisions.append("fp8")
    for precision in precisions:
        text = dataclasses.replace(
            report,
            text_encoder_precision=precision,
            text_encoder_bytes=text_encoder_bytes(dtype, text_encoder, precision),
            encode_activation_bytes=_encode_bytes(dtype, text_encoder, precision),
        )
        chosen = choose_decode_slices(text, shape, dtype, gb)
        if chosen.fits((gb,))[f"{gb:g} GB"]:
            return chosen
    return report


def choose_decode_slices(report: PlanReport, shape: ChunkShape, dtype: torch.dtype, gb: float) -> PlanReport:
    """The report with the largest decode slice under which every phase fits `gb`; unchanged if the
    whole chunk fits or nothing does."""
    if report.fits((gb,))[f"{gb:g} GB"]:
        return report
    for frames in DECODE_SLICE_CANDIDATES:
        if frames >= shape.latent_frames:
            continue
        sliced = dataclasses.replace(
            report, vae_bytes=vae_decode_bytes(shape, dtype, slice_frames=frames), decode_slice_frames=frames
        )
        if sliced.fits((gb,))[f"{gb:g} GB"]:
            return sliced
    return report


def _encode_bytes(dtype: torch.dtype, text_encoder: dict | None, precision: str) -> int:
    return text_encode_bytes(dtype, None if text_encoder is None else tuple(sorted(text_encoder.items())), precision)


_FP8_NOTE = {"native": "", "fp8": " (block linears fp8 e4m3)"}


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


def model_config(name: str) -> ModelConfig:
    """The transformer config of a preset ('helios-14b', 'tiny') or of a checkpoint folder."""
    if name in ("helios-14b", "tiny"):
        return preset(name)
    from ..checkpoint import find_component

    return ModelConfig.from_json(find_component(name, "transformer") / "config.json")


def text_encoder_config(name: str) -> dict | None:
    """umT5-XXL for the 14B preset; a checkpoint folder's own text_encoder/config.json (None without one)."""
    if name == "helios-14b":
        return UMT5_XXL
    from ..checkpoint import find_component
    from ..model.text import word_encoder_config

    if word_encoder_config(name) is not None:  # the demo checkpoints' word embedder: no weights to plan
        return None
    try:
        raw = json.loads((find_component(name, "text_encoder") / "config.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    keys = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
    return {k: raw[k] for k in keys if k in raw}


def plan_memory(config: EngineConfig, model: str) -> EngineConfig:
    """`config` with the memory settings that `helios-rt plan --gpu-memory` chooses for `model` at its size.

    The same code as the plan (`plan_engine(gpu_memory_gb=...)`), not a second derivation; values set by
    hand in `config.memory` are kept, and a config already planned for its budget is returned as it is.
    `Engine.from_pretrained` calls it, and so does the command line. A budget that nothing fits is refused
    here, before a weight is read, with the plan command that shows the phases."""
    gb = config.gpu_memory
    if gb is None or config.memory.planned_for_gb == gb:
        return config
    if not config.resolved_device().startswith("cuda"):
        raise ValueError(f"EngineConfig.gpu_memory={gb:g} budgets a GPU; this engine runs on "
                         f"{config.resolved_device()}: drop the budget or use a CUDA device")  # fmt: skip
    model_config, encoder = _plan_model(model)
    dtype = torch.bfloat16 if config.dtype == "auto" else config.resolved_dtype()
    hand = config.memory
    plan = plan_engine(model_config, config.height, config.width, dtype, model_name=str(model),
                       kernels=config.debug.kernels, text_encoder=encoder, gpu_memory_gb=gb,
                       precision=config.precision, attention=config.debug.attention,
                       text_encoder_precision=hand.text_encoder_precision or "native")  # fmt: skip
    if not plan.fits((gb,))[f"{gb:g} GB"]:
        raise ValueError(
            f"EngineConfig.gpu_memory={gb:g}: {model} at {config.height}x{config.width} does not fit {gb:g} GB "
            f"in any setting the plan knows; see `helios-rt plan --model {model} --height {config.height} "
            f"--width {config.width} --gpu-memory {gb:g}`, lower the resolution or try --precision fp8"
        )
    memory = dataclasses.replace(
        hand,
        text_encoder_precision=hand.text_encoder_precision or plan.text_encoder_precision,
        decode_slice_frames=hand.decode_slice_frames or plan.decode_slice_frames,
        planned_for_gb=gb,
    )
    return config.replace(memory=memory)


def _plan_model(model: str) -> tuple[ModelConfig, dict | None]:
    """The transformer config and umT5 config the plan reads for `model` (the demo: no umT5)."""
    if model == "demo":
        from ..demo import DEMO_CHECKPOINT

        model = str(DEMO_CHECKPOINT)
    return model_config(model), None if model == "tiny" else text_encoder_config(model)


__all__ = ["GIB", "GPU_SIZES_GB", "RESERVE_BYTES", "DECODE_SLICE_CANDIDATES", "UMT5_XXL", "TEXT_ENCODER_PRECISIONS",
           "ChunkShape", "KindReport", "PlanReport", "choose_decode_slices", "choose_settings", "distilled_spec",
           "format_bytes", "meta_vae", "model_config", "plan_chunk", "plan_engine", "plan_memory", "text_encode_bytes",
           "text_encoder_bytes", "text_encoder_config", "vae_decode_bytes", "weights_bytes"]  # fmt: skip
