"""The attention backend table: selection per device, dtype, head dim and installed libraries (simulated on
a CPU), overrides refused with the fix, failing backends passed over and reported, and the library backends
as plannable ops with out= and a fake."""

import sys
import types

import pytest
import torch

from helios_rt.ops import OpSet
from helios_rt.ops import attention_backends as AB
from helios_rt.ops import reference as R

ALL = frozenset({"flash_attn_interface", "flash_attn", "triton", AB.CUDNN})
H100 = AB.AttentionEnv("cuda", (9, 0), ALL, True, "H100")
A100 = AB.AttentionEnv("cuda", (8, 0), ALL - {"flash_attn_interface"}, True, "A100")
A100_NO_TRITON = AB.AttentionEnv("cuda", (8, 0), ALL - {"flash_attn_interface", "triton"}, False, "A100, no Triton")
A100_FA2_ONLY = AB.AttentionEnv("cuda", (8, 0), frozenset({"flash_attn"}), False, "A100, cuDNN 8, flash-attn")
RTX4090 = AB.AttentionEnv("cuda", (8, 9), ALL, True, "RTX 4090")  # even with an FA3 build present
H100_NO_FLASH = AB.AttentionEnv("cuda", (9, 0), frozenset({"triton", AB.CUDNN}), True, "H100, no flash-attn")
T4_BARE = AB.AttentionEnv("cuda", (7, 5), frozenset(), False, "T4, nothing installed")
BF16 = torch.bfloat16


@pytest.mark.parametrize(
    "env,dtype,head_dim,backend",
    [
        (H100, BF16, 128, "fa3"),
        (H100, torch.float16, 64, "fa3"),
        (H100, torch.float32, 128, "sdpa"),  # flash-attn and cuDNN run half precision only; Triton's fp32 spills
        (A100, BF16, 128, "triton"),  # untimed, our kernel (400 TFLOP/s est.) ranks above FA2 (335 measured)
        (RTX4090, BF16, 128, "triton"),
        (A100_NO_TRITON, BF16, 128, "cudnn"),
        (A100_FA2_ONLY, BF16, 128, "fa2"),
        (H100_NO_FLASH, BF16, 128, "triton"),
        (H100_NO_FLASH, BF16, 80, "cudnn"),  # Triton wants a power-of-two head dim
        (H100_NO_FLASH, BF16, 256, "triton"),  # cuDNN's head dim stops at 128
        (T4_BARE, BF16, 128, "sdpa"),
    ],
)
def test_auto_picks_the_best_backend_that_runs(env, dtype, head_dim, backend):
    sel = AB.select_attention("auto", env, dtype, head_dim)
    assert sel.backend == backend
    passed = dict(sel.passed_over)
    order = (*AB.AUTO_ORDER, "reference")
    assert list(passed) == list(order[: order.index(backend)])  # every better backend has its reason
    assert backend in sel.describe() and all(name in sel.describe() for name in passed)


def test_the_reasons_name_what_is_missing():
    a100 = dict(AB.select_attention("auto", A100, BF16, 128).passed_over)
    assert "sm_90" in a100["fa3"] and "sm_80" in a100["fa3"]
    bare = dict(AB.select_attention("auto", H100_NO_FLASH, BF16, 128).passed_over)
    assert "flash_attn_interface is not installed" in bare["fa3"]
    assert "flash_attn is not installed" in AB.BACKENDS["fa2"].reason(H100_NO_FLASH, BF16, 128)
    fp32 = dict(AB.select_attention("auto", H100, torch.float32, 128).passed_over)
    assert "bfloat16 or float16" in fp32["fa3"] and "bfloat16 or float16" in fp32["fa2"]
    t4 = dict(AB.select_attention("auto", T4_BARE, BF16, 128).passed_over)
    assert "sm_80 or newer" in t4["fa2"] and "Triton cannot launch" in t4["triton"]
    assert "sm_80 or newer" in t4["cudnn"] and "bfloat16 or float16" in fp32["cudnn"]
    fa2_only = dict(AB.select_attention("auto", A100_FA2_ONLY, BF16, 128).passed_over)
    assert "no cuDNN 9" in fa2_only["cudnn"]
    assert "a multiple of 8 and <= 128, got 256" in AB.BACKENDS["cudnn"].reason(H100, BF16, 256)


