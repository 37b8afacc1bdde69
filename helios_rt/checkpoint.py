"""Read a diffusers-layout Helios checkpoint folder: validated, memory-mapped safetensors.

Everything is checked before any weight is handed to a model (file presence, headers, shard sizes,
keys, shapes), so a failed load raises with the file or key named and never leaves a half-built
model behind. Only safetensors are read: pickle formats (.bin, .pt, .ckpt) can execute code when
loaded, and a runtime that users point at downloaded folders must not do that.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from .errors import CheckpointError
from .staging import TensorInfo, stage_tensors

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SAFETENSORS_DTYPES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}


def find_component(root: str | Path, component: str) -> Path:
    """The folder of one component (`transformer`, `vae`, ...) of a checkpoint.

    `root` may be the checkpoint folder (with model_index.json) or the component folder itself.
    """
    root = Path(root)
    if not root.exists():
        raise CheckpointError(f"checkpoint path {root} does not exist")
    if (root / "config.json").exists() and not (root / "model_index.json").exists():
        return root
    if not (root / "model_index.json").exists():
        raise CheckpointError(
            f"{root} is not a Helios checkpoint: it has no model_index.json (and no config.json of a single "
            "component); point at the folder that holds model_index.json, transformer/, vae/, ..."
        )
    folder = root / component
    if not folder.is_dir():
        raise CheckpointError(f"{root} has no {component}/ folder; the checkpoint is incomplete")
    return folder


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); re-download it") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a component, from its shard index when there is one."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    singles = sorted(folder.glob("*.safetensors"))
    if not indexes and not singles:
        if pickles:
            raise CheckpointError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}); helios_rt loads safetensors only, "
                "because unpickling can run arbitrary code. Convert them with safetensors.torch.save_file."
            )
        raise CheckpointError(f"{folder} has no *.safetensors weights")
    if len(indexes) > 1:
        raise CheckpointError(f"{folder} has several shard indexes {[p.name for p in indexes]}; keep one")
    if not indexes:
        if len(singles) > 1:
            raise CheckpointError(f"{folder} has several safetensors files but no *.safetensors.index.json")
        return singles
    index = read_json(indexes[0])
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{indexes[0]} has no weight_map; re-download it")
    files = [folder / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{folder} is missing shards named in {indexes[0].name}: {missing}")
    return files


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; a truncated or corrupt file raises naming the file."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes): not a safetensors file; re-download it")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path} is truncated or corrupt (header of {header_len} bytes in a {size}-byte file); re-download it"
            )
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has a corrupt safetensors header; re-download it") from None
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
            dtype, shape = meta["dtype"], meta["shape"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} has a corrupt entry for tensor {name!r}; re-download it") from None
        numel = 1
        for s in shape:
            numel *= s
        if dtype in _SAFETENSORS_DTYPES and end - begin != numel * _SAFETENSORS_DTYPES[dtype]:
            raise CheckpointError(
                f"{path} is corrupt: tensor {name!r} has {end - begin} bytes for shape {meta['shape']}; re-download it"
            )
        data_end = max(data_end, end)
        infos[name] = TensorInfo(path, dtype, tuple(shape), 8 + header_len + begin, 8 + header_len + end)
    if 8 + header_len + data_end != size:
        raise CheckpointError(
            f"{path} is truncated or corrupt: its header describes "
            f"{8 + header_len + data_end} bytes but the file has {size}; re-download it"
        )
    return infos


def index_tensors(files: Iterable[Path]) -> dict[str, TensorInfo]:
    """Every tensor's file, dtype and shape across the shards; duplicates are an error."""
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, info in read_header(path).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in both {tensors[name].file} and {path}")
            tensors[name] = info
    return tensors


