"""Ahead-of-time compilation of every kernel at every launch configuration used on sm_90 (Hopper).

Works without a GPU: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` gives PTX and
the shared-memory size; the ptxas that triton itself uses for sm_90 (shipped in the wheel) run with
`-v` on that PTX gives registers and spills. Run `python -m helios_rt.kernels.aot` for a JSON table.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

# 14B full-resolution shapes: D = 40 heads x 128, latents 16 x 9 x 48 x 80 (patch 1,2,2).
D, HEADS, DH, C, W_LAT = 5120, 40, 128, 16, 80
SMEM_LIMIT = 227 * 1024  # sm_90 max dynamic shared memory per block


@dataclass(frozen=True)
class AotResult:
    kernel: str
    config: str
    registers: int
    spills: int  # spill stores + spill loads, bytes
    smem: int
    stack: int


@dataclass(frozen=True)
class Variant:
    kernel: str
    fn_name: str  # module:function of the @triton.jit kernel
    types: dict  # arg -> triton type for pointers and floats; other runtime args are i32
    constexprs: dict
    num_warps: int
    num_stages: int = 3

    @property
    def config(self) -> str:
        shown = {k: v for k, v in self.constexprs.items() if not isinstance(v, str) or len(v) < 8}
        dt = "/".join(sorted({t[1:] for t in self.types.values() if t.startswith("*")}))
        return f"{dt} " + " ".join(f"{k}={v}" for k, v in shown.items()) + f" w{self.num_warps} s{self.num_stages}"


def _ptr(dtype: str, *names: str) -> dict:
    return {n: f"*{dtype}" for n in names}


def variants() -> list[Variant]:
    """The launch configurations the launchers pick at the 14B shapes (bf16 activations, fp32 latents)."""
    from . import attention, norm, residual, sampler

    out = []
    for act in ("bf16", "fp32"):
        cfg = norm.launch_config(D)
        types = {**_ptr(act, "x_ptr", "out_ptr"), **_ptr("fp32", "shift_ptr", "scale_ptr"), "eps": "fp32"}
        out.append(Variant("modulate_layernorm", "norm:_modulate_layernorm_kernel", types,
                           {"BLOCK_D": cfg["BLOCK_D"]}, cfg["num_warps"]))  # fmt: skip
        cfg = residual.launch_config(D)
        types = {**_ptr(act, "x_ptr", "out_ptr"), **_ptr("bf16", "y_ptr"), **_ptr("fp32", "gate_ptr")}
        out.append(Variant("gate_residual", "residual:_gate_residual_kernel", types,
                           {"BLOCK_D": cfg["BLOCK_D"]}, cfg["num_warps"]))  # fmt: skip
    cfg = sampler.flow_step_config(C, W_LAT)
    types = {**_ptr("bf16", "v_ptr"), **_ptr("fp32", "x_ptr", "start_ptr", "out_ptr", "sigma_t_ptr", "sigma_next_ptr")}
    cx = {"PT": 1, "PH": 2, "PW": 2, "BLOCK_C": cfg["BLOCK_C"], "BLOCK_W": cfg["BLOCK_W"]}
    out.append(Variant("flow_step", "sampler:_flow_step_kernel", types, cx, cfg["num_warps"]))
    cfg = sampler.stage_transition_config(W_LAT // 2)
    types = {**_ptr("fp32", "x_ptr", "noise_ptr", "out_ptr"), "alpha": "fp32", "beta": "fp32"}
    out.append(Variant("stage_transition", "sampler:_stage_transition_kernel", types,
                       {"BLOCK_W": cfg["BLOCK_W"]}, cfg["num_warps"]))  # fmt: skip
    nc = -(-(C * 9 * 48 * W_LAT) // sampler.CFG_CHUNK)
    out.append(
        Variant(
            "cfg_combine/partials",
            "sampler:_cfg_partials_kernel",
            {**_ptr("bf16", "pred_ptr"), **_ptr("fp32", "part_ptr")},
            {"BLOCK": sampler.CFG_CHUNK},
            8,
        )
    )
    for zs in (False, True):
        types = {**_ptr("bf16", "pred_ptr", "out_ptr"), **_ptr("fp32", "part_ptr"), "scale": "fp32"}
        cx = {"ZERO_STAR": zs, "NC_POW2": 1 << (nc - 1).bit_length(), "BLOCK": sampler.CFG_CHUNK}
        out.append(Variant("cfg_combine/apply", "sampler:_cfg_apply_kernel", types, cx, 8))
    cfg = attention.qk_norm_rope_config(D)
    types = {**_ptr("bf16", "q_ptr", "k_ptr", "qo_ptr", "ko_ptr"), "eps": "fp32",
             **_ptr("fp32", "qw_ptr", "kw_ptr", "cos_ptr", "sin_ptr", "ks_ptr")}  # fmt: skip
    out.append(Variant("qk_norm_rope", "attention:_qk_norm_rope_kernel", types,
                       {"HALF": DH // 2, "BLOCK_P": cfg["BLOCK_P"], "KEY_SCALE": True}, cfg["num_warps"]))  # fmt: skip
    cfg = attention.rstd_config(D)
    out.append(Variant("qk_rstd", "attention:_rstd_kernel", {**_ptr("bf16", "q_ptr", "k_ptr"),
                       **_ptr("fp32", "r_ptr"), "eps": "fp32"}, {"BLOCK": cfg["BLOCK"]}, cfg["num_warps"]))  # fmt: skip
    for dtype, tname in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
        for dh in (64, 128):
            for prologue in (False, True):
                if prologue and dtype == torch.float32:
                    continue  # fp32 runs qk_norm_rope + attention (see compressed_context_attention)
                cfg = attention.attention_config(dh, dtype, prologue, interpret=False)
                tables = ("rq_ptr", "rk_ptr", "qw_ptr", "kw_ptr", "cos_ptr", "sin_ptr", "ks_ptr")
                types = {**_ptr(tname, "q_ptr", "k_ptr", "v_ptr", "o_ptr"), "qk_scale": "fp32", **_ptr("fp32", *tables)}
                cx = {"HEAD_DIM": dh, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "PROLOGUE": prologue}
                precision = "ieee" if tname == "fp32" else "tf32"
                cx.update({"KEY_SCALE": prologue, "PRECISION": precision, "DOT_F32": False})
                name = "compressed_context_attention" if prologue else "attention"
                out.append(Variant(name, "attention:_attn_fwd_kernel", types, cx, cfg["num_warps"], cfg["num_stages"]))
    return out


def ptxas_path() -> str | None:
    """The ptxas triton uses for sm_90 (the wheel's CUDA 13 ptxas; its 12.x one rejects the PTX version)."""
    from triton.backends.nvidia.compiler import get_ptxas

    path = get_ptxas(90).path
    return path if path and os.path.exists(path) else None


def _jit_fn(qualified: str):
    import importlib

    mod, name = qualified.split(":")
    return getattr(importlib.import_module(f"helios_rt.kernels.{mod}"), name)


def compile_variant(v: Variant, ptxas: str) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _jit_fn(v.fn_name)
    sig = {}
    for arg in fn.arg_names:
        sig[arg] = "constexpr" if arg in v.constexprs else v.types.get(arg, "i32")
    src = triton.compiler.ASTSource(fn, sig, dict(v.constexprs))
    opts = {"num_warps": v.num_warps, "num_stages": v.num_stages}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        cmd = [ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return AotResult(
        v.kernel,
        v.config,
        regs,
        int(spill.group(1)) + int(spill.group(2)),
        int(kernel.metadata.shared),
        int(stack.group(1)) if stack else 0,
    )


def compile_all() -> list[AotResult]:
    """Compile every variant for sm_90; runs in a clean subprocess when this one interprets kernels."""
    ptxas = ptxas_path()
    if ptxas is None:
        raise FileNotFoundError("ptxas for sm_90 not found in the triton wheel (triton/backends/nvidia/bin)")
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels here are interpreter objects
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        res = subprocess.run(
            [sys.executable, "-m", "helios_rt.kernels.aot"], env=env, check=True, capture_output=True, text=True
        )
        return [AotResult(**r) for r in json.loads(res.stdout)]
    return [compile_variant(v, ptxas) for v in variants()]


if __name__ == "__main__":
    print(json.dumps([asdict(r) for r in compile_all()]))
