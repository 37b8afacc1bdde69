"""Loading a transformer with FP8 block linears, from an FP8 checkpoint or a float one.

An FP8 checkpoint (written by `helios-rt quantize`) has the float checkpoint's folder layout; its
`transformer/config.json` carries `quantization_config` (`QUANTIZATION_CONFIG`), and each block linear
stores `weight` as F8_E4M3 and `weight_scale` as F32 `[out]` beside its `bias`. It is checked as
strictly as any checkpoint: keys, shapes, and the dtype of every quantised tensor.

A float checkpoint loaded with precision="fp8" is quantised on the fly, one tensor at a time, as it
reaches the device (through the pinned staging of `helios_rt.staging` on CUDA): the float copy of a
weight lives only until its e4m3 copy exists, so the process never holds two copies of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..checkpoint import (
    CheckpointError,
    TensorInfo,
    check_finite_weights,
    check_keys,
    index_tensors,
    iter_host_tensors,
    iter_tensors_to,
    read_json,
    weight_files,
)
from .format import FP8_DTYPE, quantize_weight
from .linear import block_linear_names, quantize_blocks_

QUANTIZATION_CONFIG = {
    "quant_method": "helios_rt_fp8",
    "format": "float8_e4m3fn",
    "weight_scale": "per_output_channel",
    "activation_scale": "per_token",
    "modules": "the linears inside the transformer blocks",
}


def stored_quantization(folder: Path, precision: str) -> dict | None:
    """The checkpoint's `quantization_config` (None for a float checkpoint), checked against `precision`."""
    quant = read_json(Path(folder) / "config.json").get("quantization_config")
    if quant is None:
        return None
    if quant != QUANTIZATION_CONFIG:
        raise CheckpointError(
            f"{folder}/config.json has quantization_config {quant}, which this helios_rt cannot load; "
            f"it loads {QUANTIZATION_CONFIG} (written by `helios-rt quantize`)"
        )
    if precision != "fp8":
        raise CheckpointError(
            f"{folder} holds an FP8 checkpoint (quantization_config in config.json); load it with "
            "EngineConfig(precision='fp8') (CLI: --precision fp8), or point at the float checkpoint"
        )
    return quant


def load_fp8_module(
    build: Callable[[], torch.nn.Module],
    folder: Path,
    dtype_of: Callable[[str], torch.dtype],
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """Build the module on meta and make its block linears FP8 (`quantize_blocks_`, the one way FP8 is
    chosen), validate `folder` against it (before any read), then load it.

    build: makes the float module."""
    with torch.device("meta"):
        module = quantize_blocks_(build())
    linears = block_linear_names(module)
    weights = {f"{n}.weight" for n in linears}
    scales = {f"{n}.weight_scale" for n in linears}
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    tensors = index_tensors(weight_files(folder))
    stored = stored_quantization(folder, "fp8") is not None
    if stored:
        check_keys(expected, tensors, str(folder))
        check_dtypes(tensors, {k: "F8_E4M3" for k in weights} | {k: "F32" for k in scales}, folder)
    else:
        unexpected_scales = sorted(scales & set(tensors))
        if unexpected_scales:
            raise CheckpointError(
                f"{folder} stores FP8 scales ({unexpected_scales[0]}, ...) but its config.json has no "
                "quantization_config; the folder mixes an FP8 and a float checkpoint: re-run `helios-rt quantize`"
            )
        check_keys({k: v for k, v in expected.items() if k not in scales}, tensors, str(folder))
    state = dict(_read_quantized(tensors, weights, stored, dtype_of, device, folder))
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def check_dtypes(tensors: dict[str, TensorInfo], expected: dict[str, str], folder: Path) -> None:
    """Raise one error naming every tensor whose stored dtype is not the one the format requires."""
    wrong = sorted(f"{k}: {tensors[k].dtype} (expected {d})" for k, d in expected.items() if tensors[k].dtype != d)
    if wrong:
        shown = ", ".join(wrong[:4]) + (f" and {len(wrong) - 4} more" if len(wrong) > 4 else "")
        raise CheckpointError(
            f"{folder}: {len(wrong)} FP8 tensor(s) have the wrong dtype: {shown}; the checkpoint was not written "
            "by `helios-rt quantize` or is corrupt: re-run `helios-rt quantize` on the float checkpoint"
        )


def _read_quantized(
    tensors: dict[str, TensorInfo],
    weights: set[str],
    stored: bool,
    dtype_of: Callable[[str], torch.dtype],
    device: torch.device | str,
    folder: Path,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor on `device`: stored e4m3 weights and scales as they are, float block-linear weights
    quantised (checked finite first), everything else cast to `dtype_of(name)` and checked finite."""
    kept = weights | {n for n in tensors if n.endswith(".weight_scale")}
    for name, t in iter_tensors_to(tensors, device, lambda n: None if n in kept else dtype_of(n)):
        if stored and (name in weights or name.endswith(".weight_scale")):
            _check_fp8_finite(name, t, folder)
            yield name, t
        elif name in weights:
            check_finite_weights({name: t}, folder)
            q, scale = quantize_weight(t)
            yield name, q
            yield name + "_scale", scale
        else:
            check_finite_weights({name: t}, folder)
            yield name, t


def _check_fp8_finite(name: str, t: torch.Tensor, folder: Path) -> None:
    """e4m3fn has no infinity; its NaN is the bit pattern s.1111.111 (isfinite has no e4m3 kernel).
    A scale must be positive and finite: `quantize` never writes another (an all-zero row gets 1e-12/448)."""
    if t.dtype == FP8_DTYPE:
        bad, what = (t.view(torch.uint8) & 0x7F == 0x7F).any(), "NaN"
    else:
        bad, what = ~(torch.isfinite(t) & (t > 0)).all(), "a scale that is not positive and finite"
    if bool(bad):
        raise CheckpointError(f"{folder}: tensor {name} ({t.dtype}) holds {what}; the checkpoint is corrupt")


def iter_tensors(tensors: dict[str, TensorInfo]) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors one at a time on the host, from their memory-mapped files (see `checkpoint.iter_host_tensors`)."""
    return iter_host_tensors(tensors)
