"""Per kernel and config: registers, spills, shared memory and the MMA instruction (sm_90, compiled from the
JIT's own specialisation by kernels/aot.py), the bytes one call moves at the 14B full-resolution shape
beside the bytes the unfused reference sequence moves, and the numbers behind removing the fused-prologue
attention.

Reference bytes are counted analytically per PyTorch op of the reference (reads + writes, float32
intermediates where the reference upcasts, broadcast tables and scalars ignored). Activations are
bf16, modulation tables float32, latents float32. Run `python -m helios_rt.kernels.report`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .aot import compile_all

B, L_HIST, L_NOISY, D, HEADS, DH = 1, 2400, 8640, 5120, 40, 128
L = L_HIST + L_NOISY
LATENT = 16 * 9 * 48 * 80  # elements of one latent at full resolution
BF, F32, F64 = 2, 4, 8


def _ops(*pairs: tuple[float, float]) -> float:
    """Bytes per element of a chain of ops given as (read, write) bytes per element."""
    return sum(r + w for r, w in pairs)


# Bytes per element (of the op's main tensor) for fused kernel vs reference op chain.
_PER_ELEM = {
    # x.float(); layer_norm; seg(scale) cat; 1+scale; y*(.); seg(shift) cat; y+shift; .to(bf16)
    "modulate_layernorm": (
        BF + BF,
        _ops((BF, F32), (F32, F32), (0, F32), (F32, F32), (2 * F32, F32), (0, F32), (2 * F32, F32), (F32, BF)),
    ),
    # x.float(); y.float(); seg(gate) cat; y*g; x+(.); .to(bf16)
    "gate_residual": (3 * BF, _ops((BF, F32), (BF, F32), (0, F32), (2 * F32, F32), (2 * F32, F32), (F32, BF))),
    # per element of q plus the same of k: rmsnorm (float, pow, mean, *rsqrt, *w, .to) + rope (float,
    # 6 half-size elementwise ops, stack) + .to; k adds the history scale
    "qk_norm_rope": (
        2 * (BF + BF),
        2 * _ops((BF, F32), (F32, F32), (F32, 0), (F32, F32), (F32, F32), (F32, BF))
        + 2 * _ops((BF, F32), *[(F32 / 2, F32 / 2)] * 4, *[(F32, F32 / 2)] * 2, (F32, F32), (F32, BF))
        + _ops((F32, F32)),
    ),
    # the cross-attention LayerNorm: x.float(); layer_norm (float32 affine); .to(bf16)
    "layernorm": (BF + BF, _ops((BF, F32), (F32, F32), (F32, BF))),
    # the cross-attention Q RMSNorm: x.float(); pow; mean; *rsqrt; *w; .to(bf16)
    "rmsnorm": (BF + BF, _ops((BF, F32), (F32, F32), (F32, 0), (F32, F32), (F32, F32), (F32, BF))),
    # the FFN's gated residual in the next block's adaLN norm: gate_residual's chain, then modulate_layernorm's;
    # fused: read x and y, write x and the norm
    "residual_modulate_layernorm": (
        4 * BF,
        _ops((BF, F32), (BF, F32), (0, F32), (2 * F32, F32), (2 * F32, F32), (F32, BF))
        + _ops((BF, F32), (F32, F32), (0, F32), (F32, F32), (2 * F32, F32), (0, F32), (2 * F32, F32), (F32, BF)),
    ),
    # the self-attention's gated residual in the cross-attention LayerNorm (of the noisy rows, per element of x)
    "residual_layernorm": (
        3 * BF + (BF + BF) * L_NOISY / L,
        _ops((BF, F32), (BF, F32), (0, F32), (2 * F32, F32), (2 * F32, F32), (F32, BF))
        + _ops((BF, F32), (F32, F32), (F32, BF)) * L_NOISY / L,
    ),
    # the VAE's norm + SiLU: vector_norm (fp32 out, tiny); x*factor -> out; out*=gamma; silu_(out)
    "vae_rms_norm_silu": (BF + BF, _ops((BF, 0), (BF, BF), (BF, BF), (BF, BF))),
    # unpatchify copy; v.double(); x.double(); st*v; x-(.); (1-sn)*x0; start.double(); sn*start; add;
    # where; .to(fp32)
    "flow_step": (
        BF + 3 * F32,
        _ops(
            (BF, BF),
            (BF, F64),
            (F32, F64),
            (F64, F64),
            (2 * F64, F64),
            (F64, F64),
            (F32, F64),
            (F64, F64),
            (2 * F64, F64),
            (3 * F64, F64),
            (F64, F32),
        ),  # fmt: skip
    ),
    # per output element: 2 repeat_interleave (from 1/4 then 1/2 size), alpha*up, beta*noise, add
    "stage_transition": (
        F32 / 4 + 2 * F32,
        _ops((F32 / 4, F32 / 2), (F32 / 2, F32), (F32, F32), (F32, F32), (2 * F32, F32)),
    ),
    # per output element, CFG-Zero*: pred.float() (2 halves); u*c; sum; u*u; sum; .to; u*a; c-(.); s*(.);
    # add; .to(bf16)
    "cfg_combine (zero*)": (
        2 * (2 * BF) + BF,
        _ops(
            (2 * BF, 2 * F32),
            (2 * F32, F32),
            (F32, 0),
            (F32, F32),
            (F32, 0),
            (F32, F32),
            (2 * F32, F32),
            (F32, F32),
            (2 * F32, F32),
            (F32, BF),
        ),  # fmt: skip
    ),
}
_ELEMS = {
    "modulate_layernorm": B * L * D,
    "gate_residual": B * L * D,
    "qk_norm_rope": B * L * D,
    "layernorm": B * L_NOISY * D,
    "residual_modulate_layernorm": B * L * D,
    "residual_layernorm": B * L * D,
    "rmsnorm": B * L_NOISY * D,
    "vae_rms_norm_silu": 96 * 33 * 384 * 640,  # one full-resolution call of the decoder
    "flow_step": LATENT,
    "stage_transition": LATENT,
    "cfg_combine (zero*)": LATENT,
}
# Per transformer block (excluding GEMMs and the attention core): two adaLN norms with the residual before
# each (counted as gated over every row: the cross-attention's plain add over the noisy rows moves less), the
# Q/K prologue, the self-attention's residual in the cross-attention LayerNorm, the Q RMSNorm.
BLOCK_OPS = {"residual_modulate_layernorm": 2, "qk_norm_rope": 1, "residual_layernorm": 1, "rmsnorm": 1}


@dataclass(frozen=True)
class BytesRow:
    op: str
    fused_bytes: float
    reference_bytes: float | None

    @property
    def ratio(self) -> float | None:
        return None if not self.reference_bytes else self.reference_bytes / self.fused_bytes


def bytes_rows() -> list[BytesRow]:
    rows = []
    for op, (fused, ref) in _PER_ELEM.items():
        n = _ELEMS[op]
        ref_bytes = None if ref is None else ref * n
        rows.append(BytesRow(op, fused * n, ref_bytes))
    return rows


def block_bytes() -> tuple[float, float]:
    """(fused, reference) bytes per transformer block, excluding GEMMs and the attention core."""
    by = {r.op: r for r in bytes_rows()}
    fused = sum(k * by[op].fused_bytes for op, k in BLOCK_OPS.items())
    ref = sum(k * by[op].reference_bytes for op, k in BLOCK_OPS.items())
    return fused, ref


def report_rows() -> list[dict]:
    """One dict per compiled kernel/config: registers, spills, smem (sm_90) and bytes per call."""
    by = {r.op: r for r in bytes_rows()}
    alias = {"cfg_combine/cfg_apply": "cfg_combine (zero*)"}
    rows = []
    for r in compile_all():
        b = by.get(alias.get(r.kernel, r.kernel))
        rows.append({**r.__dict__, "fused_MB": b and b.fused_bytes / 1e6,
                     "reference_MB": b and b.reference_bytes and b.reference_bytes / 1e6})  # fmt: skip
    return rows


def main() -> None:
    print("sm_90, compiled from the JIT's own specialisation (16-byte divisibility of pointers and integers)")
    print(f"{'kernel':20} {'config':84} {'regs':>4} {'spill':>5} {'smem':>7} {'mma':>8}")
    for r in report_rows():
        cfg = r["config"].replace(" PRECISION=tf32", "").replace(" DOT_F32=False", "")
        print(f"{r['kernel']:20} {cfg[:84]:84} {r['registers']:>4} {r['spills']:>5} {r['smem']:>7} {r['mma']:>8}")
    print(f"\nbytes per call at B={B}, L={L_HIST}+{L_NOISY}, D={D}, latents 16x9x48x80 (MB)")
    print(f"{'op':42} {'fused':>9} {'reference':>10} {'ratio':>6}")
    for r in bytes_rows():
        ref = f"{r.reference_bytes / 1e6:10.1f}" if r.reference_bytes else f"{'-':>10}"
        ratio = f"{r.ratio:6.1f}" if r.ratio else f"{'-':>6}"
        print(f"{r.op:42} {r.fused_bytes / 1e6:9.1f} {ref} {ratio}")
    fused, ref = block_bytes()
    print(f"\nper block (2 adaLN norms with their residuals, Q/K prologue, 2 cross-attention norms): "
          f"fused {fused / 1e9:.2f} GB, reference {ref / 1e9:.2f} GB, ratio {ref / fused:.1f}x; "
          f"40 blocks at 3.35 TB/s: {40 * fused / 3.35e12 * 1e3:.1f} ms vs "
          f"{40 * ref / 3.35e12 * 1e3:.1f} ms")  # fmt: skip
    print("\n" + "\n".join(prologue_decision()))


def prologue_decision(block_m: int = 128, hbm_tbps: float = 2.7, attn_tflops: float = 640.0) -> list[str]:
    """Why the Q/K prologue is not fused into the attention kernel, from the stage-2 shape (an estimate:
    no GPU measured it). Fusing K's prologue redoes it for every query tile; fusing only Q's saves Q's
    round trip through HBM but ties attention to this kernel instead of FlashAttention-3."""
    q_tiles = -(-L // block_m)
    k_redo = q_tiles * L * D * 10  # ~10 FP32 ops per element (norm scale, weight, rotate, key scale), per tile
    fp32_cuda_core = 67e12
    saved_kv = 2 * B * L * D * BF  # q, k: write + re-read (4 x L x D x 2 B) less the rstd pre-pass's read of both
    saved_q = B * L * D * BF  # q alone: write + re-read less the rstd pre-pass over q
    attn_ms = 4 * B * L * L * D / (attn_tflops * 1e12) * 1e3
    return [
        f"fused prologue, per block at stage 2 (L={L}, D={D}; estimate, no GPU measurement):",
        f"  attention core at {attn_tflops:.0f} TFLOP/s (FA3): {attn_ms:.2f} ms",
        f"  K prologue in the kernel: redone by {q_tiles} query tiles ({block_m} rows): {k_redo / 1e9:.0f} GFLOP "
        f"on FP32 units = {k_redo / fp32_cuda_core * 1e3:.2f} ms added; saves "
        f"{saved_kv / 1e6:.0f} MB = {saved_kv / (hbm_tbps * 1e12) * 1e3:.3f} ms of HBM traffic",
        f"  Q prologue only: saves {saved_q / 1e6:.0f} MB = {saved_q / (hbm_tbps * 1e12) * 1e3:.3f} ms "
        f"({saved_q / (hbm_tbps * 1e12) * 1e3 / attn_ms:.1%} of the core) but rules out FlashAttention-3",
        "  decision: removed; qk_norm_rope runs once per token and any attention backend reads its output",
    ]


if __name__ == "__main__":
    main()
