"""Typed, validated configuration: `ModelConfig` mirrors a checkpoint's `transformer/config.json`;
`EngineConfig` is what a user sets to run an engine.

Every value of the checkpoint's config is honoured; a key we do not know is rejected rather than
dropped, because an ignored flag would silently compute a different model.

EngineConfig keeps the user's options (size, device, precision, steps, guidance, one memory budget,
parallel); the rest sits in one group per concern: `MemorySettings` (what the budget decides, or set
by hand), `SamplingOverrides` (the checkpoint's training values, for experts; helios_rt.sampling) and
`DebugSwitches` (what runs underneath the same math). The old flat names (`kernels=`, `pyramid_steps=`,
...) are accepted for one release with one DeprecationWarning and still read as properties.
The CLI's options are generated from these fields (helios_rt.options).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sampling.overrides import SamplingOverrides

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

# A small preset for tests and plans: same structure, tiny sizes.
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


# ==== EngineConfig ===================================================================================
# The values each engine option takes, listed once: the checks below and the CLI's choices read these.
# the attention backends a user may name (helios_rt.ops.attention_backends defines what each is)
ATTENTION_CHOICES: tuple[str, ...] = ("auto", "fa3", "fa2", "triton", "cudnn", "sdpa", "reference")
KERNEL_CHOICES: tuple[str, ...] = ("auto", "reference", "triton")
GRAPH_CHOICES: tuple[str, ...] = ("auto", "chunk", "off")
PRECISION_CHOICES: tuple[str, ...] = ("native", "fp8")

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
DTYPE_CHOICES: tuple[str, ...] = ("auto", *sorted(_DTYPES))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...], note: str = "") -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name}={value!r}: use one of {', '.join(map(repr, choices))}{note}")


@dataclass(frozen=True)
class DebugSwitches:
    """What runs underneath the same math, for debugging, per-op profiles and comparisons.

    The defaults are what a user wants on every machine; each switch changes speed or memory, never
    the model (the op tables are checked against the PyTorch references by the tests).
    """

    # the op table: "auto" (the Triton kernels on CUDA, the references on a CPU), "reference", "triton"
    kernels: str = "auto"
    # the attention backend (helios_rt.ops.attention_backends): "auto" follows `kernels` ("auto" on CUDA takes
    # the fastest backend that runs, timed at the engine's shapes during warm-up); an explicit choice that
    # cannot run is refused at load with the fix
    attention: str = "auto"
    # "chunk": each chunk one planned program on one arena, captured as one CUDA graph per chunk kind on
    # CUDA; "off": the ops run eagerly on the caching allocator; "auto" = "chunk" on CUDA, "off" on a CPU
    graphs: str = "auto"
    # decode chunk k on a second CUDA stream while chunk k+1 is computed; None = on for CUDA. With it on,
    # Stream.set_prompt takes effect one chunk later (chunk k+1 is already running)
    overlap_decode: bool | None = None
    # the VAE's dtype; "auto" follows EngineConfig.dtype
    vae_dtype: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("DebugSwitches", "kernels", self.kernels, KERNEL_CHOICES)
        _check_choice("DebugSwitches", "attention", self.attention, ATTENTION_CHOICES)
        _check_choice("DebugSwitches", "graphs", self.graphs, GRAPH_CHOICES)
        _check_choice("DebugSwitches", "vae_dtype", self.vae_dtype, DTYPE_CHOICES, " ('auto' follows the dtype)")
        if self.overlap_decode not in (None, True, False):
            raise ValueError(f"DebugSwitches.overlap_decode={self.overlap_decode!r}: use None (auto), True or False")


@dataclass(frozen=True)
class MemorySettings:
    """How the engine spends GPU memory: set by hand, or planned from `EngineConfig.gpu_memory`.

    `helios_rt.compile.memory_plan.plan_memory(config, model)` fills the values left at None with what
    `helios-rt plan --gpu-memory GB` chooses for that checkpoint (the same code); `Engine.from_pretrained`
    calls it.

    text_encoder_precision: umT5's linears, "native" (the dtype) or "fp8" (e4m3 weight-only, 4.3 GiB on
      the GPU instead of 10.6; what makes an FP8 engine fit 24 GB while a prompt is encoded).
      None: native, or what the budget needs.
    decode_slice_frames: decode each chunk this many latent frames at a time (the same frames, ~2.3x
      less decode memory at 1). None: the whole chunk at once, or what the budget needs.
    offload_text_encoder: move umT5 to host memory after each prompt is encoded and back for the next:
      lowers the memory between prompts (never the encode peak, so a budget never needs it).
    planned_for_gb: the budget these settings were planned for (None: set by hand).
    """

    text_encoder_precision: str | None = None
    decode_slice_frames: int | None = None
    offload_text_encoder: bool = False
    planned_for_gb: float | None = None

    def __post_init__(self) -> None:
        if self.text_encoder_precision is not None:
            _check_choice("MemorySettings", "text_encoder_precision", self.text_encoder_precision,
                          PRECISION_CHOICES, " (umT5's linears in e4m3, weight-only)")  # fmt: skip
        d = self.decode_slice_frames
        if d is not None and not (_is_int(d) and d >= 1):
            raise ValueError(f"MemorySettings.decode_slice_frames={d!r}: None (whole chunk) or latent frames >= 1")
        if self.offload_text_encoder not in (True, False):
            raise ValueError(f"MemorySettings.offload_text_encoder={self.offload_text_encoder!r}: use True or False")


# What a config carries beside its fields: the spelling its steps were given in (the deprecated names keep
# their old rules) and the two stream values that leave EngineConfig (honoured until the engine takes them).
_HIDDEN_DEFAULTS: dict[str, Any] = {"steps_option": "steps", "fps": 24, "prompt_blend_chunks": 3}


@dataclass(frozen=True)
class EngineConfig:
    """What a user sets to run an engine; expert and debugging values sit in their own groups.

    steps: None = the checkpoint's (distilled: 1 per pyramid stage; mid: 20 per stage; base: 50). An int
      is that many steps per stage on a pyramid checkpoint and the total on a base (HeliosPipeline) one;
      a tuple gives each pyramid stage its own count (a base checkpoint takes a 1-tuple).
    guidance_scale: None = the checkpoint's (distilled: 1.0, no CFG; mid and base: 5.0).
    gpu_memory: a budget in GB; `memory` follows from it (`MemorySettings`).
    """

    height: int = 384
    width: int = 640
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:N"; a torch.device is welcome
    dtype: str = "auto"  # "auto" (bfloat16 on cuda, float32 on cpu), or one of DTYPE_CHOICES
    # "fp8": the linears inside the transformer blocks run in e4m3 through torch._scaled_mm (weights per
    # output channel, activations per token; helios_rt.fp8), halving their weight memory; the rest keeps `dtype`
    precision: str = "native"
    steps: int | tuple[int, ...] | None = None
    guidance_scale: float | None = None
    gpu_memory: float | None = None
    # several processes, one stream: a helios_rt.parallel.ParallelConfig (sequence and CFG parallelism on
    # torch.distributed, set by `torchrun ... -m helios_rt generate`); None = this process alone
    parallel: Any = None
    memory: MemorySettings = MemorySettings()
    sampling: SamplingOverrides = SamplingOverrides()
    debug: DebugSwitches = DebugSwitches()

    def __post_init__(self) -> None:
        self._check_parallel()
        for name in ("height", "width"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"EngineConfig.{name}={value!r}: must be a positive integer")
        if not isinstance(self.device, str):  # a torch.device is welcome; stored as its name
            object.__setattr__(self, "device", str(self.device))
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"EngineConfig.device={self.device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        _check_choice("EngineConfig", "dtype", self.dtype, DTYPE_CHOICES)
        _check_choice("EngineConfig", "precision", self.precision, PRECISION_CHOICES, " ('native' is the dtype)")
        self._check_steps()
        if self.guidance_scale is not None and not self.guidance_scale >= 1.0:
            raise ValueError(f"EngineConfig.guidance_scale={self.guidance_scale}: must be >= 1.0 (1.0 disables CFG)")
        gb = self.gpu_memory
        if gb is not None and not (isinstance(gb, (int, float)) and not isinstance(gb, bool) and gb > 0):
            raise ValueError(f"EngineConfig.gpu_memory={gb!r}: a budget in GB > 0, or None (no budget)")
        for name, cls in _GROUPS.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"EngineConfig.{name}={getattr(self, name)!r}: use {cls.__name__}(...)")

    def _check_steps(self) -> None:
        steps = self.steps
        if isinstance(steps, (list, tuple)):
            steps = tuple(steps)
            object.__setattr__(self, "steps", steps)
        per_stage = isinstance(steps, tuple) and steps and all(_is_int(s) and s >= 1 for s in steps)
        if steps is not None and not (per_stage or (_is_int(steps) and steps >= 1)):
            raise ValueError(f"EngineConfig.steps={steps!r}: an int >= 1 (per pyramid stage, or a base "
                             "checkpoint's total) or one count >= 1 per pyramid stage")  # fmt: skip

    def _check_parallel(self) -> None:
        from .parallel.config import ParallelConfig

        if self.parallel is not None and not isinstance(self.parallel, ParallelConfig):
            raise ValueError(
                f"EngineConfig.parallel={self.parallel!r}: use None or helios_rt.parallel.ParallelConfig(...)"
            )

    @property
    def steps_option(self) -> str:
        """The name `steps` was given under: "steps", or a deprecated "pyramid_steps" / "num_inference_steps"
        (which keep their old rule: pyramid checkpoints only / base checkpoints only)."""
        return self._hidden_value("steps_option")

    def _hidden_value(self, key: str) -> Any:
        return self.__dict__.get("_hidden", _HIDDEN_DEFAULTS)[key]

    def memory_settings(self) -> MemorySettings:
        """The memory settings the engine runs with; a budget must have been planned for the checkpoint."""
        if self.gpu_memory is not None and self.memory.planned_for_gb != self.gpu_memory:
            raise ValueError(
                f"EngineConfig.gpu_memory={self.gpu_memory:g} is planned against the checkpoint before loading: "
                "load with Engine.from_pretrained (which plans it), pass "
                "helios_rt.compile.memory_plan.plan_memory(config, model), or set memory=MemorySettings(...) by hand"
            )
        return self.memory

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
        if self.debug.graphs == "auto":
            return "chunk" if self.resolved_device().startswith("cuda") else "off"
        return self.debug.graphs

    def resolved_overlap(self) -> bool:
        cuda = self.resolved_device().startswith("cuda")
        if self.debug.overlap_decode is None:
            return cuda
        if self.debug.overlap_decode and not cuda:
            raise ValueError(
                "EngineConfig.overlap_decode=True needs a CUDA device (a second stream); use None or False"
            )
        return self.debug.overlap_decode

    def resolved_dtype(self, which: str = "dtype"):
        """The torch dtype of the model ("dtype") or of the VAE ("vae_dtype")."""
        import torch

        value = self.dtype if which == "dtype" else self.debug.vae_dtype
        if value == "auto":
            value = (
                self.dtype
                if which == "vae_dtype" and self.dtype != "auto"
                else ("bfloat16" if self.resolved_device().startswith("cuda") else "float32")
            )
        return getattr(torch, _DTYPES[value])

    def replace(self, **changes: Any) -> EngineConfig:
        """A copy with `changes` (new or, for one release, deprecated names)."""
        old = {k: changes.pop(k) for k in list(changes) if k in DEPRECATED_NAMES}
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | changes
        hidden = dict(self.__dict__.get("_hidden", _HIDDEN_DEFAULTS))
        if "steps" in changes:
            hidden["steps_option"] = "steps"
        if old:
            _warn_deprecated(old)
            hidden = _translate(values, old, hidden)
        config = EngineConfig(**values)
        object.__setattr__(config, "_hidden", hidden)
        return config

    # ---- the old names, read-only, for one release (engine.py and compile/ read some of them) -------------
    kernels = property(lambda self: self.debug.kernels, doc="Deprecated: `debug.kernels`.")
    attention = property(lambda self: self.debug.attention, doc="Deprecated: `debug.attention`.")
    graphs = property(lambda self: self.debug.graphs, doc="Deprecated: `debug.graphs`.")
    overlap_decode = property(lambda self: self.debug.overlap_decode, doc="Deprecated: `debug.overlap_decode`.")
    vae_dtype = property(lambda self: self.debug.vae_dtype, doc="Deprecated: `debug.vae_dtype`.")
    history_sizes = property(lambda self: self.sampling.value("history_sizes"), doc="Deprecated: `sampling`.")
    latent_frames_per_chunk = property(lambda self: self.sampling.value("latent_frames_per_chunk"))
    keep_first_frame = property(lambda self: self.sampling.value("keep_first_frame"))
    zero_init_steps = property(lambda self: self.sampling.value("zero_init_steps"))
    amplify_first_chunk = property(lambda self: self.sampling.amplify_first_chunk)
    text_encoder_precision = property(lambda self: self.memory_settings().text_encoder_precision or "native")
    decode_slice_frames = property(lambda self: self.memory_settings().decode_slice_frames)
    offload_text_encoder = property(lambda self: self.memory_settings().offload_text_encoder)
    fps = property(lambda self: self._hidden_value("fps"), doc="Deprecated: the video writer's fps.")
    prompt_blend_chunks = property(lambda self: self._hidden_value("prompt_blend_chunks"))


_GROUPS: dict[str, type] = {"memory": MemorySettings, "sampling": SamplingOverrides, "debug": DebugSwitches}

# ---- the old field names, accepted for one release ----------------------------------------------------
# old name -> the group it moved to (EngineConfig(kernels="triton") is EngineConfig(debug=DebugSwitches(kernels=...)))
_MOVED: dict[str, str] = {
    **dict.fromkeys(("kernels", "attention", "graphs", "overlap_decode", "vae_dtype"), "debug"),
    **dict.fromkeys(("history_sizes", "latent_frames_per_chunk", "keep_first_frame", "zero_init_steps",
                     "amplify_first_chunk"), "sampling"),  # fmt: skip
    **dict.fromkeys(("text_encoder_precision", "decode_slice_frames", "offload_text_encoder"), "memory"),
}
_STEP_NAMES = ("pyramid_steps", "num_inference_steps")
# the values that leave EngineConfig for the stream side: honoured until the engine takes them there
_STREAM_NOTES = {
    "fps": "the frame rate belongs to the video writer (Mp4Writer(fps=), `helios-rt generate --fps`)",
    "prompt_blend_chunks": "it belongs to the stream: Engine.generate_stream(prompt_blend_chunks=)",
}
DEPRECATED_NAMES: frozenset[str] = frozenset(_MOVED) | frozenset(_STEP_NAMES) | frozenset(_STREAM_NOTES)


def _new_spelling(name: str) -> str:
    if name in _MOVED:
        return f"{_MOVED[name]}={_GROUPS[_MOVED[name]].__name__}({name}=...)"
    if name in _STEP_NAMES:
        return "steps=... (an int per stage, or the total on a base checkpoint)"
    return f"(none on EngineConfig: {_STREAM_NOTES[name]})"


def _warn_deprecated(old: dict[str, Any]) -> None:
    """One warning per construction, naming each old name's new spelling (stacklevel: the caller's line)."""
    moves = "; ".join(f"{name} -> {_new_spelling(name)}" for name in old)
    warnings.warn(f"EngineConfig: deprecated names, accepted for one release: {moves}", DeprecationWarning,
                  stacklevel=3)  # fmt: skip


def _translate(values: dict[str, Any], old: dict[str, Any], hidden: dict[str, Any]) -> dict[str, Any]:
    """Move deprecated keywords into `values` (in place) at their new place; returns the hidden values.

    An invalid old value is reported under the name the caller wrote (EngineConfig.kernels=...)."""
    hidden = dict(hidden)
    for name, value in old.items():
        if name in _MOVED:
            group = _GROUPS[_MOVED[name]]
            try:
                values[_MOVED[name]] = dataclasses.replace(values.get(_MOVED[name], group()), **{name: value})
            except ValueError as err:
                raise ValueError(str(err).replace(f"{group.__name__}.", "EngineConfig.", 1)) from None
        elif name in _STEP_NAMES:
            if "steps" in values and values["steps"] is not None and hidden.get("steps_option") != name:
                raise ValueError(f"EngineConfig: {name} and steps both set; pass steps alone")
            values["steps"] = _old_steps(name, value)
            hidden["steps_option"] = name
        else:
            if not (_is_int(value) and value >= 1):
                raise ValueError(f"EngineConfig.{name}={value!r}: must be an integer >= 1")
            hidden[name] = value
    return hidden


def _old_steps(name: str, value: Any) -> int | tuple[int, ...] | None:
    """`pyramid_steps` (a count per stage) or `num_inference_steps` (a base checkpoint's total), checked by name."""
    if value is None:
        return None
    if name == "pyramid_steps":
        steps = tuple(value) if isinstance(value, (list, tuple)) else value
        if not isinstance(steps, tuple) or not steps or not all(_is_int(s) and s >= 1 for s in steps):
            raise ValueError(f"EngineConfig.pyramid_steps={steps!r}: one step count >= 1 per stage")
        return steps
    if not (_is_int(value) and value >= 1):
        raise ValueError(f"EngineConfig.num_inference_steps={value!r}: must be >= 1")
    return value


_fields_init = EngineConfig.__init__


def _engine_config_init(self: EngineConfig, *args: Any, **kwargs: Any) -> None:
    """The dataclass's __init__, taking the deprecated names too (moved to their new place, one warning)."""
    old = {k: kwargs.pop(k) for k in list(kwargs) if k in DEPRECATED_NAMES}
    hidden = dict(_HIDDEN_DEFAULTS)
    if old:
        _warn_deprecated(old)
        hidden = _translate(kwargs, old, hidden)
    _fields_init(self, *args, **kwargs)
    object.__setattr__(self, "_hidden", hidden)


EngineConfig.__init__ = _engine_config_init  # type: ignore[method-assign]
