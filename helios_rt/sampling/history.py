"""Fixed-size latent memory of the autoregressive chunk loop, and the conditioning-noise augmentations.

The reference grows `history_latents` with `torch.cat` every chunk and slices the last 19 frames.
Here one buffer `[B, C, 20, H, W]` holds exactly what the transformer reads, laid out so every
window is a view:

    keep_first_frame:   [ long (16) | mid (2) | prefix (1) | last (1) ]   short = [prefix | last]
    otherwise:          [ long (16) | mid (2) | short (2) ]

The rolling part (all but the prefix) is the reference's window `history[-19:]` in order; `push`
shifts it in place by a chunk and writes the chunk's newest frames (a few `copy_`s planned at
construction, no allocation). Frame indices (RoPE positions) are the pipeline's constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pyramid import normal_noise

Tensor = torch.Tensor

NOISE_SIGMA_RANGE = (0.111, 0.135)


@dataclass(frozen=True)
class HistoryLayout:
    """Window sizes (long, mid, short) as the pipeline's `history_sizes`, sorted large to small like it.

    With keep_first_frame the short window is `[prefix | last `sizes[2]` frames]`; without, it is the
    last `sizes[2] + 1` frames (the pipeline adds one). chunk_frames: latent frames per chunk.
    """

    sizes: tuple[int, int, int] = (16, 2, 1)
    chunk_frames: int = 9
    keep_first_frame: bool = True

    def __post_init__(self) -> None:
        if len(self.sizes) != 3 or any(int(s) < 1 for s in self.sizes):
            raise ValueError(f"HistoryLayout.sizes={self.sizes!r}: need three positive window sizes (long, mid, short)")
        object.__setattr__(self, "sizes", tuple(sorted((int(s) for s in self.sizes), reverse=True)))
        if self.chunk_frames < 1:
            raise ValueError(f"HistoryLayout.chunk_frames={self.chunk_frames}: must be >= 1")

    @property
    def windows(self) -> tuple[int, int, int]:
        """Frames of the long, mid and short windows as the transformer receives them."""
        long, mid, short = self.sizes
        return long, mid, short + 1

    @property
    def rolling(self) -> int:
        """Frames of generated history kept (the reference's window of the last frames)."""
        return sum(self.sizes) + (0 if self.keep_first_frame else 1)

    @property
    def frames(self) -> int:
        return sum(self.windows)

    def rolling_slots(self) -> tuple[int, ...]:
        """Buffer frame of each rolling (logical) history position, oldest first."""
        long, mid, short = self.sizes
        if not self.keep_first_frame:
            return tuple(range(self.rolling))
        return tuple(range(long + mid)) + tuple(range(long + mid + 1, long + mid + 1 + short))

    def indices(self) -> dict[str, Tensor]:
        """The pipeline's frame-index tensors, int64 `[1, n]`: hidden_states, history short/mid/long."""
        long, mid, short = self.sizes
        n = self.chunk_frames
        if self.keep_first_frame:
            idx = torch.arange(0, 1 + long + mid + short + n)
            prefix, i_long, i_mid, i_1x, i_hidden = idx.split([1, long, mid, short, n])
            i_short = torch.cat([prefix, i_1x])
        else:
            idx = torch.arange(0, long + mid + short + 1 + n)
            i_long, i_mid, i_short, i_hidden = idx.split([long, mid, short + 1, n])
        return {
            "indices_hidden_states": i_hidden.unsqueeze(0),
            "indices_latents_history_short": i_short.unsqueeze(0),
            "indices_latents_history_mid": i_mid.unsqueeze(0),
            "indices_latents_history_long": i_long.unsqueeze(0),
        }


def _plan_copies(src_slots: list[int], dst_slots: list[int], max_len: int) -> list[tuple[int, int, int]]:
    """Group frame moves dst_slots[j] <- src_slots[j] into (dst, src, length) runs of at most max_len."""
    runs: list[tuple[int, int, int]] = []
    for d, s in zip(dst_slots, src_slots, strict=True):
        if runs:
            d0, s0, k = runs[-1]
            if d == d0 + k and s == s0 + k and k < max_len:
                runs[-1] = (d0, s0, k + 1)
                continue
        runs.append((d, s, 1))
    return runs


class HistoryMemory:
    """The preallocated history `[B, C, layout.frames, H, W]`; windows are views, updates are in place."""

    def __init__(
        self,
        layout: HistoryLayout,
        batch: int,
        channels: int,
        height: int,
        width: int,
        dtype=torch.float32,
        device=None,
    ) -> None:
        self.layout = layout
        self.buffer = torch.zeros((batch, channels, layout.frames, height, width), dtype=dtype, device=device)
        self.prefix_set = False  # host flag: the first pushed chunk supplies the prefix unless one was given
        self._slots = layout.rolling_slots()
        r, n = layout.rolling, layout.chunk_frames
        keep = max(r - n, 0)
        # shift: logical j <- j + n, in runs of <= n frames so no copy_ reads what it writes
        self._shift = _plan_copies(list(self._slots[n : n + keep]), list(self._slots[:keep]), n)
        self._write = _plan_copies(list(range(n - (r - keep), n)), list(self._slots[keep:]), r)

    # views ---------------------------------------------------------------
    def _frames(self, start: int, length: int) -> Tensor:
        return self.buffer[:, :, start : start + length]

    @property
    def long(self) -> Tensor:
        return self._frames(0, self.layout.windows[0])

    @property
    def mid(self) -> Tensor:
        return self._frames(self.layout.windows[0], self.layout.windows[1])

    @property
    def short(self) -> Tensor:
        """`[prefix | last]` with keep_first_frame, else the last frames."""
        long, mid, short = self.layout.windows
        return self._frames(long + mid, short)

    @property
    def prefix(self) -> Tensor:
        if not self.layout.keep_first_frame:
            raise ValueError("this history has no prefix frame (keep_first_frame=False)")
        long, mid, _ = self.layout.windows
        return self._frames(long + mid, 1)

    def windows(self) -> tuple[Tensor, Tensor, Tensor]:
        """(short, mid, long) views, the transformer's `latents_history_*` inputs."""
        return self.short, self.mid, self.long

    # updates -------------------------------------------------------------
    def _check(self, name: str, x: Tensor, frames: int | None) -> None:
        b, c, _, h, w = self.buffer.shape
        if x.dim() != 5 or (x.shape[0], x.shape[1], x.shape[3], x.shape[4]) != (b, c, h, w):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected [{b}, {c}, T, {h}, {w}]")
        if frames is not None and x.shape[2] != frames:
            raise ValueError(f"{name} has {x.shape[2]} frames, expected {frames}")

    def set_prefix(self, latent: Tensor) -> None:
        """Put the first-frame latent `[B, C, 1, H, W]` (image, video's first frame, or chunk 0's first)."""
        self._check("prefix latent", latent, 1)
        self.prefix.copy_(latent)
        self.prefix_set = True

    def push(self, chunk: Tensor, set_prefix: bool | None = None) -> None:
        """Append a chunk's clean latents `[B, C, chunk_frames, H, W]` in place.

        set_prefix: take the chunk's first frame as prefix; by default only when none is set yet (the
        reference's first text-to-video chunk). Pass True on the second chunk to mimic
        `is_skip_first_chunk`. Ignored without keep_first_frame.
        """
        self._check("chunk", chunk, self.layout.chunk_frames)
        if self.layout.keep_first_frame and (not self.prefix_set if set_prefix is None else set_prefix):
            self.set_prefix(chunk[:, :, 0:1])
        buf = self.buffer
        for d, s, k in self._shift:
            buf[:, :, d : d + k].copy_(buf[:, :, s : s + k])
        for d, s, k in self._write:
            buf[:, :, d : d + k].copy_(chunk[:, :, s : s + k])

    def copy_from(self, other: HistoryMemory) -> None:
        """Take `other`'s state (buffer contents and prefix flag), e.g. into a chunk program's static buffer."""
        if other.layout != self.layout or other.buffer.shape != self.buffer.shape:
            raise ValueError(
                f"cannot copy a {tuple(other.buffer.shape)} history into a {tuple(self.buffer.shape)} one "
                "(another layout, batch or resolution)"
            )
        self.buffer.copy_(other.buffer)
        self.prefix_set = other.prefix_set

    def _write_rolling_tail(self, latents: Tensor) -> None:
        """Write latents into the newest rolling positions (older ones keep their content)."""
        t = min(latents.shape[2], self.layout.rolling)
        for d, s, k in _plan_copies(list(range(latents.shape[2] - t, latents.shape[2])), list(self._slots[-t:]), t):
            self.buffer[:, :, d : d + k].copy_(latents[:, :, s : s + k])

    def init_image(self, image_latent: Tensor, fake_latent: Tensor) -> None:
        """Image-to-video: the image latent is the prefix, the "fake" last-frame latent the newest history frame."""
        self._check("fake latent", fake_latent, 1)
        if self.layout.keep_first_frame:
            self.set_prefix(image_latent)
        self._write_rolling_tail(fake_latent)

    def init_video(self, first_latent: Tensor, video_latents: Tensor) -> None:
        """Video-to-video: the first-frame latent is the prefix; the video's last frames fill the history."""
        self._check("video latents", video_latents, None)
        if self.layout.keep_first_frame:
            self.set_prefix(first_latent)
        self._write_rolling_tail(video_latents)


# ------------------------------------------------------------------ conditioning noise


def _uniform(n: int, lo_hi: tuple[float, float], generator: torch.Generator, device) -> Tensor:
    lo, hi = lo_hi
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"noise sigma range {lo_hi} must satisfy 0 <= min <= max <= 1")
    return (torch.rand(n, device=generator.device, generator=generator) * (hi - lo) + lo).to(device)


