"""FP8Linear's accumulation mode: off by default, set per model with `set_fast_accum`, and handed to every
`_scaled_mm` call (first light measures both modes against the gate before fast may become a default)."""

from __future__ import annotations

import torch

from helios_rt.fp8.linear import FP8Linear, set_fast_accum


def _model() -> torch.nn.Module:
    layers = [torch.nn.Linear(32, 16, bias=True), torch.nn.Linear(16, 8, bias=True)]
    return torch.nn.Sequential(*(FP8Linear.from_linear(layer) for layer in layers))


def test_fast_accumulation_is_off_by_default_and_reaches_scaled_mm(monkeypatch) -> None:
    seen: list[bool] = []

    def recording(a, b, scale_a, scale_b, *, bias=None, out_dtype=None, use_fast_accum=False):
        seen.append(use_fast_accum)
        return torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    model, x = _model(), torch.randn(4, 32)
    model(x)
    assert seen == [False, False]
    assert set_fast_accum(model, True) == 2
    model(x)
    assert seen[2:] == [True, True]
    set_fast_accum(model, False)
    model(x)
    assert seen[4:] == [False, False]
