"""What a first-light run runs on: the GPU profile (14B at 384x640, bf16) and the CPU dry run (demo sizes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compile import cost
from ..config import HELIOS_14B, ModelConfig
from ..model.vae import VAEConfig

# The cost model's device table holds the H100; an H200 has the same tensor cores and faster HBM.
H200 = cost.DeviceSpec("H200", bf16_tflops=989.0, fp8_tflops=1979.0, fp32_tflops=67.0, hbm_tbps=4.8)
_SPECS = {"H200": H200, "H100": cost.H100_SXM}


@dataclass(frozen=True)
class Profile:
    """The shapes and selections of one run.

    steps: transformer steps per pyramid stage (Distilled real time: 1+1+1); chunks: chunks per
    measured stream (steady state is chunks 1..); kernel_check: (batch, tokens, heads) of the head-dim-128
    kernel comparisons; kernel_tests: whether the pytest phase also runs the kernel test files (on a GPU
    they compile the kernels for it; on the interpreter they are the suite's, and slow);
    skips_fail: whether a skipped gpu test is a failed check (on a GPU every one must run).
    """

    name: str
    device: str
    dtype: torch.dtype
    model: ModelConfig
    vae: VAEConfig
    height: int
    width: int
    text_len: int
    chunks: int
    stage_chunks: int
    eager_warmup: bool
    steps: tuple[int, ...]
    kernel_check: tuple[int, int, int]
    kernel_dtypes: tuple[torch.dtype, ...]
    kernel_tests: bool
    skips_fail: bool
    timing_iters: int

    @property
    def dry_run(self) -> bool:
        return self.name == "dry-run"


def gpu_profile() -> Profile:
    return Profile("gpu", "cuda", torch.bfloat16, HELIOS_14B, VAEConfig(), 384, 640, 512, chunks=4,
                   stage_chunks=4, eager_warmup=True, steps=(1, 1, 1), kernel_check=(1, 1031, 4),
                   kernel_dtypes=(torch.bfloat16, torch.float32), kernel_tests=True, skips_fail=True,
                   timing_iters=10)  # fmt: skip


def dry_run_profile() -> Profile:
    from ..demo import DEMO_TRANSFORMER, DEMO_VAE

    return Profile("dry-run", "cpu", torch.float32, DEMO_TRANSFORMER, DEMO_VAE, 64, 64, 512, chunks=2,
                   stage_chunks=1, eager_warmup=False, steps=(1, 1, 1), kernel_check=(1, 19, 1),
                   kernel_dtypes=(torch.bfloat16,), kernel_tests=False, skips_fail=False,
                   timing_iters=1)  # fmt: skip


def device_spec(device: str) -> tuple[cost.DeviceSpec, str]:
    """The cost model's spec for this machine's GPU, and a note when it is only a stand-in."""
    if not device.startswith("cuda"):
        return cost.H100_SXM, "no GPU (dry run): projected for an H100 SXM"
    name = torch.cuda.get_device_name(torch.device(device))
    for key, spec in _SPECS.items():
        if key in name:
            return spec, f"{name}: projected for {spec.name}"
    return cost.H100_SXM, f"{name} is not in the cost model's table: projected for an H100 SXM"
