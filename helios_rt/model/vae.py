"""The Wan 2.1 VAE of Helios: whole-chunk causal decode and encode, loaded from a checkpoint's `vae/`.

A chunk's 9 latent frames decode in one pass into 33 frames (the first latent frame yields 1 frame,
every other one 4), equal to the reference's frame-by-frame decode with its feature cache; see
`vae_blocks` for why. `slice_frames` decodes the same chunk a few latent frames at a time with that
cache carried between slices: the same frames, a fraction of the activation memory.
Encoding takes 1 + 4k frames (a window, or one image as a 1-frame video).

Latents leave the encoder and enter the decoder *raw*; the transformer works on *normalised*
latents, `(z - latents_mean) / latents_std`. `normalize_latents` / `denormalize_latents` are the one
place that converts, with the Helios pipelines' exact arithmetic (they multiply by `1 / std`).

Shapes: pixels `[B, C, T, H, W]` in [-1, 1]; latents `[B, z_dim, T', H / 8, W / 8]` with
`T = 1 + 4 (T' - 1)` for the Wan 2.1 layout. uint8 frames are `[T, H, W, 3]`, rounded as diffusers'
`VideoProcessor` does for PIL output.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import find_component, load_state_dict, read_json
from .vae_blocks import CausalConv3d, Decoder, Encoder, RMSNorm, TimeCarry, norm_silu_backend

Tensor = torch.Tensor
# The reference encodes the first frame, then groups of 4 frames (whatever the temporal ratio).
ENCODE_GROUP = 4

# Keys that diffusers writes for its own bookkeeping; they do not change the math.
_BOOKKEEPING_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


def _fail(name: str, value: Any, constraint: str) -> None:
    raise ValueError(f"VAEConfig.{name}={value!r}: {constraint}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        _fail(name, value, "must be a positive integer")


@dataclass(frozen=True)
class VAEConfig:
    """diffusers `AutoencoderKLWan` config, key for key (including its `temperal_*` spelling)."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8

    def __post_init__(self) -> None:
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            _positive_int(name, getattr(self, name))
        if self.decoder_base_dim is not None:
            _positive_int("decoder_base_dim", self.decoder_base_dim)
        if not self.dim_mult or any(not isinstance(m, int) or m <= 0 for m in self.dim_mult):
            _fail("dim_mult", self.dim_mult, "must be a non-empty list of positive integers")
        if len(self.temperal_downsample) < len(self.dim_mult) - 1:
            _fail("temperal_downsample", self.temperal_downsample, f"needs {len(self.dim_mult) - 1} entries")
        if self.temporal_stages > 2:
            _fail(
                "temperal_downsample",
                self.temperal_downsample,
                "at most 2 temporal stages: the reference encodes 4 frames per step",
            )
        if self.attn_scales:
            _fail(
                "attn_scales",
                self.attn_scales,
                "encoder attention is not supported (Wan 2.1 uses []; diffusers' own encoder cannot run it)",
            )
        if not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "must be in [0, 1) (it is inactive at inference)")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                _fail(name, getattr(self, name), f"must have z_dim={self.z_dim} entries")
        if any(s == 0 for s in self.latents_std):
            _fail("latents_std", self.latents_std, "entries must be non-zero")
        if self.is_residual:
            _fail("is_residual", True, "the residual (Wan 2.2) VAE is not supported; Helios uses the Wan 2.1 VAE")
        if self.patch_size is not None:
            _fail("patch_size", self.patch_size, "patchified (Wan 2.2) VAEs are not supported; expected null")
        if self.scale_factor_temporal not in (None, self.temporal_ratio):
            _fail("scale_factor_temporal", self.scale_factor_temporal, f"the layers give {self.temporal_ratio}")
        if self.scale_factor_spatial not in (None, self.spatial_ratio):
            _fail("scale_factor_spatial", self.scale_factor_spatial, f"the layers give {self.spatial_ratio}")

    @property
    def temporal_stages(self) -> int:
        return sum(bool(t) for t in self.temperal_downsample[: len(self.dim_mult) - 1])

    @property
    def temporal_ratio(self) -> int:
        return 2**self.temporal_stages

    @property
    def spatial_ratio(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def num_frames(self, latent_frames: int) -> int:
        """Pixel frames decoded from `latent_frames` latent frames (9 -> 33)."""
        return 1 + self.temporal_ratio * (latent_frames - 1)

    def num_latent_frames(self, frames: int) -> int:
        """Latent frames encoded from `frames` = 1 + 4k pixel frames (33 -> 9)."""
        return 1 + (frames - 1) // self.temporal_ratio

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if k not in known and k not in _BOOKKEEPING_KEYS)
        if unknown:
            raise ValueError(
                f"VAE config has unknown keys {unknown}: this helios_rt does not know what they change; "
                "upgrade helios_rt or remove them if they are not part of the Wan VAE"
            )
        return cls(**{k: v for k, v in raw.items() if k in known})


