"""The public API: `Engine`, `Stream`, `Chunk`, and the autoregressive chunk loop.

An engine holds the loaded networks and everything that is constant for a resolution; a stream
holds one generation's state (history memory, prompt, generator), so an engine can serve several
streams one after another and a stream never grows: its history is a fixed-size buffer updated in
place and every chunk's frames are handed to the caller as soon as they are decoded.

A chunk is `sampling.chunk.ChunkSampler.run_chunk`, whatever the mode: on a GPU one replay of the engine's
chunk program (planned, captured), with `graphs="off"` the same body run eagerly (`EagerChunk`). The
stream runs two lanes (`overlap`): chunk k is decoded on a second CUDA stream while chunk k+1 is
computed, ordered by events; the host waits only for the decode of the chunk it hands over.

Every entry point (loading, `warmup`, `generate_stream`, each chunk, `set_prompt`, `close`) runs under
`device_scope(engine.device)`: captures, replays, noise uploads, events and decodes use the engine's
device whatever the caller's current CUDA device is.
"""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError, find_component, read_json
from .compile.chunk_program import STEADY, ChunkKind, ChunkProgram, EagerChunk, TextShape, stream_kinds
from .compile.memory_plan import plan_memory
from .compile.plan_cache import PlanCache
from .config import EngineConfig
from .demo import DEMO_CHECKPOINT, demo_config, is_demo, resolve_model
from .errors import InputError, NonFiniteError, StreamFailedError
from .guards import check_device, check_finite_input
from .model.text import (
    MAX_TEXT_TOKENS,
    PromptCache,
    PromptEncoder,
    load_prompt_encoder,
    validate_prompt,
    word_encoder_config,
)
from .model.transformer import HeliosTransformer, TextContext, load_transformer
from .model.vae import LatentPosterior, WanVAE
from .model.vae_graph import GraphedDecode
from .ops import OpSet
from .ops.attention_tuning import plan_shapes, tune_attention
from .overlap import device_scope, lanes_for
from .parallel import attach as attach_parallel
from .parallel.group import wait_within
from .parallel.io import no_frames, prompt_from_rank0
from .profiling import nvtx_range
from .sampling.chunk import ChunkSampler, SamplingSpec
from .sampling.history import HistoryLayout, HistoryMemory, augment_image_latents, augment_video_latents
from .video import Video, first_and_last_frames

Tensor = torch.Tensor


@dataclass
class Chunk:
    """One decoded chunk: `frames` uint8 `[T, H, W, 3]` (33 for Helios), and where it sits in the video.

    The model makes whole chunks; when `num_frames` is not a multiple of the chunk length, the last
    chunk has more frames than the video asked for: `num_video_frames` of them belong to the video
    (`video_frames`), the rest are decoded but past its end.
    """

    index: int
    first_frame: int
    frames: np.ndarray
    latents: Tensor  # the chunk's clean (normalised) latents `[1, C, 9, h, w]`, float32, on the CPU
    timings: dict[str, float] = field(default_factory=dict)
    num_video_frames: int | None = None  # None: all of `frames`

    def __post_init__(self) -> None:
        if self.num_video_frames is None:
            self.num_video_frames = len(self.frames)

    @property
    def video_frames(self) -> np.ndarray:
        """The frames of this chunk that belong to the requested video."""
        return self.frames[: self.num_video_frames]


