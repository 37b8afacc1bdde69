"""The `python -m` entry points and the serve measurement script run: each answers --help, and the
measurement prints one row per frame format for a demo chunk."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["helios_rt", "helios_rt.benchmarking", "helios_rt.first_light"])
def test_each_python_m_entry_point_answers_help(module, tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:200]


def test_serve_measure_prints_each_format_for_a_demo_chunk(capsys) -> None:
    from helios_rt.serve import measure

    measure.main(["--chunks", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("chunk 0")]
    assert len(rows) == 3, rows
    assert all(" B  (" in row and "encode" in row for row in rows), rows
