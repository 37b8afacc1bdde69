"""FP8 in first light: the quantising kernels and `torch._scaled_mm` against their references, and the FP8
engine (`EngineConfig(precision="fp8")`, the profile's model with random weights quantised on the device)
beside the bf16 one: steady FPS against the projection and the gate's latent drift, with and without
`use_fast_accum`.

Fast accumulation: the runtime's `FP8Linear` calls `_scaled_mm` with `use_fast_accum=False` by default
(float32 accumulation). The gate decides whether the faster mode (Hopper's reduced-precision
accumulation) may become the default, so first light runs the engine both ways, setting the layers' flag
(`set_fast_accum`) before the engine's graphs are captured.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from .. import benchmarking as hb
from ..compile import cost
from ..fp8 import gate
from ..fp8.format import quantize_rows, quantize_weight
from ..fp8.linear import quantize_blocks_, require_fp8_support, set_fast_accum
from ..fp8.projection import project_fp8
from .measure import Measured, Recorded, engine_config, largest, memory_figure, prompt_embeds, time_ms
from .profile import Profile
from .report import FAIL, PASS, SKIP, Check, Figure

Tensor = torch.Tensor
FLAGS = (False, True)  # use_fast_accum: the runtime's default first


def fp8_unsupported(profile: Profile) -> str | None:
    """Why precision="fp8" cannot run on this machine (the engine's own refusal), or None."""
    try:
        require_fp8_support(profile.device, profile.dtype)
    except ValueError as err:
        return str(err)
    return None


def skipped_rows(why: str) -> tuple[list[Check], list[Figure]]:
    names = ("FP8 quantise kernels vs references", "FP8 _scaled_mm vs float64 product", "FP8 engine stream")
    return [Check(name, SKIP, why) for name in names], []


# ---- the quantising kernels -----------------------------------------------------------------------------
def quantised_error(q: Tensor, s: Tensor, y: Tensor) -> str | None:
    """None when the kernel's e4m3 values and scales quantise `y` (float64) as the spec does: scales to
    2^-20 relative, values within half a spacing at their binade plus 16 float32 ulps of the row's amax
    (the kernel tests' bound, tests/test_fp8_kernels.py); else what differs, how often and where."""
    q, s = q.cpu().double(), s.cpu().double()
    amax = y.abs().amax(-1, keepdim=True)
    if not torch.allclose(s, amax.clamp_min(1e-12) / 448, rtol=2.0**-20, atol=0):
        return "scales differ from amax / 448"
    err = (q * s - y).abs()
    binade = torch.floor(torch.log2((y / s).abs().clamp_min(2.0**-6)))
    bad = err > torch.exp2(binade - 4) * s + 16 * 2.0**-23 * amax
    if bad.any():
        i = int(torch.argmax(bad.flatten().to(torch.uint8)))
        return f"{int(bad.sum())} of {err.numel()} values off the e4m3 grid; first at flat index {i}"
    return None


def quantise_kernel_checks(profile: Profile) -> list[Check]:
    """The three quantising kernels (`kernels/quantize.py`) against their references on the kernel device."""
    from ..kernels.testing import kernel_device, to_device
    from ..ops import OpSet
    from ..ops import reference as R

    device, m = kernel_device(), profile.model
    ops = OpSet(device, "triton")
    _, n, _ = profile.kernel_check
    d, f = m.num_attention_heads * m.attention_head_dim, m.ffn_dim
    g = torch.Generator().manual_seed(8)
    x, up = torch.randn(1, n, d, generator=g).to(profile.dtype) * 3, torch.randn(1, n, f, generator=g).to(profile.dtype)
    table = torch.randn(1, 2, 2, d, generator=g) * 0.5
    cases = {
        "fp8_quantize_rows": (lambda: ops.fp8_quantize_rows(to_device(x, device)), x.double()),
        "gelu_tanh_fp8": (lambda: ops.gelu_tanh_fp8(to_device(up, device)), F.gelu(up.double(), approximate="tanh")),
        "modulate_layernorm_fp8": (
            lambda: ops.modulate_layernorm_fp8(*to_device((x, table[:, 0], table[:, 1]), device), n // 3, 1e-6),
            R.modulate_layernorm(x.double(), table[:, 0].double(), table[:, 1].double(), n // 3, 1e-6)),
    }  # fmt: skip
    checks = []
    for name, (run, y) in cases.items():
        problem = quantised_error(*run(), y)
        shape = list(y.shape)
        checks.append(Check(f"FP8 {name} on {device.type} {shape} vs reference", FAIL if problem else PASS,
                            problem or "scales exact, values within half an e4m3 spacing"))  # fmt: skip
    return checks


# ---- _scaled_mm -------------------------------------------------------------------------------------------
def scaled_mm_rows(profile: Profile, measured: Measured, spec: cost.DeviceSpec) -> tuple[list[Check], list[Figure]]:
    """`_scaled_mm` at the model's largest GEMM, both accumulation modes, against the float64 product of
    the same e4m3 operands. Bound, per element: the output dtype's rounding of the result plus a float32
    dot product's worst case, (K + 2) 2^-24 sum_k |x_k w_k| (K additions, two scale multiplies). The
    default mode must meet it (a check); fast accumulation is a figure: its worst error over that bound."""
    device = torch.device(profile.device)
    gemm = largest(measured.chunk.stage(len(profile.steps) - 1), cost.GEMM)
    n = gemm.outputs[0][0][-1]
    m = torch.Size(gemm.outputs[0][0]).numel() // n
    k = gemm.flops // (2 * m * n)
    g = torch.Generator(device).manual_seed(9)
    xq, xs = quantize_rows(torch.randn(m, k, device=device, generator=g))
    wq, ws = quantize_weight(torch.randn(n, k, device=device, generator=g) * k**-0.5)
    ref = (xq.double() * xs.double()) @ (wq.double() * ws.double()[:, None]).T
    scale_sum = (xq.double() * xs.double()).abs() @ (wq.double() * ws.double()[:, None]).abs().T
    unit = torch.finfo(profile.dtype).eps / 2
    bound = unit * ref.abs() + (k + 2) * 2.0**-24 * scale_sum
    fp8_gemm = replace(gemm, dtype="float8_e4m3fn")  # the same shape as `_scaled_mm` runs it
    projected = gemm.flops / cost.op_seconds(fp8_gemm, spec, measured.inputs.efficiency) / 1e12
    shape, checks, figures = f"[{m}x{k}] @ [{k}x{n}] e4m3 -> {str(profile.dtype).removeprefix('torch.')}", [], []
    for flag in FLAGS:

        def run(flag=flag) -> Tensor:
            return torch._scaled_mm(xq, wq.t(), xs, ws.view(1, -1), out_dtype=profile.dtype, use_fast_accum=flag)

        worst = float(((run().double() - ref).abs() / bound).max())
        ms = time_ms(run, device, profile.timing_iters)
        tag = f"use_fast_accum={flag}"
        figures.append(Figure(f"FP8 _scaled_mm TFLOP/s {shape}, {tag}", gemm.flops / ms / 1e9, "TFLOP/s", projected,
                              f"{ms:.3f} ms; projected at the fp8 GEMM rate (compile.cost.H100_RATES)"))  # fmt: skip
        figures.append(Figure(f"FP8 _scaled_mm worst error / float32-accumulation bound, {tag}", worst, "", None,
                              "<= 1: as exact as float32 accumulation"))  # fmt: skip
        if not flag:
            status = PASS if worst <= 1 else FAIL
            checks.append(Check(f"FP8 _scaled_mm {shape} vs float64 product ({tag})", status,
                                f"worst error {worst:.3g} of the float32-accumulation bound"))  # fmt: skip
    return checks, figures


# ---- the FP8 engine ---------------------------------------------------------------------------------------
def fp8_engine(profile: Profile, fast_accum: bool = False):
    """The profile's engine with precision="fp8": the same random weights as the bf16 engine (same seed),
    its block linears quantised on the device before anything is planned or captured."""
    engine = hb.random_engine(profile.model, engine_config(profile).replace(precision="fp8"), profile.vae)
    quantize_blocks_(engine.transformer)
    set_fast_accum(engine.transformer, fast_accum)
    return engine


def latent_drift(fp8: list[Tensor], bf16: list[Tensor]) -> float:
    """The gate's latent drift: relative L2 of the FP8 stream's latents against the bf16 stream's."""
    chunks = min(len(fp8), len(bf16))
    return gate.relative_error(torch.cat(fp8[:chunks]), torch.cat(bf16[:chunks]))


def engine_rows(profile: Profile, measured: Measured, spec: cost.DeviceSpec) -> list[Figure]:
    """Steady FPS (beside the projection with FP8 GEMMs) and latent drift, for each accumulation mode."""
    proj = project_fp8(measured.chunk, profile.steps, measured.inputs.efficiency, spec)
    embeds, figures = prompt_embeds(profile), []
    for flag in FLAGS:
        tag = f"use_fast_accum={flag}"
        engine = fp8_engine(profile, fast_accum=flag)
        engine.warmup()
        recorded = Recorded(engine)
        warm = hb.measure_stream(recorded, profile.fp8_chunks, prompt_embeds=embeds, stages=False)
        engine.close()
        del engine
        hb.stream._free_cuda()
        drift = latent_drift(recorded.latents, measured.latents)
        verdict = "within" if drift <= gate.LATENT_DRIFT_BOUND else "OUTSIDE"
        figures += [
            Figure(f"FP8 steady FPS, end to end ({tag})", warm.steady_fps, "frames/s", proj.fps_fp8_end_to_end,
                   f"bf16 projected {proj.fps_bf16_end_to_end:.3g}; both lanes on one GPU"),
            Figure(f"FP8 gate: latent drift vs bf16 after {profile.fp8_chunks} chunks ({tag})", drift, "", None,
                   f"{verdict} the gate's {gate.LATENT_DRIFT_BOUND} (random weights)"),
        ]  # fmt: skip
        if not flag:
            figures.append(memory_figure(profile, measured.inputs, warm.peak_memory_gb, precision="fp8"))
    return figures


def fp8_rows(profile: Profile, measured: Measured | None, spec: cost.DeviceSpec) -> tuple[list[Check], list[Figure]]:
    """Every FP8 row of the run; SKIP rows saying why where this machine's torch cannot run FP8."""
    why = fp8_unsupported(profile)
    if why is not None:
        return skipped_rows(why)
    if measured is None:
        return skipped_rows("the bf16 engine phase failed: no reference stream to compare with")
    checks = quantise_kernel_checks(profile)
    mm_checks, figures = scaled_mm_rows(profile, measured, spec)
    return checks + mm_checks, figures + engine_rows(profile, measured, spec)
