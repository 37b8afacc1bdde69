"""Ahead-of-time compilation of every kernel, at every launch configuration, for sm_90 (Hopper), with the
JIT's own specialisation.

Works without a GPU. Each public launcher runs at the 14B shapes on CPU tensors (never touched) while
Triton's runtime sees a stand-in sm_90 driver; a `jit_cache_hook` records what the JIT would compile (the
signature, the constexprs, the attributes of its specialisation, 16-byte divisibility of pointers and
integers, and the options) and stops it before it compiles or launches. `compile_spec` then compiles
exactly that with `triton.compile` and runs the ptxas Triton uses for sm_90 (shipped in the wheel) with
`-v` for registers and spills. Compiling from hand-written argument types instead (no divisibility)
describes another binary: scalar loads, no cp.async, more registers.

`jit_compile` is the check: it lets the JIT itself compile the same launch (the compile runs, the
launch is stopped), so a test can compare the two. Run `python -m helios_rt.kernels.aot` for a JSON
table (`--jit` for the JIT's side).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import torch

# 14B full-resolution shapes: D = 40 heads x 128, L = 2400 history + 8640 noisy tokens, latents 16 x 9 x 48 x 80.
D, HEADS, DH, C, L, T_LAT, H_LAT, W_LAT = 5120, 40, 128, 16, 11040, 9, 48, 80
FFN = 13824  # the 14B FFN width: the GELU output the FP8 FFN quantises
SMEM_LIMIT = 227 * 1024  # sm_90 max dynamic shared memory per block
SM90 = ("cuda", 90, 32)


@dataclass(frozen=True)
class AotResult:
    kernel: str
    config: str
    registers: int
    spills: int  # spill stores + spill loads, bytes
    smem: int
    stack: int
    mma: str  # the matrix instruction in the PTX: wgmma (Hopper), mma.sync (Ampere-style), or "-"


@dataclass(frozen=True)
class Launch:
    """One launcher call at the 14B shapes; `kernel` names it in the report."""

    kernel: str
    call: Callable[[], None]
    variant: str = ""  # attention: "bf16 dh128", to pick launches without compiling them


@dataclass(frozen=True)
class Specialisation:
    """What the JIT compiles for one launch: recorded from its own binder, not written by hand."""

    kernel: str
    fn: object  # the JITFunction
    signature: dict
    constants: dict
    attrs: dict
    options: dict

    @property
    def config(self) -> str:
        names = self.fn.arg_names
        shown = " ".join(f"{names[k[0]]}={v}" for k, v in self.constants.items() if not _long(v))
        dtypes = "/".join(sorted({t[1:] for t in self.signature.values() if t.startswith("*")}))
        return f"{dtypes} {shown} w{self.options['num_warps']} s{self.options['num_stages']}"


def _long(v: object) -> bool:
    return isinstance(v, str) and len(v) >= 8


def _empty(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)  # never written: the pages are not even touched


def launches() -> list[Launch]:
    """The launches the runtime makes at the 14B shapes (bf16 activations, fp32 latents), attention at
    every config its autotuner may pick."""
    from . import attention, norm, quantize, residual, residual_norm, sampler, vae_norm

    f32 = torch.float32
    out = []
    for act in (torch.bfloat16, f32):
        x, mod = _empty(1, L, D, dtype=act), _empty(1, 2, D, dtype=f32)
        out.append(Launch("modulate_layernorm", lambda x=x, m=mod: norm.modulate_layernorm(x, m, m, 2400, 1e-6)))
        y = _empty(1, L, D)
        out.append(Launch("gate_residual", lambda x=x, y=y, g=mod: residual.gate_residual(x, y, g, 2400)))
        noisy, w32, w16 = x[:, 2400:], _empty(D, dtype=f32), _empty(D)  # the cross-attention norms: noisy rows
        out.append(Launch("layernorm", lambda x=noisy, w=w32: norm.layernorm(x, w, w, 1e-6)))
        out.append(Launch("rmsnorm", lambda x=noisy, w=w16: norm.rmsnorm(x, w, 1e-6)))
        # the residuals in the norms: the FFN's (gated) into the next block, the cross-attention's (noisy rows)
        call = lambda x=x, y=y, m=mod: residual_norm.residual_modulate_layernorm(x, y, m, 2400, m, m, 1e-6)  # noqa: E731
        out.append(Launch("residual_modulate_layernorm", call))
        call = lambda x=x, y=y[:, 2400:], m=mod: residual_norm.residual_modulate_layernorm(x, y, None, 2400, m, m, 1e-6)  # noqa: E731
        out.append(Launch("residual_modulate_layernorm", call))
        call = lambda x=x, y=y, m=mod, w=w32: residual_norm.residual_layernorm(x, y, m, 2400, 2400, w, w, 1e-6)  # noqa: E731
        out.append(Launch("residual_layernorm", call))
    for act in (torch.bfloat16, f32):  # the VAE decoder's levels at 384x640; out: the next causal conv's padded input
        for c, t, h, w in ((96, 33, 384, 640), (192, 33, 192, 320), (384, 17, 96, 160)):
            vx = torch.empty(1, c, t, h, w, dtype=act, memory_format=torch.channels_last_3d)
            body = torch.empty(1, c, t + 2, h, w, dtype=act, memory_format=torch.channels_last_3d)
            gamma = torch.empty(c, 1, 1, 1, dtype=act)
            call = lambda x=vx, g=gamma, b=body[:, :, 2:], c=c: vae_norm.rms_norm_silu(x, g, c**0.5, out=b)  # noqa: E731
            out.append(Launch("vae_rms_norm_silu", call))
    lat = _empty(1, C, T_LAT, H_LAT, W_LAT, dtype=f32)
    v, sig = _empty(1, T_LAT * H_LAT * W_LAT // 4, 4 * C), _empty(1, dtype=f32)
    out.append(Launch("flow_step", lambda: sampler.flow_step(v, lat, lat, sig, sig, (1, 2, 2))))
    half = _empty(1, C, T_LAT, H_LAT // 2, W_LAT // 2, dtype=f32)
    out.append(Launch("stage_transition", lambda: sampler.stage_transition(half, lat, 0.5, 0.5)))
    pred = _empty(2, C, T_LAT, H_LAT, W_LAT)
    for zero_star in (False, True):
        out.append(Launch("cfg_combine", lambda z=zero_star: sampler.cfg_combine(pred, 5.0, z)))
    x, hidden, mod = _empty(1, L, D), _empty(1, L, FFN), _empty(1, 2, D, dtype=f32)  # FP8: the quantising ops
    out.append(Launch("fp8_quantize_rows", lambda: quantize.fp8_quantize_rows(x)))
    out.append(Launch("gelu_tanh_fp8", lambda: quantize.gelu_tanh_fp8(hidden)))
    out.append(Launch("modulate_layernorm_fp8", lambda: quantize.modulate_layernorm_fp8(x, mod, mod, 2400, 1e-6)))
    qkv = _empty(1, L, 3 * D)
    w, rope, ks = _empty(D, dtype=f32), _empty(L, DH // 2, dtype=f32), _empty(HEADS, dtype=f32)
    q, k = qkv[..., :D], qkv[..., D : 2 * D]  # slices of the fused QKV projection, as the model hands them
    out.append(Launch("qk_norm_rope", lambda: attention.qk_norm_rope(q, k, w, w, rope, rope, HEADS, 1e-6, ks, 2400)))
    for dtype in (torch.bfloat16, torch.float16, f32):
        for dh in (64, 128):
            t = _empty(1, L, D // dh, dh, dtype=dtype)
            tag = f"{str(dtype).removeprefix('torch.').replace('bfloat', 'bf').replace('float', 'fp')} dh{dh}"
            for cfg in attention.attention_configs(dh, dtype):
                call = lambda t=t, c=cfg: attention.launch_attention(t, t, t, t, c)  # noqa: E731
                out.append(Launch("attention", call, tag))
    return out


class _Sm90:
    """The three driver calls the JIT makes before it compiles: enough to compile for sm_90 on a CPU."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(*SM90)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


