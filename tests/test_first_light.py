"""First light (`python -m helios_rt.first_light`): the dry run end to end on CPU, the report's rules, and
the optional imports a bare GPU machine may lack (av, nvtx) failing only where used."""

from __future__ import annotations

import json
import math
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU profile")
def test_dry_run_writes_the_json_and_the_table(tmp_path, capsys) -> None:
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


def test_memory_flat_needs_two_chunks_after_the_first_and_fails_when_it_grows() -> None:
    from helios_rt.first_light.measure import replay_checks

    same = [torch.zeros(2)] * 3
    status = {n: replay_checks(same, same, allocated)[0][0].status for n, allocated in
              {"two": [5, 7], "flat": [5, 7, 7], "grows": [5, 7, 8]}.items()}  # fmt: skip
    assert status == {"two": SKIP, "flat": PASS, "grows": FAIL}
