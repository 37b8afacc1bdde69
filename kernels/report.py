"""Per kernel and config: registers, shared memory, spills (sm_90, from kernels/aot.py), and the bytes one
call moves at the 14B full-resolution shape beside the bytes the unfused reference sequence moves.

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
    # rstd pre-pass over q and k; the attention kernel reads raw q, k instead of rotated ones (core)
    "compressed_context_attention (prologue)": (2 * BF, None),
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
    "compressed_context_attention (prologue)": B * L * D,
    "flow_step": LATENT,
    "stage_transition": LATENT,
    "cfg_combine (zero*)": LATENT,
}
# Per transformer block (excluding GEMMs and the attention core): two adaLN norms, two gated residuals,
# the Q/K prologue.
BLOCK_OPS = {"modulate_layernorm": 2, "gate_residual": 2, "qk_norm_rope": 1}


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
        if op == "compressed_context_attention (prologue)":  # vs qk_norm_rope's separate kernel
            ref_bytes = _PER_ELEM["qk_norm_rope"][0] * n
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
    alias = {"cfg_combine/apply": "cfg_combine (zero*)", "qk_rstd": "compressed_context_attention (prologue)"}
    rows = []
    for r in compile_all():
        b = by.get(alias.get(r.kernel, r.kernel))
        rows.append({**r.__dict__, "fused_MB": b and b.fused_bytes / 1e6,
                     "reference_MB": b and b.reference_bytes and b.reference_bytes / 1e6})  # fmt: skip
    return rows


def main() -> None:
    print(f"{'kernel':30} {'config':70} {'regs':>4} {'spill':>5} {'smem':>7}")
    for r in report_rows():
        print(f"{r['kernel']:30} {r['config'][:70]:70} {r['registers']:>4} {r['spills']:>5} {r['smem']:>7}")
    print(f"\nbytes per call at B={B}, L={L_HIST}+{L_NOISY}, D={D}, latents 16x9x48x80 (MB)")
    print(f"{'op':42} {'fused':>9} {'reference':>10} {'ratio':>6}")
    for r in bytes_rows():
        ref = f"{r.reference_bytes / 1e6:10.1f}" if r.reference_bytes else f"{'-':>10}"
        ratio = f"{r.ratio:6.1f}" if r.ratio else f"{'-':>6}"
        print(f"{r.op:42} {r.fused_bytes / 1e6:9.1f} {ref} {ratio}")
    fused, ref = block_bytes()
    print(f"\nper block (2 adaLN norms, 2 gated residuals, Q/K prologue): fused {fused / 1e9:.2f} GB, "
          f"reference {ref / 1e9:.2f} GB, ratio {ref / fused:.1f}x; 40 blocks at 3.35 TB/s: "
          f"{40 * fused / 3.35e12 * 1e3:.1f} ms vs {40 * ref / 3.35e12 * 1e3:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
