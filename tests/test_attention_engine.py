"""The engine picks its attention backend at load, reports it, and refuses an impossible EngineConfig.attention;
with attention="auto" on CUDA its warm-up times every backend that runs at the chunk's own shapes."""

import pytest
import torch
from support.untrained import untrained_engine

from helios_rt.config import EngineConfig
from helios_rt.ops import OpSet
from helios_rt.ops import attention_backends as AB
from helios_rt.ops import attention_tuning as AT
from helios_rt.ops import reference as R


def test_engine_config_rejects_an_unknown_attention():
    with pytest.raises(ValueError, match="EngineConfig.attention='flash'"):
        EngineConfig(attention="flash")


def test_the_engine_reports_its_attention_and_refuses_an_impossible_one(tiny_config):
    cfg = tiny_config(attention="sdpa")
    engine = untrained_engine(cfg)
    assert engine.attention.backend == "sdpa" and engine.sampler.ops.backend_of("attention") == "sdpa"
    assert engine.attention.describe().startswith("attention: sdpa (float32, head dim")
    engine.close()
    with pytest.raises(ValueError, match="attention='fa2' cannot run here: needs a CUDA device"):
        untrained_engine(cfg.replace(attention="fa2"))


# ---- the warm-up's timing of attention="auto" (fake backends and a fake timer on a CPU) -------------------
ALL = frozenset({"flash_attn_interface", "flash_attn", "triton", AB.CUDNN})
H100 = AB.AttentionEnv("cuda", (9, 0), ALL, True, "H100 (simulated)")
BF16 = torch.bfloat16
SELF = ((2, 40, 2, 128), (2, 40, 2, 128), BF16)  # a stage's self-attention, CFG batch 2
CROSS = ((2, 24, 2, 128), (2, 16, 2, 128), BF16)  # its cross-attention to the prompt
SHAPES = {SELF: 12, CROSS: 6}  # calls per chunk


def _writes_reference(q, k, v, out=None):
    return out.copy_(R.attention(q.float(), k.float(), v.float()).to(out.dtype))


class FakeTimer:
    """ms per call by (backend, q length); records each trial. A backend in `raises` fails at that q length."""

    def __init__(self, ms: dict[str, tuple[float, float]], raises: dict[str, int] | None = None):
        self.ms, self.raises, self.trials = ms, raises or {}, []

    def __call__(self, name, call):
        length = call.args[0].shape[1]
        self.trials.append((name, length))
        if self.raises.get(name) == length:
            raise RuntimeError(f"{name} has no kernel for this shape")
        call()  # the backend really writes the trial's out
        return self.ms[name][0 if length == SELF[0][1] else 1]


def _dispatch(choice="auto", env=H100, probe=None):
    return AB.AttentionDispatch(choice, env, torch.device("cpu"), probe)


def test_the_tuner_keeps_the_backend_fastest_over_the_chunks_calls_and_reports_the_times():
    # per call at (self, cross): FA3 is fastest on the cross-attention shape, cuDNN over the whole chunk
    timer = FakeTimer({"fa3": (2.0, 0.5), "triton": (1.5, 3.0), "cudnn": (1.0, 2.0), "fa2": (3.0, 3.0),
                       "sdpa": (4.0, 4.0)})  # fmt: skip
    dispatch = _dispatch()
    tuning = AT.tune_attention(dispatch, SHAPES, timer, lambda name: _writes_reference)
    sel = tuning.selections[(BF16, 128)]
    assert tuning.changed and sel.backend == "cudnn" and dispatch.selections[(BF16, 128)] is sel
    assert sel.timings == (("cudnn", 24.0), ("fa3", 27.0), ("triton", 36.0), ("fa2", 54.0), ("sdpa", 72.0))
    assert sorted(timer.trials) == sorted((n, length) for n in AB.AUTO_ORDER for length in (40, 24))
    line = sel.describe()
    assert line.startswith("attention: cudnn (bfloat16, head dim 128; requested auto, fastest in warm-up")
    assert "18 calls at 2 shapes" in line and "cudnn 24.000 ms, fa3 27.000 ms" in line


def test_a_backend_failing_its_trial_or_the_probe_is_passed_over_with_the_reason():
    timer = FakeTimer({"fa3": (0.5, 0.5), "triton": (1.0, 1.0), "cudnn": (2.0, 2.0), "fa2": (3.0, 3.0),
                       "sdpa": (4.0, 4.0)}, raises={"fa3": 24})  # fmt: skip

    def probe(name, dtype, head_dim):
        return "failed a trial call (RuntimeError: no kernel image)" if name == "triton" else None

    sel = AT.tune_attention(_dispatch(probe=probe), SHAPES, timer, lambda name: _writes_reference).selections[
        (BF16, 128)
    ]
    passed = dict(sel.passed_over)
    assert sel.backend == "cudnn" and [name for name, _ in sel.timings] == ["cudnn", "fa2", "sdpa"]
    assert passed["fa3"] == (
        "failed its trial at q [2, 24, 2, 128] x k [16] bfloat16 (RuntimeError: fa3 has no kernel for this shape)"
    )
    assert "no kernel image" in passed["triton"] and ("triton", 40) not in timer.trials
    assert "fa3: failed its trial" in sel.describe()


