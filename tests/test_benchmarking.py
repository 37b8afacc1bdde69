"""`helios_rt.benchmarking`: the measurement math, tables, the bench/profile commands' arguments,
and short CPU runs of the stream timer and of `helios-rt profile` on the demo model."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
from types import SimpleNamespace

import pytest
import torch
from support.untrained import untrained_engine

from helios_rt import EngineConfig, profiling
from helios_rt import benchmarking as hb
from helios_rt.config import TINY
from helios_rt.model.vae import VAEConfig


# ---- math ---------------------------------------------------------------------------------------------
def test_ratio() -> None:
    assert hb.ratio(1.0, 4.0) == 0.25
    assert math.isnan(hb.ratio(1.0, 0.0))


def test_chunk_rates() -> None:
    # requested at t=1; chunks of 33 frames at 3, 4, 5 s
    r = hb.chunk_rates([3.0, 4.0, 5.0], 33, start=1.0)
    assert r["ttff_s"] == pytest.approx(2.0)
    assert r["steady_chunk_s"] == pytest.approx(1.0)
    assert r["steady_fps"] == pytest.approx(33.0)
    assert r["e2e_fps"] == pytest.approx(99 / 4.0)
    one = hb.chunk_rates([0.5], 33)
    assert one["ttff_s"] == 0.5 and math.isnan(one["steady_fps"]) and one["e2e_fps"] == pytest.approx(66.0)
    with pytest.raises(ValueError, match="at least one"):
        hb.chunk_rates([], 33)
    with pytest.raises(ValueError, match="must not decrease"):
        hb.chunk_rates([2.0, 1.0], 33)
    with pytest.raises(ValueError, match="must not decrease"):
        hb.chunk_rates([0.5], 33, start=1.0)


def test_summarize_ms_drops_the_first_chunk() -> None:
    s = hb.summarize_ms({"stage 0": [100.0, 2.0, 4.0], "decode": [5.0]})
    assert s == {"stage 0": 3.0, "decode": 5.0}
    assert hb.summarize_ms({"x": [1.0, 3.0]}, skip_first=False) == {"x": 2.0}


def test_op_counter_counts_new_storages_only() -> None:
    x = torch.randn(4, 4)
    with hb.OpCounter() as c:
        y = x + 1  # allocates
        y.add_(1)  # in place
        v = y.view(16)  # view
        torch.add(x, 1, out=y)  # out=
        v.sum()  # allocates
    assert c.ops == 5
    assert c.allocations == 2
    assert c.allocated_bytes == 16 * 4 + 4


def test_rss_readings() -> None:
    assert hb.rss_bytes() > 0
    hb.reset_peak_rss()
    assert hb.peak_rss_bytes() >= hb.rss_bytes() * 0.9
    assert hb.cpu_seconds() > 0


# ---- tables -------------------------------------------------------------------------------------------
def test_format_value() -> None:
    assert hb.format_value(None) == "-"
    assert hb.format_value(float("nan")) == "-"
    assert hb.format_value(12345) == "12,345"
    assert hb.format_value(1234.6) == "1,235"
    assert hb.format_value(123.45) == "123.5"
    assert hb.format_value(12.345) == "12.35"
    assert hb.format_value(1.2345) == "1.23"
    assert hb.format_value(0.012345) == "0.0123"
    assert hb.format_value(0.0) == "0"
    assert hb.format_value(True) == "yes"
    assert hb.format_value("abc") == "abc"


def test_format_table_aligns_columns() -> None:
    text = hb.format_table(("name", "value"), [("a", 1.5), ("longer name", 12345)], title="T")
    lines = text.splitlines()
    assert lines[0] == "T"
    assert lines[1].startswith("name") and lines[1].endswith("value")
    assert set(lines[2].replace(" ", "")) == {"-"}
    assert lines[3].startswith("a ") and lines[3].endswith("1.5")
    assert lines[4] == "longer name  12,345"
    assert len({len(line) for line in lines[1:]}) == 1  # right-aligned to one width
    with pytest.raises(ValueError, match="columns"):
        hb.format_table(("a", "b"), [(1,)])


def test_rows_table_and_json() -> None:
    rows = [hb.Row("cpu", "seconds / chunk", 0.5, 1.0, "s"), hb.Row("projection", "FPS", 20.0, None, "frames/s")]
    assert rows[0].ratio == 0.5 and rows[1].ratio is None
    text = hb.format_rows(rows)
    assert "seconds / chunk" in text and "0.5" in text and "frames/s" in text
    data = json.loads(hb.rows_json(rows))
    assert data[0] == {
        "suite": "cpu",
        "metric": "seconds / chunk",
        "helios_rt": 0.5,
        "reference": 1.0,
        "unit": "s",
        "ratio": 0.5,
    }


def test_side_by_side_result_rows_and_extra_info() -> None:
    ours = hb.SideMeasure(1.0, 2.0, 0.4, 10.0, 100, 50, 3.0)
    theirs = hb.SideMeasure(2.0, 4.0, 1.0, 20.0, 400, 100, 6.0)
    r = hb.SideBySideResult(ours, theirs, 3, 1e-6, 2, "cfg")
    assert r.speedup == 2.0 and r.cpu_speedup == 2.0
    assert ours.decode_share == pytest.approx(0.4)
    info = r.extra_info()
    assert info["ratio_ops"] == 0.25 and info["ratio_allocations"] == 0.5 and info["helios_rt_seconds"] == 1.0
    assert any(row.metric.startswith("aten ops") and row.ratio == 0.25 for row in r.rows())


# ---- arguments ----------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helios-rt")
    sub = parser.add_subparsers(dest="command", required=True)
    hb.add_bench_parser(sub)
    hb.add_profile_parser(sub)
    return parser


def test_bench_arguments() -> None:
    args = _parser().parse_args(["bench"])
    assert (args.suite, args.json, args.chunks, args.rounds) == ("auto", False, 3, 2)
    args = _parser().parse_args(["bench", "--suite", "projection", "--json", "--chunks", "4"])
    assert (args.suite, args.json, args.chunks) == ("projection", True, 4)
    for bad in (["bench", "--suite", "tpu"], ["bench", "--chunks", "1"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(bad)


def test_suites_for() -> None:
    assert hb.suites_for("auto", cuda=False) == ["projection", "cpu"]
    assert hb.suites_for("auto", cuda=True) == ["projection", "gpu"]
    assert hb.suites_for("projection", cuda=True) == ["projection"]
    assert hb.suites_for("cpu", cuda=True) == ["projection", "cpu"]
    with pytest.raises(ValueError, match="CUDA"):
        hb.suites_for("gpu", cuda=False)


def test_run_bench_gpu_without_cuda_is_an_error(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert hb.run_bench(_parser().parse_args(["bench", "--suite", "gpu"])) == 2
    assert "CUDA" in capsys.readouterr().err


def test_run_bench_prints_one_table_or_json(monkeypatch, capsys) -> None:
    rows = [hb.Row("projection", "FPS H100", 41.7, None, "frames/s")]
    monkeypatch.setattr(hb.commands, "projection_rows", lambda: (rows, "full tables"))
    assert hb.run_bench(_parser().parse_args(["bench", "--suite", "projection"])) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "helios-rt bench" and "FPS H100" in out and "41.7" in out
    assert "full tables" not in out
    assert hb.run_bench(_parser().parse_args(["bench", "--suite", "projection", "--json", "--verbose"])) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == [{**dataclasses.asdict(rows[0]), "ratio": None}]


def test_engine_option_argument() -> None:
    args = _parser().parse_args(["bench", "--engine-option", "kernels=reference"])
    assert args.engine_option == [("kernels", "reference")]
    with pytest.raises(SystemExit):
        _parser().parse_args(["bench", "--engine-option", "no_such_field=1"])


def test_profile_arguments_and_nsys_line() -> None:
    args = _parser().parse_args(["profile", "--model", "demo", "--steps", "2,2,2", "--height", "64", "--graphs", "off"])
    assert (args.model, args.steps, args.height, args.width, args.chunks, args.warmup_chunks) == (
        "demo", (2, 2, 2), 64, None, 2, 1
    )  # fmt: skip
    argv = hb.profile_argv(args)
    assert argv[:3] == ["profile", "--model", "demo"] and "--steps" in argv and "2,2,2" in argv
    assert argv[argv.index("--graphs") + 1] == "off"
    assert "--width" not in argv
    again = _parser().parse_args(argv)  # the printed command reproduces the run
    assert hb.profile_argv(again) == argv
    out = io.StringIO()
    args = _parser().parse_args(["profile", "--model", "demo", "--print-only", "--output", "rep"])
    assert hb.run_profile(args, out=out) == 0
    text = out.getvalue()
    assert "nsys profile" in text and f"--nvtx-capture={profiling.CAPTURE_RANGE}@{profiling.DOMAIN}" in text
    assert "-o rep" in text and "helios-rt profile --model demo" in text
    with pytest.raises(SystemExit):
        _parser().parse_args(["profile"])  # --model is required


# ---- short runs on CPU ------------------------------------------------------------------------------------
def test_profile_runs_the_demo_with_ranges(monkeypatch) -> None:
    entered: list[str] = []
    real = hb.commands.nvtx_range

    class Spy(real):
        def __enter__(self):
            entered.append(self.name)
            assert profiling._enabled, "ranges must be switched on during the run"
            return super().__enter__()

    monkeypatch.setattr(hb.commands, "nvtx_range", Spy)
    before = profiling._enabled
    args = _parser().parse_args(
        ["profile", "--model", "demo", "--height", "64", "--width", "64", "--device", "cpu", "--chunks", "1"]
    )
    out = io.StringIO()
    assert hb.run_profile(args, out=out) == 0
    assert profiling._enabled == before
    assert entered == ["load", profiling.CAPTURE_RANGE]
    text = out.getvalue()
    assert "warm-up" in text and "recorded" in text and "nsys profile" in text


def test_measure_stream_on_the_demo_model(make_tiny_engine) -> None:
    engine = make_tiny_engine()
    result = hb.measure_stream(engine, chunks=2, label="demo")
    assert result.frames_per_chunk == 33 and result.chunks == 2
    assert result.ttff_s > 0 and result.steady_fps > 0 and result.e2e_fps > 0
    assert set(result.stage_ms) == {"stage 0", "stage 1", "stage 2", "transition 1", "transition 2", "decode"}
    assert all(v > 0 for v in result.stage_ms.values())
    assert math.isnan(result.peak_memory_gb)  # CPU: no CUDA memory statistics
    assert engine.sampler.section_hook is None  # the timer let go of the engine
    assert any("steady-state FPS" in row.metric for row in result.rows())
    assert result.extra_info()["ms_stage_0"] > 0
    assert set(result.lane_ms) == {"transformer", "decode"} and all(v > 0 for v in result.lane_ms.values())


def test_stage_timer_refuses_an_engine_that_replays_chunk_graphs() -> None:
    """A replayed graph runs no Python: a section hook would time nothing (or the capture)."""
    graphed = SimpleNamespace(chunk_program=SimpleNamespace(cuda_graph=True))
    with pytest.raises(ValueError, match="graphs='off'"):
        hb.StageTimer(graphed)


def test_stream_result_rows_follow_the_kind_of_run() -> None:
    base = dict(label="x", device="cuda", resolution="64x64", chunks=3, frames_per_chunk=33, ttff_s=1.5,
                steady_fps=20.0, e2e_fps=15.0, steady_chunk_s=1.65)  # fmt: skip
    cold = hb.StreamResult(**base, kind="cold").rows()
    assert len(cold) == 1 and "cold" in cold[0].metric and cold[0].helios_rt == 1.5
    stages = hb.StreamResult(**base, kind="stages", stage_ms={"stage 0": 3.0}).rows()
    assert [r.metric for r in stages] == ["x 64x64, eager + no overlap: seconds / chunk",
                                          "x 64x64, eager + no overlap: stage 0"]  # fmt: skip
    warm = hb.StreamResult(**base, lane_ms={"transformer": 1200.0, "decode": 300.0}).rows()
    metrics = [r.metric for r in warm]
    assert "x 64x64: steady-state FPS" in metrics and "x 64x64: decode ms / chunk" in metrics


@pytest.mark.slow  # a cold, a warm and a staged run: ~13 s
def test_random_engine_builds_on_meta_and_generates(tiny_config) -> None:
    vae = VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    engine = hb.random_engine(TINY, tiny_config(), vae)
    assert all(not p.is_meta for p in engine.transformer.parameters())
    assert all(torch.isfinite(p).all() for p in engine.transformer.parameters())
    embeds = torch.randn(1, 8, TINY.text_dim)
    engines = [("tiny random", lambda: engine, {"prompt_embeds": embeds})]
    runs = hb.run_gpu_suite(chunks=2, engines=engines, warmup=False)
    # a CPU engine replays no graphs: a cold and a warm stream, the warm one timed stage by stage
    assert [r.kind for r in runs] == ["cold", "warm"] and all(r.label == "tiny random" for r in runs)
    assert runs[1].load_s >= 0 and runs[1].steady_fps > 0 and runs[1].stage_ms and not runs[0].stage_ms


# ---- CUDA (skipped without it) ------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_gpu_memory_is_constant_across_50_chunks() -> None:
    """A stream never grows: after the first chunks, allocated memory is the same at every chunk."""
    engine = untrained_engine(EngineConfig(height=64, width=64, device="cuda"))
    allocated, peaks = [], []
    with engine.generate_stream("a fish", num_frames=None, seed=0) as stream:
        for k, _ in enumerate(stream):
            torch.cuda.synchronize()
            allocated.append(torch.cuda.memory_allocated())
            peaks.append(torch.cuda.max_memory_allocated())
            if k == 49:
                break
    steady = allocated[3:]
    assert max(steady) == min(steady), f"allocated memory moves across chunks: {sorted(set(steady))}"
    assert peaks[-1] == peaks[3], f"peak memory grows after chunk 3: {peaks[3]} -> {peaks[-1]}"


@pytest.mark.gpu
@cuda
def test_gpu_stream_timings_use_cuda_events() -> None:
    vae = VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    engine = hb.random_engine(TINY, EngineConfig(height=64, width=64, device="cuda"), vae)
    assert all(p.device.type == "cuda" for p in engine.transformer.parameters())
    assert {p.dtype for p in engine.transformer.parameters()} <= {torch.bfloat16, torch.float32}
    with pytest.raises(ValueError, match="graphs='off'"):
        hb.StageTimer(engine)  # it replays chunk graphs
    embeds = torch.randn(1, 8, TINY.text_dim)
    factory = lambda **overrides: (
        engine
        if not overrides
        else hb.random_engine(  # noqa: E731
            TINY, EngineConfig(height=64, width=64, device="cuda", **overrides), vae
        )
    )
    runs = hb.run_gpu_suite(chunks=3, engines=[("tiny", factory, {"prompt_embeds": embeds})])
    assert [r.kind for r in runs] == ["cold", "warm", "stages"]  # the default CUDA engine replays chunk graphs
    warm, staged = runs[1], runs[2]
    assert warm.device.startswith("cuda") and warm.peak_memory_gb > 0
    assert warm.ttff_s > 0 and warm.steady_fps > 0 and set(warm.lane_ms) == {"transformer", "decode"}
    assert {"stage 0", "stage 1", "stage 2", "decode"} <= set(staged.stage_ms)
    assert all(ms > 0 for ms in staged.stage_ms.values())
