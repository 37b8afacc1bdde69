"""The attention backend table: FlashAttention-3, our Triton kernel, cuDNN, FlashAttention-2, SDPA, the reference.

Every backend computes the `attention` op's contract (`ops/reference.py`): softmax(q k^T / sqrt(Dh)) v over
`[B, L, H, Dh]` tensors, written into a caller-owned `out`. Which one runs is decided once per (dtype, head
dim) from an `AttentionEnv` (device capability, what is installed) and recorded with the reason every
other backend was passed over, so that a user reads why FA3 does not run on an A100 instead of meeting an
import error inside a stage. `auto` takes the first backend of `AUTO_ORDER` that can run; on a CUDA device
it also makes one small probe call, so that an installed but broken wheel (built for another GPU) is a
reported fallback at load time, and the engine's warm-up then times every backend that runs at its own
shapes and keeps the fastest (`ops/attention_tuning.py`). An explicit choice that cannot run raises a
ValueError naming the fix.

The library backends are `helios_rt::` custom ops that mutate only `out` and have a fake implementation:
the chunk compiler plans and captures them like the Triton kernels. FlashAttention-2 (>= 2.6) and -3 (an
interface whose `_flash_attn_forward` takes `out_`) write into `out` through their internal forwards;
older releases, cuDNN and SDPA return a fresh tensor that is copied into `out` (one extra write of the
output, and a temporary from the caching allocator that the arena does not see).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import ATTENTION_CHOICES
from .launch import load_triton, on_device, triton_runs
from .reference import attention as reference_attention
from .registry import entry

Tensor = torch.Tensor
log = logging.getLogger("helios_rt")

# The untimed ranking (a CPU, graphs="off", the load-time pick before warm-up times them), by the cost model's
# H100 rates (`compile/cost/attention_rates.py`): FA3 640 TFLOP/s (measured) > our Triton kernel 400
# (estimate, FA2-class tiles on wgmma) > FA2 335 (measured) = SDPA's flash kernel. cuDNN has no rate there
# and its speed moves with the cuDNN release inside the wheel, so it ranks below the kernel the model can
# price and above FA2, whose code it outruns on Hopper; the warm-up's timing decides on the real machine.
AUTO_ORDER: tuple[str, ...] = ("fa3", "triton", "cudnn", "fa2", "sdpa")
HALF_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class AttentionEnv:
    """What decides which attention can run: the device, its compute capability and the importable libraries.

    `installed` holds module names: `flash_attn_interface` (FA3, built from flash-attention's hopper/),
    `flash_attn` (FA2, `pip install helios_rt[fa]`), `triton`, and `cudnn_attention` when PyTorch was built
    with cuDNN 9 or newer (its SDPA cuDNN backend). `triton_runs`: Triton can launch here (a CUDA
    device, or the CPU interpreter).
    """

    device_type: str
    capability: tuple[int, int] | None = None
    installed: frozenset[str] = frozenset()
    triton_runs: bool = False
    name: str = ""

    @property
    def cuda(self) -> bool:
        return self.device_type == "cuda"


PROBED_MODULES = ("flash_attn_interface", "flash_attn", "triton")


@functools.lru_cache(maxsize=8)
def probe_env(device: str) -> AttentionEnv:
    """The environment of `device` (cached: capability queries and imports happen once per process)."""
    dev = torch.device(device)
    installed = frozenset(m for m in PROBED_MODULES if _importable(m))
    if dev.type != "cuda":
        return AttentionEnv(dev.type, None, installed, "triton" in installed and triton_runs(dev), dev.type)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(index)
    if _cudnn_attention_built():
        installed |= {CUDNN}
    return AttentionEnv("cuda", cap, installed, "triton" in installed, torch.cuda.get_device_name(index))


CUDNN = "cudnn_attention"  # the pseudo-module of `AttentionEnv.installed`: PyTorch's cuDNN SDPA backend


def _cudnn_attention_built() -> bool:
    """PyTorch's cuDNN attention needs cuDNN 9 (`torch.backends.cudnn.version()` >= 90000)."""
    return torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000


_IMPORT_ERRORS: dict[str, BaseException] = {}


def _importable(module: str) -> bool:
    """Import `module` once; a failure is remembered and re-raised with a fix if the backend is demanded."""
    if module in _IMPORT_ERRORS:
        return False
    try:
        importlib.import_module(module)
    except Exception as err:  # an ImportError, or a wheel whose extension fails to load (OSError, ...)
        _IMPORT_ERRORS[module] = err
        return False
    return True


# ---- requirements: None when the backend can run, else why not -------------------------------------------
def _flash_reason(env: AttentionEnv, dtype: torch.dtype, head_dim: int, module: str, arch: str) -> str | None:
    if not env.cuda:
        return f"needs a CUDA device ({arch}), device is {env.device_type}"
    if dtype not in HALF_DTYPES:
        return f"needs bfloat16 or float16, dtype is {str(dtype).removeprefix('torch.')}"
    if head_dim % 8 or head_dim > 256:
        return f"needs a head dim that is a multiple of 8 and <= 256, got {head_dim}"
    if module not in env.installed:
        why = _IMPORT_ERRORS.get(module)
        if why is None or (isinstance(why, ModuleNotFoundError) and why.name == module):
            return f"{module} is not installed"
        return f"{module} is not importable ({why!r})"  # installed, but its extension fails to load
    return None


def _fa3_reason(env: AttentionEnv, dtype: torch.dtype, head_dim: int) -> str | None:
    if env.cuda and env.capability != (9, 0):
        return f"needs sm_90 (Hopper), device is sm_{_sm(env)}"
    return _flash_reason(env, dtype, head_dim, "flash_attn_interface", "sm_90")


def _fa2_reason(env: AttentionEnv, dtype: torch.dtype, head_dim: int) -> str | None:
    if env.cuda and (env.capability or (0, 0)) < (8, 0):
        return f"needs sm_80 or newer (Ampere+), device is sm_{_sm(env)}"
    return _flash_reason(env, dtype, head_dim, "flash_attn", "sm_80+")


def _triton_reason(env: AttentionEnv, dtype: torch.dtype, head_dim: int) -> str | None:
    if not env.triton_runs:
        return f"Triton cannot launch on {env.device_type} (needs CUDA, or TRITON_INTERPRET=1 on a CPU)"
    if dtype not in HALF_DTYPES and (env.cuda or dtype != torch.float32):
        # float32 runs exact FMA products whose tiles spill on sm_90 (kernels/report.py)
        dt = str(dtype).removeprefix("torch.")
        return f"runs bfloat16 or float16 on a GPU (float32 tiles spill; kernels='triton' still runs it), got {dt}"
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return f"needs a power-of-two head dim in [16, 256], got {head_dim}"
    return None


def _cudnn_reason(env: AttentionEnv, dtype: torch.dtype, head_dim: int) -> str | None:
    if not env.cuda:
        return f"needs a CUDA device (sm_80+), device is {env.device_type}"
    if (env.capability or (0, 0)) < (8, 0):
        return f"needs sm_80 or newer (Ampere+), device is sm_{_sm(env)}"
    if dtype not in HALF_DTYPES:
        return f"needs bfloat16 or float16, dtype is {str(dtype).removeprefix('torch.')}"
    if head_dim % 8 or head_dim > 128:  # PyTorch's check_cudnn_tensor_shapes for the cuDNN 9 releases
        return f"needs a head dim that is a multiple of 8 and <= 128, got {head_dim}"
    if CUDNN not in env.installed:
        return "this PyTorch has no cuDNN 9 (torch.backends.cudnn.version() < 90000)"
    return None


def _always(env: AttentionEnv, dtype: torch.dtype, head_dim: int) -> str | None:
    return None  # PyTorch picks its own kernel (flash, memory-efficient or math) for any input


def _sm(env: AttentionEnv) -> str:
    return "".join(map(str, env.capability)) if env.capability else "?"


# ---- the library backends as plannable ops --------------------------------------------------------------
def _fa3_forward(q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> None:
    import flash_attn_interface as fa3

    forward = _raw(getattr(fa3, "_flash_attn_forward", None))
    if forward is not None and _takes_out(forward, "out_") and out.stride(-1) == 1:
        res = forward(q, k, v, out_=out, softmax_scale=q.shape[-1] ** -0.5, causal=False)
        _into(out, res[0])
        return
    res = fa3.flash_attn_func(q, k, v, causal=False)  # an FA3 beta without `out_`: copy
    out.copy_(res[0] if isinstance(res, tuple) else res)  # some FA3 releases also return the log-sum-exp


FA2_OUT_SINCE = (2, 6)  # flash_attn_2_cuda.fwd(q, k, v, out_, alibi, p, scale, causal, wl, wr, softcap, ...)


def _fa2_forward(q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> None:
    import flash_attn

    if _version(flash_attn) >= FA2_OUT_SINCE and out.stride(-1) == 1:
        import flash_attn_2_cuda

        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        res = flash_attn_2_cuda.fwd(q, k, v, out, None, 0.0, q.shape[-1] ** -0.5, False, -1, -1, 0.0, False, None)
        _into(out, res[0])
        return
    out.copy_(flash_attn.flash_attn_func(q, k, v, dropout_p=0.0, causal=False))  # before 2.6: copy


def _raw(fn: Callable | None) -> Callable | None:
    """The Python function under a `torch.library.custom_op` (FA3 declares its forward functional, so calling
    the op with `out_` trips PyTorch's aliasing check; the function itself passes `out_` to the kernel)."""
    return getattr(fn, "_init_fn", fn)


@functools.lru_cache(maxsize=8)
def _takes_out(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def _version(module) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", getattr(module, "__version__", "0"))[:2])


def _into(out: Tensor, res: Tensor) -> None:
    """The library wrote `out` (the usual case); if it handed back another buffer, copy it in."""
    if res.data_ptr() != out.data_ptr():
        out.copy_(res)


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


# "sdpa" is PyTorch's pick among flash, memory-efficient and math (never cuDNN, which is its own backend):
# the FlashAttention-2 kernel wherever it runs, and something that runs everywhere else (float32, sm_75, CPU)
SDPA_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa_forward(q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> None:
    with sdpa_kernel(SDPA_KERNELS, set_priority=True):
        out.copy_(_sdpa(q, k, v))


def _cudnn_forward(q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> None:
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):  # only cuDNN: an unsupported input raises, never falls back
        out.copy_(_sdpa(q, k, v))


LIBRARY_OPS: dict[str, Callable] = {}  # name -> the torch.library op (for opcheck and plans)


def _library_op(name: str, forward: Callable[[Tensor, Tensor, Tensor, Tensor], None]) -> Callable:
    """`helios_rt::attention_<name>`: `forward` writes `out` (the only mutated input)."""

    def launch(q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> None:
        forward(q, k, v, out)

    op = torch.library.custom_op(f"helios_rt::attention_{name}", launch, mutates_args=("out",))
    op.register_fake(lambda q, k, v, out: None)
    LIBRARY_OPS[name] = op

    def attention(q: Tensor, k: Tensor, v: Tensor, out: Tensor | None = None) -> Tensor:
        _check_qkv(q, k, v)
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        elif out.shape != q.shape or out.dtype != q.dtype:
            raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
        if out.numel():
            op(q, k, v, out)
        return out

    attention.__name__ = attention.__qualname__ = f"attention_{name}"
    attention.__doc__ = f"`attention` through {name}: q `[B, Lq, H, Dh]`, k/v `[B, Lk, H, Dh]`, out= like q."
    return attention


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        raise ValueError(f"attention wants q [B, Lq, H, Dh] and k, v [B, Lk, H, Dh]; got {shapes}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"query, key and value must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


fa3_attention = _library_op("fa3", _fa3_forward)
fa2_attention = _library_op("fa2", _fa2_forward)
cudnn_attention = _library_op("cudnn", _cudnn_forward)
sdpa_attention = _library_op("sdpa", _sdpa_forward)


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    reason: Callable[[AttentionEnv, torch.dtype, int], str | None]
    fix: str  # what makes it available


BACKENDS: dict[str, AttentionBackend] = {
    "fa3": AttentionBackend("fa3", _fa3_reason, "build flash-attention's hopper/ package (flash_attn_interface)"),
    "fa2": AttentionBackend("fa2", _fa2_reason, "pip install 'helios_rt[fa]'"),
    "triton": AttentionBackend("triton", _triton_reason, "pip install triton (a CUDA device)"),
    "cudnn": AttentionBackend("cudnn", _cudnn_reason, "install a CUDA build of PyTorch (it ships cuDNN 9)"),
    "sdpa": AttentionBackend("sdpa", _always, ""),
    "reference": AttentionBackend("reference", _always, ""),
}


def implementation(name: str) -> Callable:
    """The callable of backend `name` (Triton's module imported on first use)."""
    if name == "fa3":
        return fa3_attention
    if name == "fa2":
        return fa2_attention
    if name == "sdpa":
        return sdpa_attention
    if name == "cudnn":
        return cudnn_attention
    if name == "triton":
        load_triton()
        return entry("attention").impls["triton"]
    if name == "reference":
        return reference_attention
    raise ValueError(f"unknown attention backend {name!r}; use one of {ATTENTION_CHOICES}")


# ---- selection ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionSelection:
    """Which backend runs attention for one (dtype, head dim), and why each backend before it does not."""

    backend: str
    requested: str
    dtype: torch.dtype
    head_dim: int
    passed_over: tuple[tuple[str, str], ...] = ()
    note: str = ""  # how the request became this choice, e.g. attention='auto' following kernels='triton'
    timings: tuple[tuple[str, float], ...] = ()  # (backend, ms at the engine's shapes), fastest first

    def describe(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        how = f"requested {self.requested}" + (f", {self.note}" if self.note else "")
        if self.timings:
            how += ": " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in self.timings)
        line = f"attention: {self.backend} ({dt}, head dim {self.head_dim}; {how})"
        if self.passed_over:
            line += "; not " + "; ".join(f"{name}: {why}" for name, why in self.passed_over)
        return line


Probe = Callable[[str, torch.dtype, int], str | None]


def select_attention(
    choice: str, env: AttentionEnv, dtype: torch.dtype, head_dim: int, probe: Probe | None = None
) -> AttentionSelection:
    """The backend for `choice` ("auto" or a name) in `env`; `probe(name, dtype, head_dim)` returns an error
    text when a backend that should run fails a trial call. An explicit choice that cannot run raises."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention={choice!r}: use one of {', '.join(ATTENTION_CHOICES)}")
    if choice != "auto":
        why = _why_not(choice, env, dtype, head_dim, probe)
        if why is not None:
            fix = BACKENDS[choice].fix
            raise ValueError(f"attention={choice!r} cannot run here: {why}; {fix + ', or ' if fix else ''}"
                             "use attention='auto' to take the best backend that can")  # fmt: skip
        return AttentionSelection(choice, choice, dtype, head_dim)
    passed: list[tuple[str, str]] = []
    for name in (*AUTO_ORDER, "reference"):
        why = _why_not(name, env, dtype, head_dim, probe)
        if why is None:
            return AttentionSelection(name, "auto", dtype, head_dim, tuple(passed))
        passed.append((name, why))
    raise AssertionError("the reference attention always runs")  # pragma: no cover


def _why_not(name: str, env: AttentionEnv, dtype: torch.dtype, head_dim: int, probe: Probe | None) -> str | None:
    why = BACKENDS[name].reason(env, dtype, head_dim)
    if why is None and probe is not None and name != "reference":
        why = probe(name, dtype, head_dim)
    return why


def device_probe(device: torch.device, lookup: Callable[[str], Callable] | None = None) -> Probe:
    """A trial call on `device` checked against the reference: catches a wheel that imports but cannot run
    (built for another GPU) or computes garbage, before a stage meets it."""

    def probe(name: str, dtype: torch.dtype, head_dim: int) -> str | None:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, 64, 2, head_dim, generator=g).to(device, dtype) for _ in range(3))
        try:
            got = on_device((lookup or implementation)(name), device)(q, k, v).float()
        except Exception as err:  # reported and passed over (auto) or raised with the fix (explicit)
            return f"failed a trial call ({type(err).__name__}: {err})"
        want = reference_attention(q.float(), k.float(), v.float())
        worst = (got - want).abs().max().item()
        return None if worst < 0.05 else f"a trial call differs from the reference by {worst:.3g}"

    return probe


AttentionFn = Callable[..., Tensor]  # (q, k, v, out=None) -> out: the `attention` op's contract


@dataclass
class AttentionDispatch:
    """The op table's `attention` when backends are chosen per (dtype, head dim): an explicit
    `EngineConfig.attention`, or "auto" on CUDA. A selection is made on first use or by `select` (the
    engine's load), and replaced by the warm-up's timing (`adopt`, `ops/attention_tuning.py`).

    Selecting binds `launch`: the chosen backend's launcher itself (on `device`), so a call compares its
    (dtype, head dim) with the bound `key` and runs `launch`; no table is read per call. A call with
    another (dtype, head dim) selects and binds that one first."""

    choice: str
    env: AttentionEnv
    device: torch.device
    probe: Probe | None = None
    selections: dict[tuple[torch.dtype, int], AttentionSelection] = field(default_factory=dict)
    key: tuple[torch.dtype, int] | None = None  # the (dtype, head dim) that `launch` was bound for
    launch: AttentionFn | None = None  # the launcher of `selections[key]`, e.g. `kernels.attention.attention`

    def adopt(self, sel: AttentionSelection) -> None:
        """Run `sel` from now on for its (dtype, head dim): plans and graphs made before must be remade."""
        self._bind((sel.dtype, sel.head_dim), sel)
        self.selections[(sel.dtype, sel.head_dim)] = sel
        log.info(sel.describe())

    def select(self, dtype: torch.dtype, head_dim: int) -> AttentionSelection:
        """The backend for (dtype, head dim), chosen once (an explicit choice that cannot run raises), and
        bound as `launch`."""
        key = (dtype, head_dim)
        sel = self.selections.get(key)
        if sel is None:
            sel = select_attention(self.choice, self.env, dtype, head_dim, self.probe)
            self._bind(key, sel)
            self.selections[key] = sel
            log.info(sel.describe())
        elif key != self.key:
            self._bind(key, sel)
        return sel

    def _bind(self, key: tuple[torch.dtype, int], sel: AttentionSelection) -> None:
        self.launch, self.key = on_device(implementation(sel.backend), self.device), key

    @property
    def backend(self) -> str:
        """The backend of the latest selection, or the request when nothing was selected yet."""
        return next(reversed(self.selections.values())).backend if self.selections else self.choice

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor | None = None) -> Tensor:
        if (q.dtype, q.shape[-1]) != self.key:
            self.select(q.dtype, q.shape[-1])
        return self.launch(q, k, v, out=out)


def pinned_note(device: torch.device, kernels: str, choice: str, target: str | None = None) -> str | None:
    """Why `choice` leaves attention to the op table's own pick (`kernels`), or None when it does not:
    "auto" follows kernels="reference"/"triton", and runs the reference off CUDA (the plan for a CUDA
    `target` keeps the table's Triton kernel, as before the backend table existed)."""
    if choice != "auto":
        return None
    if kernels != "auto":
        return f"following kernels={kernels!r}"
    if target is not None:
        return f"the op table's attention for a {target} plan"
    return None if device.type == "cuda" else f"the default on {device.type}"


def attention_dispatch(device: torch.device, choice: str, target: str | None = None) -> AttentionDispatch:
    """The dispatch an `OpSet` holds for an explicit choice, or for "auto" on a CUDA device. `target`
    (planning on meta) names the device the plan is for: nothing runs, so nothing is probed."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention={choice!r}: use one of {', '.join(ATTENTION_CHOICES)}")
    if target is not None:  # planning on meta: every backend has a fake, so any choice plans
        env = AttentionEnv("cuda", (9, 0), frozenset(PROBED_MODULES), True, f"a {target} plan")
        return AttentionDispatch(choice, env, device)
    env = probe_env(str(device))
    return AttentionDispatch(choice, env, device, device_probe(device) if env.cuda else None)
