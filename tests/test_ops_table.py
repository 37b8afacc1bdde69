"""The op table resolves each op once, when it is built: every op is a declared attribute of `OpSet` whose
value is the function that runs it (the Triton launcher or the PyTorch reference), so a block's
`ops.modulate_layernorm(...)` is a direct call; the attention dispatch binds one launcher per
(dtype, head dim) and reads no table per call."""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

from helios_rt.ops import OpSet, entry, op_names, reference, register_impl, registry
from helios_rt.ops import attention_backends as AB
from helios_rt.ops.launch import on_device


def test_every_registered_op_is_a_declared_attribute_and_nothing_else_is():
    assert sorted(OpSet.__annotations__) == op_names()
    assert "__getattr__" not in vars(OpSet)  # no lookup by name at call time


def test_a_registered_op_without_a_declared_attribute_stops_the_table(monkeypatch):
    monkeypatch.setitem(registry._TABLE, "new_op", registry.OpEntry("new_op", reference.gelu_tanh))
    with pytest.raises(TypeError, match=r"lacks \['new_op'\]: declare each registered op"):
        OpSet("cpu", "reference")


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_each_op_is_the_registered_function_itself(kernels):
    """On a CPU (the interpreter runs Triton) each attribute is the launcher or the reference, not a wrapper."""
    ops = OpSet("cpu", kernels)
    for name in op_names():
        op = entry(name)
        want = op.impls.get("triton", op.reference) if kernels == "triton" else op.reference
        assert getattr(ops, name) is want, name
        assert ops.backend_of(name) == ("triton" if getattr(ops, name) is not op.reference else "reference")
    assert inspect.isfunction(ops.modulate_layernorm)


def test_a_block_op_leads_to_the_kernels_launcher():
    """The path a reader follows: `OpSet.modulate_layernorm` holds `kernels/norm.py`'s launcher."""
    from helios_rt.kernels import norm

    assert OpSet("cpu", "triton").modulate_layernorm is norm.modulate_layernorm
    assert OpSet("cpu", "reference").modulate_layernorm is reference.modulate_layernorm
    assert OpSet.for_planning("auto").modulate_layernorm is norm.modulate_layernorm  # a CUDA plan on a CPU


def test_only_triton_registers_beside_the_reference():
    with pytest.raises(ValueError, match=r"backend must be one of \('triton',\), got 'cuda'"):
        register_impl("modulate_layernorm", "cuda")


class _Tripwire(dict):
    """A selections table that fails when read: a call must run the bound launcher without it."""

    def __getitem__(self, key):
        raise AssertionError("the dispatch read its selections on a call")

    def get(self, key, default=None):
        raise AssertionError("the dispatch read its selections on a call")

    def __contains__(self, key):
        raise AssertionError("the dispatch read its selections on a call")


def _qkv(dtype: torch.dtype, head_dim: int = 32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 9, 2, head_dim, generator=g, dtype=dtype) for _ in range(3))


def test_the_attention_dispatch_binds_the_launcher_once_per_dtype_and_head_dim():
    ops = OpSet("cpu", "reference", attention="sdpa")
    dispatch = ops.attention
    assert isinstance(dispatch, AB.AttentionDispatch) and dispatch.launch is None  # nothing chosen yet
    sel = ops.attention_selection(torch.float32, 32)  # the engine's load
    assert sel.backend == "sdpa" and dispatch.key == (torch.float32, 32)
    assert dispatch.launch is AB.sdpa_attention
    q, k, v = _qkv(torch.float32)
    dispatch.selections = _Tripwire(dispatch.selections)
    torch.testing.assert_close(ops.attention(q, k, v), reference.attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_a_call_with_another_dtype_selects_and_binds_it_and_adopting_rebinds():
    dispatch = OpSet("cpu", "reference", attention="sdpa").attention
    q, k, v = _qkv(torch.float64, 16)
    out = dispatch(q, k, v)
    assert dispatch.key == (torch.float64, 16) and out.dtype == torch.float64
    assert list(dispatch.selections) == [(torch.float64, 16)]
    dispatch.adopt(AB.AttentionSelection("reference", "auto", torch.float64, 16))  # the warm-up's timing
    assert dispatch.launch is reference.attention and dispatch.backend == "reference"
    dispatch(*_qkv(torch.float32))  # back and forth: each pair keeps its own selection, bound when called
    assert dispatch.key == (torch.float32, 32) and dispatch.launch is AB.sdpa_attention
    dispatch(q, k, v)
    assert dispatch.key == (torch.float64, 16) and dispatch.launch is reference.attention


def test_a_launcher_is_pinned_to_an_indexed_cuda_device(monkeypatch):
    """Triton and the libraries launch on the current device: an engine on cuda:1 makes it current."""
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext(entered.append(d)))

    def launcher(x, out=None):
        return x

    assert on_device(launcher, torch.device("cpu")) is launcher
    assert on_device(launcher, torch.device("cuda")) is launcher  # no index: the current device is meant
    pinned = on_device(launcher, torch.device("cuda", 1))
    assert pinned(7) == 7 and entered == [torch.device("cuda", 1)]
    assert pinned.__wrapped__ is launcher
