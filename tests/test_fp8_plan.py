"""`helios-rt plan --precision fp8`: the FP8 engine's weights and its planned chunk."""

from __future__ import annotations

import json

import torch

from helios_rt.cli import main
from helios_rt.compile.report import weights_bytes
from helios_rt.config import HELIOS_14B, TINY


def _saved_per_block(d: int, ffn: int) -> int:
    """bf16 -> e4m3 + float32 scales: 8 attention linears [d, d], FFN up [ffn, d] and down [d, ffn]."""
    return 8 * (d * d - 4 * d) + 2 * ffn * d - 4 * (ffn + d)


def test_fp8_weights_of_the_14b_model_from_its_shapes() -> None:
    c = HELIOS_14B
    native, fp8 = weights_bytes(c, torch.bfloat16), weights_bytes(c, torch.bfloat16, "fp8")
    assert native - fp8 == c.num_layers * _saved_per_block(c.dim, c.ffn_dim)
    assert fp8 < 14.7e9 < 28.6e9 < native  # the "about 14.3 GB instead of 28.6" (plus the float parts)


def test_the_cli_plans_the_fp8_chunk_and_reports_its_precision(capsys) -> None:
    assert main(["plan", "--model", "tiny", "--height", "64", "--width", "128", "--precision", "fp8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "fp8" and report["dtype"] == "bfloat16"
    saved = TINY.num_layers * _saved_per_block(TINY.dim, TINY.ffn_dim)
    assert weights_bytes(TINY, torch.bfloat16) - report["weights_bytes"] == saved
    assert len(report["kinds"]) == 3 and all(k["arena_bytes"] > 0 for k in report["kinds"])
