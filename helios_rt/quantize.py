"""`helios-rt quantize SRC DST`: write an FP8 copy of a Helios checkpoint.

The copy has the source's folder layout. Every component but the transformer is copied as is. In
`transformer/`, each linear inside the blocks is stored as an e4m3 `weight` with a float32
`weight_scale` `[out]` (per output channel) beside its `bias`; every other tensor keeps its stored
dtype; the shards keep their names, the index maps the new scale keys, and `config.json` gains
`quantization_config` (see `helios_rt.fp8.loading`). Loading it with precision="fp8" reads about
half the bytes of the bf16 checkpoint (14 GB instead of 28 for the 14B model) and quantises nothing.

The source is validated like any checkpoint before anything is written, tensors are read one at a
time from their memory-mapped files, and DST is written to a temporary sibling folder that is
renamed into place only when complete, so a failed run never leaves a half-written checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import CheckpointError, check_finite_weights, check_keys, find_component, index_tensors, weight_files
from .config import ModelConfig
from .fp8.format import quantize_weight
from .fp8.linear import block_linear_names
from .fp8.loading import QUANTIZATION_CONFIG, iter_tensors


def quantize_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write the FP8 copy of checkpoint folder `src` to `dst` (which must not exist); returns `dst`."""
    src, dst = Path(src), Path(dst)
    if not (src / "model_index.json").exists():
        raise CheckpointError(f"{src} is not a Helios checkpoint folder (no model_index.json)")
    if dst.exists():
        raise ValueError(f"{dst} exists; quantize writes a new folder: choose another DST or remove it")
    folder = find_component(src, "transformer")
    raw = json.loads((folder / "config.json").read_text())
    if "quantization_config" in raw:
        raise CheckpointError(f"{src} is already quantised (quantization_config in transformer/config.json)")
    layout = _float_layout(ModelConfig.from_dict(raw))
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp, ignore=lambda d, names: [folder.name] if Path(d) == src else [])
        _write_transformer(folder, tmp / folder.name, raw, *layout)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _float_layout(config: ModelConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The float model's expected shapes, and the weight keys of its block linears (the ones to quantise)."""
    from .model.transformer import HeliosTransformer

    with torch.device("meta"):
        model = HeliosTransformer(config)
    weights = {f"{n}.weight" for n in block_linear_names(model)}
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, weights


def _write_transformer(
    folder: Path, out: Path, raw: dict, expected: dict[str, tuple[int, ...]], weights: set[str]
) -> None:
    """Validate the float transformer folder, then write its FP8 shards, index and marked config."""
    tensors = index_tensors(weight_files(folder))
    check_keys(expected, tensors, str(folder))
    out.mkdir()
    weight_map: dict[str, str] = {}
    total = 0
    by_file: dict[Path, dict] = {}
    for name, info in tensors.items():
        by_file.setdefault(info.file, {})[name] = info
    for path, infos in by_file.items():
        shard: dict[str, torch.Tensor] = {}
        for name, t in iter_tensors(infos):
            check_finite_weights({name: t}, folder)
            if name in weights:
                shard[name], shard[name + "_scale"] = quantize_weight(t)
            else:
                shard[name] = t
        save_file(shard, str(out / path.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, path.name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    if len(by_file) > 1 or any(folder.glob("*.safetensors.index.json")):
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        index_name = next(folder.glob("*.safetensors.index.json")).name
        (out / index_name).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(raw | {"quantization_config": QUANTIZATION_CONFIG}, indent=2) + "\n")


# ---- command line --------------------------------------------------------------------------------------
def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    """Add `quantize` to the CLI's subparsers; `run_quantize(args)` runs it."""
    p = subparsers.add_parser(
        "quantize",
        help="write an FP8 (e4m3) copy of a checkpoint: half the weight bytes; load it with --precision fp8",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="a Helios checkpoint folder (with model_index.json)")
    p.add_argument("dst", help="the folder to write (must not exist)")
    p.set_defaults(func=run_quantize)
    return p


def run_quantize(args: argparse.Namespace) -> int:
    dst = quantize_checkpoint(args.src, args.dst)
    size = lambda root: sum(f.stat().st_size for f in (root / "transformer").glob("*.safetensors"))  # noqa: E731
    before, after = size(Path(args.src)), size(dst)
    print(f"wrote {dst}: transformer weights {before / 2**30:.2f} GiB -> {after / 2**30:.2f} GiB", file=sys.stdout)
    return 0
