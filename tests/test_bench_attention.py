"""The attention benchmark times every backend that runs and names why the others were skipped (a tiny shape
on the CPU; on a GPU `helios-rt bench --suite gpu` measures the stage-2 shape)."""

import torch

from helios_rt.benchmarking import attention as BA


def test_measure_backends_on_cpu():
    timings, skipped = BA.measure_backends("cpu", shape=(1, 64, 2, 32), dtype=torch.float32)
    names = {t.backend for t in timings}
    assert {"sdpa", "reference"} <= names and "fa3" in skipped and "fa2" in skipped
    assert "needs a CUDA device" in skipped["fa3"] and "needs a CUDA device" in skipped["cudnn"]
    assert set(names) | set(skipped) == {*BA.AB.AUTO_ORDER, "reference"}  # every backend: timed or skipped
    for t in timings:
        assert t.ms > 0 and t.tflops == BA.attention_flops(1, 64, 64, 2, 32) / (t.ms * 1e-3) / 1e12