@pytest.mark.parametrize(
    "choice,env,match",
    [("fa3", A100, "needs sm_90"), ("fa3", RTX4090, "sm_89"), ("fa2", H100_NO_FLASH, r"helios_rt\[fa\]"),
     ("triton", T4_BARE, "Triton cannot launch"), ("cudnn", T4_BARE, "sm_80.*a CUDA build of PyTorch"),
     ("cudnn", A100_FA2_ONLY, "no cuDNN 9"), ("bogus", H100, "use one of")],
)  # fmt: skip
def test_an_explicit_choice_that_cannot_run_is_refused_with_the_fix(choice, env, match):
    with pytest.raises(ValueError, match=match):
        AB.select_attention(choice, env, BF16, 128)
    assert AB.select_attention("sdpa", env, BF16, 128).backend == "sdpa"  # SDPA runs everywhere


def test_a_failing_backend_is_passed_over_and_reported():
    def probe(name, dtype, head_dim):
        return "failed a trial call (RuntimeError: no kernel image for this device)" if name == "fa3" else None

    sel = AB.select_attention("auto", H100, BF16, 128, probe)
    assert sel.backend == "triton" and "no kernel image" in dict(sel.passed_over)["fa3"]
    with pytest.raises(ValueError, match="attention='fa3' cannot run here: failed a trial call"):
        AB.select_attention("fa3", H100, BF16, 128, probe)


def test_the_device_probe_catches_a_raising_and_a_wrong_backend():
    def lookup(name):
        if name == "fa2":
            return lambda q, k, v, out=None: (_ for _ in ()).throw(RuntimeError("FA2 was built for sm_80"))
        if name == "fa3":
            return lambda q, k, v, out=None: torch.zeros_like(q)
        return AB.implementation(name)

    probe = AB.device_probe(torch.device("cpu"), lookup)
    assert "FA2 was built for sm_80" in probe("fa2", torch.float32, 32)
    assert "differs from the reference" in probe("fa3", torch.float32, 32)
    assert probe("sdpa", torch.float32, 32) is None


def test_attention_auto_follows_kernels_and_the_device():
    sel = OpSet("cpu").attention_selection(torch.float32, 32)
    assert sel.backend == "reference" and "the default on cpu" in sel.describe()
    chosen = OpSet("cpu", "reference", attention="sdpa")
    sel = chosen.attention_selection(torch.float32, 32)
    assert sel.backend == chosen.backend_of("attention") == "sdpa"
    assert OpSet.for_planning("auto").backend_of("attention") == "triton"  # the GPU plan, as before
    assert OpSet.for_planning("reference").backend_of("attention") == "reference"
    assert OpSet.for_planning("auto", attention="fa3").backend_of("attention") == "fa3"


@pytest.mark.parametrize("name", ["sdpa", "fa3", "fa2", "cudnn"])
def test_library_backends_are_ops_with_out_and_a_fake(name):
    """On meta (the planner's tracing) every library op runs its fake: FA3 plans on a machine without it."""
    q = torch.empty(2, 40, 3, 64, dtype=BF16, device="meta")
    out = torch.empty_like(q)
    assert AB.implementation(name)(q, q, q, out=out) is out
    if name == "sdpa":  # the real op runs on a CPU: schema, fake and aliasing checked by torch
        g = torch.Generator().manual_seed(0)
        args = [torch.randn(1, 9, 2, 16, generator=g) for _ in range(3)] + [torch.empty(1, 9, 2, 16)]
        torch.library.opcheck(AB.LIBRARY_OPS["sdpa"], args)


def test_sdpa_matches_the_reference_into_a_strided_out():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 37, 3, 32, generator=g)
    kv = torch.randn(2, 21, 2, 3, 32, generator=g)  # k, v strided views of one buffer
    buf = torch.zeros(2, 37, 5, 32)
    out = buf[:, :, 1:4]
    ops = OpSet("cpu", attention="sdpa")
    assert ops.attention(q, kv[:, :, 0], kv[:, :, 1], out=out).data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, R.attention(q, kv[:, :, 0], kv[:, :, 1]), rtol=1e-5, atol=1e-5)
    assert (buf[:, :, 0] == 0).all() and (buf[:, :, 4] == 0).all()
    with pytest.raises(ValueError, match="same dtype"):
        ops.attention(q, kv[:, :, 0].double(), kv[:, :, 1])


