"""Where a chunk's random numbers come from: drawn on demand, or staged into static buffers.

A chunk takes standard normals twice over: once for its start noise (`[B, C, T, H, W]`) and once per
pyramid stage transition for the block noise (`[blocks, ph*pw]`, correlated afterwards by the
Cholesky factor). The sampler asks a `NoiseSource` for them in that order.

- `GeneratorNoise` draws them when asked, on the generator's device, then moves them: the eager
  path, and the stream of diffusers' `randn_tensor` for the same generator.
- `StaticNoise` owns one device buffer per draw. `fill(generator)` draws the same numbers in the
  same order before a static program (a captured CUDA graph) runs, and the program only reads the
  buffers. That is what makes the chunk graph's random numbers graph-safe without changing them: a
  replay never bakes in the numbers of its capture, and the results are those of the eager path and
  of the reference on the same CPU generator. On CUDA the draws land in pinned host memory (two
  slots, so that drawing chunk k+1 never overwrites memory chunk k's upload still reads) and go up
  with non-blocking copies on the current stream, ordered before the replay that reads them.

Drawing on the host costs about 1.3M normals per 384x640 chunk (~10 ms of one CPU core), which runs
while the GPU works on the previous chunk; a device-side Philox draw inside the graph would remove it
but change the random stream (and needs generator registration with the graph, which this torch's
`CUDAGraph` does not offer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from .pyramid import normal_noise

Tensor = torch.Tensor


class NoiseSource(Protocol):
    def chunk(self, shape: tuple[int, ...]) -> Tensor:
        """The chunk's start normals `[B, C, T, H, W]` float32 on the sampler's device."""

    def block(self, transition: int, shape: tuple[int, ...]) -> Tensor:
        """The normals `[blocks, ph*pw]` of stage transition `transition` (1 for the first)."""


class GeneratorNoise:
    """Draws on `generator` when asked, in the order asked (the eager sampler's source)."""

    def __init__(self, generator: torch.Generator, device: torch.device | str) -> None:
        self.generator, self.device = generator, torch.device(device)

    def chunk(self, shape: tuple[int, ...]) -> Tensor:
        return normal_noise(shape, self.generator, self.device)

    def block(self, transition: int, shape: tuple[int, ...]) -> Tensor:
        return normal_noise(shape, self.generator, self.device)


class StaticNoise:
    """One float32 buffer per draw of a chunk (start noise first, then one per transition).

    shapes: the draws' shapes in the order the sampler takes them; device: where the program reads them.
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]], device: torch.device | str) -> None:
        if not shapes:
            raise ValueError("StaticNoise needs at least the chunk's start-noise shape")
        self.device = torch.device(device)
        self.shapes = [tuple(s) for s in shapes]
        self.buffers = [torch.zeros(s, dtype=torch.float32, device=self.device) for s in self.shapes]
        self._staging: list[list[Tensor]] = []
        self._uploaded: list[torch.cuda.Event | None] = []
        self._slot = 0
        if self.device.type == "cuda":
            self._staging = [[torch.empty(s, dtype=torch.float32, pin_memory=True) for s in self.shapes]
                             for _ in range(2)]  # fmt: skip
            self._uploaded = [None, None]

    def fill(self, generator: torch.Generator) -> None:
        """Draw every buffer's normals on `generator` (the order `GeneratorNoise` would) into the buffers."""
        if generator.device == self.device:
            for buf in self.buffers:
                torch.randn(buf.shape, generator=generator, out=buf)
        elif self.device.type == "cuda" and generator.device.type == "cpu":
            self._fill_staged(generator)
        else:
            for buf in self.buffers:
                buf.copy_(normal_noise(buf.shape, generator, None))

    def _fill_staged(self, generator: torch.Generator) -> None:
        slot, self._slot = self._slot, 1 - self._slot
        if self._uploaded[slot] is not None:
            self._uploaded[slot].synchronize()  # the upload two chunks ago still read this slot
        for host, buf in zip(self._staging[slot], self.buffers, strict=True):
            torch.randn(host.shape, generator=generator, out=host)
            buf.copy_(host, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._uploaded[slot] = event

    def chunk(self, shape: tuple[int, ...]) -> Tensor:
        return self._take(0, shape)

    def block(self, transition: int, shape: tuple[int, ...]) -> Tensor:
        return self._take(transition, shape)

    def _take(self, i: int, shape: tuple[int, ...]) -> Tensor:
        if i >= len(self.buffers) or self.shapes[i] != tuple(shape):
            raise ValueError(f"StaticNoise: draw {i} of shape {tuple(shape)} was not planned; planned {self.shapes}")
        return self.buffers[i]


__all__ = ["GeneratorNoise", "NoiseSource", "StaticNoise"]
