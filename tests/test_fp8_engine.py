"""The engine in FP8 against the bf16 engine: same checkpoint, seed and prompt, within each task's bounds.

The bf16 engine is the reference (the VAE decodes in float32 on both sides: it is not quantised, and
bf16 convolutions on a CPU are slow). The FP8 engine quantises the float checkpoint while loading
(test_fp8_checkpoint.py shows a stored FP8 checkpoint gives the same weights). Text-to-video runs
three chunks, image- and video-to-video two each (from the second chunk on, the history holds FP8
output: errors fed back must not grow past the bounds); the image one runs eager and through the
compiled chunk, which must give the eager FP8 latents bit for bit.

Bounds. `fp8/gate.py` bounds any model from e4m3's roundoff (latent drift <= 2u = 0.125); on this demo
that gate is loose: the integration bug "FP8 history tokens modulated with the noisy segment's table"
(`Block._modulated` passing n_hist=0 to `modulate_layernorm_fp8`) moved T2V's drift to 0.127 and
passed I2V and V2V. So each task has bounds per chunk, set from the measured distribution: the FP8
engine against the bf16 engine over seeds 5-9 (reference op table, this demo, an AMD EPYC CPU, torch 2.13),
the largest latent drift and the lowest frame PSNR per chunk, then a margin of 1.5 (drift x 1.5, PSNR
- 20 log10 1.5 = 3.5 dB) for other CPUs and torch versions:

    task  chunk  drift max (bound)   PSNR min dB (floor)   with the bug: drift min over seeds 5-9
    t2v   0      0.0324 (0.0486)     37.99 (34.47)         0.0942
    t2v   1      0.0638 (0.0958)     31.27 (27.75)         0.1272
    t2v   2      0.0689 (0.1034)     32.36 (28.84)         0.1240
    i2v   0      0.0371 (0.0557)     37.65 (34.13)         0.0927
    i2v   1      0.0565 (0.0848)     35.27 (31.75)         0.1196
    v2v   0      0.0382 (0.0573)     36.55 (33.03)         0.1019
    v2v   1      0.0566 (0.0849)     34.89 (31.37)         0.1247

With the bug every chunk of every task, at every measured seed, is above its drift bound (by 1.2x at
the least: t2v chunk 2, 0.1240 against 0.1034); the tests' seed 5 gives 0.1105 (t2v), 0.1148 (i2v) and
0.1019 (v2v) at chunk 0, twice the bounds.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from support.capabilities import needs_cpu_fp8
from support.pipelines import HEIGHT, WIDTH, build_pipeline, prompt_embeds, sample_image, sample_video, save_pipeline

from helios_rt import Engine, EngineConfig
from helios_rt.fp8 import FP8Linear
from helios_rt.fp8.gate import FRAME_PSNR_MIN, LATENT_DRIFT_BOUND, LAYER_REL_BOUND, layer_errors, psnr, relative_error

BF16 = EngineConfig(device="cpu", dtype="bfloat16", vae_dtype="float32", height=HEIGHT, width=WIDTH, graphs="off")
# the FP8 engine's linears run CPU torch._scaled_mm with per-row scales; streams of several chunks: slow
pytestmark = [needs_cpu_fp8, pytest.mark.slow]
TASKS = {"t2v": {}, "i2v": {"image": sample_image()}, "v2v": {"video": sample_video()}}


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> tuple[Engine, Engine]:
    folder = save_pipeline(build_pipeline("distilled"), tmp_path_factory.mktemp("distilled"))
    return Engine.from_pretrained(folder, BF16), Engine.from_pretrained(folder, BF16.replace(precision="fp8"))


def _run(engine: Engine, task: str, chunks: int) -> list:
    with engine.generate_stream(prompt_embeds=prompt_embeds(1), num_frames=33 * chunks, seed=5, **TASKS[task]) as s:
        return [(c.latents.clone(), c.frames.copy()) for c in s]


def _within_gate(fp8: list, ref: list) -> None:
    for i, ((lat, frames), (lat_ref, frames_ref)) in enumerate(zip(fp8, ref, strict=True)):
        drift, db = relative_error(lat, lat_ref), psnr(frames, frames_ref)
        assert 0 < drift <= LATENT_DRIFT_BOUND, f"chunk {i}: latent drift {drift:.4f} (gate {LATENT_DRIFT_BOUND})"
        assert db >= FRAME_PSNR_MIN, f"chunk {i}: PSNR {db:.2f} dB (gate {FRAME_PSNR_MIN:.1f} dB)"


MARGIN = 1.5
# per task, per chunk: (largest latent drift, lowest frame PSNR in dB) measured over seeds 5-9 (module docstring)
MEASURED = {
    "t2v": ((0.0324, 37.99), (0.0638, 31.27), (0.0689, 32.36)),
    "i2v": ((0.0371, 37.65), (0.0565, 35.27)),
    "v2v": ((0.0382, 36.55), (0.0566, 34.89)),
}


def _within_task_bounds(task: str, fp8: list, ref: list) -> None:
    """Each chunk's drift within its measured maximum x MARGIN, its PSNR above its measured minimum less
    20 log10 MARGIN; the bounds themselves lie inside the model-independent gate of fp8/gate.py."""
    assert len(fp8) == len(MEASURED[task]), (
        f"{task}: {len(fp8)} chunks ran, bounds are measured for {len(MEASURED[task])}"
    )
    for i, ((lat, frames), (lat_ref, frames_ref)) in enumerate(zip(fp8, ref, strict=True)):
        drift_max, psnr_min = MEASURED[task][i]
        bound, floor = drift_max * MARGIN, psnr_min - 20 * math.log10(MARGIN)
        assert bound <= LATENT_DRIFT_BOUND and floor >= FRAME_PSNR_MIN
        drift, db = relative_error(lat, lat_ref), psnr(frames, frames_ref)
        assert 0 < drift <= bound, f"{task} chunk {i}: latent drift {drift:.4f} > {bound:.4f} (measured <= {drift_max})"
        assert db >= floor, f"{task} chunk {i}: PSNR {db:.2f} dB < {floor:.2f} dB (measured >= {psnr_min})"


def test_t2v_over_three_chunks_and_every_layer_within_the_gate(engines) -> None:
    ref_engine, fp8_engine = engines
    linears = [m for m in fp8_engine.transformer.modules() if isinstance(m, FP8Linear)]
    assert len(linears) == 10 * ref_engine.transformer.config.num_layers
    ref: list = []
    run_reference = lambda: ref.extend(_run(ref_engine, "t2v", 3))  # noqa: E731
    errors = layer_errors(ref_engine.transformer, fp8_engine.transformer, run_reference)
    assert len(errors) == len(linears)
    worst = max(errors, key=errors.get)
    assert 0 < errors[worst] <= LAYER_REL_BOUND, f"{worst}: relative error {errors[worst]:.4f}"
    _within_task_bounds("t2v", _run(fp8_engine, "t2v", 3), ref)


def test_i2v_compiled_equals_eager_bit_for_bit_within_the_task_bounds(engines) -> None:
    """The FP8 ops plan on meta and run from the arena (`graphs="chunk"`: `_scaled_mm` has an out= form).
    The compiled chunk runs the eager op sequence on the same op table, only into planned buffers, so
    its latents and frames equal the eager FP8 engine's bit for bit, both chunk kinds (first and later)."""
    ref_engine, fp8_engine = engines
    compiled = Engine(
        fp8_engine.transformer, fp8_engine.vae, None, fp8_engine.spec, fp8_engine.config.replace(graphs="chunk")
    )
    ran, eager = _run(compiled, "i2v", 2), _run(fp8_engine, "i2v", 2)
    for i, ((lat, frames), (lat_eager, frames_eager)) in enumerate(zip(ran, eager, strict=True)):
        differ = lat != lat_eager
        assert torch.equal(lat, lat_eager), (
            f"chunk {i}: compiled FP8 latents differ from eager FP8 in {int(differ.sum())} of {lat.numel()} "
            f"elements (largest {float((lat.float() - lat_eager.float()).abs().max()):.3g})"
        )
        assert np.array_equal(frames, frames_eager), f"chunk {i}: compiled FP8 frames differ from eager FP8"
    _within_task_bounds("i2v", ran, _run(ref_engine, "i2v", 2))


