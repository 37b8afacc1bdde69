"""helios_rt: a static-program inference runtime for the Helios video diffusion model."""

__version__ = "0.1.0"
