"""Planning mode (lifetimes of intermediates) and execution mode (arena views, plan checks) of the workspace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helios_rt.compile.workspace import (
    Executor,
    PlanMismatch,
    UnplannableOp,
    allocate_arena,
    out_variant,
    plan_program,
)
from helios_rt.ops import OpSet

aten = torch.ops.aten
META = torch.device("meta")


def meta_like(*ts):
    return [torch.empty_like(t, device=META) for t in ts]


def chain(x, w):
    a = x + 1  # buffer 0, read by the last op
    b = (a * 2).t()  # buffer 1 (the transpose is a view)
    c = b.t() @ w  # buffer 2 (mm)
    c.add_(a)  # in place: no buffer, touches c and a
    return torch.relu(c)  # buffer 3: the result


def test_lifetimes_views_and_in_place_ops():
    x, w = torch.randn(5, 7), torch.randn(7, 7)
    plan = plan_program(chain, *meta_like(x, w))
    ops = [s.op for s in plan.steps]
    assert ops == ["aten.add.Tensor", "aten.mul.Tensor", "aten.t.default", "aten.t.default", "aten.mm.default",
                   "aten.add_.Tensor", "aten.relu.default"]  # fmt: skip
    spans = {r.id: (r.first, r.last) for r in plan.memory.requests}
    assert spans == {0: (0, 5), 1: (1, 4), 2: (4, 6), 3: (6, 6)}
    assert all(r.nbytes == 5 * 7 * 4 for r in plan.memory.requests)
    assert plan.persistent_bytes == x.nbytes + w.nbytes
    plan.memory.check()
    # buffers 0, 1 and 2 are all live at step 4 (the mm)
    assert plan.lower_bound_bytes == 3 * 256


def test_execute_matches_eager_and_stays_in_the_arena():
    x, w = torch.randn(5, 7), torch.randn(7, 7)
    plan = plan_program(chain, *meta_like(x, w))
    arena = allocate_arena(plan, "cpu")
    with Executor(plan, arena, record_ranges=True) as ex:
        got = chain(x, w)
    torch.testing.assert_close(got, chain(x, w), rtol=0, atol=0)
    start, end = arena.data_ptr(), arena.data_ptr() + arena.numel()
    produced = [(i, s, e) for i, op, s, e in ex.ranges if plan.steps[i].allocs]
    assert len(produced) == 4 and all(start <= s and e <= end for _, s, e in produced)
    assert start <= got.data_ptr() < end


def test_returned_tensors_live_to_the_end():
    def fn(x):
        y = x * 2
        z = x + 1
        return y, z.sum()

    plan = plan_program(fn, *meta_like(torch.randn(4)))
    last_step = len(plan.steps) - 1
    assert all(r.last == last_step for r in plan.memory.requests if r.id in (0, 2))


def test_plan_is_deterministic():
    x, w = meta_like(torch.randn(5, 7), torch.randn(7, 7))
    a, b = plan_program(chain, x, w), plan_program(chain, x, w)
    assert a.steps == b.steps and a.memory.offsets == b.memory.offsets


def execute(plan, arena, fn, *args):
    with Executor(plan, arena):
        return fn(*args)


def test_mismatch_names_the_step_and_both_ops():
    plan = plan_program(chain, *meta_like(torch.randn(5, 7), torch.randn(7, 7)))
    arena = allocate_arena(plan, "cpu")
    x, w, wrong = torch.randn(5, 7), torch.randn(7, 7), torch.randn(6, 7)
    with pytest.raises(PlanMismatch, match=r"step 0: planned aten\.add\.Tensor\(float32\[5, 7\]\).*executed "
                       r"aten\.add\.Tensor\(float32\[6, 7\]\)"):  # fmt: skip
        execute(plan, arena, chain, wrong, w)
    with pytest.raises(PlanMismatch, match=r"step 0: planned aten\.add\.Tensor.*executed aten\.sub\.Tensor"):
        execute(plan, arena, lambda: x - 1)
    with pytest.raises(PlanMismatch, match=r"step 1: the program ended early; planned aten\.mul\.Tensor"):
        execute(plan, arena, lambda: x + 1)
    with pytest.raises(PlanMismatch, match=r"step 7: the plan ended after 7 steps"):
        execute(plan, arena, lambda: chain(x, w).neg())


def test_dtype_change_is_a_mismatch():
    plan = plan_program(lambda x: x * 3, *meta_like(torch.randn(4)))
    x = torch.randn(4, dtype=torch.float64)
    with pytest.raises(PlanMismatch, match=r"planned aten\.mul\.Tensor\(float32\[4\]\).*float64\[4\]"):
        execute(plan, allocate_arena(plan, "cpu"), lambda: x * 3)


def test_unplannable_ops_raise_with_their_name():
    q = torch.empty(1, 2, 8, 16, device=META)
    no_out = aten._scaled_dot_product_flash_attention_for_cpu.default
    assert out_variant(no_out) is None
    with pytest.raises(UnplannableOp, match="_scaled_dot_product_flash_attention_for_cpu.*no out= variant"):
        plan_program(lambda: no_out(q, q, q))
    with pytest.raises(UnplannableOp, match="random"):
        plan_program(lambda: torch.randn(3, device=META))
    with pytest.raises(UnplannableOp, match="reads a tensor value on the host"):
        plan_program(lambda x: (x + 1).item(), torch.ones(1))


def test_out_variants_are_found_by_schema():
    assert out_variant(aten.add.Tensor).overload is aten.add.out
    assert out_variant(aten.mul.Scalar).overload is aten.mul.Scalar_out
    assert out_variant(aten._to_copy.default).overload is aten._to_copy.out
    assert out_variant(aten.native_layer_norm.default).outs == ("out0", "out1", "out2")
    assert out_variant(aten.sum.dim_IntList).overload is aten.sum.IntList_out


def test_multi_output_and_dtype_converting_ops_execute_through_out():
    def fn(x):
        y = F.layer_norm(x, (x.shape[-1],))
        return y.to(torch.float64) + x.sum(-1, keepdim=True)

    x = torch.randn(3, 5, 9)
    plan = plan_program(fn, *meta_like(x))
    with Executor(plan, allocate_arena(plan, "cpu")):
        got = fn(x)
    torch.testing.assert_close(got, fn(x), rtol=0, atol=0)


@pytest.mark.parametrize("b,lq,lk,h,d", [(1, 13, 7, 2, 16), (2, 113, 203, 3, 8)])
def test_reference_attention_runs_from_the_arena_and_matches_sdpa(b, lq, lk, h, d, monkeypatch):
    from helios_rt.ops import reference

    monkeypatch.setattr(reference, "ATTENTION_SCRATCH_BYTES", 4 * h * lk * 10)  # 10 query rows per chunk
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, generator=g) for n in (lq, lk, lk))
    attention = OpSet("cpu", "reference").attention
    plan = plan_program(attention, *meta_like(q, k, v))
    assert not any("scaled_dot_product" in s.op for s in plan.steps)
    with Executor(plan, allocate_arena(plan, "cpu")):
        got = attention(q, k, v)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_a_fused_kernel_traces_as_one_custom_op_that_writes_its_planned_output():
    pytest.importorskip("triton")
    from helios_rt.kernels import attention as kernels

    q = torch.empty(2, 11, 4, 16, device=META)
    plan = plan_program(kernels.attention, q, q, q)
    assert [s.op for s in plan.steps] == ["aten.empty.memory_format", "helios_rt.attention.default"]
    assert plan.memory.requests[0].nbytes == q.numel() * 4


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Sees the ops the Executor's handler calls (it runs outside the Executor, inside this mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("convert", [lambda t: t.to(torch.bfloat16), lambda t: t.clone(), lambda t: t.t().contiguous()])
def test_casts_and_clones_write_the_planned_buffer_directly(convert):
    """`_to_copy.out` and `clone.out` are codegen-generated (compute into a temporary, then copy): the Executor
    copies straight into the arena view instead, with the same result bit for bit."""
    x = torch.randn(7, 13)
    plan = plan_program(lambda t: convert(t) * 2, *meta_like(x))
    recorder = _Recorder()
    with recorder, Executor(plan, allocate_arena(plan, "cpu")):
        got = convert(x) * 2
    assert not [op for op in recorder.ops if op in ("aten._to_copy.out", "aten.clone.out")], recorder.ops
    assert "aten.copy_.default" in recorder.ops
    torch.testing.assert_close(got, convert(x) * 2, rtol=0, atol=0)
