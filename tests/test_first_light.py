"""First light (`python -m helios_rt.first_light`): the dry run end to end on CPU, the report's rules, and
the optional imports a bare GPU machine may lack (av, nvtx) failing only where used."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from helios_rt.first_light import main
from helios_rt.first_light.checks import behaviour_checks, junit_cases, suite_check
from helios_rt.first_light.report import FAIL, PASS, SKIP, Check, Figure, Report
from helios_rt.optional import MissingDependencyError

FIGURES = (
    "time to first frame, cold", "time to first frame, warm", "steady FPS, end to end", "end-to-end FPS over",
    "transformer ms per chunk", "VAE decode ms per chunk", "stage 0 ms", "stage 1 ms", "stage 2 ms",
    "attention TFLOP/s, stage 2", "largest GEMM TFLOP/s, stage 2", "peak memory", "graph replay vs eager",
)  # fmt: skip
POSITIVE = FIGURES[:-2]  # measured on a CPU too (peak memory is CUDA's; the replay difference may be 0)
FP8_FIGURES = ("FP8 _scaled_mm TFLOP/s", "FP8 _scaled_mm worst error", "FP8 steady FPS", "FP8 gate: latent drift")


@pytest.mark.slow  # the whole dry run, `pytest -m gpu` included: ~30 s on two quiet cores, 100 s on busy ones
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU profile")
def test_dry_run_writes_the_json_and_the_table(tmp_path, capsys) -> None:
    from helios_rt.first_light.fp8 import fp8_unsupported
    from helios_rt.first_light.profile import dry_run_profile

    assert main([str(tmp_path), "--dry-run"]) == 0
    report = json.loads((tmp_path / "first_light.json").read_text())
    table = (tmp_path / "first_light.md").read_text()
    assert report["profile"] == "dry-run" and report["ok"] is True
    figures = {f["name"]: f for f in report["figures"]}
    for prefix in FIGURES:
        named = [f for name, f in figures.items() if name.startswith(prefix)]
        assert len(named) == 1, f"figure {prefix!r}: {sorted(figures)}"
        if prefix in POSITIVE:
            assert named[0]["measured"] > 0 and math.isfinite(named[0]["measured"]), named[0]
        assert f"| {named[0]['name']} |" in table
    for f in figures.values():  # the ratio is measured / projected wherever both exist
        both = f["projected"] is not None and math.isfinite(f["measured"])
        assert f["ratio"] == (pytest.approx(f["measured"] / f["projected"]) if both else None), f
    assert figures[next(n for n in figures if n.startswith("graph replay"))]["measured"] == 0.0
    checks = {c["name"]: c["status"] for c in report["checks"]}
    assert checks["pytest -m gpu"] == SKIP  # every gpu test ran through pytest and skipped without CUDA
    assert [s for n, s in checks.items() if n.startswith("head dim 128")] == [PASS]
    assert FAIL not in checks.values()
    assert (tmp_path / "pytest-gpu.xml").is_file()
    fp8_checks = [n for n in checks if n.startswith("FP8 ")]
    why = fp8_unsupported(dry_run_profile())
    if why is not None:  # this torch's CPU _scaled_mm cannot run FP8Linear's product: SKIP rows that say why
        assert fp8_checks and {checks[n] for n in fp8_checks} == {SKIP} and why[:40] in table
    else:
        for op in ("fp8_quantize_rows", "gelu_tanh_fp8", "modulate_layernorm_fp8", "_scaled_mm"):
            assert [checks[n] for n in fp8_checks if op in n] == [PASS], (op, fp8_checks)
        for prefix in FP8_FIGURES:
            for flag in ("use_fast_accum=False", "use_fast_accum=True"):
                assert any(n.startswith(prefix) and flag in n and f"| {n} |" in table for n in figures), prefix
    out = capsys.readouterr().out
    assert "| FP8 " in out and "| GPU phase (estimate, one H100) |" in out and "| pytest runs" in out
    estimate = re.search(r"GPU run estimate: (\d+) s of 480 s", out)
    assert estimate is not None and int(estimate.group(1)) < 480, out[-2000:]
    assert report["gpu_estimate"][-1] in out


def test_a_failed_check_fails_the_run_and_a_timing_never_does() -> None:
    slow = Figure("steady FPS", 0.1, "frames/s", projected=20.0)
    report = Report("gpu", {}, [Check("a", PASS), Check("b", SKIP)], [slow])
    assert report.ok and slow.ratio == pytest.approx(0.005)
    report.checks.append(Check("c", FAIL, "broken"))
    assert not report.ok and "CHECKS FAILED" in report.markdown()


def test_on_a_gpu_a_skipped_gpu_test_is_a_failure(tmp_path) -> None:
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="t" name="test_memory_is_constant_over_50_chunks">'
        '<skipped message="needs a CUDA device"/></testcase><testcase classname="t" name="test_x"/>'
        '<testcase classname="t" name="test_y"><failure message="boom"/></testcase></testsuite></testsuites>'
    )
    cases = junit_cases(xml)
    assert cases == {"t::test_memory_is_constant_over_50_chunks": SKIP, "t::test_x": PASS, "t::test_y": FAIL}
    assert suite_check("s", cases, 1, "", skips_fail=False).status == FAIL  # a failed test always fails
    skipped_only = {k: v for k, v in cases.items() if v != FAIL}
    assert suite_check("s", skipped_only, 0, "", skips_fail=False).status == SKIP
    assert suite_check("s", skipped_only, 0, "", skips_fail=True).status == FAIL
    assert suite_check("s", {}, 5, "no tests ran", skips_fail=False).status == FAIL
    memory = {c.name: c for c in behaviour_checks(skipped_only, skips_fail=True)}["memory flat over 50 chunks"]
    assert memory.status == FAIL and "skipped" in memory.detail


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_run_without_cuda_is_refused(tmp_path, capsys) -> None:
    assert main([str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err


BLOCKED = "import sys; sys.modules['av'] = None; sys.modules['nvtx'] = None\n"


def test_the_engine_imports_and_runs_ranges_without_av_and_nvtx() -> None:
    code = BLOCKED + (
        "import helios_rt.engine, helios_rt.cli, helios_rt.video, helios_rt.benchmarking, helios_rt.first_light\n"
        "from helios_rt import profiling\n"
        "profiling.set_enabled(True)\n"
        "with profiling.nvtx_range('x'): pass\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("use", ["writer", "reader", "encoder"])
def test_video_files_without_av_name_the_install_command(use: str, tmp_path, monkeypatch) -> None:
    from helios_rt.fmp4 import encode_batch
    from helios_rt.video import Mp4Writer, VideoFile

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    calls = {
        "writer": lambda: Mp4Writer(tmp_path / "a.mp4"),
        "reader": lambda: VideoFile(tmp_path / "missing.mp4"),
        "encoder": lambda: encode_batch(torch.zeros(1, 8, 8, 3, dtype=torch.uint8).numpy(), 24, 18),
    }
    with pytest.raises(MissingDependencyError, match=r"pip install av"):
        calls[use]()
    assert not (tmp_path / "a.mp4").exists()  # refused before the file is created


def test_memory_flat_compares_the_steady_chunks_exactly() -> None:
    """A simulated stream's allocated bytes at each handover: chunk 0 warms up, and the last chunk is handed
    over with no successor launched (one 0-dim flag, 512 B, fewer alive), so chunks 1..n-2 are compared."""
    from helios_rt.first_light.measure import replay_checks

    same = [torch.zeros(2)] * 3
    base, leak = 10_000_000, 512
    series = {
        "three": [5, base, base],  # one steady chunk: nothing to compare
        "flat": [5, base, base, base, base],
        "last lower by one flag": [5, base, base, base, base - 512],
        "leaks 512 B a chunk": [5, *(base + i * leak for i in range(4))],
        "steps once": [5, base, base + 512, base + 512, base + 512],
    }
    status = {n: replay_checks(same, same, allocated)[0][0].status for n, allocated in series.items()}
    assert status == {"three": SKIP, "flat": PASS, "last lower by one flag": PASS, "leaks 512 B a chunk": FAIL,
                      "steps once": FAIL}  # fmt: skip


CUDA_ON = {"cpu": False, "cuda": True}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("kernels", ["auto", "reference", "triton"])
@pytest.mark.parametrize("attention", ["fa3", "fa2", "triton", "sdpa", "reference"])
def test_projection_prices_the_op_table_and_the_attention_backend_the_engine_selected(
    device: str, kernels: str, attention: str, monkeypatch
) -> None:
    from helios_rt.compile.cost import H100_SXM
    from helios_rt.compile.cost.attention_rates import H100_ATTENTION
    from helios_rt.config import EngineConfig
    from helios_rt.first_light.measure import projection_inputs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: CUDA_ON[device])
    inputs = projection_inputs(EngineConfig(device="auto", kernels=kernels), attention)
    op_table = "triton" if kernels == "triton" or (kernels == "auto" and device == "cuda") else "reference"
    assert (inputs.op_table, inputs.attention, inputs.fused) == (op_table, attention, op_table == "triton")
    assert inputs.efficiency.attention == pytest.approx(H100_ATTENTION[attention].tflops / H100_SXM.bf16_tflops)
    assert inputs.efficiency.attention_label.startswith(f"{attention}:")


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_the_op_table_rule_is_the_one_the_engine_runs(kernels: str) -> None:
    from helios_rt.config import EngineConfig
    from helios_rt.first_light.measure import projection_inputs
    from helios_rt.ops import OpSet

    config = EngineConfig(device="cpu", kernels=kernels)  # conftest runs Triton on the interpreter here
    assert projection_inputs(config, "reference").op_table == OpSet("cpu", kernels).backend_of("modulate_layernorm")
    assert projection_inputs(EngineConfig(device="cpu"), "reference").op_table == OpSet("cpu").backend_of("rmsnorm")


def test_the_memory_figure_plans_the_op_table_and_the_attention_backend_apart(monkeypatch) -> None:
    from types import SimpleNamespace

    from helios_rt.compile.cost import Efficiency
    from helios_rt.first_light import measure
    from helios_rt.first_light.profile import dry_run_profile

    seen = {}
    monkeypatch.setattr(measure, "plan_engine", lambda *a, **kw: seen.update(kw) or SimpleNamespace(total_bytes=1e9))
    inputs = measure.ProjectionInputs("triton", "fa3", True, Efficiency())
    figure = measure.memory_figure(dry_run_profile(), inputs, 1.5, precision="fp8")
    assert (seen["kernels"], seen["attention"], seen["precision"]) == ("triton", "fa3", "fp8")
    assert figure.projected == 1.0 and figure.name.startswith("FP8 peak memory")


@pytest.mark.parametrize("overlap", [True, False])
def test_steady_fps_projects_both_lanes_sharing_the_gpu(overlap: bool) -> None:
    from types import SimpleNamespace

    from helios_rt.first_light.measure import stream_figures
    from helios_rt.first_light.profile import dry_run_profile

    proj = SimpleNamespace(seconds=0.8, vae_seconds=0.2, total=lambda **kw: 0.01)
    warm = SimpleNamespace(frames_per_chunk=33, chunks=4, ttff_s=2.0, steady_fps=30.0, e2e_fps=25.0, lane_ms={})
    stages = SimpleNamespace(stage_ms={}, chunks=4)
    figures = stream_figures(dry_run_profile(), proj, SimpleNamespace(seconds=1.6), warm, warm, stages, overlap)
    steady = next(f for f in figures if f.name.startswith("steady FPS"))
    assert steady.projected == pytest.approx(33 / (0.8 + 0.2))  # not 33 / max(0.8, 0.2) with overlap


def test_fp8_rows_are_skipped_with_the_engines_refusal_and_drift_is_relative() -> None:
    """Where FP8 cannot run, its rows are skips carrying the engine's own reason; the drift figure is the
    latents' relative distance (zero for equal latents, one for latents against zeros)."""
    from helios_rt.first_light.fp8 import latent_drift, skipped_rows
    from helios_rt.first_light.report import SKIP

    checks, figures = skipped_rows("no FP8 here")
    assert figures == [] and len(checks) == 3 and all(c.status == SKIP and c.detail == "no FP8 here" for c in checks)
    x = [torch.ones(1, 3), torch.full((2, 3), 2.0)]
    assert latent_drift(x, x) == 0.0
    assert latent_drift([torch.zeros(1, 3), torch.zeros(2, 3)], x) == pytest.approx(1.0)
