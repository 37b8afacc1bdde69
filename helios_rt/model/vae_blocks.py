"""Wan 2.1 VAE building blocks, written for whole-sequence (whole-chunk) causal execution.

The reference (diffusers `AutoencoderKLWan`) runs its encoder and decoder one slice of frames at a
time and carries the last two input frames of every causal conv in a feature cache (zeros before
the first slice). A causal conv over the whole sequence, zero-padded by two frames in front, sees
exactly the same windows, so every block here takes the full `[B, C, T, H, W]` tensor at once.

Two places are not plain causal convs and reproduce the reference's first-slice rules:
- the temporal upsampler passes the first frame through untouched (its cache starts as "Rep") and
  runs its time conv, zero-padded, over the remaining frames only; each of those yields 2 frames.
- the temporal downsampler passes the first frame through and runs its stride-2 time conv over the
  whole sequence with no padding (its cache holds the previous slice's last frame).

Module and parameter names equal diffusers' state-dict keys, so a checkpoint loads unchanged.
Shapes depend only on the input's shape: no value-dependent control flow, no growing lists.

A decode can also run in *time slices* (`TimeCarry`): each causal conv keeps the last `time_pad`
frames of its padded input between slices, exactly the reference's feature cache, so slicing a chunk
changes which frames are resident at once, not the math. A slice of one latent frame holds ~1/8 of
a whole chunk's activations; the plan picks the slice size when a memory budget asks for it.

Memory traffic, not FLOPs, separates a whole-chunk pass from the frame loop: activations are kept in
`channels_last_3d` (the channel norm reduces over contiguous memory), norm + SiLU write straight into
the time-padded input buffer of the next causal conv (`Staging`, one buffer per shape, reused within
a call), and residual adds run in place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


MEMORY_FORMAT = torch.channels_last_3d


class TimeCarry:
    """What a time-sliced decode carries from one slice to the next (the reference's feature cache).

    Per causal conv: the last `time_pad` frames of its padded input (zeros before the first slice).
    `first` is true while the slice holding the sequence's first frame runs: the temporal upsampler
    passes that frame through instead of doubling it. One carry per decode call; modules stay
    stateless and reentrant.
    """

    def __init__(self) -> None:
        self.first = True
        self._frames: dict[int, Tensor] = {}

    def lead(self, conv: nn.Module) -> Tensor | None:
        """The frames that precede this slice's input of `conv` (None: zeros, the sequence start)."""
        return self._frames.get(id(conv))

    def keep(self, conv: nn.Module, padded: Tensor, pad: int) -> None:
        """Remember the last `pad` frames of `conv`'s padded input for the next slice."""
        self._frames[id(conv)] = padded[:, :, -pad:].clone(memory_format=MEMORY_FORMAT)


class Staging:
    """Time-padded input buffers for causal convs: one per shape, its leading pad frames zeroed once.

    Owned by one decode/encode call (modules stay stateless and reentrant). A buffer is written just
    before its conv runs and is dead once the conv returns, so convs of one level share it; a memory
    planner can hand these out as arena views instead. With a `TimeCarry` the leading frames are the
    carried ones of the conv that reads the buffer, written before each use.
    """

    def __init__(self, carry: TimeCarry | None = None) -> None:
        self._buffers: dict[tuple, Tensor] = {}
        self.carry = carry

    def padded(self, like: Tensor, channels: int, pad: int, conv: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """`(buffer [B, channels, pad + T, H, W], view of its last T frames)` for `like` `[B, *, T, H, W]`."""
        b, _, t, h, w = like.shape
        key = (b, channels, pad + t, h, w, like.dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(key[:5], dtype=like.dtype, device=like.device, memory_format=MEMORY_FORMAT)
            buf[:, :, :pad].zero_()
            self._buffers[key] = buf
        if self.carry is not None and pad:
            lead = self.carry.lead(conv)
            if lead is None:
                buf[:, :, :pad].zero_()
            else:
                buf[:, :, :pad].copy_(lead)
        return buf, buf[:, :, pad:]


class CausalConv3d(nn.Conv3d):
    """Conv3d that is causal in time: `2 * padding_t` zero frames in front, none behind.

    Spatial zero padding is left to the conv itself (no padded copy of the input in H and W).
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=padding)
        pt, ph, pw = self.padding
        self.time_pad = 2 * pt
        self.padding = (0, ph, pw)

    def forward(self, x: Tensor, staging: Staging | None = None) -> Tensor:
        if self.time_pad:
            if staging is None:
                x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))
            else:
                buf, body = staging.padded(x, x.shape[1], self.time_pad, self)
                body.copy_(x)
                return self.forward_padded(buf, staging)
        return super().forward(x)

    def forward_padded(self, x: Tensor, staging: Staging | None = None) -> Tensor:
        """`x` already carries the `time_pad` leading frames (written through `Staging.padded`)."""
        if staging is not None and staging.carry is not None and self.time_pad:
            staging.carry.keep(self, x, self.time_pad)
        return super().forward(x)


NormSilu = Callable[..., Tensor]  # (x, gamma, scale, out=None) -> out


def rms_norm_silu(x: Tensor, gamma: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
    """`out = silu(x / max(|x|_C, eps) * scale * gamma)`: the residual blocks' norm + SiLU, and the spec of
    the fused kernel (`helios_rt.kernels.vae_norm`).

    Three passes and no full-size temporary: `x * (scale / max(|x|, eps)) * gamma` is the reference's
    `x / max(|x|, eps) * scale * gamma` reassociated (last-bit differences). The norm is taken in float32
    for low-precision inputs; the scaled value is rounded to x.dtype before the gain and the SiLU.
    """
    if out is None:
        out = torch.empty_like(x)
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
    factor = norm.clamp_min_(1e-12).reciprocal_().mul_(scale)
    torch.mul(x, factor, out=out)
    out.mul_(gamma)
    return F.silu(out, inplace=True)


NORM_SILU_BACKENDS = ("reference", "triton")


def norm_silu_backend(name: str) -> NormSilu:
    """The norm + SiLU a decoder runs: "reference" (the PyTorch spec above) or "triton" (one fused pass;
    on a CPU only under TRITON_INTERPRET=1, for tests)."""
    if name == "reference":
        return rms_norm_silu
    if name == "triton":
        from ..kernels.vae_norm import rms_norm_silu as fused

        return fused
    raise ValueError(f"norm_silu={name!r}: use one of {NORM_SILU_BACKENDS}")


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a per-channel gain (diffusers `WanRMS_norm`).

    Low-precision inputs are normalised in float32, as the reference does. `norm_silu` is the function
    `silu_into` runs (resolved once, by `WanVAE.use_norm_silu`, not per call).
    """

    def __init__(self, dim: int, images: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))
        self.norm_silu: NormSilu = rms_norm_silu

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma
        return F.normalize(x, dim=1) * self.scale * self.gamma

    def silu_into(self, x: Tensor, out: Tensor) -> Tensor:
        """`out = silu(self(x))`, written straight into `out` (a causal conv's time-padded input)."""
        return self.norm_silu(x, self.gamma, self.scale, out=out)


def _spatial_conv(conv: nn.Conv2d, x: Tensor, stride: int = 1) -> Tensor:
    """A Conv2d applied to every frame of `[B, C, T, H, W]`, as a (1, k, k) Conv3d (no transposes)."""
    return F.conv3d(x, conv.weight.unsqueeze(2), conv.bias, stride=(1, stride, stride), padding=(0, *conv.padding))


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim, images=False)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim, images=False)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, staging: Staging) -> Tensor:
        h = self.conv_shortcut(x)
        buf, body = staging.padded(x, x.shape[1], self.conv1.time_pad, self.conv1)
        self.norm1.silu_into(x, body)
        x = self.conv1.forward_padded(buf, staging)
        buf, body = staging.padded(x, x.shape[1], self.conv2.time_pad, self.conv2)
        self.norm2.silu_into(x, body)  # the reference's dropout sits here: identity at inference
        return self.conv2.forward_padded(buf, staging).add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(y)).reshape(b * t, 1, c * 3, h * w).transpose(2, 3)
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # [bt, 1, hw, c]
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class MidBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])

    def forward(self, x: Tensor, staging: Staging) -> Tensor:
        x = self.resnets[0](x, staging)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(attn(x), staging)
        return x