def check_keys(expected: dict[str, tuple[int, ...]], found: dict[str, TensorInfo], where: str) -> None:
    """Raise one error naming every missing, unexpected and wrongly shaped key."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {list(found[k].shape)} vs model {list(expected[k])}"
        for k in set(expected) & set(found)
        if tuple(found[k].shape) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing keys {_clip(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_clip(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_clip(mismatched)}")
    if problems:
        raise CheckpointError(
            f"{where} does not match the model built from its config.json: "
            + "; ".join(problems)
            + ". The weights and config.json belong to different models, or the download is incomplete."
        )


def _clip(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)} in all)"


def load_state_dict(
    folder: Path,
    expected: dict[str, tuple[int, ...]],
    dtype_of: Callable[[str], torch.dtype],
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Validate a component folder against `expected` shapes, then read its tensors one at a time.

    Each tensor reaches `device` on its own, cast to `dtype_of(name)` (a model keeps a few parameters
    in float32 whatever its dtype), through a staging buffer (`iter_tensors_to`): host memory holds the
    weights only when `device` is the CPU, plus two buffers of the largest tensor, never a shard.
    Validation runs before the first read.
    """
    tensors = index_tensors(weight_files(folder))
    check_keys(expected, tensors, str(folder))
    state: dict[str, torch.Tensor] = {}
    flags: list[torch.Tensor | bool] = []
    for name, tensor in iter_tensors_to(tensors, device, dtype_of):
        state[name] = tensor
        flags.append(finite_flag(tensor))
    check_finite_weights(state, folder, flags)
    return state


def iter_tensors_to(
    tensors: dict[str, TensorInfo],
    device: torch.device | str,
    dtype_of: Callable[[str], torch.dtype | None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor on `device`, in `dtype_of(name)` (None: as stored), one at a time, in file order.

    CUDA: pinned double-buffered staging with non_blocking copies, cast on the device. CPU: the same
    loop, unpinned, the cast done by the copy out of the buffer (see `helios_rt.staging`).
    """
    return stage_tensors(tensors, device, dtype_of)


def iter_host_tensors(tensors: dict[str, TensorInfo]) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors one at a time in host memory, as stored, in file order; never a whole shard."""
    return iter_tensors_to(tensors, "cpu")


def check_finite_weights(
    state: dict[str, torch.Tensor], folder: Path, flags: list[torch.Tensor | bool] | None = None
) -> None:
    """Refuse weights holding NaN or Inf, naming them: they would only show as black videos.

    Checked after the cast, so a value that overflows the model's dtype (1e5 in float16) is caught too.
    `flags` (one `finite_flag` per tensor, in `state`'s order) may have been taken while loading.
    """
    if not state:
        return
    names = list(state)
    flags = flags if flags is not None else [finite_flag(t) for t in state.values()]
    on_device = [f for f in flags if isinstance(f, torch.Tensor)]
    read = iter(torch.stack(on_device).cpu().tolist()) if on_device else iter(())  # one host sync for all
    oks = [next(read) if isinstance(f, torch.Tensor) else f for f in flags]
    bad = [name for name, ok in zip(names, oks, strict=True) if not ok]
    if bad:
        shown = ", ".join(f"{n} ({state[n].dtype})" for n in bad[:3]) + (
            f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        )
        raise CheckpointError(
            f"{folder}: {len(bad)} tensor(s) hold NaN or Inf after loading: {shown}; the checkpoint is "
            "corrupt (re-download it) or its values overflow this dtype (load it in bfloat16 or float32)"
        )


def finite_flag(t: torch.Tensor) -> torch.Tensor | bool:
    """Whether `t` is all finite: a bool at once on CPU, a flag left on the device elsewhere.

    On CPU it is read from `aminmax` (NaN propagates to both, an infinity shows as one of them), which
    makes no tensor-sized temporary: a freed temporary between the loaded tensors leaves the allocator
    holes that it keeps (up to the checkpoint's element count in bytes of peak host memory, run to
    run). On a device the flags are read together, in one sync.
    """
    if t.device.type != "cpu":
        return torch.isfinite(t).all()
    if not t.is_floating_point() or t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def load_module(
    build: Callable[[], torch.nn.Module],
    folder: Path,
    dtype_of: Callable[[str], torch.dtype],
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """Build a module on the meta device (no memory), validate `folder` against it, then assign weights.

    The module is returned only when every tensor was read; on any error nothing is returned, so a
    caller can never hold a half-loaded model.
    """
    with torch.device("meta"):
        module = build()
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    state = load_state_dict(folder, expected, dtype_of, device)
    module.load_state_dict(state, strict=True, assign=True)
    _materialize_buffers(module, device)
    return module.eval()


def _materialize_buffers(module: torch.nn.Module, device: torch.device | str) -> None:
    """Non-persistent buffers stay on meta after `assign=True`; such buffers must be recomputed by their owner."""
    for name, buf in module.named_buffers():
        if buf.is_meta:
            raise CheckpointError(f"buffer {name!r} was not restored by the checkpoint; the model must compute it")
