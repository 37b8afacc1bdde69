"""helios_rt: a static-program inference runtime for the Helios video diffusion model."""

from .config import EngineConfig, ModelConfig

__version__ = "0.1.0"
__all__ = ["Chunk", "Engine", "EngineConfig", "ModelConfig", "Stream", "Video"]


def __getattr__(name: str):
    # The engine pulls in the networks and samplers; import it on first use so that `import helios_rt`
    # (and the CLI's argument parsing) stays fast.
    if name in ("Engine", "Stream", "Chunk"):
        from . import engine

        return getattr(engine, name)
    if name == "Video":
        from .video import Video

        return Video
    raise AttributeError(f"module 'helios_rt' has no attribute {name!r}")
