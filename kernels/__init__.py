"""Triton kernels of helios_rt (installed as helios_rt.kernels).

Importing this package registers every kernel as the "triton" impl of its op in the op table. It
only defines functions: nothing compiles until a kernel is first launched.
"""

from . import attention, linear, norm, quantize, residual, residual_norm, sampler  # noqa: F401  (register the impls)