def test_the_tuner_refuses_to_run_inside_a_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    timer = FakeTimer({})
    with pytest.raises(RuntimeError, match="cannot run while a CUDA graph is being captured"):
        AT.tune_attention(_dispatch(), SHAPES, timer, lambda name: _writes_reference)
    assert timer.trials == []


def test_the_tuner_leaves_explicit_choices_non_cuda_tables_and_timed_selections_alone():
    timer = FakeTimer({name: (1.0, 1.0) for name in AB.AUTO_ORDER})
    cpu = AB.AttentionEnv("cpu", None, frozenset({"triton"}), True, "cpu")
    for dispatch in (_dispatch("sdpa"), _dispatch(env=cpu), OpSet("cpu").attention):
        assert AT.tune_attention(dispatch, SHAPES, timer, lambda name: _writes_reference) == AT.Tuning()
    assert timer.trials == []
    dispatch = _dispatch()
    assert AT.tune_attention(dispatch, SHAPES, timer, lambda name: _writes_reference).changed
    trials = len(timer.trials)
    assert AT.tune_attention(dispatch, SHAPES, timer, lambda name: _writes_reference) == AT.Tuning()
    assert len(timer.trials) == trials  # timed once: a later warm-up keeps the choice its graphs hold


def test_the_tuner_times_the_shapes_the_engines_planned_chunk_makes(tiny_config):
    """The demo chunk's plans (graphs="chunk" on a CPU) hold every attention call with its shapes: the
    self-attention of each pyramid stage and the cross-attention to the 512-token prompt."""
    cfg = tiny_config(attention="sdpa", graphs="chunk")
    engine = untrained_engine(cfg)
    engine.warmup()
    dispatch = engine.transformer.ops.attention
    heads, dim = engine.transformer.config.num_attention_heads, engine.transformer.config.attention_head_dim
    stages = engine.spec.schedule.stages
    shapes = AT.plan_shapes(engine.chunk_program.plans.values())
    steps = [s for p in engine.chunk_program.plans.values() for s in p.steps if "attention_sdpa" in s.op]
    engine.close()
    assert len(shapes) == 2 * stages and {s[2] for s in shapes} == {torch.float32}
    assert all(q[0] == 1 and q[2:] == (heads, dim) and k[2:] == (heads, dim) for q, k, _ in shapes)
    assert sum(1 for _, k, _ in shapes if k[1] == 512) == stages  # one cross-attention shape per stage
    assert sum(shapes.values()) == len(steps) > 0  # every planned call, counted
    dispatch.choice, dispatch.env = "auto", H100
    seen = []

    def trial(name, call):
        seen.append((name, tuple(call.args[0].shape), tuple(call.args[1].shape)))
        return 1.0

    sel = AT.tune_attention(dispatch, shapes, trial, lambda name: _writes_reference).selections[(torch.float32, dim)]
    assert sel.backend == "sdpa" and sel.timings == (("sdpa", float(sum(shapes.values()))),)  # 1 ms x each call
    assert sorted(s[1:] for s in seen) == sorted((q, k) for q, k, _ in shapes)  # float32: only SDPA runs


@pytest.mark.slow  # plans, tunes and re-plans: ~11 s
def test_the_engine_tunes_attention_at_warmup_before_capturing_and_adopts_the_result(tiny_config, monkeypatch):
    """`Engine.warmup()` hands the tuner the planned kinds' attention shapes before `capture`, and when the
    tuner changes the backend the plans (which name the old op) are dropped and the engine reports the new pick."""
    import helios_rt.engine as engine_module

    cfg = tiny_config(graphs="chunk", attention="sdpa")  # one op per call
    engine = untrained_engine(cfg)
    program, calls = engine.chunk_program, []
    picked = AB.AttentionSelection("sdpa", "auto", engine.attention.dtype, engine.attention.head_dim)

    def tune(attention, shapes):
        calls.append(("tune", dict(shapes), len(program.plans)))
        return AT.Tuning({(picked.dtype, picked.head_dim): picked}, changed=True)

    capture = program.capture
    monkeypatch.setattr(engine_module, "tune_attention", tune)
    monkeypatch.setattr(program, "capture", lambda kinds, **kw: (calls.append(("capture", len(program.plans))),
                                                                 capture(kinds, **kw))[1])  # fmt: skip
    engine.warmup()
    assert [c[0] for c in calls] == ["tune", "capture"]
    assert calls[0][1] and calls[0][2] > 0  # the shapes came from plans made before the tuning
    assert calls[1][1] == 0  # a changed backend drops the plans: capture re-plans with the new op
    assert engine.attention is picked
    engine.close()
