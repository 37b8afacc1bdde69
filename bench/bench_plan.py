"""How long `helios-rt plan` takes for the 14B model at 384x640 bf16 (meta tensors, no weights), and
what a time-sliced decode costs against the whole-chunk decode on CPU.

    python -m pytest bench/bench_plan.py --benchmark-only -s

The plan is what a user waits for before loading 28 GB of weights: it should stay well under a
minute (measured 21.7 s on the 2-core CI machine, idle). The decode pair shows the price of bounded
memory: more, smaller conv calls for the same frames.
"""

from __future__ import annotations

import pytest
import torch

from helios_rt.compile.report import plan_engine
from helios_rt.config import HELIOS_14B
from helios_rt.model.vae import VAEConfig, WanVAE


def test_plan_14b_384x640(benchmark):
    report = benchmark.pedantic(
        lambda: plan_engine(HELIOS_14B, 384, 640, torch.bfloat16, model_name="helios-14b"), rounds=1, iterations=1
    )
    benchmark.extra_info["arena_bytes"] = report.arena_bytes
    print(f"\n14B plan at 384x640 bf16: {benchmark.stats.stats.mean:.1f} s")


@pytest.mark.parametrize("slice_frames", [None, 3, 1])
def test_decode_chunk_by_slices(benchmark, slice_frames):
    cfg = VAEConfig(base_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2)
    vae = WanVAE(cfg).eval()
    z = torch.randn(1, cfg.z_dim, 9, 12, 20, generator=torch.Generator().manual_seed(0))
    benchmark.pedantic(lambda: vae.decode_frames(z, slice_frames=slice_frames), rounds=3, iterations=1)
