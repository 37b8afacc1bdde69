"""The op table: each fused op has a PyTorch reference (the spec) and optional Triton backends.

`registry` (the leaf the references and kernels register in) <- `reference`, `sampler`, `fp8` (the specs)
<- `attention_backends` (attention's backend table) <- `opset` (`OpSet`: each op resolved once).
"""

from .opset import OpSet
from .registry import entry, op_names, register_impl, register_reference

__all__ = ["OpSet", "entry", "op_names", "register_impl", "register_reference"]
