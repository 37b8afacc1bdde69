"""Chunk plans kept on disk across processes, so a second start with the same settings skips planning.

Planning a 14B chunk kind dispatches ~18,000 ops on meta tensors (seconds per kind, every process).
Its result, a `ProgramPlan` (the op sequence with input shapes, each intermediate's tensor and the
arena offsets), depends only on the program, so it is stored as JSON under a key that hashes
everything that can change it (`plan_key`): the model config, parameter names, shapes and dtypes,
precision, the sampling spec, history layout and latent size, batch, text shape, the chunk kind,
the device type and every op's backend, the package version and a digest of its source, the torch,
triton and flash-attn versions, and the plan format (the field names of the plan's dataclasses).

Trust, in three layers, each failing into a re-plan (never a crash, never a run):
1. a file that is truncated, not JSON, of another format or key, or whose sha256 does not match its
   payload, is rejected at `load` with one log line;
2. a payload whose memory plan is inconsistent (a buffer outside the arena, two live buffers
   sharing bytes, a tensor past its buffer: `MemoryPlan.check` and `_check_plan`) is rejected too;
3. the executor checks every executed op against the plan (`workspace.Executor`: `PlanMismatch`),
   so an entry of another program under this key (a stale or hand-edited file) fails its first run;
   the chunk program then restores the state that run touched, re-plans and runs again.

Location: `$HELIOS_RT_CACHE_DIR`, else `$XDG_CACHE_HOME/helios_rt`, else `~/.cache/helios_rt`
(plans in `plans/`). `HELIOS_RT_PLAN_CACHE`: "1" on, "0" off, unset: on for CUDA engines (where a
start pays for planning before the first frame), off on CPUs (a CPU engine runs eagerly unless asked,
and test runs then never write to the user's cache; set it to 1 for a compiled CPU engine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .planner import BufferRequest, MemoryPlan
from .workspace import ProgramPlan, Step, TensorSpec

log = logging.getLogger("helios_rt")

PLAN_FORMAT = 1
_MAGIC = b"helios_rt plan\n"
_ENV_SWITCH, _ENV_DIR = "HELIOS_RT_PLAN_CACHE", "HELIOS_RT_CACHE_DIR"


class CacheEntryRejected(ValueError):
    """A cache file that cannot be trusted (corrupt, another format or key, inconsistent plan)."""


# ---- where and whether ----------------------------------------------------------------------------
def cache_root() -> Path:
    """The package's cache folder, by the platform's conventions ($HELIOS_RT_CACHE_DIR moves it)."""
    if os.environ.get(_ENV_DIR):
        return Path(os.environ[_ENV_DIR])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "helios_rt"


def cache_enabled(device: torch.device) -> bool:
    """HELIOS_RT_PLAN_CACHE: "1" on, "0" off, unset: on for CUDA devices only (see the module docstring)."""
    value = os.environ.get(_ENV_SWITCH, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{_ENV_SWITCH}={value!r}: use 1 (cache chunk plans on disk), 0 (off) or leave it unset")
    return value == "1" or (value == "" and device.type == "cuda")


class PlanCache:
    """Plans stored as JSON files named by their key in `folder`."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else cache_root() / "plans"
        self.hits = self.misses = self.rejected = 0

    @classmethod
    def for_device(cls, device: torch.device) -> PlanCache | None:
        """The default cache for an engine on `device`, or None where it is switched off."""
        return cls() if cache_enabled(torch.device(device)) else None

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def load(self, key: str) -> ProgramPlan | None:
        """The stored plan of `key`, or None (missing, or rejected with one log line)."""
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as err:
            return self._reject(path, f"unreadable ({err})")
        try:
            plan = decode_plan(raw, key)
        except CacheEntryRejected as err:
            return self._reject(path, str(err))
        self.hits += 1
        return plan

    def store(self, key: str, plan: ProgramPlan) -> None:
        """Write `plan` atomically (a reader sees the old file or the whole new one); failures are logged."""
        path = self.path(key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(encode_plan(plan, key))
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.warning("plan cache: could not write %s (%s); plans are made again next start", path, err)

    def discard(self, key: str, why: str) -> None:
        """Forget an entry that failed the executor's check (it is re-planned and stored again)."""
        self.rejected += 1
        log.warning("plan cache: %s failed verification (%s); re-planning", self.path(key), why)
        self.path(key).unlink(missing_ok=True)

    def _reject(self, path: Path, why: str) -> None:
        self.rejected += 1
        log.warning("plan cache: ignoring %s: %s; re-planning", path, why)
        return None


# ---- the key --------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@cache
def source_digest() -> str:
    """sha256 of the runtime's Python source (helios_rt and its kernels): an edit changes every key.

    The version alone does not move when a development tree changes the chunk's code, and an edit can
    keep the op sequence while changing which buffer an op reads (lifetimes the executor cannot see).
    """
    package = Path(__file__).resolve().parent.parent
    spec = importlib.util.find_spec("helios_rt.kernels")  # installed from the repository's kernels/ folder
    roots = [package] + [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else [package]
    h = hashlib.sha256()
    for root in dict.fromkeys(roots):
        for path in sorted(root.rglob("*.py")):
            h.update(f"{root.name}/{path.relative_to(root)}".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def format_digest() -> str:
    """The plan format: its version and the field names of every dataclass a stored plan holds."""
    fields = {c.__name__: [f.name for f in dataclasses.fields(c)]
              for c in (ProgramPlan, Step, TensorSpec, MemoryPlan, BufferRequest)}  # fmt: skip
    return hashlib.sha256(json.dumps([PLAN_FORMAT, fields]).encode()).hexdigest()[:16]


def _params_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()


def key_fields(sampler: Any, batch: int, text: Any, kind: Any) -> dict[str, Any]:
    """Everything a chunk's plan depends on, as JSON-able values (see the module docstring)."""
    from ..ops.registry import op_names

    model, ops = sampler.model, sampler.ops
    factor = sampler.block_factor
    return {
        "format": format_digest(),
        "helios_rt": _version("helios_rt"),
        "source": source_digest(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "flash_attn": _version("flash_attn") or _version("flash-attn"),
        "model": repr(model.config),
        "precision": model.precision,
        "dtype": str(model.dtype),
        "params": _params_digest(model),
        "spec": repr(sampler.spec),
        "layout": repr(sampler.history_layout),
        "latent_hw": list(sampler.latent_hw),
        "block_factor": None if factor is None else [list(factor.shape), str(factor.dtype)],
        "device": torch.device(sampler.device).type,
        "ops": {name: ops.backend_of(name) for name in sorted(op_names())},
        "batch": batch,
        "text": [text.tokens, None if text.lengths is None else list(text.lengths)],
        "kind": [kind.amplified, kind.set_prefix],
    }


def plan_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:40]


# ---- the format -----------------------------------------------------------------------------------
def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise CacheEntryRejected(f"unknown dtype {name!r}")
    return d


def _payload(plan: ProgramPlan) -> dict[str, Any]:
    ops: dict[str, int] = {}
    steps = []
    for s in plan.steps:
        inputs = [[_dtype_name(d), list(shape)] for shape, d in s.inputs]
        allocs = [[b, list(t.shape), list(t.stride), t.offset, _dtype_name(t.dtype), t.nbytes] for b, t in s.allocs]
        steps.append([ops.setdefault(s.op, len(ops)), inputs, allocs])
    m = plan.memory
    memory = {"requests": [[r.id, r.nbytes, r.first, r.last] for r in m.requests],
              "offsets": sorted(m.offsets.items()), "arena_bytes": m.arena_bytes,
              "lower_bound_bytes": m.lower_bound_bytes, "alignment": m.alignment, "strategy": m.strategy}  # fmt: skip
    return {"ops": list(ops), "steps": steps, "memory": memory, "persistent_bytes": plan.persistent_bytes}


def encode_plan(plan: ProgramPlan, key: str) -> bytes:
    """The file: a magic line, a header line (format, key, sha256 of the payload), the payload (JSON)."""
    payload = json.dumps(_payload(plan), separators=(",", ":")).encode()
    header = {"format": format_digest(), "key": key, "sha256": hashlib.sha256(payload).hexdigest()}
    return _MAGIC + json.dumps(header).encode() + b"\n" + payload


def decode_plan(raw: bytes, key: str) -> ProgramPlan:
    """The plan in `raw`, checked (header, checksum, consistency); raises CacheEntryRejected."""
    if not raw.startswith(_MAGIC):
        raise CacheEntryRejected("not a helios_rt plan file")
    head, sep, payload = raw[len(_MAGIC) :].partition(b"\n")
    try:
        header = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CacheEntryRejected("corrupt header") from None
    if not sep or not isinstance(header, dict):
        raise CacheEntryRejected("truncated header")
    if header.get("format") != format_digest():
        raise CacheEntryRejected(f"plan format {header.get('format')!r}, this runtime writes {format_digest()!r}")
    if header.get("key") != key:
        raise CacheEntryRejected(f"the file holds key {header.get('key')!r}")
    if header.get("sha256") != hashlib.sha256(payload).hexdigest():
        raise CacheEntryRejected("its payload does not match its sha256 (truncated or modified)")
    try:
        plan = _plan_of(json.loads(payload))
    except CacheEntryRejected:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AssertionError) as err:
        raise CacheEntryRejected(f"malformed plan ({type(err).__name__}: {err})") from None
    return plan


def _plan_of(data: dict[str, Any]) -> ProgramPlan:
    ops = data["ops"]
    steps = []
    for i, (op, inputs, allocs) in enumerate(data["steps"]):
        ins = tuple((tuple(shape), _dtype(d)) for d, shape in inputs)
        outs = tuple(
            (int(b), TensorSpec(tuple(shape), tuple(stride), int(off), _dtype(d), int(nbytes)))
            for b, shape, stride, off, d, nbytes in allocs
        )
        steps.append(Step(i, str(ops[op]), ins, outs))
    m = data["memory"]
    requests = tuple(BufferRequest(*map(int, r)) for r in m["requests"])
    memory = MemoryPlan(requests, {int(b): int(o) for b, o in m["offsets"]}, int(m["arena_bytes"]),
                        int(m["lower_bound_bytes"]), int(m["alignment"]), str(m["strategy"]))  # fmt: skip
    plan = ProgramPlan(tuple(steps), memory, int(data["persistent_bytes"]))
    _check_plan(plan)
    return plan


def _check_plan(plan: ProgramPlan) -> None:
    """Every allocation is the buffer the memory plan sized, created at its step, its tensor inside it;
    the placement itself is `MemoryPlan.check`'s (no live buffers share bytes, all within the arena)."""
    requests = {r.id: r for r in plan.memory.requests}
    for step in plan.steps:
        for buffer, spec in step.allocs:
            r = requests.get(buffer)
            if r is None or r.first != step.index or r.nbytes != spec.nbytes:
                raise CacheEntryRejected(f"step {step.index}: buffer {buffer} disagrees with the memory plan")
            item = spec.dtype.itemsize
            extent = spec.offset + sum((n - 1) * s for n, s in zip(spec.shape, spec.stride, strict=True)) + 1
            if min(spec.shape, default=1) > 0 and (spec.offset < 0 or extent * item > spec.nbytes):
                raise CacheEntryRejected(f"step {step.index}: buffer {buffer}'s tensor runs past its bytes")
    plan.memory.check()


__all__ = ["CacheEntryRejected", "PlanCache", "cache_enabled", "cache_root", "key_fields", "plan_key"]
