"""What a first-light run runs on: the GPU profile (14B at 384x640, bf16) and the CPU dry run (untrained model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compile import cost
from ..config import HELIOS_14B, ModelConfig
from ..model.vae import VAEConfig


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
    fp8_chunks: int = 3  # chunks per FP8 stream (the gate's latent drift is defined after 3)
    # the engine's EngineConfig.attention: "auto" on a GPU (what a user gets); the dry run names SDPA, a backend
    # that runs on a CPU as one op per call, so its plan has an attention op to time and price as on a GPU
    # (the CPU's default, the reference table, computes attention as bmm/softmax pieces)
    attention: str = "auto"

    @property
    def dry_run(self) -> bool:
        return self.name == "dry-run"


def gpu_profile() -> Profile:
    return Profile("gpu", "cuda", torch.bfloat16, HELIOS_14B, VAEConfig(), 384, 640, 512, chunks=4,
                   stage_chunks=4, eager_warmup=True, steps=(1, 1, 1), kernel_check=(1, 1031, 4),
                   kernel_dtypes=(torch.bfloat16, torch.float32), kernel_tests=True, skips_fail=True,
                   timing_iters=10)  # fmt: skip


def dry_run_profile() -> Profile:
    from ..demo.untrained import UNTRAINED_TRANSFORMER, UNTRAINED_VAE

    return Profile("dry-run", "cpu", torch.float32, UNTRAINED_TRANSFORMER, UNTRAINED_VAE, 64, 64, 512, chunks=2,
                   stage_chunks=1, eager_warmup=False, steps=(1, 1, 1), kernel_check=(1, 19, 1),
                   kernel_dtypes=(torch.bfloat16,), kernel_tests=False, skips_fail=False,
                   timing_iters=1, fp8_chunks=2, attention="sdpa")  # fmt: skip


def device_spec(device: str) -> tuple[cost.DeviceSpec, str]:
    """The cost model's spec for this machine's GPU from its own attributes (`compile.cost.device_rates`: SM
    count, clocks, bus width), and a note saying where the rates came from (a name-table fallback says so)."""
    from ..compile.cost.device_rates import device_spec_for

    if not device.startswith("cuda"):
        return cost.H100_SXM, "no GPU (dry run): projected for an H100 SXM (datasheet rates)"
    index = torch.device(device).index
    return device_spec_for(torch.cuda.current_device() if index is None else index)


# ---- the GPU run's own time estimate (printed by --dry-run) -------------------------------------------------
GPU_BUDGET_S = 480.0  # the whole script on one H100: 8 minutes of a 15-minute lease (installs excluded)
# Stated assumptions (no GPU has timed them yet; first light's phase times will):
ENGINE_BUILD_S = 10.0  # meta construction, 28 GB of random bf16 weights drawn on the device, the VAE, quantising
COMPILE_S = 60.0  # Triton's JIT of the engine's kernels (~12 kernels x ~3 specialisations x ~1.5 s), bf16
FP8_COMPILE_S = 15.0  # the three quantising kernels and their specialisations
HEAD_DIM_128_S = 10.0  # two kernels compiled and compared, float32 references on the host
KERNEL_FIGURES_S = 5.0  # attention, GEMM and _scaled_mm x2 timed 11 times each, float64 product references
SLACK = 2.0  # a measured chunk may take twice its projection (tails, host gaps, un-modelled ops)
EAGER_FACTOR = 1.5  # the eager engine (no graphs, stage timers synchronising) against replayed chunks


@dataclass(frozen=True)
class PhaseEstimate:
    name: str
    seconds: float
    how: str


def gpu_time_estimate(pytest_timeout_s: float, transformer_s: float, vae_s: float, fp8_transformer_s: float
                      ) -> list[PhaseEstimate]:  # fmt: skip
    """The GPU profile's phases in seconds, from the projected chunk (transformer and VAE seconds on one H100,
    bf16 and FP8) and the stated assumptions above. Chunk work counts each stream's chunks, the amplified
    first chunk at twice the transformer steps, and the warm-up's one run per chunk kind (2 kinds)."""
    t, v, t8, g = transformer_s, vae_s, fp8_transformer_s, gpu_profile()

    def stream(n: int, t: float) -> float:  # n chunks, the first amplified
        return (n + 1) * t + n * v

    def warmup(t: float) -> float:  # both kinds, one amplified
        return 3 * t + 2 * v

    graphed = stream(1, t) + warmup(t) + stream(g.chunks, t)
    eager = EAGER_FACTOR * (stream(1, t) + stream(g.stage_chunks, t))
    fp8 = 2 * (warmup(t8) + stream(g.fp8_chunks, t8))  # with and without use_fast_accum
    return [
        PhaseEstimate("pytest runs (gpu tests, kernel tests)", pytest_timeout_s, "bounded: killed at --pytest-timeout"),
        PhaseEstimate("head dim 128 kernel checks", HEAD_DIM_128_S, "compile + compare"),
        PhaseEstimate("bf16 engine streams", 2 * ENGINE_BUILD_S + COMPILE_S + SLACK * (graphed + eager),
                      f"2 builds, compile {COMPILE_S:.0f} s, {SLACK:g} x projected chunks (cold, warm-up, "
                      f"{g.chunks} warm; eager x{EAGER_FACTOR:g}: 1 + {g.stage_chunks})"),
        PhaseEstimate("kernel figures (attention, GEMM, _scaled_mm)", KERNEL_FIGURES_S, "11 launches each"),
        PhaseEstimate("FP8 engines (fast accumulation off, on)", 2 * ENGINE_BUILD_S + FP8_COMPILE_S + SLACK * fp8,
                      f"2 builds + quantise, {SLACK:g} x projected FP8 chunks (warm-up, {g.fp8_chunks} chunks) x 2"),
    ]  # fmt: skip


def estimate_lines(phases: list[PhaseEstimate]) -> list[str]:
    total = sum(p.seconds for p in phases)
    verdict = "fits" if total <= GPU_BUDGET_S else "DOES NOT FIT"
    lines = ["| GPU phase (estimate, one H100) | seconds | how |", "|---|---|---|"]
    lines += [f"| {p.name} | {p.seconds:.0f} | {p.how} |" for p in phases]
    return [*lines, f"GPU run estimate: {total:.0f} s of {GPU_BUDGET_S:.0f} s (installs excluded): {verdict}"]