class _Stop(Exception):
    """Raised from a JIT hook to end a launch that must not run (there is no GPU)."""


@contextlib.contextmanager
def _sm90_runtime(pre: Callable | None = None, post: Callable | None = None) -> Iterator[None]:
    from triton import knobs
    from triton.runtime.driver import driver

    saved = (driver._active, knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
    driver.set_active(_Sm90())
    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = pre, post
    try:
        yield
    finally:
        driver._active, knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = saved


def capture(launch: Launch) -> list[Specialisation]:
    """The specialisations the JIT would compile for `launch` (one per kernel it launches)."""
    specs: list[Specialisation] = []

    def record(*, fn, compile, **_) -> bool:
        options = json.loads(compile["specialization_data"])["options"]
        specs.append(Specialisation(launch.kernel, fn.jit_function, compile["signature"], compile["constants"],
                                    compile["configs"][0], options))  # fmt: skip
        return True  # the JIT skips the compile and the launch

    with _sm90_runtime(pre=record):
        launch.call()
    if not specs:
        raise RuntimeError(f"{launch.kernel}: the launcher ran no Triton kernel (is TRITON_INTERPRET set?)")
    return [replace(sp, kernel=_name(launch.kernel, sp.fn, len(specs))) for sp in specs]


def _name(kernel: str, fn, launched: int) -> str:
    """A launcher that runs several kernels names each (cfg_combine/cfg_partials, cfg_combine/cfg_apply)."""
    return kernel if launched == 1 else f"{kernel}/{fn.__name__.strip('_').removesuffix('_kernel')}"


_OPTIONS = ("num_warps", "num_ctas", "num_stages", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid",
            "launch_pdl", "debug", "sanitize_overflow", "instrumentation_mode")  # fmt: skip


def compile_spec(spec: Specialisation, ptxas: str) -> AotResult:
    """Compile a recorded specialisation ahead of time for sm_90 and read ptxas's resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(spec.fn, spec.signature, spec.constants, spec.attrs)
    options = {k: spec.options[k] for k in _OPTIONS if k in spec.options and spec.options[k] is not None}
    kernel = triton.compile(src, target=GPUTarget(*SM90), options=options)
    return _resources(spec.kernel, spec.config, kernel, ptxas)


def jit_compile(launch: Launch, ptxas: str) -> list[AotResult]:
    """Let the JIT itself compile `launch` for sm_90 (the launch is stopped after the compile)."""
    compiled: list[tuple[object, object]] = []

    def done(*, key, fn, **_) -> None:
        compiled.append((fn.jit_function, key))
        raise _Stop

    with _sm90_runtime(post=done), contextlib.suppress(_Stop):
        launch.call()
    results = []
    for fn, key in compiled:
        kernel = fn.device_caches[0][0][key]
        meta = kernel.metadata
        options = {"num_warps": meta.num_warps, "num_stages": meta.num_stages}
        spec = Specialisation(launch.kernel, fn, kernel.src.signature, kernel.src.constants, {}, options)
        results.append(_resources(_name(launch.kernel, fn, len(compiled)), spec.config, kernel, ptxas))
    return results


def _resources(name: str, config: str, kernel, ptxas: str) -> AotResult:
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "-"
    return AotResult(name, config, regs, int(spill.group(1)) + int(spill.group(2)), int(kernel.metadata.shared),
                     int(stack.group(1)) if stack else 0, mma)  # fmt: skip


def ptxas_path() -> str | None:
    """The ptxas triton uses for sm_90 (the wheel's CUDA 13 ptxas; its 12.x one rejects the PTX version)."""
    from triton.backends.nvidia.compiler import get_ptxas

    path = get_ptxas(90).path
    return path if path and os.path.exists(path) else None


def _ptxas() -> str:
    ptxas = ptxas_path()
    if ptxas is None:
        raise FileNotFoundError("ptxas for sm_90 not found in the triton wheel (triton/backends/nvidia/bin)")
    return ptxas


def _in_compiler_process(flag: str) -> list[AotResult] | None:
    """Kernels compiled in this process are interpreter objects under TRITON_INTERPRET=1: rerun there."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "helios_rt.kernels.aot", *([flag] if flag else [])]
    res = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return [AotResult(**r) for r in json.loads(res.stdout)]


def compile_all() -> list[AotResult]:
    """Compile every launch's recorded specialisation for sm_90."""
    ptxas = _ptxas()
    done = _in_compiler_process("")
    return done if done is not None else [compile_spec(s, ptxas) for la in launches() for s in capture(la)]


def jit_compile_all(kernel: str = "attention", dtype: str = "bf16", head_dim: int = DH) -> list[AotResult]:
    """The JIT's own compile of the `kernel` launches (attention: at `dtype` and `head_dim`), for the check."""
    ptxas = _ptxas()
    done = _in_compiler_process(f"--jit={kernel},{dtype},{head_dim}")
    if done is not None:
        return done
    tag = f"{dtype} dh{head_dim}" if kernel == "attention" else ""
    return [r for la in launches() if la.kernel == kernel and la.variant == tag for r in jit_compile(la, ptxas)]


def main(argv: list[str]) -> None:
    if argv and argv[0].startswith("--jit="):
        kernel, dtype, dh = argv[0].removeprefix("--jit=").split(",")
        rows = jit_compile_all(kernel, dtype, int(dh))
    else:
        rows = compile_all()
    print(json.dumps([asdict(r) for r in rows]))


if __name__ == "__main__":
    main(sys.argv[1:])