@contextmanager
def cudnn_autotuned() -> Iterator[None]:
    """cuDNN on, with its autotuner (`benchmark`), for the decode only; every flag is the host's again on exit.

    The decode's 3-D convolutions run one fixed shape per engine, so autotuning once pays for every chunk;
    setting `torch.backends.cudnn.benchmark` globally would change the host application's other convs too.
    The flags the decode does not ask for (deterministic, TF32, fp32 precision, ...) keep the host's values.
    The flags are process-wide, so another host thread's convs see them while a decode runs.
    """
    c = torch.backends.cudnn
    host = {name: getattr(c, name) for name in _CUDNN_HOST_FLAGS if hasattr(c, name)}  # this torch's flags only
    with c.flags(enabled=True, benchmark=True, benchmark_limit=c.benchmark_limit or 10, **host):
        yield


# the flags `cudnn.flags()` would otherwise reset to its defaults, kept at the host's values; depthwise_kernel
# is newer than torch 2.11 (the floor), so each is passed only where this torch has it
_CUDNN_HOST_FLAGS = ("deterministic", "allow_tf32", "fp32_precision", "depthwise_kernel")


def _autotuned(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with cudnn_autotuned():
            return fn(*args, **kwargs)

    return run


def resolve_norm_silu(device: torch.device | str, kernels: str = "auto") -> str:
    """The norm + SiLU backend of a decode on `device`: the fused Triton kernel on CUDA ("auto") or when asked
    for ("triton", on a CPU only under TRITON_INTERPRET=1), the PyTorch spec otherwise."""
    device = torch.device(device)
    if kernels not in ("auto", "reference", "triton"):
        raise ValueError(f"kernels must be 'auto', 'reference' or 'triton', got {kernels!r}")
    if kernels == "reference" or (kernels == "auto" and device.type != "cuda"):
        return "reference"
    if device.type not in ("cuda", "meta") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"kernels='triton' needs a CUDA device or TRITON_INTERPRET=1; the VAE is on {device}")
    return "triton"