class _Nearest2x(nn.Module):
    """Nearest-exact 2x spatial upsampling of every frame (diffusers `WanUpsample`, parameter-free).

    The reference upsamples in float32 and casts back; nearest copies values, so the native dtype
    gives the same bits without the round trip.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact")


class Upsample(nn.Module):
    """2x spatial upsample + conv; with `temporal`, first a causal time conv that doubles frames 1..T-1.

    `[B, C, T, H, W] -> [B, out_dim, 1 + 2 (T - 1), 2H, 2W]` (temporal) or `[B, out_dim, T, 2H, 2W]`.
    """

    def __init__(self, dim: int, out_dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(_Nearest2x(), nn.Conv2d(dim, out_dim, 3, padding=1))
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def forward(self, x: Tensor, staging: Staging) -> Tensor:
        if self.time_conv is not None:
            x = self._time_upsample(x, staging)
        return _spatial_conv(self.resample[1], self.resample[0](x))

    def _time_upsample(self, x: Tensor, staging: Staging) -> Tensor:
        """Each frame becomes two, except the sequence's first, which passes through (the reference's
        "Rep" cache); in a later time slice every frame doubles."""
        keep = 1 if staging.carry is None or staging.carry.first else 0
        b, c, t, h, w = x.shape
        if t == keep:
            return x
        out = torch.empty(
            b, c, keep + 2 * (t - keep), h, w, dtype=x.dtype, device=x.device, memory_format=MEMORY_FORMAT
        )
        out[:, :, :keep] = x[:, :, :keep]
        # channels [0, c) give the first of each new pair of frames, [c, 2c) the second
        n = t - keep
        pairs = self.time_conv(x[:, :, keep:], staging).view(b, 2, c, n, h, w).permute(0, 2, 3, 1, 4, 5)
        out[:, :, keep:].view(b, c, n, 2, h, w).copy_(pairs)
        return out


class Downsample(nn.Module):
    """Stride-2 spatial conv (zero pad right/bottom); with `temporal`, a stride-2 time conv after it.

    `[B, C, T, H, W] -> [B, C, T, H/2, W/2]` or, temporal, `[B, C, 1 + (T - 1) / 2, H/2, W/2]`.
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, staging: Staging) -> Tensor:
        x = _spatial_conv(self.resample[1], F.pad(x, (0, 1, 0, 1)), stride=2)
        if self.time_conv is not None and x.shape[2] > 1:
            # windows [x0, x1, x2], [x2, x3, x4], ...: the reference's cache holds the last frame
            x = torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample: str | None) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList([ResidualBlock(i, o) for i, o in zip(dims[:-1], dims[1:], strict=True)])
        self.upsamplers = None
        if upsample is not None:
            self.upsamplers = nn.ModuleList([Upsample(out_dim, out_dim // 2, temporal=upsample == "upsample3d")])

    def forward(self, x: Tensor, staging: Staging) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, staging)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, staging)
        return x


class Encoder(nn.Module):
    """Pixels `[B, in, 1 + 4k, H, W]` -> moments `[B, 2 z, 1 + k', H / 2^s, W / 2^s]` in one pass."""

    def __init__(self, in_channels, dim, z_dim, dim_mult, num_res_blocks, temperal_downsample) -> None:
        super().__init__()
        dims = [dim * u for u in [1, *dim_mult]]
        self.conv_in = CausalConv3d(in_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []  # a flat list, as in diffusers: down_blocks.{k}
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Downsample(out_dim, temporal=bool(temperal_downsample[i])))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1], images=False)
        self.conv_out = CausalConv3d(dims[-1], z_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        staging = Staging()
        x = self.conv_in(x.contiguous(memory_format=MEMORY_FORMAT), staging)
        for block in self.down_blocks:
            if isinstance(block, Downsample):
                x, staging = block(x, staging), Staging()  # the level's buffers are dead after it
            else:
                x = block(x, staging)
        x = self.mid_block(x, staging)
        return _head(self.norm_out, self.conv_out, x, staging)


class Decoder(nn.Module):
    """Latents `[B, z, T, h, w]` -> pixels `[B, out, 1 + 2^u (T - 1), h 2^s, w 2^s]` in one pass."""

    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temperal_upsample, out_channels) -> None:
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
        self.conv_in = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                in_dim = in_dim // 2  # the previous block's upsampler halved the channels
            upsample = None
            if i != len(dim_mult) - 1:
                upsample = "upsample3d" if temperal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, num_res_blocks, upsample))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1], images=False)
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1)

    def forward(self, x: Tensor, carry: TimeCarry | None = None) -> Tensor:
        """The whole sequence, or with `carry` the next time slice of it (frames follow the carried ones)."""
        staging = Staging(carry)
        x = self.mid_block(self.conv_in(x.contiguous(memory_format=MEMORY_FORMAT), staging), staging)
        for block in self.up_blocks:
            # each up block ends a level: its staging buffers die with it, bounding the peak
            x, staging = block(x, staging), Staging(carry)
        x = _head(self.norm_out, self.conv_out, x, staging)
        if carry is not None:
            carry.first = False
        return x


def _head(norm: RMSNorm, conv: CausalConv3d, x: Tensor, staging: Staging) -> Tensor:
    buf, body = staging.padded(x, x.shape[1], conv.time_pad, conv)
    norm.silu_into(x, body)
    return conv.forward_padded(buf, staging)