class Engine:
    """A loaded Helios model at one resolution. Build with `Engine.from_pretrained`."""

    def __init__(
        self,
        transformer: HeliosTransformer,
        vae: WanVAE,
        prompts: PromptEncoder | None,
        spec: SamplingSpec,
        config: EngineConfig,
    ) -> None:
        self.transformer = transformer
        self.vae = vae
        self.spec = spec
        self.config = config
        self.device = transformer.proj_out.weight.device
        # channels-last conv weights; the fused norm + SiLU on CUDA (CPU decodes stay bit-identical)
        vae.prepare_decode(self.device, config.debug.kernels if self.device.type == "cuda" else "reference")
        self._graphed_decode: GraphedDecode | None = None
        self._decoded: Any = None  # the last decode's end mark: streams taking turns share the decode graph
        self.parallel = attach_parallel(config.parallel, transformer, spec.uses_cfg)  # None: one process
        self._prompts = PromptCache(prompts) if prompts is not None else None
        self._check_resolution()
        # which attention runs, chosen (and an impossible EngineConfig.attention refused) now, not in a stage
        transformer.ops.use_attention(config.debug.attention)
        self.attention = transformer.ops.attention_selection(
            config.resolved_dtype(), transformer.config.attention_head_dim
        )
        self.latent_hw = (config.height // vae.config.spatial_ratio, config.width // vae.config.spatial_ratio)
        trained = config.sampling  # the checkpoint's history and chunk sizes unless an expert overrides them
        self.history_layout = HistoryLayout(
            trained.value("history_sizes"), trained.value("latent_frames_per_chunk"), trained.value("keep_first_frame")
        )
        self.sampler = ChunkSampler(transformer, spec, self.history_layout, self.latent_hw, self.device)
        self.chunk_program: ChunkProgram | None = None
        self.overlap_decode = config.resolved_overlap()
        if config.resolved_graphs() == "chunk":
            # the compiled chunk: planned on first use of a kind, captured per kind at warm-up on CUDA
            self.chunk_program = ChunkProgram(
                self.sampler, batch=1, text=TextShape(MAX_TEXT_TOKENS), plan_cache=PlanCache.for_device(self.device)
            )
        # what runs a chunk: the program, or the same body eagerly on the caching allocator
        self.chunks: ChunkProgram | EagerChunk = self.chunk_program or EagerChunk(self.sampler)
        self.load_timings: dict[str, float] = {}  # set by from_pretrained: load_s, weights_gb, load_gb_s
        self._streams: weakref.WeakSet[Stream] = weakref.WeakSet()  # closed with the engine
        self._closed = False

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None) -> Engine:
        """Load a diffusers-layout Helios checkpoint folder, or `"demo"` for the built-in demo checkpoint.

        The demo runs at its own size, steps and guidance where `config` leaves EngineConfig's defaults
        (`helios_rt.demo.demo_config`).

        With `EngineConfig(gpu_memory=GB)` the memory settings left unset are planned for the checkpoint
        first (`compile.memory_plan.plan_memory`, what `helios-rt plan --gpu-memory` chooses); a budget
        nothing fits is refused before a weight is read."""
        config = config or EngineConfig()
        if is_demo(path):
            config = demo_config(config)
        start = time.perf_counter()
        check_device(config.resolved_device())  # before any weight is read, for Python callers too
        # a gpu_memory budget decides the memory settings, as `helios-rt plan --gpu-memory` does (same code)
        config = plan_memory(config, str(path))
        engine = cls._load(resolve_model(path), config)
        engine.load_timings = _load_timings(engine, time.perf_counter() - start)
        return engine

    @classmethod
    def _load(cls, root: Path, config: EngineConfig) -> Engine:
        if config.precision == "fp8":
            from .fp8.linear import require_fp8_support

            require_fp8_support(config.resolved_device(), config.resolved_dtype())
        memory = config.memory_settings()
        no_umt5 = not (root / "text_encoder").is_dir() or word_encoder_config(root)
        if (memory.text_encoder_precision or "native") != "native" and no_umt5:
            raise ValueError(
                f"MemorySettings(text_encoder_precision={memory.text_encoder_precision!r}) sets the precision of a "
                f"checkpoint's umT5 encoder, and {root} has none (no text_encoder/ with umT5): leave it 'native'"
            )
        if root == DEMO_CHECKPOINT and not (root / "model_index.json").exists():
            raise CheckpointError(
                f"the built-in demo checkpoint is missing from this install ({root}): reinstall helios_rt"
            )
        if not (root / "model_index.json").exists():
            raise CheckpointError(
                f"{root} is not a Helios checkpoint folder (no model_index.json); pass the folder "
                "that holds model_index.json, transformer/, vae/, scheduler/, or 'demo'"
            )
        device = torch.device(config.resolved_device())
        with nvtx_range("load"), device_scope(device):
            ops = OpSet(device, config.debug.kernels)
            transformer = load_transformer(root, config.resolved_dtype(), device, ops, config.precision)
            vae = WanVAE.from_pretrained(root, config.resolved_dtype("vae_dtype"), device)
            scheduler = read_json(find_component(root, "scheduler") / "scheduler_config.json")
            spec = SamplingSpec.from_checkpoint(read_json(root / "model_index.json"), scheduler, config)
            # umT5-XXL is ~5.7B parameters: float32 on a GPU would take 23 GB, so it follows the model dtype
            prompts = load_prompt_encoder(
                root,
                config.resolved_dtype(),
                device,
                offload=memory.offload_text_encoder,
                precision=memory.text_encoder_precision or "native",
            )
            return cls(transformer, vae, prompts, spec, config)

    @property
    def scope(self):
        """The engine's device as the current CUDA device (nothing on a CPU): wraps every entry point."""
        return device_scope(self.device)

    def warmup(self, image_or_video: bool = False) -> None:
        """Plan and capture the chunk graphs before the first stream, so its first chunk replays one.

        For prompts of the text encoder's length (512 tokens): the first chunk's kind (text-to-video,
        or with `image_or_video` the I2V/V2V one) and the steady-state one. A stream warms up the
        kinds it needs by itself (before its first chunk); this moves that cost out of the stream.
        """
        program = self.chunk_program
        if program is None:
            return
        with nvtx_range("warmup"), self.scope:
            cfg = self.transformer.config
            zeros = torch.zeros(1, MAX_TEXT_TOKENS, cfg.text_dim, device=self.device)
            both = torch.cat([zeros, zeros]) if self.spec.uses_cfg else zeros  # [cond; uncond] with CFG
            text = self.transformer.encode_text(both)
            program.replan(text)
            program.set_text(text)
            keep = self.history_layout.keep_first_frame
            kinds = list(stream_kinds(self.spec.amplify_first_chunk, keep, prefix_set=image_or_video))
            self._tune_attention(program, kinds)
            program.capture(kinds)

    def _tune_attention(self, program: ChunkProgram, kinds: list[ChunkKind]) -> None:
        """attention="auto" on CUDA: time every backend that runs at the planned chunk's attention shapes and
        keep the fastest, before any capture; plans made with the load-time pick name its op and are remade."""
        tuning = tune_attention(self.transformer.ops.attention, plan_shapes(program.plan(k) for k in kinds))
        if tuning.changed:
            program.plans.clear()
        self.attention = tuning.selections.get((self.attention.dtype, self.attention.head_dim), self.attention)

    def decode_frames(self, latents: Tensor) -> Tensor:
        """uint8 frames of one chunk's latents; with CUDA graphs, the decode's own graph (captured on first
        use, outside the chunk's capture). The result may be a static buffer: copy it before the next decode."""
        program = self.chunk_program
        slices = self.config.memory_settings().decode_slice_frames
        if program is None or not program.cuda_graph or self.device.type != "cuda":
            return self.vae.decode_frames(latents, normalized=True, slice_frames=slices)
        if self._graphed_decode is None:
            self._graphed_decode = GraphedDecode(
                self.vae, tuple(latents.shape), dtype=latents.dtype, device=self.device, slice_frames=slices
            )
        return self._graphed_decode(latents)

    def _check_resolution(self) -> None:
        """Height and width must survive the VAE (x8), the patch (x2) and the pyramid's halvings."""
        stages = self.spec.schedule.stages if self.spec.pyramid else 1
        unit = self.vae.config.spatial_ratio * self.transformer.config.patch_size[1] * 2 ** (stages - 1)
        for name in ("height", "width"):
            value = getattr(self.config, name)
            if value % unit:
                lower, upper = value // unit * unit, (value // unit + 1) * unit
                raise ValueError(
                    f"{name}={value} is not a multiple of {unit} (VAE x{self.vae.config.spatial_ratio}, "
                    f"patch x{self.transformer.config.patch_size[1]}, {stages} pyramid stages); "
                    f"use {lower or upper} or {upper}"
                )

    # ---- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the networks, programs and every stream's buffers now, device memory included.

        Without it the memory goes back only when the last reference (a stream, a notebook variable,
        a traceback) dies; a server that swaps models needs it back at a known point. Streams from
        this engine are closed too. The engine cannot generate afterwards.
        """
        for stream in list(self._streams):
            stream.close()
        self.transformer = self.vae = self.sampler = self.chunk_program = self.chunks = self._graphed_decode = None
        self._prompts = None
        self._closed = True
        with self.scope:
            gc.collect()  # modules hold reference cycles; collect them now rather than at some later point
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this engine is closed; load the model again with Engine.from_pretrained()")

    # ---- generation ------------------------------------------------------------------------------
    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        image: np.ndarray | Tensor | None = None,
        video: np.ndarray | Tensor | None = None,
        num_frames: int | None = None,
        seed: int | torch.Generator = 0,
        negative_prompt: str | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        prompt_blend_chunks: int | None = None,
    ) -> Stream:
        """Stream chunks of a video. `num_frames=None` streams until the caller stops.

        The last chunk is decoded whole; its `num_video_frames` says how many of its frames are within
        `num_frames`. image: uint8 `[H, W, 3]` (image-to-video); video: uint8 `[T, H, W, 3]`
        (video-to-video). seed: an int in [0, 2**64), or a CPU `torch.Generator` that the stream
        draws its noise from (and advances, as a diffusers pipeline does). prompt_embeds:
        precomputed `[1, S, text_dim]` embeddings instead of `prompt`. prompt_blend_chunks: after
        `Stream.set_prompt`, the chunks over which the embedding blends from the old prompt to the new
        (None: 3, or a deprecated `EngineConfig(prompt_blend_chunks=)`).
        """
        blend = self.config.prompt_blend_chunks if prompt_blend_chunks is None else prompt_blend_chunks
        if not (isinstance(blend, int) and not isinstance(blend, bool) and blend >= 1):
            raise ValueError(f"prompt_blend_chunks={blend!r}: an integer >= 1 (1 switches at once)")
        if num_frames is not None and (not isinstance(num_frames, int) or num_frames <= 0):
            raise ValueError(f"num_frames must be a positive integer or None (endless), got {num_frames!r}")
        if image is not None and video is not None:
            raise InputError("pass image (image-to-video) or video (video-to-video), not both")
        self._check_open()
        generator = noise_generator(seed)
        with self.scope:
            start = time.perf_counter()
            cond = self._embed(prompt, prompt_embeds, "prompt")
            uncond = None
            if self.spec.uses_cfg:
                uncond = self._embed(negative_prompt or "", negative_prompt_embeds, "negative_prompt", allow_empty=True)
            text_s = _synced(self.device, start)
            stream = Stream(self, cond, uncond, image, video, num_frames, generator, blend, text_encoder_s=text_s)
        self._streams.add(stream)
        return stream

    def generate(self, prompt: str | None = None, *, fps: int | None = None, **kwargs) -> Video:
        """Generate a whole video (all chunks collected): `engine.generate(...).save("out.mp4")`.

        fps: the Video's frame rate (None: 24, Helios's training rate, or a deprecated `EngineConfig(fps=)`)."""
        num_frames = kwargs.pop("num_frames", 132)
        if num_frames is None:
            raise ValueError(
                "generate() collects the whole video, so it needs num_frames; "
                "use generate_stream(num_frames=None) to stream without end"
            )
        with self.generate_stream(prompt, num_frames=num_frames, **kwargs) as stream:
            frames = [chunk.video_frames for chunk in stream]
        return Video(np.concatenate(frames), fps=self.config.fps if fps is None else fps)

    def _embed(self, text: str | None, embeds: Tensor | None, what: str, allow_empty: bool = False) -> Tensor:
        if embeds is not None:
            if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[-1] != self.transformer.config.text_dim:
                raise InputError(
                    f"{what}_embeds must be [1, S, {self.transformer.config.text_dim}], got {list(embeds.shape)}"
                )
            return check_finite_input(embeds.float().to(self.device), f"{what}_embeds")
        if text is None:
            raise InputError(f"pass {what} (text) or {what}_embeds")
        if self._prompts is None:
            raise InputError(
                f"this checkpoint has no text_encoder/; pass {what}_embeds instead of text "
                "(helios-rt generate: --prompt-embeds FILE.safetensors)"
            )
        if allow_empty and text == "":
            return self._prompts.encoder.encode([""]).to(self.device)
        return self._prompts.get(validate_prompt(text, what)).to(self.device)

    def encode_pixels(self, frames: np.ndarray | Tensor, generator: torch.Generator) -> Tensor:
        """uint8 `[T, H, W, 3]` frames -> the VAE posterior sample, normalised for the transformer."""
        with self.scope:
            return self.vae.encode(self._pixels(frames), generator=generator, normalize=True).float()

    def encode_windows(self, frames: np.ndarray | Tensor, window: int, generator: torch.Generator) -> Tensor:
        """uint8 `[k * window, H, W, 3]` -> each window encoded on its own, latents concatenated in time.

        The same as `encode_pixels` of each window in turn, with one encoder call for all of them:
        the posteriors are sampled window by window, so the random draws are the reference's. (The
        batched convolutions round differently, ~1e-6; on the CPU, PyTorch runs batch-1 3-D
        convolutions through a slow path, so one batched call is several times faster.)
        """
        k = len(frames) // window
        if k == 0 or len(frames) != k * window:
            raise ValueError(f"encode_windows needs a positive multiple of {window} frames, got {len(frames)}")
        with self.scope:
            pixels = torch.cat([self._pixels(frames[i * window : (i + 1) * window]) for i in range(k)])
            posterior = self.vae.encode_posterior(pixels)
        samples = [
            LatentPosterior(posterior.mean[i : i + 1], posterior.logvar[i : i + 1]).sample(generator) for i in range(k)
        ]
        return self.vae.normalize_latents(torch.cat(samples, dim=2)).float()

    def skip_encode_draws(self, frames: int, generator: torch.Generator) -> None:
        """Advance `generator` exactly as `encode_pixels` of `frames` frames would, without encoding them.

        The posterior is sampled on the meta device: the noise is drawn as `LatentPosterior.sample`
        always draws it, and nothing is computed.
        """
        c, t = self.vae.config.z_dim, self.vae.config.num_latent_frames(frames)
        mean = torch.empty(1, c, t, *self.latent_hw, dtype=self.vae.dtype, device="meta")
        LatentPosterior(mean, mean).sample(generator)

    def _pixels(self, frames: np.ndarray | Tensor) -> Tensor:
        """Caller frames -> `[1, 3, T, H, W]` in [-1, 1] at the engine's resolution."""
        x = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, Tensor) else frames
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise InputError(
                f"frames must be uint8 [T, H, W, 3] (an image is [H, W, 3]), got {x.dtype} {list(x.shape)}"
            )
        h, w = x.shape[1:3]
        if (h, w) != (self.config.height, self.config.width):
            raise InputError(
                f"input frames are {h}x{w} but the engine runs at {self.config.height}x"
                f"{self.config.width}; resize them or build the engine at their resolution"
            )
        x = x.to(self.device).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)
        return x.unsqueeze(0).to(self.vae.dtype)


