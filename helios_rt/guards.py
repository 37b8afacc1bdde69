"""Checks that run before any weight is read, so a bad option fails in a second, not after a load.

Each raises `UsageError` naming the option, the problem and the fix.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import InputError, UsageError


def check_output_path(path: Path) -> None:
    """The video can be written at `path`: an .mp4 name, not a folder, in a folder we can create a file in.

    Probed by really opening the file for appending (then removing it if it did not exist), because
    permission bits do not tell (root ignores them; read-only mounts and quotas do not show in them).
    """
    if path.suffix.lower() != ".mp4":
        raise UsageError(f"--out {path} must end in .mp4 (helios-rt writes H.264 mp4)")
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; give a file name such as {path / 'out.mp4'}")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as err:
        raise UsageError(f"--out {path} cannot be written ({err.strerror}); choose another path") from None
    if not existed:
        path.unlink()


def check_device(device: str) -> None:
    """The device exists here: 'cuda' needs a CUDA build with a visible GPU, 'cuda:N' needs N GPUs."""
    if not device.startswith("cuda"):
        return
    try:
        index = torch.device(device).index
    except RuntimeError:
        raise UsageError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if not torch.cuda.is_available():
        why = "this PyTorch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UsageError(f"device {device}: {why}; use device cpu (--device cpu) or auto")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise UsageError(f"device {device}: only {count} CUDA device(s) here (cuda:0 to cuda:{count - 1})")


def check_finite_input(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Refuse NaN/Inf in an input: it would flow through every chunk and decode to black frames.

    One reduction and one host sync per input (not per chunk), so it costs nothing that matters.
    """
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise InputError(f"{what} hold NaN or Inf ({bad} of {tensor.numel()} values); recompute them, e.g. in float32")
    return tensor
