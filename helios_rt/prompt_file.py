"""Prompt embeddings from a safetensors file, for checkpoints without a text encoder (or to skip it).

The file holds `prompt_embeds` `[1, S, text_dim]` and, for guidance, optionally
`negative_prompt_embeds`; any other key is refused so that a misspelt name is not silently ignored.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import InputError

KEYS = ("prompt_embeds", "negative_prompt_embeds")


def read_prompt_embeds(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(prompt_embeds, negative_prompt_embeds or None)` from `path`; shapes are checked by the engine."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"--prompt-embeds {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise InputError(f"--prompt-embeds {path} is not a readable safetensors file ({err})") from None
    unknown = sorted(set(tensors) - set(KEYS))
    if unknown or "prompt_embeds" not in tensors:
        raise InputError(
            f"--prompt-embeds {path} holds {sorted(tensors)}; it must hold 'prompt_embeds' [1, S, text_dim] "
            "and optionally 'negative_prompt_embeds', nothing else"
        )
    return tensors["prompt_embeds"], tensors.get("negative_prompt_embeds")
