"""The VAE decode of one chunk captured as a CUDA graph, replayed on the decode lane.

An engine decodes one latent shape for its whole life (`[1, z, T, h, w]` of its resolution), so the decode
is captured once, like a chunk kind: the first call warms it up (cuDNN's autotuning, Triton's compile) on a
side stream, then captures `decode_frames` from a static input buffer into a static uint8 output; every
later call is `copy_` into the input, `replay()`, and the output buffer is the result. The decode's ~300
launches (convs, norms, copies of the causal-conv staging) become one graph launch, and its allocations
live in the graph's private pool, not the caching allocator the compute lane uses.

Where the graph comes from is a `GraphBackend` (`CudaGraphs` on a GPU), so when to capture, the shape
checks and the refusal inside another capture run on a CPU with a fake backend (tests/test_vae_graph.py).

The output buffer is overwritten by the next call: the caller reads (or copies) the frames before it
decodes the next chunk. The engine's stream does: chunk k is handed over (copied to the host, on the
decode lane) before chunk k+1's decode is issued.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .vae import WanVAE

Tensor = torch.Tensor


class Graph(Protocol):
    def replay(self) -> None: ...


class GraphBackend(Protocol):
    """What `GraphedDecode` needs from a graph library: a capture test, a warm-up, a capture."""

    def capturing(self) -> bool:
        """True while the current stream is capturing a graph (nothing may be captured inside it)."""

    def warm_up(self, fn, runs: int) -> None:
        """Run `fn` `runs` times, ordered after the work already queued and before the work queued next."""

    def capture(self, fn) -> Graph:
        """Record `fn` as a graph (nothing runs) and return it."""


class CudaGraphs:
    """`GraphBackend` on a CUDA device: warm-up on a side stream, capture into the graph's own pool."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def warm_up(self, fn, runs: int) -> None:
        # a side stream, as torch.cuda.graph requires of anything captured later (lazy inits, autotuning)
        here = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(here)
        with torch.cuda.stream(side):
            for _ in range(runs):
                fn()
        here.wait_stream(side)

    def capture(self, fn) -> Graph:
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (NCCL's watchdog with several ranks) cannot break it; a
        # capture stream made on this device (torch's default one lives on whichever device first captured)
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.device(self.device), torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            fn()
        return graph


class GraphedDecode:
    """`vae.decode_frames(latents, normalized=..., slice_frames=...)` of one latent shape as a replayed graph.

    `shape`, `dtype`: the latents every call passes (`[1, z, T, h, w]`, or `[z, T, h, w]`). The first call
    (or `capture()`) warms up and captures, outside any other capture; later calls replay. A call with
    another shape is refused: a new chunk shape needs a new `GraphedDecode`.
    """

    def __init__(
        self,
        vae: WanVAE,
        shape: tuple[int, ...],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        normalized: bool = True,
        slice_frames: int | None = None,
        graphs: GraphBackend | None = None,
        warmup_runs: int = 1,
    ) -> None:
        device = torch.device(device) if device is not None else vae.post_quant_conv.weight.device
        self.vae, self.normalized, self.slice_frames = vae, normalized, slice_frames
        self.graphs = graphs if graphs is not None else CudaGraphs(device)
        self.warmup_runs = warmup_runs
        self.static_in = torch.zeros(shape, dtype=dtype, device=device)
        t, h, w = shape[-3:]
        c = vae.config
        frames = (c.num_frames(t), h * c.spatial_ratio, w * c.spatial_ratio, c.out_channels)
        self.static_out = torch.empty(frames, dtype=torch.uint8, device=device)
        self.graph: Graph | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, latents: Tensor) -> Tensor:
        """The uint8 frames `[T', H, W, 3]` of `latents`, in `static_out` (valid until the next call)."""
        self._check(latents)
        self.static_in.copy_(latents)
        if self.graph is None:
            self.capture()  # the last warm-up run decoded these latents into static_out: nothing thrown away
        else:
            self.graph.replay()
        return self.static_out

    def capture(self) -> None:
        """Warm up and capture on whatever `static_in` holds (zeros before the first call). Once."""
        if self.graph is not None:
            return
        if self.graphs.capturing():
            raise RuntimeError(
                "the VAE decode cannot be captured inside another CUDA graph capture: call "
                "GraphedDecode.capture() (or decode once) before capturing, or decode outside the capture"
            )
        self.graphs.warm_up(self._decode, self.warmup_runs)
        self.graph = self.graphs.capture(self._decode)

    def _decode(self) -> None:
        self.vae.decode_frames(
            self.static_in, normalized=self.normalized, slice_frames=self.slice_frames, out=self.static_out
        )

    def _check(self, latents: Tensor) -> None:
        want = self.static_in
        if not isinstance(latents, Tensor) or tuple(latents.shape) != tuple(want.shape):
            got = list(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(
                f"this GraphedDecode decodes latents of shape {list(want.shape)}, got {got}: a chunk of "
                "another shape needs its own GraphedDecode (or the eager vae.decode_frames)"
            )
        if not latents.is_floating_point() or latents.device != want.device:
            raise ValueError(
                f"latents must be floating point on {want.device} (copied into the {want.dtype} input buffer), "
                f"got {latents.dtype} on {latents.device}"
            )