@dataclass(frozen=True)
class LatentPosterior:
    """The encoder's diagonal Gaussian (diffusers `DiagonalGaussianDistribution`), raw latent space."""

    mean: Tensor
    logvar: Tensor  # clamped to [-30, 20]

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """`mean + std * eps`, eps drawn as the reference does: on the generator's device, then moved."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)


class WanVAE(nn.Module):
    """Wan 2.1 VAE: `encoder`, `quant_conv`, `post_quant_conv`, `decoder` (diffusers key names)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.encoder = Encoder(
            c.in_channels, c.base_dim, c.z_dim * 2, c.dim_mult, c.num_res_blocks, c.temperal_downsample
        )
        self.quant_conv = CausalConv3d(c.z_dim * 2, c.z_dim * 2, 1)
        self.post_quant_conv = CausalConv3d(c.z_dim, c.z_dim, 1)
        self.decoder = Decoder(
            c.decoder_base_dim or c.base_dim,
            c.z_dim,
            c.dim_mult,
            c.num_res_blocks,
            c.temperal_downsample[::-1],
            c.out_channels,
        )
        self._init_latent_stats()
        self.norm_silu = "reference"  # which norm + SiLU the blocks run (`use_norm_silu`)

    def _init_latent_stats(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        # Non-persistent: computed from the config, never read from the weights. As in the pipelines,
        # std is cast to the VAE's dtype before 1 / std is taken.
        shape = (1, self.config.z_dim, 1, 1, 1)
        dtype = dtype or torch.float32
        mean = torch.tensor(self.config.latents_mean, device=device).view(shape).to(dtype)
        inv_std = 1.0 / torch.tensor(self.config.latents_std, device=device).view(shape).to(dtype)
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_inv_std", inv_std, persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        root: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kernels: str = "auto",
    ) -> WanVAE:
        """Build on the meta device, validate the folder's tensors against it, then assign them; then
        `prepare_decode(device, kernels)`."""
        folder = find_component(root, "vae")
        config = VAEConfig.from_dict(read_json(folder / "config.json"))
        with torch.device("meta"):
            module = cls(config)
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        state = load_state_dict(folder, expected, lambda _name: dtype, device)
        module.load_state_dict(state, strict=True, assign=True)
        module._init_latent_stats(device, dtype)
        return module.eval().prepare_decode(device, kernels)

    def prepare_decode(self, device: torch.device | str, kernels: str = "auto") -> WanVAE:
        """Lay the conv weights out channels-last and pick the norm + SiLU backend (`resolve_norm_silu`).

        The activations are channels-last already (`vae_blocks.MEMORY_FORMAT`); with weights in the same
        layout cuDNN runs its NHWC kernels with no per-call weight transpose (and oneDNN on a CPU gives the
        same float32 bits either way). Returns self.
        """
        self.use_norm_silu(resolve_norm_silu(device, kernels))
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
            elif isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
        return self

    def use_norm_silu(self, backend: str) -> WanVAE:
        """Run every norm + SiLU of the encoder and decoder on `backend` ("reference" or "triton")."""
        fn = norm_silu_backend(backend)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.norm_silu = fn
        self.norm_silu = backend
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    # -- latent normalisation (the Helios pipelines' formula, in the VAE's dtype) --------------------
    def normalize_latents(self, z: Tensor) -> Tensor:
        """Raw (encoder) latents -> the transformer's latents: `(z - mean) * (1 / std)`."""
        return (z.to(self.dtype) - self.latents_mean) * self.latents_inv_std

    def denormalize_latents(self, z: Tensor) -> Tensor:
        """The transformer's latents -> raw latents for the decoder: `z / (1 / std) + mean`."""
        return z.to(self.dtype) / self.latents_inv_std + self.latents_mean

    # -- decode ----------------------------------------------------------------------------------
    @torch.no_grad()
    @_autotuned
    def decode(self, latents: Tensor, *, normalized: bool = False, slice_frames: int | None = None) -> Tensor:
        """`[B, z_dim, T, h, w]` latents -> `[B, out_channels, 1 + 4 (T - 1), 8h, 8w]` in [-1, 1].

        `normalized=True` takes the transformer's latents (denormalised here first). The output is in
        the VAE's dtype and clamped to [-1, 1], like the reference's `decode`. `slice_frames`: decode
        that many latent frames at a time (bounded memory, the same result; None: all at once). cuDNN
        autotunes inside the call only (`cudnn_autotuned`).
        """
        self._check_latents(latents)
        slices = [self._decode_slice(z, normalized, carry) for z, carry in self._slices(latents, slice_frames)]
        return slices[0].contiguous() if len(slices) == 1 else torch.cat(slices, dim=2)

    @torch.no_grad()
    @_autotuned
    def decode_frames(
        self,
        latents: Tensor,
        *,
        normalized: bool = False,
        out: Tensor | None = None,
        slice_frames: int | None = None,
    ) -> Tensor:
        """One video's latents `[z_dim, T, h, w]` (or `[1, z_dim, T, h, w]`) -> uint8 `[T', H, W, 3]`.

        With `slice_frames`, each slice's pixels become uint8 before the next slice is decoded, so the
        float pixels of only one slice are ever resident.
        """
        if latents.dim() == 4:
            latents = latents.unsqueeze(0)
        if latents.dim() != 5 or latents.shape[0] != 1:
            raise ValueError(
                f"decode_frames takes one video's latents [z_dim, T, h, w] or [1, z_dim, T, h, w], got "
                f"{list(latents.shape)}; use decode() for a batch"
            )
        self._check_latents(latents)
        pieces = self._slices(latents, slice_frames)
        if len(pieces) == 1:
            return to_uint8_frames(self._decode_slice(latents, normalized, None)[0], out=out)
        c, t = self.config, self.config.num_frames(latents.shape[2])
        h, w = latents.shape[3] * c.spatial_ratio, latents.shape[4] * c.spatial_ratio
        frames = out
        if frames is None:
            frames = torch.empty(t, h, w, c.out_channels, dtype=torch.uint8, device=latents.device)
        elif frames.dtype != torch.uint8 or tuple(frames.shape) != (t, h, w, c.out_channels):
            raise ValueError(f"out must be uint8 {[t, h, w, c.out_channels]}, got {frames.dtype} {list(frames.shape)}")
        start = 0
        for z, carry in pieces:
            pixels = self._decode_slice(z, normalized, carry)[0]
            to_uint8_frames(pixels, out=frames[start : start + pixels.shape[1]])
            start += pixels.shape[1]
        return frames

    def _slices(self, latents: Tensor, slice_frames: int | None) -> list[tuple[Tensor, TimeCarry | None]]:
        """`(latent slice, the carry it continues)` in order; one whole slice without `slice_frames`."""
        t = latents.shape[2]
        if slice_frames is not None and (
            not isinstance(slice_frames, int) or isinstance(slice_frames, bool) or slice_frames <= 0
        ):
            raise ValueError(f"slice_frames must be a positive number of latent frames or None, got {slice_frames!r}")
        if slice_frames is None or slice_frames >= t:
            return [(latents, None)]
        carry = TimeCarry()
        return [(latents[:, :, i : i + slice_frames], carry) for i in range(0, t, slice_frames)]

    def _decode_slice(self, latents: Tensor, normalized: bool, carry: TimeCarry | None) -> Tensor:
        """The decode in the blocks' channels-last layout: memory order `[B, T, H, W, C]`."""
        z = self.denormalize_latents(latents) if normalized else latents.to(self.dtype)
        return self.decoder(self.post_quant_conv(z), carry).clamp_(-1.0, 1.0)

    def _check_latents(self, z: Tensor) -> None:
        c = self.config.z_dim
        if not isinstance(z, Tensor) or z.dim() != 5:
            shape = list(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"latents must be a 5-D tensor [B, {c}, T, h, w], got {shape}")
        if z.shape[1] != c:
            raise ValueError(f"latents must have z_dim={c} channels (dim 1), got {list(z.shape)}")
        if min(z.shape) == 0:
            raise ValueError(f"latents have an empty dimension: {list(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"latents must be floating point, got {z.dtype}")

    # -- encode ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_posterior(self, video: Tensor) -> LatentPosterior:
        """Pixels `[B, in_channels, 1 + 4k, H, W]` in [-1, 1] (H, W multiples of 8) -> the posterior.

        One image is a 1-frame video: `image.unsqueeze(2)`.
        """
        self._check_pixels(video)
        moments = self.quant_conv(self.encoder(video.to(self.dtype)))
        mean, logvar = moments.chunk(2, dim=1)
        return LatentPosterior(mean, logvar.clamp(-30.0, 20.0))

    @torch.no_grad()
    def encode(
        self,
        video: Tensor,
        *,
        sample: bool = True,
        generator: torch.Generator | None = None,
        normalize: bool = False,
    ) -> Tensor:
        """Latents of `video`: a posterior sample (`generator` makes it deterministic) or its mean.

        `normalize=True` returns them in the transformer's normalised space.
        """
        posterior = self.encode_posterior(video)
        z = posterior.sample(generator) if sample else posterior.mean
        return self.normalize_latents(z) if normalize else z

    def _check_pixels(self, x: Tensor) -> None:
        c, s, r = self.config.in_channels, self.config.spatial_ratio, ENCODE_GROUP
        if not isinstance(x, Tensor) or x.dim() != 5:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"video must be a 5-D tensor [B, {c}, T, H, W], got {shape}; pass one image as image.unsqueeze(2)"
            )
        b, ch, t, h, w = x.shape
        if ch != c:
            raise ValueError(f"video must have {c} channels (dim 1), got {list(x.shape)}")
        if b == 0 or t == 0:
            raise ValueError(f"video has an empty dimension: {list(x.shape)}")
        if (t - 1) % r:
            raise ValueError(f"video has {t} frames; the encoder takes 1 + {r}k frames (1, {1 + r}, {1 + 2 * r}, ...)")
        if h == 0 or w == 0 or h % s or w % s:
            raise ValueError(f"pixel resolution {h}x{w} must be positive multiples of {s}")
        if not x.is_floating_point():
            raise ValueError(f"video must be floating point in [-1, 1], got {x.dtype}")


def to_uint8_frames(video: Tensor, out: Tensor | None = None) -> Tensor:
    """`[3, T, H, W]` in [-1, 1] -> uint8 `[T, H, W, 3]`: `round(clamp(x / 2 + 0.5, 0, 1) * 255)`.

    The arithmetic of diffusers' `VideoProcessor.postprocess_video` + `numpy_to_pil`, in float32,
    with round-half-to-even as numpy rounds. `out` (uint8 `[T, H, W, 3]`) receives the frames.
    """
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, T, H, W] to become RGB frames, got {list(video.shape)}")
    x = (video.float() * 0.5 + 0.5).clamp_(0.0, 1.0).mul_(255.0).round_().permute(1, 2, 3, 0)
    if out is None:
        return x.to(torch.uint8)
    if out.dtype != torch.uint8 or out.shape != x.shape:
        raise ValueError(f"out must be uint8 {list(x.shape)}, got {out.dtype} {list(out.shape)}")
    return out.copy_(x)
