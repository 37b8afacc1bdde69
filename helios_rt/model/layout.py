"""The token layout of one Helios forward: `[long history | mid history | short history | noisy]`.

A layout is fixed by the latent shapes alone, so it is computed once per (stage, resolution) and
everything derived from it (token counts, RoPE tables, buffer sizes) is a constant of a program.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from .rope import segment_tables

Tensor = torch.Tensor

# History terms, in token order, with the patch multiplier of each relative to `patch_size`.
HISTORY_TERMS: tuple[tuple[str, int], ...] = (("long", 4), ("mid", 2), ("short", 1))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class HistorySegment:
    """One history term: its latent frames' absolute indices and its token grid."""

    name: str
    pool: int  # patch multiplier: 1 (short), 2 (mid), 4 (long)
    frame_indices: tuple[int, ...]
    grid: tuple[int, int, int]  # tokens along (t, h, w) after (padded) patching

    @property
    def tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w


@dataclass(frozen=True)
class TokenLayout:
    """Token counts and positions of one forward, for a given noisy latent shape and history."""

    noisy_frame_indices: tuple[int, ...]
    noisy_grid: tuple[int, int, int]
    history_latent_hw: tuple[int, int] | None
    history: tuple[HistorySegment, ...]  # in token order: long, mid, short (absent terms omitted)

    @property
    def n_noisy(self) -> int:
        t, h, w = self.noisy_grid
        return t * h * w

    @property
    def n_hist(self) -> int:
        return sum(s.tokens for s in self.history)

    @property
    def n_tokens(self) -> int:
        return self.n_hist + self.n_noisy

    def segment(self, name: str) -> HistorySegment | None:
        return next((s for s in self.history if s.name == name), None)


def build_layout(
    config: ModelConfig,
    noisy_latent_shape: tuple[int, int, int],
    noisy_frame_indices: tuple[int, ...] | None = None,
    history_latent_hw: tuple[int, int] | None = None,
    history_frame_indices: dict[str, tuple[int, ...]] | None = None,
) -> TokenLayout:
    """Layout for noisy latents `(T, H, W)` and history terms given by their frame indices.

    `history_frame_indices` maps "short" / "mid" / "long" to the absolute frame index of each latent
    frame of that term; a term that is absent has no tokens. All history latents share the spatial
    size `history_latent_hw` (full resolution, also in the low-resolution pyramid stages).
    """
    pt, ph, pw = config.patch_size
    t, h, w = noisy_latent_shape
    if t % pt or h % ph or w % pw:
        raise ValueError(
            f"noisy latents of shape (T, H, W)={noisy_latent_shape} are not divisible by the "
            f"patch size {config.patch_size}"
        )
    if noisy_frame_indices is None:
        noisy_frame_indices = tuple(range(t // pt))
    if len(noisy_frame_indices) != t // pt:
        raise ValueError(f"noisy_frame_indices has {len(noisy_frame_indices)} entries for {t // pt} patched frames")
    history_frame_indices = history_frame_indices or {}
    unknown = set(history_frame_indices) - {name for name, _ in HISTORY_TERMS}
    if unknown:
        raise ValueError(f"unknown history terms {sorted(unknown)}; expected short, mid, long")
    segments = []
    if history_frame_indices:
        if history_latent_hw is None:
            raise ValueError("history_latent_hw is required when history terms are given")
        hh, hw = history_latent_hw
        for name, mult in HISTORY_TERMS:
            frames = history_frame_indices.get(name)
            if not frames:
                continue
            k = (pt * mult, ph * mult, pw * mult)
            grid = (_ceil_div(len(frames), k[0]), _ceil_div(hh, k[1]), _ceil_div(hw, k[2]))
            short_grid = (hh // ph, hw // pw)
            pooled = (_ceil_div(len(frames), mult), _ceil_div(short_grid[0], mult), _ceil_div(short_grid[1], mult))
            if grid != pooled:
                raise ValueError(
                    f"history term {name!r}: patched grid {grid} and RoPE grid {pooled} differ; history latents "
                    f"of size {history_latent_hw} must be divisible by the patch size {config.patch_size}"
                )
            segments.append(HistorySegment(name, mult, tuple(frames), grid))
    return TokenLayout(tuple(noisy_frame_indices), (t // pt, h // ph, w // pw), history_latent_hw, tuple(segments))


def rope_tables(config: ModelConfig, layout: TokenLayout, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """cos, sin `[n_tokens, Dh/2]` float32 for the whole layout, in token order."""
    cos_parts, sin_parts = [], []
    if layout.history:
        hh, hw = layout.history_latent_hw
        short_h, short_w = hh // config.patch_size[1], hw // config.patch_size[2]
        for seg in layout.history:
            c, s = segment_tables(
                torch.tensor(seg.frame_indices), short_h, short_w, seg.pool, config.rope_dim, config.rope_theta
            )
            cos_parts.append(c)
            sin_parts.append(s)
    _, nh, nw = layout.noisy_grid
    c, s = segment_tables(torch.tensor(layout.noisy_frame_indices), nh, nw, 1, config.rope_dim, config.rope_theta)
    cos_parts.append(c)
    sin_parts.append(s)
    return torch.cat(cos_parts).to(device), torch.cat(sin_parts).to(device)
