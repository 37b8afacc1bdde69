"""Typed, validated configuration: `ModelConfig` mirrors a checkpoint's `transformer/config.json`.

Every value of the checkpoint's config is honoured; a key we do not know is rejected rather than
dropped, because an ignored flag would silently compute a different model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Keys that diffusers writes for its own bookkeeping; they do not change the math.
_BOOKKEEPING_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})

# Keys of the official training code's model class (diffusers loads a config carrying them and
# ignores them). At these values they add nothing to the forward: restricted self-attention and the
# restriction LoRA are off, so the rank sizes nothing (None: any value). Another value would change
# the model, and is refused.
_INACTIVE_TRAINING_KEYS: dict[str, Any] = {
    "restrict_self_attn": False,
    "restrict_lora": False,
    "is_train_restrict_lora": False,
    "restrict_lora_rank": None,
}

# How the weights are stored, not what the model computes: checked by the loader (helios_rt.fp8.loading).
_STORAGE_KEYS = frozenset({"quantization_config"})

log = logging.getLogger("helios_rt")


def _fail(field_name: str, value: Any, constraint: str) -> None:
    raise ValueError(f"ModelConfig.{field_name}={value!r}: {constraint}")


@dataclass(frozen=True)
class ModelConfig:
    """The Helios transformer's architecture (diffusers `HeliosTransformer3DModel` config names)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    added_kv_proj_dim: int | None = None
    rope_dim: tuple[int, int, int] = (44, 42, 42)
    rope_theta: float = 10000.0
    guidance_cross_attn: bool = True
    zero_history_timestep: bool = True
    has_multi_term_memory_patch: bool = True
    is_amplify_history: bool = False
    history_scale_mode: str = "per_head"

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "rope_dim", tuple(int(r) for r in self.rope_dim))
        self._validate()

    def _validate(self) -> None:
        for name in (
            "num_attention_heads",
            "attention_head_dim",
            "in_channels",
            "text_dim",
            "freq_dim",
            "ffn_dim",
            "num_layers",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(name, value, "must be a positive integer")
        if self.out_channels is not None and self.out_channels <= 0:
            _fail("out_channels", self.out_channels, "must be a positive integer")
        if len(self.patch_size) != 3 or min(self.patch_size) <= 0:
            _fail("patch_size", self.patch_size, "must be three positive integers (t, h, w)")
        if len(self.rope_dim) != 3 or sum(self.rope_dim) != self.attention_head_dim:
            _fail(
                "rope_dim",
                self.rope_dim,
                f"must be three sizes (t, y, x) summing to attention_head_dim={self.attention_head_dim}",
            )
        if any(r % 2 for r in self.rope_dim):
            _fail("rope_dim", self.rope_dim, "each axis must be even (RoPE rotates pairs)")
        if self.qk_norm != "rms_norm_across_heads":
            _fail("qk_norm", self.qk_norm, "Helios checkpoints use 'rms_norm_across_heads'; no other is supported")
        if self.added_kv_proj_dim is not None:
            _fail(
                "added_kv_proj_dim",
                self.added_kv_proj_dim,
                "image K/V projections are not part of Helios; expected null",
            )
        if self.history_scale_mode not in ("per_head", "scalar"):
            _fail("history_scale_mode", self.history_scale_mode, "must be 'per_head' or 'scalar'")
        if not self.eps > 0:
            _fail("eps", self.eps, "must be positive")
        if not self.has_multi_term_memory_patch:
            _fail(
                "has_multi_term_memory_patch",
                False,
                "Helios checkpoints carry the short/mid/long memory patches; a model without them is not supported",
            )

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        _check_training_keys(raw)
        ignored = _BOOKKEEPING_KEYS | _INACTIVE_TRAINING_KEYS.keys() | _STORAGE_KEYS
        unknown = sorted(k for k in raw if k not in known and k not in ignored)
        if unknown:
            raise ValueError(
                f"transformer config has unknown keys {unknown}: this helios_rt does not know what they change; "
                "upgrade helios_rt or remove them if they are not part of Helios"
            )
        values = {k: v for k, v in raw.items() if k in known}
        for key in ("patch_size", "rope_dim"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing: a Helios transformer folder needs its config.json") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); re-download the checkpoint") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["rope_dim"] = list(self.rope_dim)
        return d

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _check_training_keys(raw: dict[str, Any]) -> None:
    """Accept the training code's keys at their inactive values (named in one info line); refuse the rest."""
    present = {k: raw[k] for k in _INACTIVE_TRAINING_KEYS if k in raw}
    for key, value in present.items():
        inactive = _INACTIVE_TRAINING_KEYS[key]
        if inactive is None:  # a size: meaningful only while restrict_lora is on, which is refused
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                _fail(key, value, "must be a non-negative integer or null")
        elif value is not inactive and value != inactive:
            _fail(
                key,
                value,
                f"this training option changes the model and helios_rt does not implement it; "
                f"Helios inference checkpoints have {key}={json.dumps(inactive)}",
            )
    if present:
        log.info("transformer config: ignoring training-only keys at inactive values: %s", ", ".join(sorted(present)))


# The released Helios checkpoints (Distilled, Mid, Base) share this architecture.
HELIOS_14B = ModelConfig(is_amplify_history=True)

# Small presets for tests and the built-in demo model: same structure, tiny sizes.
TINY = ModelConfig(
    num_attention_heads=2,
    attention_head_dim=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    rope_dim=(4, 6, 6),
    is_amplify_history=True,
)

PRESETS: dict[str, ModelConfig] = {
    "helios-14b": HELIOS_14B,
    "tiny": TINY,
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)} or pass a path") from None


