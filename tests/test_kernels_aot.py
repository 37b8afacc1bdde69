"""Every kernel compiles for sm_90 at every launch configuration, from the JIT's own specialisation, without
spills or excess shared memory; the report agrees with a JIT compile of the same launch."""

import pytest
import torch
from helios_rt.kernels import aot, attention, report

if aot.ptxas_path() is None:
    pytest.skip("the triton wheel ships no ptxas for sm_90 (triton/backends/nvidia/bin)", allow_module_level=True)


@pytest.fixture(scope="module")
def rows():
    return report.report_rows()


def test_every_launch_compiles(rows):
    kernels = {r["kernel"] for r in rows}
    for op in ("modulate_layernorm", "gate_residual", "flow_step", "stage_transition", "qk_norm_rope",
               "attention", "cfg_combine", "cfg_combine/cfg_partials", "cfg_combine/cfg_apply",
               "fp8_quantize_rows", "gelu_tanh_fp8", "modulate_layernorm_fp8", "layernorm", "rmsnorm",
               "vae_rms_norm_silu", "residual_modulate_layernorm", "residual_layernorm"):  # fmt: skip
        assert op in kernels
    tuned = attention.attention_configs(128, torch.bfloat16)
    seen = {r["config"] for r in rows if r["kernel"] == "attention" and r["config"].startswith("bf16 HEAD_DIM=128 ")}
    assert len(seen) == len(tuned)  # every config the autotuner may pick at the 14B head dim


def test_the_report_uses_the_jit_specialisation(rows):
    """The JIT marks 16-byte-aligned pointers and strides divisible by 16: the attention tiles then load with
    cp.async into shared memory and multiply with wgmma; the hand-typed signature gave 255 registers."""
    att = [r for r in rows if r["kernel"] == "attention" and not r["config"].startswith("fp32")]
    assert att and all(r["mma"] == "wgmma" for r in att)
    assert all(r["registers"] < 255 for r in att)


def test_no_spills_and_smem_fits(rows):
    """float32 attention (exact products on FMA units) spills at every tile size; it is a debug precision that
    the backend table does not pick on a GPU. Everything else must be clean."""
    bad = [r for r in rows if r["spills"] or r["smem"] > aot.SMEM_LIMIT or r["stack"]]
    clean = [r for r in bad if not (r["kernel"] == "attention" and r["config"].startswith("fp32"))]
    assert not clean, "\n".join(f"{r['kernel']} [{r['config']}]: {r}" for r in clean)
    assert all(r["spills"] < 2048 for r in bad), bad


@pytest.mark.parametrize("kernel,dtype", [("attention", "bf16"), ("qk_norm_rope", "")])
def test_report_and_jit_agree_on_registers(rows, kernel, dtype):
    jit = aot.jit_compile_all(kernel, dtype or "bf16", 128)
    assert jit
    by_config = {(r["kernel"], r["config"]): r for r in rows}
    for j in jit:
        r = by_config.get((j.kernel, j.config))
        assert r is not None, f"the JIT compiled {j.kernel} [{j.config}], which the report does not list"
        assert (r["registers"], r["smem"], r["mma"]) == (j.registers, j.smem, j.mma), (r, j)


def test_fused_moves_fewer_bytes():
    for r in report.bytes_rows():
        assert r.reference_bytes is None or r.reference_bytes > r.fused_bytes, r
    fused, ref = report.block_bytes()
    assert ref / fused > 5


def test_the_fused_prologue_decision_is_printed_from_numbers():
    lines = report.prologue_decision()
    assert "redone by 87 query tiles" in lines[2] and lines[-1].strip().startswith("decision: removed")
