"""The planned chunk on the Triton op table: no float32 round trip, unfused norm or separate GELU pass over
an activation inside a block, read from the plan the engine executes.

The model is TINY in bf16 on meta tensors (planning runs nothing), sampled as Helios-Distilled (three
pyramid stages, one step each); the steady kind is the chunk a stream repeats.
"""

import pytest
import torch

from helios_rt.compile.chunk_program import META, ChunkKind, ChunkProgram, TextShape
from helios_rt.config import TINY
from helios_rt.model.transformer import HeliosTransformer, keeps_fp32
from helios_rt.ops import OpSet
from helios_rt.sampling.chunk import ChunkSampler, SamplingSpec
from helios_rt.sampling.history import HistoryLayout
from helios_rt.sampling.schedules import ScheduleConfig

# Ops that, on an activation, mean a cast, an unfused norm or a GELU pass of its own.
UNFUSED = ("aten._to_copy.", "aten.native_layer_norm.", "aten.pow.", "aten.mean.", "aten.rsqrt.", "aten.gelu.")
MIN_TOKENS = 16  # an activation `[B, L, D]`: every stage has more tokens than this, the modulation tables 6 rows


def _steady_plan(kernels: str):
    ops = OpSet.for_planning(kernels, attention="auto")
    with torch.device(META):
        model = HeliosTransformer(TINY, ops)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_fp32(name) else torch.bfloat16)
    spec = SamplingSpec(ScheduleConfig(kind="dmd", stages=3), True, True, False, (1, 1, 1), 1.0, True)
    sampler = ChunkSampler(model.eval(), spec, HistoryLayout((16, 2, 1), 9, True), (16, 24), META, ops)
    n = TINY.patch_size[1] * TINY.patch_size[2]
    sampler.set_block_factor(torch.empty(n, n, device=META))
    program = ChunkProgram(sampler, 1, TextShape(8), cuda_graph=False)
    return program.plan(ChunkKind(False, False))


@pytest.fixture(scope="module")
def plans():
    return {"triton": _steady_plan("triton")}


def _activation(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[1] >= MIN_TOKENS and shape[2] >= TINY.dim


def test_no_cast_norm_or_gelu_pass_over_an_activation(plans):
    steps = plans["triton"].steps
    offenders = [s.describe() for s in steps if s.op.startswith(UNFUSED) and any(_activation(t) for t, _ in s.inputs)]
    assert not offenders, "\n".join(offenders[:5])


def test_the_blocks_run_the_fused_ops(plans):
    ops = {s.op.split(".")[1] for s in plans["triton"].steps if s.op.startswith("helios_rt.")}
    assert {"residual_layernorm", "rmsnorm", "linear_gelu_tanh", "residual_modulate_layernorm"} <= ops


def test_residuals_ride_in_the_norms(plans):
    """Every residual but the last block's is added by the next norm in the same pass: one gate_residual and one
    plain modulate_layernorm per forward (after the last block; the first block's input), no add_ of its own."""
    steps = plans["triton"].steps
    forwards = sum(s.op.startswith("helios_rt.qk_norm_rope") for s in steps) // TINY.num_layers
    count = lambda name: sum(s.op.startswith(f"helios_rt.{name}.") for s in steps)  # noqa: E731
    assert forwards == 3  # one per pyramid stage
    assert count("gate_residual") == forwards
    n = TINY.num_layers
    assert count("residual_layernorm") == forwards * n  # the self-attention's residual, in the cross norm
    assert count("residual_modulate_layernorm") == forwards * (2 * n - 1)  # the cross residual; the last FFN's
    adds = [s.describe() for s in steps if s.op.startswith("aten.add_.") and any(_activation(t) for t, _ in s.inputs)]
    assert not adds, adds[:3]