# ---- FlashAttention writes the planned `out` (the libraries faked on a CPU: what we hand them is checked) ----
def _reference_into(out, q, k, v):
    out.copy_(R.attention(q.float(), k.float(), v.float()).to(out.dtype))
    return out


def _fake_fa3(monkeypatch, with_out: bool) -> list:
    """An FA3 interface whose `_flash_attn_forward` takes `out_` (the hopper/ interface today) or not (the
    2024 betas); `calls` records which entry point ran and the buffer it was given."""
    calls = []
    mod = types.ModuleType("flash_attn_interface")
    if with_out:

        def forward(q, k, v, k_new=None, v_new=None, qv=None, out_=None, softmax_scale=None, causal=False):
            calls.append(("forward", out_))
            return _reference_into(out_, q, k, v), None, None, None

        mod._flash_attn_forward = types.SimpleNamespace(_init_fn=forward)  # like a torch.library CustomOpDef
    else:
        mod._flash_attn_forward = lambda q, k, v, softmax_scale, causal: pytest.fail("no out_ here")

    def func(q, k, v, causal=False):
        calls.append(("func", None))
        return _reference_into(torch.empty_like(q), q, k, v), None

    mod.flash_attn_func = func
    monkeypatch.setitem(sys.modules, "flash_attn_interface", mod)
    return calls


def _fake_fa2(monkeypatch, version: str) -> list:
    calls = []
    fa2 = types.ModuleType("flash_attn")
    fa2.__version__ = version
    fa2.flash_attn_func = lambda q, k, v, dropout_p, causal: (
        calls.append(("func", None)) or _reference_into(torch.empty_like(q), q, k, v)
    )
    ext = types.ModuleType("flash_attn_2_cuda")

    def fwd(q, k, v, out_, alibi, p, scale, causal, left, right, softcap, return_softmax, gen):
        assert (p, causal, left, right, softcap, return_softmax) == (0.0, False, -1, -1, 0.0, False)
        assert scale == q.shape[-1] ** -0.5
        calls.append(("fwd", out_))
        return [_reference_into(out_, q, k, v), None, None, None]

    ext.fwd = fwd
    monkeypatch.setitem(sys.modules, "flash_attn", fa2)
    monkeypatch.setitem(sys.modules, "flash_attn_2_cuda", ext)
    return calls


def _strided_case():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 19, 3, 16, generator=g)
    kv = torch.randn(2, 23, 2, 3, 16, generator=g)
    buf = torch.zeros(2, 19, 5, 16)
    return q, kv[:, :, 0], kv[:, :, 1], buf, buf[:, :, 1:4]


@pytest.mark.parametrize(
    "name,fake,arg,entry",
    [("fa3", _fake_fa3, True, "forward"), ("fa3", _fake_fa3, False, "func"),
     ("fa2", _fake_fa2, "2.6.3", "fwd"), ("fa2", _fake_fa2, "2.8.0.post2", "fwd"), ("fa2", _fake_fa2, "2.5.9", "func")],
)  # fmt: skip
def test_flash_attention_writes_the_planned_out_where_the_release_can(monkeypatch, name, fake, arg, entry):
    """FA3 with `out_` and FA2 >= 2.6 get the caller's (strided) `out` itself; older releases are copied."""
    calls = fake(monkeypatch, arg)
    q, k, v, buf, out = _strided_case()
    assert AB.implementation(name)(q, k, v, out=out) is out
    assert [c[0] for c in calls] == [entry]
    if entry != "func":
        assert calls[0][1].data_ptr() == out.data_ptr() and calls[0][1].stride() == out.stride()
    torch.testing.assert_close(out, R.attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert (buf[:, :, 0] == 0).all() and (buf[:, :, 4] == 0).all()
