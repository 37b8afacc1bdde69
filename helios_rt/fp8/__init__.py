"""FP8 (e4m3) inference: quantisation math, the FP8 linear, and the quantised-checkpoint format."""

from .format import E4M3_MAX, FP8_DTYPE, UNIT_ROUNDOFF, quantize_blocks, quantize_rows, quantize_weight
from .linear import FP8Activation, FP8Linear, block_linear_names, quantize_blocks_

PRECISIONS = ("native", "fp8")

__all__ = [
    "E4M3_MAX",
    "FP8_DTYPE",
    "PRECISIONS",
    "UNIT_ROUNDOFF",
    "FP8Activation",
    "FP8Linear",
    "block_linear_names",
    "quantize_blocks",
    "quantize_blocks_",
    "quantize_rows",
    "quantize_weight",
]
