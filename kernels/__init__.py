"""Triton kernels of helios_rt (installed as helios_rt.kernels)."""