def _blend(latents: Tensor, sigma: Tensor, generator: torch.Generator) -> Tensor:
    return sigma * normal_noise(tuple(latents.shape), generator, latents.device) + (1 - sigma) * latents


def augment_image_latents(
    image_latent: Tensor,
    fake_latent: Tensor,
    generator: torch.Generator,
    image_sigma: tuple[float, float] = NOISE_SIGMA_RANGE,
    video_sigma: tuple[float, float] = NOISE_SIGMA_RANGE,
) -> tuple[Tensor, Tensor]:
    """I2V conditioning noise `s * n + (1 - s) * x`: image with s ~ U(image_sigma), fake frame with
    s ~ U(video_sigma), drawn in the reference's order (rand, randn, rand, randn) from `generator`."""
    s_img = _uniform(1, image_sigma, generator, image_latent.device)
    image_latent = _blend(image_latent, s_img, generator)
    s_fake = _uniform(1, video_sigma, generator, fake_latent.device)
    return image_latent, _blend(fake_latent, s_fake, generator)


def augment_video_latents(
    first_latent: Tensor,
    video_latents: Tensor,
    generator: torch.Generator,
    chunk_frames: int = 9,
    image_sigma: tuple[float, float] = NOISE_SIGMA_RANGE,
    video_sigma: tuple[float, float] = NOISE_SIGMA_RANGE,
    dropped_chunks: int = 0,
) -> tuple[Tensor, Tensor]:
    """V2V conditioning noise: the first frame with one sigma, then each chunk of the video with one
    sigma per frame, in the reference's draw order. video_latents: `[B, C, k * chunk_frames, H, W]`.

    dropped_chunks: chunks older than `video_latents` that the reference noises too but the history
    cannot see; their draws are made first (on the meta device: drawn, never computed) and discarded,
    so the generator continues as the reference's does.
    """
    frames = video_latents.shape[2]
    if frames == 0 or frames % chunk_frames:
        raise ValueError(f"video latents have {frames} frames, expected a positive multiple of {chunk_frames}")
    if dropped_chunks < 0:
        raise ValueError(f"dropped_chunks={dropped_chunks} must be >= 0")
    first_latent = _blend(first_latent, _uniform(1, image_sigma, generator, first_latent.device), generator)
    dropped = torch.empty_like(video_latents[:, :, :chunk_frames], device="meta")
    for _ in range(dropped_chunks):
        _blend(dropped, _uniform(chunk_frames, video_sigma, generator, "meta").view(1, 1, -1, 1, 1), generator)
    out = torch.empty_like(video_latents)
    for start in range(0, frames, chunk_frames):
        chunk = video_latents[:, :, start : start + chunk_frames]
        sig = _uniform(chunk_frames, video_sigma, generator, chunk.device).view(1, 1, chunk_frames, 1, 1)
        out[:, :, start : start + chunk_frames] = _blend(chunk, sig, generator)
    return first_latent, out
