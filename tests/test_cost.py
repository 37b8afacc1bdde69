"""The cost model: FLOPs and bytes of single ops against hand formulas; the priced trace is the planned
chunk (op for op, on a small config; the 14B is in bench/bench_projection.py); the projection's rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helios_rt.compile import cost
from helios_rt.compile.cost import ATTENTION, COPY, ELEMENTWISE, GEMM, NORM, VIEW, ChunkShape
from helios_rt.config import TINY

BF = torch.bfloat16


def meta(*shape, dtype=BF):
    return torch.empty(shape, dtype=dtype, device="meta")


def only(trace, kind):
    ops = [o for o in trace.ops if o.kind == kind]
    assert len(ops) == 1, [o.name for o in trace.ops]
    return ops[0]


# ---- single ops -----------------------------------------------------------------------------------
def test_mm_and_addmm() -> None:
    m, k, n = 96, 80, 48
    a, b, bias = meta(m, k), meta(k, n), meta(n)
    t = cost.trace(torch.mm, a, b)
    op = only(t, GEMM)
    assert op.name == "aten.mm.default" and op.flops == 2 * m * k * n
    assert op.bytes_read == 2 * (m * k + k * n) and op.bytes_written == 2 * m * n
    op = only(cost.trace(torch.addmm, bias, a, b), GEMM)
    assert op.flops == 2 * m * k * n and op.bytes_read == 2 * (m * k + k * n + n)


def test_linear_3d_bmm_and_fp32() -> None:
    x, w, bias = meta(2, 5, 24, dtype=torch.float32), meta(40, 24, dtype=torch.float32), meta(40, dtype=torch.float32)
    t = cost.trace(F.linear, x, w, bias)
    assert t.flops(GEMM) == 2 * 2 * 5 * 24 * 40
    assert {o.dtype for o in t.ops if o.kind == GEMM} == {"float32"}
    a, b = meta(3, 7, 9), meta(3, 9, 11)
    assert only(cost.trace(torch.bmm, a, b), GEMM).flops == 2 * 3 * 7 * 9 * 11


def test_conv3d_patch_embedding() -> None:
    b, c, t_, h, w, d = 2, 16, 3, 8, 12, 32
    x, weight, bias = meta(b, c, t_, h, w), meta(d, c, 1, 2, 2), meta(d)
    op = only(cost.trace(F.conv3d, x, weight, bias, stride=(1, 2, 2)), GEMM)
    assert op.flops == 2 * (b * t_ * (h // 2) * (w // 2)) * d * (c * 4)
    assert op.bytes_written == 2 * b * d * t_ * (h // 2) * (w // 2)


@pytest.mark.parametrize("dv", [16, 8])
def test_sdpa_is_one_attention_op(dv: int) -> None:
    b, h, lq, lk, dh = 2, 3, 10, 14, 16
    q, k, v = meta(b, h, lq, dh), meta(b, h, lk, dh), meta(b, h, lk, dv)
    t = cost.trace(F.scaled_dot_product_attention, q, k, v)
    op = only(t, ATTENTION)
    assert op.flops == 2 * b * h * lq * lk * (dh + dv)
    if dv == dh:
        assert op.flops == 4 * b * h * lq * lk * dh
    assert op.bytes_read == 2 * (q.numel() + k.numel() + v.numel()) and op.bytes_written == 2 * b * h * lq * dv
    assert t.flops(GEMM) == 0 and t.bytes(NORM) == 0, "the math-path lowering must not be priced"
    assert len(t.planned) > 1 and not any(o.priced for o in t.planned), "its steps stay in the trace, unpriced"


def test_fused_attention_aten_ops() -> None:
    b, h, lq, lk, dh = 1, 2, 6, 9, 8
    q, k, v = torch.randn(b, h, lq, dh), torch.randn(b, h, lk, dh), torch.randn(b, h, lk, dh)
    t = cost.trace(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default, q, k, v)
    assert only(t, ATTENTION).flops == 4 * b * h * lq * lk * dh
    blhd = cost.attention_flops((b, lq, h, dh), (b, lk, h, dh), (b, lk, h, dh), heads_last=True)
    assert blhd == 4 * b * h * lq * lk * dh
    assert cost.attention_flops((b, h, lq, lq), (b, h, lq, lq), (b, h, lq, lq), causal=True) == 2 * b * h * lq * lq * lq


def test_an_in_place_argument_is_read_and_written() -> None:
    """`helios_rt::` ops: write-only outputs are written; an in-place argument (trailing `_`) is read and written,
    and only the rows the residual updates (`tail_`) are written."""
    from helios_rt.kernels import residual_norm

    b, n, d, n_hist = 1, 96, 64, 32
    x, y = meta(b, n, d), meta(b, n - n_hist, d)
    shift, scale = meta(b, 2, d, dtype=torch.float32), meta(b, 2, d, dtype=torch.float32)
    t = cost.trace(lambda: residual_norm.residual_modulate_layernorm(x, y, None, n_hist, shift, scale, 1e-6))
    op = only(t, NORM)
    rows = 2 * d  # bytes of one bf16 row
    assert op.bytes_read == n_hist * rows + 2 * (n - n_hist) * rows + 2 * 2 * d * 4, "head, tail_ and y, tables"
    assert op.bytes_written == (n - n_hist) * rows + n * rows, "tail_ and out"


def test_elementwise_views_and_copies() -> None:
    n, d = 64, 32
    x = meta(n, d)
    op = only(cost.trace(lambda: x.float()), COPY)
    assert (op.bytes_read, op.bytes_written) == (2 * n * d, 4 * n * d)
    row = meta(d, dtype=torch.float32)
    t = cost.trace(lambda: x.float() + row.expand(n, d))
    op = next(o for o in t.ops if o.name == "aten.add.Tensor")
    assert op.bytes_read == 4 * n * d + 4 * d, "a broadcast operand is read once"
    t = cost.trace(lambda: x.view(n * d).unsqueeze(0).transpose(0, 1).expand(n * d, 3))
    assert t.bytes() == 0 and {o.kind for o in t.ops} == {VIEW}
    dst = meta(n, d, dtype=torch.float32)
    op = only(cost.trace(lambda: dst.copy_(x)), COPY)
    assert (op.bytes_read, op.bytes_written) == (2 * n * d, 4 * n * d)
    op = only(cost.trace(lambda: torch.cat([x, x[:8]])), COPY)
    assert (op.bytes_read, op.bytes_written) == (2 * (n + 8) * d, 2 * (n + 8) * d)


def test_norms_and_pointwise_ops_are_classed() -> None:
    x, w = meta(16, 32), meta(32)
    t = cost.trace(lambda: F.layer_norm(x, (32,), w, w) * 2)
    assert [o.kind for o in t.priced if o.kind != VIEW] == [NORM, ELEMENTWISE]


# ---- the priced trace is the planned chunk ------------------------------------------------------------------
SHAPE = ChunkShape(height=128, width=64)


@pytest.fixture(scope="module")
def tiny():
    return cost.planned_chunk(TINY, SHAPE, torch.bfloat16, label="tiny")


def _steps(trace) -> list[tuple[str, tuple]]:
    return [(o.name, o.inputs) for o in trace.planned]


def test_the_priced_trace_is_the_plan_that_helios_rt_plan_reports(tiny) -> None:
    from helios_rt.compile.chunk_program import ChunkKind
    from helios_rt.compile.report import distilled_spec, plan_chunk
    from helios_rt.ops import OpSet

    program = plan_chunk(TINY, SHAPE, torch.bfloat16, OpSet.for_planning("auto"), distilled_spec(3))
    for kind, trace in ((ChunkKind(False, False), tiny.steady), (ChunkKind(True, True), tiny.first)):
        plan = program.plans[kind].steps
        assert len(trace.planned) == len(plan)
        assert _steps(trace) == [(s.op, tuple((sh, str(d).removeprefix("torch.")) for sh, d in s.inputs))
                                 for s in plan]  # fmt: skip
    assert len(tiny.first.planned) > len(tiny.steady.planned), "the amplified first chunk runs more steps"


def test_a_trace_that_is_not_the_plan_is_refused(tiny) -> None:
    from helios_rt.compile.workspace import plan_program

    x = meta(8, 8)
    plan = plan_program(lambda: x * 2)
    with pytest.raises(cost.TraceMismatch, match="do not contain the plan's 1 steps"):
        cost.price_plan(cost.trace(lambda: x + 2), plan, "other")
    assert len(cost.price_plan(cost.trace(lambda: x * 2), plan, "same").planned) == 1


def test_sections_group_the_plan_by_stage(tiny) -> None:
    sections = tiny.steady.sections
    assert [s for s in sections if s.startswith("stage")] == ["stage 0", "stage 1", "stage 2"]
    assert {"transition 1", "transition 2", ""} <= set(sections)
    stage2 = tiny.stage(2)
    assert stage2.flops(ATTENTION) > tiny.stage(0).flops(ATTENTION) > 0
    assert sum(tiny.steady.section(s).flops() for s in sections) == tiny.steady.flops()


def test_custom_ops_read_their_inputs_and_write_their_mutated_outputs(tiny) -> None:
    att = next(o for o in tiny.steady.priced if o.name == "helios_rt.attention.default")
    (b, lq, h, d), (_, lk, _, _) = att.inputs[0][0], att.inputs[1][0]
    assert att.kind == ATTENTION and att.backend == "triton" and att.flops == 4 * b * h * lq * lk * d
    assert att.bytes_written == 2 * b * lq * h * d and att.bytes_read == 2 * b * h * d * (lq + 2 * lk)


def test_a_generated_out_form_pays_its_copy(tiny) -> None:
    copies = [o for o in tiny.steady.ops if o.name.startswith("copy into out=")]
    assert copies and all(not o.planned and o.priced and o.kind == COPY for o in copies)
    assert all("_to_copy" in o.name or "native_layer_norm" in o.name or "clone" in o.name for o in copies[:1])
    assert not any(o.name.startswith("copy into out=") for o in tiny.vae.ops), "the decode runs functional ops"


def test_projection_prices_every_op_at_its_class_rate(tiny) -> None:
    eff = cost.Efficiency()
    gemm = next(o for o in tiny.steady.priced if o.name == "aten.addmm.default" and o.dtype == "bfloat16")
    big = replace_flops(gemm, 10**15)
    assert cost.op_seconds(big, cost.H100_SXM, eff) == pytest.approx(1e15 / (eff.gemm * 989e12))
    fp8 = replace_flops(gemm, 10**15, "float8_e4m3fn")
    assert cost.op_seconds(fp8, cost.H100_SXM, eff) == pytest.approx(1e15 / (eff.gemm_fp8 * 1979e12))
    norm = next(o for o in tiny.steady.priced if o.kind == NORM)
    assert cost.op_seconds(norm, cost.H100_SXM, eff) == pytest.approx(norm.bytes / (eff.memory * 3.35e12))
    p = cost.project(tiny)
    assert p.seconds == pytest.approx(cost.trace_seconds(tiny.steady, cost.H100_SXM, p.efficiency))
    assert p.total(group="stage 2") == pytest.approx(cost.trace_seconds(tiny.stage(2), cost.H100_SXM, p.efficiency))


def replace_flops(op, flops: int, dtype: str | None = None):
    from dataclasses import replace

    return replace(op, flops=flops, bytes_read=0, bytes_written=0, dtype=dtype or op.dtype)


def test_fp8_plan_runs_scaled_mm_and_is_priced_at_the_fp8_rate(tiny) -> None:
    from helios_rt.fp8.projection import fp8_chunk, project_fp8

    fp8 = fp8_chunk(tiny)
    scaled = [o for o in fp8.steady.priced if o.name.startswith("aten._scaled_mm")]
    assert scaled and all(o.dtype.startswith("float8") for o in scaled)
    f = project_fp8(tiny)
    assert f.fps_fp8_end_to_end == pytest.approx(33 / (f.fp8_seconds + f.vae_seconds))


def test_verbose_lists_ten_ops_and_bytes_by_class(tiny) -> None:
    text = cost.format_projection(tiny, verbose=True)
    assert "ten costliest ops, steady chunk" in text and "bytes outside GEMMs and attention" in text
    assert len(cost.top_ops(tiny.steady, 10)) == 10
    by_class = cost.bytes_by_class(tiny.steady)
    outside = cost.bytes_outside_gemm_and_attention(tiny.steady)
    assert outside == sum(by_class[k] for k in cost.MEMORY_BOUND) > 0


def test_calibration_row_names_the_paper(tiny) -> None:
    from helios_rt.compile.cost import attention_rates as rates

    c = rates.calibrate(tiny)
    assert c.vae_s > 0 and c.text_kv_s > 0 and "vs the paper's 19.5 FPS at steps 1+1+1" in c.line()


# ---- device-derived rates and the lanes model --------------------------------------------------
H100_SXM_ATTRS = dict(name="NVIDIA H100 80GB HBM3", sm_count=132, major=9, minor=0, max_clock_khz=1_980_000,
                      mem_clock_khz=2_619_000, bus_width_bits=5120)  # fmt: skip
H100_PCIE_ATTRS = dict(name="NVIDIA H100 PCIe", sm_count=114, major=9, minor=0, max_clock_khz=1_755_000,
                       mem_clock_khz=1_593_000, bus_width_bits=5120)  # fmt: skip


def test_peak_rates_from_sm_count_and_clocks_match_the_h100_datasheets() -> None:
    from helios_rt.compile.cost.device_rates import peak_rates

    # datasheets (dense): SXM 989.4 / 1978.9 TFLOP/s bf16 / fp8, 3.35 TB/s; PCIe 756 / 1513, 2.0 TB/s
    bf16, fp8, hbm = peak_rates(132, 1_830_000, 2_619_000, 5120, 9, 0)
    assert bf16 / 1e12 == pytest.approx(989.4, rel=2e-3) and fp8 / 1e12 == pytest.approx(1978.9, rel=2e-3)
    assert hbm / 1e12 == pytest.approx(3.35, rel=2e-3)
    bf16, fp8, hbm = peak_rates(114, 1_620_000, 1_593_000, 5120, 9, 0)
    assert bf16 / 1e12 == pytest.approx(756, rel=2e-3) and fp8 / 1e12 == pytest.approx(1513, rel=2e-3)
    assert hbm / 1e12 == pytest.approx(2.04, rel=2e-3)
    assert peak_rates(108, 1_410_000, 1_215_000, 5120, 8, 0)[0] / 1e12 == pytest.approx(312, rel=2e-3)  # A100
    with pytest.raises(ValueError, match="sm_75.*ARCH_RATES"):
        peak_rates(40, 1_590_000, 5_001_000, 256, 7, 5)


def test_device_spec_is_read_from_the_attributes_and_a_fallback_says_so() -> None:
    from types import SimpleNamespace

    from helios_rt.compile.cost import device_rates as dr

    def source_of(attrs: dict):
        table = {attr: attrs[field] for field, attr in dr.RUNTIME_ATTRIBUTES.items()}
        return lambda name, index: table[name]

    def props_of(attrs: dict):
        return SimpleNamespace(name=attrs["name"], multi_processor_count=attrs["sm_count"], major=attrs["major"],
                               minor=attrs["minor"])  # fmt: skip

    sxm, note = dr.device_spec_for(0, source_of(H100_SXM_ATTRS), props_of(H100_SXM_ATTRS))
    assert sxm.bf16_tflops == pytest.approx(989.4, rel=2e-3) and sxm.fp32_tflops == pytest.approx(66.9, rel=2e-3)
    assert sxm.hbm_tbps == pytest.approx(3.35, rel=2e-3) and "from the device's attributes" in note
    pcie, _ = dr.device_spec_for(0, source_of(H100_PCIE_ATTRS), props_of(H100_PCIE_ATTRS))
    assert pcie.bf16_tflops == pytest.approx(756, rel=2e-3) and pcie.hbm_tbps == pytest.approx(2.04, rel=2e-3)

    def absent(name: str, index: int) -> int:
        raise ImportError("cuda-python is not installed: pip install 'cuda-python>=12'")

    fallback, note = dr.device_spec_for(0, absent, props_of(H100_PCIE_ATTRS))
    assert fallback.name == "H100 PCIe" and "FALLBACK name table" in note and "cuda-python" in note
    nvl, _ = dr.device_spec_for(0, absent, SimpleNamespace(name="NVIDIA H100 NVL"))
    assert nvl.name == "H100 NVL" and nvl.bf16_tflops < cost.H100_SXM.bf16_tflops


def test_attention_rates_carry_over_to_every_sm_90_part_only() -> None:
    from helios_rt.compile.cost import attention_rates as rates

    pcie = cost.DeviceSpec("H100 PCIe", 756.0, 1513.0, 51.2, 2.04)
    assert rates.efficiency_for("fa2", pcie).attention == rates.efficiency_for("fa2").attention
    with pytest.raises(ValueError, match="sm_80"):
        rates.efficiency_for("fa2", cost.DeviceSpec("A100", 312.0, 0.0, 19.5, 2.04, sm=(8, 0)))


def test_steady_fps_prices_both_lanes_on_one_gpu(tiny) -> None:
    assert cost.steady_chunk_seconds(0.8, 0.15) == pytest.approx(0.95)  # the sum, not max(0.8, 0.15)
    p = cost.project(tiny)
    assert p.fps_end_to_end == pytest.approx(33 / cost.steady_chunk_seconds(p.seconds, p.vae_seconds))
