"""The attention backend table: selection per device, dtype, head dim and installed libraries (simulated on
a CPU), overrides refused with the fix, failing backends passed over and reported, and the library backends
as plannable ops with out= and a fake."""

import pytest
import torch

from helios_rt.ops import OpSet
from helios_rt.ops import attention_backends as AB
from helios_rt.ops import reference as R

ALL = frozenset({"flash_attn_interface", "flash_attn", "triton"})
H100 = AB.AttentionEnv("cuda", (9, 0), ALL, True, "H100")
A100 = AB.AttentionEnv("cuda", (8, 0), ALL - {"flash_attn_interface"}, True, "A100")
RTX4090 = AB.AttentionEnv("cuda", (8, 9), ALL, True, "RTX 4090")  # even with an FA3 build present
H100_NO_FLASH = AB.AttentionEnv("cuda", (9, 0), frozenset({"triton"}), True, "H100, no flash-attn")
T4_BARE = AB.AttentionEnv("cuda", (7, 5), frozenset(), False, "T4, nothing installed")
BF16 = torch.bfloat16


@pytest.mark.parametrize(
    "env,dtype,head_dim,backend",
    [
        (H100, BF16, 128, "fa3"),
        (H100, torch.float16, 64, "fa3"),
        (H100, torch.float32, 128, "sdpa"),  # flash-attn runs half precision only; Triton's fp32 tiles spill
        (A100, BF16, 128, "fa2"),
        (RTX4090, BF16, 128, "fa2"),
        (H100_NO_FLASH, BF16, 128, "triton"),
        (H100_NO_FLASH, BF16, 80, "sdpa"),  # Triton wants a power-of-two head dim
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
    assert "flash_attn is not installed" in bare["fa2"]
    fp32 = dict(AB.select_attention("auto", H100, torch.float32, 128).passed_over)
    assert "bfloat16 or float16" in fp32["fa3"] and "bfloat16 or float16" in fp32["fa2"]
    t4 = dict(AB.select_attention("auto", T4_BARE, BF16, 128).passed_over)
    assert "sm_80 or newer" in t4["fa2"] and "Triton cannot launch" in t4["triton"]


@pytest.mark.parametrize(
    "choice,env,match",
    [("fa3", A100, "needs sm_90"), ("fa3", RTX4090, "sm_89"), ("fa2", H100_NO_FLASH, r"helios_rt\[fa\]"),
     ("triton", T4_BARE, "Triton cannot launch"), ("bogus", H100, "use one of")],
)  # fmt: skip
def test_an_explicit_choice_that_cannot_run_is_refused_with_the_fix(choice, env, match):
    with pytest.raises(ValueError, match=match):
        AB.select_attention(choice, env, BF16, 128)
    assert AB.select_attention("sdpa", env, BF16, 128).backend == "sdpa"  # SDPA runs everywhere


def test_a_failing_backend_is_passed_over_and_reported():
    def probe(name, dtype, head_dim):
        return "failed a trial call (RuntimeError: no kernel image for this device)" if name == "fa3" else None

    sel = AB.select_attention("auto", H100, BF16, 128, probe)
    assert sel.backend == "fa2" and "no kernel image" in dict(sel.passed_over)["fa3"]
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


@pytest.mark.parametrize("name", ["sdpa", "fa3"])
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
