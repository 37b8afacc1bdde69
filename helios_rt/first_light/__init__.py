"""GPU first light: one command that checks and measures the whole GPU path on a bare H100/H200.

    python -m helios_rt.first_light OUT_DIR            # on a CUDA machine, from a checkout
    python -m helios_rt.first_light OUT_DIR --dry-run  # the same script on CPU at the demo model's sizes

Checks (any failure exits 1): the gpu-marked tests and the kernel test files compiled on the GPU
(pytest subprocesses), the GPU behaviours they specify (replay == eager, decode overlap, no device
synchronize, flat memory), the head-dim-128 kernels against their references, and flat memory in the
measured model's stream. Figures (never fail the run): the Helios 14B shape with random bf16 weights at
384x640, Distilled 1+1+1 (TTFF cold and warm, steady and end-to-end FPS, transformer and per-stage ms,
VAE decode ms, peak memory against the plan, attention and largest-GEMM TFLOP/s), each beside the cost
model's projection for the same GPU. Results: OUT_DIR/first_light.json and OUT_DIR/first_light.md.
"""

from .cli import main

__all__ = ["main"]
