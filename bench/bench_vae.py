"""Whole-chunk VAE decode (ours) against diffusers' frame-by-frame decode, same weights, on CPU.

One chunk: 9 latent frames -> 33 frames. The config is the Wan 2.1 VAE's layout (dim_mult 1,2,4,4,
2 res blocks, z 16, temporal x4, spatial x8) with its widths scaled down. Both decoders run the same
convolutions; the reference runs them one latent frame at a time through a feature cache. The
speedup comes from memory traffic and kernel choice, not FLOPs: no cache cat/clone, norm + SiLU
written straight into the next conv's time-padded input, channels-last activations, and convs big
enough that PyTorch always takes its mkldnn path (the reference's per-frame convs at 128 channels
fall below PyTorch's mkldnn size heuristic onto `slow_conv3d`).

    python -m pytest bench/bench_vae.py --benchmark-only -s

Timings of the two are interleaved (best of ROUNDS each) so that load on the machine hits both;
the ratio is printed and kept in `benchmark.extra_info["speedup_vs_diffusers"]`. The issue's target
is >= 1.5x. Measured (2-core AMD EPYC, torch 2.13): width 32 1.48-1.57x at 2 threads, 1.56x at 1
thread; width 16 4.1x (1 thread) to 7x (2 threads). At width 32 both run the same mkldnn convs at the
same per-frame speed and those are ~90% of our time, so ~1.7x is the ceiling there. On a loaded
machine the reference slows far more (its ~10^4 small parallel regions each wait for a descheduled
thread), which inflates the ratio: compare runs on an idle machine, or with one thread.

On a GPU (`test_decode_chunk_cuda`, skipped without one): the Wan 2.1 VAE (base_dim 96, random weights) at
one 384x640 chunk in bf16, timed with CUDA events: the eager decode with the PyTorch norm + SiLU, the eager
decode with the fused kernel, and the captured graph (`GraphedDecode`), each with cuDNN autotuning in the call.
"""

from __future__ import annotations

import time

import pytest
import torch

from helios_rt.model.vae import VAEConfig, WanVAE
from helios_rt.model.vae_graph import GraphedDecode

ROUNDS = 3
TARGET_SPEEDUP = 1.5
# name -> (base_dim, latent h, latent w); Wan 2.1 is base_dim 96
CASES = {"wan21_width32_16x16": (32, 16, 16), "wan21_width16_16x16": (16, 16, 16)}


def _pair(base_dim: int):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=base_dim, z_dim=16, num_res_blocks=2).eval()
    ours = WanVAE(VAEConfig(base_dim=base_dim, z_dim=16, num_res_blocks=2)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_chunk(benchmark, case):
    base_dim, h, w = CASES[case]
    ref, ours = _pair(base_dim)
    z = torch.randn(1, 16, 9, h, w, generator=torch.Generator().manual_seed(1))

    def reference():
        with torch.no_grad():
            return ref.decode(z).sample

    def whole_chunk():
        return ours.decode(z)

    err = (reference() - whole_chunk()).abs().max().item()  # also the warm-up of both
    assert err <= 1e-4, f"outputs differ by {err}"
    t_ref, t_ours = [], []
    for _ in range(ROUNDS):
        t_ref.append(_best(reference, 1))
        t_ours.append(_best(whole_chunk, 1))
    ratio = min(t_ref) / min(t_ours)
    benchmark.extra_info.update(
        {
            "base_dim": base_dim,
            "latents": [16, 9, h, w],
            "threads": torch.get_num_threads(),
            "seconds_diffusers": min(t_ref),
            "seconds_ours": min(t_ours),
            "speedup_vs_diffusers": ratio,
            "max_abs_diff": err,
        }
    )
    print(
        f"\n{case}: diffusers {min(t_ref):.3f} s, ours {min(t_ours):.3f} s, speedup {ratio:.2f}x "
        f"(target {TARGET_SPEEDUP}x, {torch.get_num_threads()} threads, max |diff| {err:.1e})"
    )
    benchmark.pedantic(whole_chunk, rounds=ROUNDS, iterations=1)


def _cuda_ms(fn, rounds: int) -> float:
    """Best of `rounds` calls, in milliseconds, between CUDA events on the current stream."""
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return min(times)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_chunk_cuda(benchmark):
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig()).to("cuda", torch.bfloat16).eval().prepare_decode("cuda")
    z = torch.randn(1, 16, 9, 48, 80, device="cuda")
    graphed = GraphedDecode(vae, tuple(z.shape), device="cuda")
    rows = {}
    for name, fn in (
        ("eager, PyTorch norm + SiLU", lambda: vae.use_norm_silu("reference").decode_frames(z, normalized=True)),
        ("eager, fused norm + SiLU", lambda: vae.use_norm_silu("triton").decode_frames(z, normalized=True)),
        ("CUDA graph, fused norm + SiLU", lambda: graphed(z)),
    ):
        fn()  # warm-up: cuDNN's autotuner, Triton's compile, the capture
        rows[name] = _cuda_ms(fn, ROUNDS)
    for name, ms in rows.items():
        print(f"\n{name}: {ms:.1f} ms per 33-frame chunk ({torch.cuda.get_device_name()})")
    benchmark.extra_info.update({"ms": rows, "device": torch.cuda.get_device_name()})
    benchmark.pedantic(lambda: (graphed(z), torch.cuda.synchronize()), rounds=ROUNDS, iterations=1)