def test_v2v_over_two_chunks_within_the_task_bounds(engines) -> None:
    _within_task_bounds("v2v", _run(engines[1], "v2v", 2), _run(engines[0], "v2v", 2))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton interpreter (set by conftest)")
def test_the_triton_op_table_in_fp8_with_cfg(tmp_path) -> None:
    """The GPU default: FP8 linears fed by the fused quantising Triton kernels (modulate_layernorm_fp8,
    gelu_tanh_fp8, fp8_quantize_rows), Base with CFG, compiled. Against the FP8 reference ops the
    difference is only e4m3 rounding ties that fall the other way, far inside the gate."""
    folder = save_pipeline(build_pipeline("base"), tmp_path / "base")
    config = EngineConfig(device="cpu", dtype="bfloat16", vae_dtype="float32", height=32, width=32, graphs="chunk",
                          precision="fp8", num_inference_steps=1, guidance_scale=5.0)  # fmt: skip
    runs = {}
    for kernels in ("reference", "triton"):
        engine = Engine.from_pretrained(folder, config.replace(kernels=kernels))
        assert engine.sampler.ops.backend_of("modulate_layernorm_fp8") == kernels
        with engine.generate_stream(prompt_embeds=prompt_embeds(1), negative_prompt_embeds=prompt_embeds(2),
                                    num_frames=33, seed=5) as s:  # fmt: skip
            runs[kernels] = [(c.latents.clone(), c.frames.copy()) for c in s]
    _within_gate(runs["triton"], runs["reference"])