class Stream:
    """An iterator of `Chunk`s; `set_prompt` changes the prompt of the chunks not yet started; `close` frees it.

    `time_to_first_frame_s` and `steady_fps` say how the stream ran so far.
    """

    def __init__(
        self,
        engine: Engine,
        cond: Tensor,
        uncond: Tensor | None,
        image,
        video,
        num_frames: int | None,
        generator: torch.Generator,
        prompt_blend_chunks: int = 3,
        text_encoder_s: float = 0.0,
    ) -> None:
        self.engine = engine
        self.num_frames = num_frames
        self._generator = generator
        self._uncond = uncond
        self._prompt = _PromptBlend(cond, prompt_blend_chunks)
        self._history = HistoryMemory(
            engine.history_layout,
            1,
            engine.transformer.config.in_channels,
            *engine.latent_hw,
            torch.float32,
            engine.device,
        )
        self._frames_per_chunk = engine.vae.config.num_frames(engine.history_layout.chunk_frames)
        self._index = 0  # the next chunk to hand over
        self._launched = 0  # chunks whose compute has been issued
        self._closed = False
        self.failure: BaseException | None = None  # what stopped the stream, once something did
        self._text, self._text_key = None, None
        self._lanes = lanes_for(engine.device, engine.overlap_decode)
        # two latent slots: chunk k's decode reads slot k % 2 while chunk k+1's compute writes the other
        shape = (1, engine.transformer.config.in_channels, engine.history_layout.chunk_frames, *engine.latent_hw)
        self._slots = [torch.zeros(shape, device=engine.device) for _ in range(2)]
        self._finite = _FiniteFlags(self._slots)
        self._compute_end: Any = None  # the last launched chunk's compute-end mark
        self._slot_free: list[Any] = [None, None]  # the decode lane's mark after it copied the slot out
        self._started = time.perf_counter()
        self.handover_times: list[float] = []  # perf_counter() when each chunk was handed to the caller
        program = engine.chunk_program
        self._cold_at_start = program.cold.snapshot() if program is not None else None
        self._cold: dict[str, float] = {"text_encoder_s": text_encoder_s}
        self._condition_on(image, video)
        self._cold["condition_s"] = _synced(engine.device, self._started)
        self._pending: _Launched | None = None  # with overlap: the next chunk, launched before this one's hand-over

    def _condition_on(self, image, video) -> None:
        """Fill the history from an image (I2V) or a video (V2V), with the reference's noise augmentation."""
        engine, g = self.engine, self._generator
        if image is not None:
            img = torch.as_tensor(np.asarray(image)) if not isinstance(image, Tensor) else image
            if img.ndim != 3:
                raise InputError(f"image must be uint8 [H, W, 3], got {list(img.shape)}")
            latent = engine.encode_pixels(img[None], g)
            window = img[None].expand(engine.vae.config.num_frames(engine.history_layout.chunk_frames), -1, -1, -1)
            fake = engine.encode_pixels(window, g)[:, :, -1:]
            latent, fake = augment_image_latents(latent, fake, g)
            self._history.init_image(latent, fake)
        elif video is not None:
            self._history.init_video(*self._video_latents(video))

    def _video_latents(self, video) -> tuple[Tensor, Tensor]:
        """The V2V prefix and history latents, encoding only the windows the history can see.

        The reference encodes every window of `window` frames aligned to the video's end, then noises
        each; the history keeps only its newest `rolling` latent frames, so only the last
        ceil(rolling / chunk_frames) windows can reach it. The older windows are not read or encoded,
        but their random draws (posterior sample, then sigmas and noise) are made in the reference's
        order and discarded: the generator ends where the reference's does, so the result is the same.
        """
        engine, g = self.engine, self._generator
        n = engine.history_layout.chunk_frames
        window = engine.vae.config.num_frames(n)
        seen = -(-engine.history_layout.rolling // n)
        first, tail, total = first_and_last_frames(video, seen * window)
        if total < window:
            raise InputError(f"video must be uint8 [T, H, W, 3] with at least {window} frames, got {total} frames")
        windows = total // window
        kept = min(windows, seen)
        first_latent = engine.encode_pixels(first, g)
        for _ in range(windows - kept):
            engine.skip_encode_draws(window, g)
        latents = engine.encode_windows(tail[len(tail) - kept * window :], window, g)
        return augment_video_latents(first_latent, latents, g, n, dropped_chunks=windows - kept)

    # ---- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        """The next chunk; after an exception inside a chunk, every call raises `StreamFailedError`.

        A stream cut short by an error (or Ctrl-C in a notebook) must not look complete (a plain
        generator would end with StopIteration after raising), so the failure is kept.
        """
        if self.failure is not None:
            raise StreamFailedError(self._failure_message()) from self.failure
        if self._closed or not self._more(self._index):
            raise StopIteration
        try:
            # launch, decode, hand over; with overlap, chunk k+1 is launched before chunk k is handed over
            with self.engine.scope:
                current = self._pending or self._launch()
                decoded = self._decode(current)
                overlap = self._lanes.overlapped and self._more(current.index + 1)
                self._pending = self._launch() if overlap else None
                chunk = self._hand_over(decoded)
        except BaseException as err:
            self.failure = err
            raise
        self._index += 1
        return chunk

    def _failure_message(self) -> str:
        err = self.failure
        cause = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        return (
            f"this stream failed at chunk {self._index} ({cause}) and cannot continue; "
            "start a new one with engine.generate_stream()"
        )

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the stream's buffers; iteration ends."""
        self._closed = True
        with self.engine.scope:  # a chunk launched ahead (overlap) is dropped on its own device
            self._pending = None  # not handed over
            self._history = None
        self._prompt = None
        self._uncond = None
        self._text, self._text_key = None, None

    def set_prompt(self, prompt: str | None = None, *, prompt_embeds: Tensor | None = None) -> int:
        """Switch to a new prompt, blending embeddings over the stream's `prompt_blend_chunks` chunks.

        It takes effect at the first chunk whose compute has not started, and returns that chunk's
        index: the next chunk, or with `overlap_decode` (on by default on CUDA) the one after it,
        since chunk k+1 is already running on the GPU when chunk k is handed over.
        """
        if self.failure is not None:
            raise StreamFailedError(self._failure_message()) from self.failure
        if self._closed:
            raise RuntimeError("this stream is closed; start a new one with engine.generate_stream()")
        with self.engine.scope:
            self._prompt.switch(self.engine._embed(prompt, prompt_embeds, "prompt"))
        return self._launched

    @property
    def chunks_total(self) -> int | None:
        if self.num_frames is None:
            return None
        return -(-self.num_frames // self._frames_per_chunk)

    @property
    def time_to_first_frame_s(self) -> float | None:
        """Seconds from `generate_stream()` to the first chunk's frames in the caller's hands."""
        return self.handover_times[0] - self._started if self.handover_times else None

    @property
    def timings(self) -> dict[str, float]:
        """The cold start by phase, in seconds (after the first chunk; before it, what is known).

        load_s, load_gb_s: the engine's load (`Engine.from_pretrained`); text_encoder_s: the prompt
        encoding before the stream starts; condition_s: the image or video encode (I2V/V2V); plan_s
        (plans_loaded from the cache, plans_made here), warmup_s (eager runs thrown away: on CUDA the
        Triton compiles and autotuning), capture_s: the chunk program's work for this stream;
        first_chunk_s: the rest of the time to first frame (the first chunk's compute, its decode,
        the hand-over); ttff_s as `time_to_first_frame_s`.
        """
        out = dict(self.engine.load_timings) if self.engine is not None else {}
        out.update(self._cold)
        if self._cold_at_start is not None and self.engine.chunk_program is not None:
            now = self.engine.chunk_program.cold.snapshot()
            out.update({k: now[k] - self._cold_at_start[k] for k in now})
        ttff = self.time_to_first_frame_s
        if ttff is not None:
            before = sum(out.get(k, 0.0) for k in ("condition_s", "plan_s", "warmup_s", "capture_s"))
            out.update(ttff_s=ttff, first_chunk_s=max(ttff - before, 0.0))
        return out

    @property
    def steady_fps(self) -> float | None:
        """Frames per second handed over after the first chunk (None before the second chunk)."""
        t = self.handover_times
        return (len(t) - 1) * self._frames_per_chunk / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else None

    def _more(self, k: int) -> bool:
        return self.chunks_total is None or k < self.chunks_total

    def _launch(self) -> _Launched:
        """Issue chunk `_launched`'s compute on the compute lane; its latents land in its slot."""
        engine, lanes, k = self.engine, self._lanes, self._launched
        slot = self._slots[k % 2]
        with nvtx_range(f"chunk {k}"), lanes.on("compute"):
            begin = lanes.mark("compute")
            text = self._text_context()
            chunks = engine.chunks
            chunks.attach(self._history)
            self._bind(chunks, text)
            latents = chunks.run(chunks.kind(first_chunk=k == 0), self._generator)
            if self._slot_free[k % 2] is not None:  # chunk k-2's decode lane copies the slot out: wait only now
                lanes.wait("compute", self._slot_free[k % 2])
            slot.copy_(latents)
            finite = self._finite.check(k % 2)  # on the device; copied to the host on the decode lane
            end = lanes.mark("compute")
        self._launched += 1
        self._compute_end = end
        return _Launched(k, slot, begin, end, finite)

    def _bind(self, chunks: ChunkProgram | EagerChunk, text: TextContext) -> None:
        """Bind the chunk's prompt K/V; with CUDA graphs, plan and capture the kinds this stream runs
        before its first chunk, after a prompt of a new shape, and whenever the steady kind has no graph
        (a larger arena drops the graphs: a stale cached plan re-planned bigger): a warm-up between chunks."""
        fresh = not chunks.accepts(text)
        if fresh:
            chunks.replan(text)  # explicit, outside any capture
        chunks.set_text(text)
        if chunks.cuda_graph and (fresh or self._launched == 0 or STEADY not in chunks.captured):
            kinds = list(chunks.kinds(first_chunk=self._launched == 0))
            self.engine._tune_attention(chunks, kinds)
            with nvtx_range("warmup"):  # this chunk's own run is its kind's warm-up: nothing thrown away
                chunks.capture(kinds, first=kinds[0])
            chunks.attach(self._history)

    def _decode(self, launched: _Launched) -> _Decoded:
        """Issue the VAE decode of a launched chunk on the decode lane, after its compute."""
        lanes = self._lanes
        with nvtx_range(f"decode {launched.index}"), lanes.on("decode"):
            lanes.wait("decode", launched.end)
            lanes.used_on("decode", launched.latents)
            lanes.used_on("decode", launched.finite)
            begin = lanes.mark("decode")
            latents = launched.latents.clone()
            finite = _to_host(launched.finite)
            slot_read = self._slot_free[launched.index % 2] = lanes.mark("decode")  # the slot and its flag
            if self.engine._decoded is not None:  # another stream's decode may still use the graph's buffers
                lanes.wait("decode", self.engine._decoded)
            with self.engine.sampler.section("decode"):
                mesh = self.engine.parallel
                if mesh is None or mesh.is_output_rank:
                    frames = _to_host(self.engine.decode_frames(latents))
                else:  # rank 0 decodes and writes; the other ranks go on to the next chunk
                    config = self.engine.config
                    frames = _to_host(no_frames(config.height, config.width, self.engine.device))
            latents = _to_host(latents)
            end = self.engine._decoded = lanes.mark("decode")
        return _Decoded(launched, latents, frames, finite, begin, end, slot_read)

    def _hand_over(self, decoded: _Decoded) -> Chunk:
        """Wait for one chunk's decode (only that) and bring its frames to the host."""
        lanes, k = self._lanes, decoded.launched.index
        self._host_wait(decoded.end, f"chunk {k}")  # the decode and its copies to the host: no other sync
        if not bool(decoded.finite):
            raise NonFiniteError(
                f"chunk {k}'s latents hold NaN or Inf, so its frames would be black; generation stops "
                "here. Check the prompt embeddings, the guidance scale and the dtype (float16 overflows)"
            )
        frames, latents = decoded.frames.cpu().numpy(), decoded.latents.cpu()
        if self.engine.device.type == "cuda":  # the caller keeps chunks: pageable copies, the pinned ones recycle
            frames, latents = frames.copy(), latents.clone()
        self.handover_times.append(time.perf_counter())
        timings = {
            "transformer_s": lanes.seconds(decoded.launched.begin, decoded.launched.end),
            "decode_s": lanes.seconds(decoded.begin, decoded.end),
        }
        first = k * self._frames_per_chunk
        in_video = len(frames) if self.num_frames is None else min(len(frames), self.num_frames - first)
        return Chunk(k, first, frames, latents, timings, in_video)

    def _host_wait(self, mark: Any, what: str) -> None:
        """Block until `mark`; on several ranks give up with `ParallelError` after the mesh's timeout.

        A replayed chunk graph holds the collectives, which NCCL's watchdog does not see: a dead peer
        would leave this wait (and the rank) hanging. One process waits without a bound.
        """
        mesh = self.engine.parallel
        if mesh is not None:
            wait_within(mesh, lambda: self._lanes.reached(mark), what)
        self._lanes.host_wait(mark)

    def _text_context(self) -> TextContext:
        """The text K/V of the next chunk's prompt (a new context only when the embedding changed)."""
        embeds = self._prompt.next()
        fresh = embeds is not self._text_key  # text K/V are computed once per prompt (and per blend chunk)
        if self.engine.parallel is not None:  # rank 0's prompts (set_prompt there) are every rank's
            if self._compute_end is not None:  # the broadcast queues behind the chunk before: bound that wait
                self._host_wait(self._compute_end, f"chunk {self._launched - 1}'s compute")
            fresh, embeds, self._uncond = prompt_from_rank0(self.engine.parallel, fresh, embeds, self._uncond)
        if fresh:
            if self._uncond is None:
                self._text = self.engine.transformer.encode_text(embeds)
            else:  # one CFG batch; each half attends to its own tokens only (TextContext.lengths)
                lengths = (embeds.shape[1], self._uncond.shape[1])
                self._text = self.engine.transformer.encode_text(_pad_cat(embeds, self._uncond), lengths)
            self._text_key = embeds
        return self._text


class _FiniteFlags:
    """One static on-device flag per latent slot: "every latent of the slot's chunk is finite".

    Static so that a steady chunk leaves no tensor of its own alive (a fresh 0-d flag per chunk made
    the allocated bytes depend on how many chunks were in flight). Written with out= ops only, into
    a static scratch: x - x is 0 for a finite x and NaN for Inf or NaN, and a sum of zeros is 0 while
    a NaN survives any summation order (IEEE), so the flag is exact.
    """

    def __init__(self, slots: list[Tensor]) -> None:
        self.slots = slots
        self.flags = [torch.ones((), dtype=torch.bool, device=s.device) for s in slots]
        self._scratch = torch.empty_like(slots[0])
        self._total = torch.zeros((), dtype=slots[0].dtype, device=slots[0].device)

    def check(self, i: int) -> Tensor:
        """Write slot `i`'s flag (on the current stream) and return it."""
        torch.sub(self.slots[i], self.slots[i], out=self._scratch)
        torch.sum(self._scratch, dim=None, out=self._total)
        return torch.eq(self._total, 0, out=self.flags[i])


@dataclass
class _Launched:
    index: int
    latents: Tensor  # the chunk's slot
    begin: Any
    end: Any  # a mark on the compute lane after the chunk's latents are in the slot
    finite: Tensor  # the slot's static 0-d bool on the device: every latent is finite


@dataclass
class _Decoded:
    launched: _Launched
    latents: Tensor  # on the host (pinned on CUDA) once `end` is reached
    frames: Tensor  # likewise
    finite: Tensor  # the slot's finite flag, likewise
    begin: Any
    end: Any
    slot_read: Any  # a mark on the decode lane after the slot and its flag were copied out


def _to_host(t: Tensor) -> Tensor:
    """A CUDA tensor copied to pinned host memory without a sync (valid once the lane's next mark is reached);
    a CPU tensor as it is. The engine's hand-over then waits on one event and never synchronises."""
    if t.device.type != "cuda":
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


class _PromptBlend:
    """The current prompt embedding; after a switch, a linear blend from old to new over `chunks` chunks."""

    def __init__(self, embeds: Tensor, chunks: int) -> None:
        self.current = embeds
        self.target = embeds
        self.chunks = chunks
        self.step = chunks

    def switch(self, embeds: Tensor) -> None:
        self.current, self.target, self.step = self.next_value(), embeds, 0

    def next_value(self) -> Tensor:
        if self.step >= self.chunks:
            return self.target
        w = (self.step + 1) / self.chunks
        a, b = _pad_pair(self.current, self.target)
        return torch.lerp(a, b, w)

    def next(self) -> Tensor:
        value = self.next_value()
        if self.step < self.chunks:
            self.step += 1
            if self.step == self.chunks:
                self.current = self.target
        return value


def _synced(device: torch.device, start: float) -> float:
    """Seconds since `start`, once `device`'s queued work is done (a phase's wall time, cold path only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _load_timings(engine: Engine, seconds: float) -> dict[str, float]:
    """Seconds to load, the bytes of the networks' parameters and buffers, and their rate."""
    modules = [engine.transformer, engine.vae]
    encoder = getattr(engine._prompts.encoder, "encoder", None) if engine._prompts is not None else None
    if isinstance(encoder, torch.nn.Module):  # umT5 (the demo's hash encoder has no weights)
        modules.append(encoder)
    nbytes = sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])
    return {"load_s": seconds, "weights_gb": nbytes / 1e9, "load_gb_s": nbytes / 1e9 / seconds if seconds else 0.0}


def noise_generator(seed: int | torch.Generator) -> torch.Generator:
    """The CPU generator a stream draws from: a new one seeded with `seed`, or the caller's own."""
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError(
                f"seed: the stream draws its noise on the CPU (the reference's random stream), so the "
                f"generator must be a CPU torch.Generator, got one on {seed.device}"
            )
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return torch.Generator("cpu").manual_seed(int(seed))


def _pad_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Zero-pad two `[1, S, D]` embeddings to the same length (zeros are the reference's padding)."""
    s = max(a.shape[1], b.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, s - x.shape[1]))  # noqa: E731
    return pad(a), pad(b)


def _pad_cat(a: Tensor, b: Tensor) -> Tensor:
    """One `[2, S, D]` batch of two embeddings; the padding is masked by the text lengths, never attended."""
    return torch.cat(_pad_pair(a, b))
