"""Several processes, one stream: sequence (Ulysses) and CFG parallelism on torch.distributed.

`EngineConfig(parallel=ParallelConfig(...))` (or `torchrun --nproc-per-node N -m helios_rt generate
...`, which sets it) runs one generation on N ranks: `config` (the mesh sizes), `group` (the process
group, errors, timeouts), `sequence` (token shards, the all-to-all attention), `forward` (the
transformer's hooks), `io` (prompts from rank 0, decode on rank 0).
"""

from __future__ import annotations

from .config import ParallelConfig
from .group import Mesh, ParallelError, launched_by_torchrun, local_device

__all__ = ["Mesh", "ParallelConfig", "ParallelError", "attach", "launched_by_torchrun", "local_device"]


def attach(config: ParallelConfig | None, transformer, uses_cfg: bool) -> Mesh | None:
    """Join the process group and hook the transformer's forward (None: a one-process engine).

    With one rank in the group nothing is hooked: the engine is the one-process engine.
    """
    if config is None:
        return None
    from .forward import ParallelForward
    from .group import setup_mesh

    device = transformer.proj_out.weight.device
    mesh = setup_mesh(config, transformer.config.num_attention_heads, uses_cfg, device)
    if mesh.world > 1:
        transformer.set_parallel(ParallelForward(mesh))
    return mesh