# the attention backends a user may name (helios_rt.ops.attention_backends defines what each is)
ATTENTION_CHOICES: tuple[str, ...] = ("auto", "fa3", "fa2", "triton", "cudnn", "sdpa", "reference")

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


@dataclass(frozen=True)
class EngineConfig:
    """How an engine runs: resolution, precision, device, kernels, and sampling overrides.

    Sampling values left as None take the checkpoint's defaults (distilled: one step per pyramid
    stage, no guidance, doubled steps on the first chunk; base/mid: CFG 5.0).
    """

    height: int = 384
    width: int = 640
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:N"
    dtype: str = "auto"  # "auto" (bfloat16 on cuda, float32 on cpu), "float32", "bfloat16", "float16"
    vae_dtype: str = "auto"  # "auto" follows dtype
    kernels: str = "auto"  # "auto", "reference", "triton"
    # the attention backend (helios_rt.ops.attention_backends): "auto" follows `kernels` ("auto" on CUDA takes
    # the fastest backend that runs, timed at the engine's shapes during warm-up; untimed, the first of AUTO_ORDER),
    # or one of ATTENTION_CHOICES; an explicit choice that cannot run is refused at load with the fix
    attention: str = "auto"
    # the compiled chunk: "chunk" runs each chunk as one planned program on one arena, captured as one
    # CUDA graph per chunk kind on CUDA (on a CPU the same program runs from its arena, uncaptured);
    # "off" runs the op table eagerly through the caching allocator (debugging, per-op profiles);
    # "auto" = "chunk" on CUDA, "off" on a CPU (where the planner's per-op checks cost more than they save)
    graphs: str = "auto"
    # decode chunk k on a second CUDA stream while chunk k+1 is computed; None = on for CUDA. With it
    # on, Stream.set_prompt takes effect one chunk later (chunk k+1 is already running)
    overlap_decode: bool | None = None
    pyramid_steps: tuple[int, ...] | None = None  # steps per stage, e.g. (1, 1, 1) or (2, 2, 2)
    num_inference_steps: int | None = None  # base (non-pyramid) checkpoints
    guidance_scale: float | None = None
    amplify_first_chunk: bool | None = None
    history_sizes: tuple[int, int, int] = (16, 2, 1)  # long, mid, short latent frames
    latent_frames_per_chunk: int = 9
    keep_first_frame: bool = True
    zero_init_steps: int = 1  # CFG-Zero*: steps at the start of stage 0 whose prediction is zeroed
    prompt_blend_chunks: int = 3  # chunks over which a new prompt's embedding is interpolated
    fps: int = 24
    # move the umT5 encoder (10.6 GiB in bf16) to host memory after each prompt is encoded and back for
    # the next: `helios-rt plan` shows what that frees; a new prompt then pays the transfer
    offload_text_encoder: bool = False
    # decode each chunk this many latent frames at a time, carrying the causal convs' frames between
    # slices (the same frames; ~2.3x less decode memory at 1 frame): `helios-rt plan --gpu-memory`
    # says when a budget needs it. None decodes the whole chunk at once
    decode_slice_frames: int | None = None
    # "fp8": the linears inside the transformer blocks run in e4m3 through torch._scaled_mm (weights per
    # output channel, activations per token; helios_rt.fp8), halving their weight memory; the rest keeps `dtype`
    precision: str = "native"
    # "fp8": umT5's linears as e4m3 weights with per-channel scales, dequantised per product (4.3 GiB on the
    # GPU instead of 10.6; the token embedding stays on the host); what makes an FP8 engine fit 24 GB while a
    # prompt is encoded (`helios-rt plan --precision fp8 --gpu-memory 24` names it). Gate: fp8/weight_only.py
    text_encoder_precision: str = "native"

    # several processes, one stream: a helios_rt.parallel.ParallelConfig (sequence and CFG parallelism
    # on torch.distributed, set by `torchrun ... -m helios_rt generate`); None = this process alone
    parallel: Any = None

    def __post_init__(self) -> None:
        self._check_parallel()
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"EngineConfig.{name}={value!r}: must be a positive integer")
        if not isinstance(self.device, str):  # a torch.device is welcome; stored as its name
            object.__setattr__(self, "device", str(self.device))
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"EngineConfig.device={self.device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        for name in ("dtype", "vae_dtype"):
            value = getattr(self, name)
            if value != "auto" and value not in _DTYPES:
                raise ValueError(f"EngineConfig.{name}={value!r}: use 'auto' or one of {sorted(set(_DTYPES))}")
        if self.kernels not in ("auto", "reference", "triton"):
            raise ValueError(f"EngineConfig.kernels={self.kernels!r}: use 'auto', 'reference' or 'triton'")
        if self.precision not in ("native", "fp8"):
            raise ValueError(f"EngineConfig.precision={self.precision!r}: use 'native' (the dtype) or 'fp8'")
        if self.text_encoder_precision not in ("native", "fp8"):
            raise ValueError(
                f"EngineConfig.text_encoder_precision={self.text_encoder_precision!r}: use 'native' (the dtype) "
                "or 'fp8' (umT5's linears in e4m3, weight-only)"
            )
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"EngineConfig.attention={self.attention!r}: use one of {', '.join(ATTENTION_CHOICES)}")
        if self.graphs not in ("auto", "chunk", "off"):
            raise ValueError(f"EngineConfig.graphs={self.graphs!r}: use 'auto', 'chunk' or 'off'")
        if self.overlap_decode not in (None, True, False):
            raise ValueError(f"EngineConfig.overlap_decode={self.overlap_decode!r}: use None (auto), True or False")
        if self.pyramid_steps is not None:
            object.__setattr__(self, "pyramid_steps", tuple(self.pyramid_steps))
            if not self.pyramid_steps or any(not isinstance(s, int) or s < 1 for s in self.pyramid_steps):
                raise ValueError(f"EngineConfig.pyramid_steps={self.pyramid_steps!r}: one step count >= 1 per stage")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"EngineConfig.num_inference_steps={self.num_inference_steps}: must be >= 1")
        if self.guidance_scale is not None and not self.guidance_scale >= 1.0:
            raise ValueError(f"EngineConfig.guidance_scale={self.guidance_scale}: must be >= 1.0 (1.0 disables CFG)")
        object.__setattr__(self, "history_sizes", tuple(self.history_sizes))
        if len(self.history_sizes) != 3 or any(s < 1 for s in self.history_sizes):
            raise ValueError(f"EngineConfig.history_sizes={self.history_sizes}: three sizes >= 1 (long, mid, short)")
        if self.latent_frames_per_chunk < 1:
            raise ValueError(f"EngineConfig.latent_frames_per_chunk={self.latent_frames_per_chunk}: must be >= 1")
        d = self.decode_slice_frames
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
            raise ValueError(f"EngineConfig.decode_slice_frames={d!r}: None (whole chunk) or latent frames >= 1")
        if self.prompt_blend_chunks < 1 or self.fps < 1 or self.zero_init_steps < 0:
            raise ValueError("EngineConfig.prompt_blend_chunks and fps must be >= 1, zero_init_steps >= 0")

    def _check_parallel(self) -> None:
        from .parallel.config import ParallelConfig

        if self.parallel is not None and not isinstance(self.parallel, ParallelConfig):
            raise ValueError(
                f"EngineConfig.parallel={self.parallel!r}: use None or helios_rt.parallel.ParallelConfig(...)"
            )

    def resolved_device(self) -> str:
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.parallel is not None and device == "cuda":  # one GPU per rank, as torchrun numbers them
            from .parallel.group import local_device

            device = local_device(device)
        return device

    def resolved_graphs(self) -> str:
        """'chunk' (the compiled chunk, captured on CUDA) or 'off' (eager)."""
        if self.graphs == "auto":
            return "chunk" if self.resolved_device().startswith("cuda") else "off"
        return self.graphs

    def resolved_overlap(self) -> bool:
        cuda = self.resolved_device().startswith("cuda")
        if self.overlap_decode is None:
            return cuda
        if self.overlap_decode and not cuda:
            raise ValueError(
                "EngineConfig.overlap_decode=True needs a CUDA device (a second stream); use None or False"
            )
        return self.overlap_decode

    def resolved_dtype(self, which: str = "dtype"):
        import torch

        value = getattr(self, which)
        if value == "auto":
            value = (
                self.dtype
                if which == "vae_dtype" and self.dtype != "auto"
                else ("bfloat16" if self.resolved_device().startswith("cuda") else "float32")
            )
        return getattr(torch, _DTYPES[value])

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)
