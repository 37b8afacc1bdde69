"""The op table: each fused op has a PyTorch reference (the spec) and optional Triton/CUDA backends."""

from . import fp8, reference, sampler  # noqa: F401  (register the references)
from .registry import OpSet, entry, op_names, register_impl, register_reference

__all__ = ["OpSet", "entry", "op_names", "register_impl", "register_reference"]
