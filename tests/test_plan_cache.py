"""Chunk plans cached across processes: a second start skips planning, the results are the
same bit for bit, and a corrupt, stale or tampered entry is re-planned (one log line), never run.

Every test points the cache at its own tmp folder (HELIOS_RT_CACHE_DIR), never at the user's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helios_rt import Engine
from helios_rt.compile import chunk_program
from helios_rt.compile.chunk_program import ChunkKind, ChunkProgram, TextShape
from helios_rt.compile.plan_cache import PlanCache, cache_enabled, cache_root, decode_plan, encode_plan

KIND = ChunkKind(True, True)


@pytest.fixture(scope="module")
def engine(make_tiny_engine) -> Engine:
    """The tiny engine with the compiled chunk (what a plan cache serves)."""
    return make_tiny_engine(graphs="chunk")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> PlanCache:
    monkeypatch.setenv("HELIOS_RT_CACHE_DIR", str(tmp_path))
    return PlanCache()


@pytest.fixture
def plan_calls(monkeypatch) -> list[ChunkKind]:
    """Counts the chunk programs' meta-tensor plannings."""
    calls: list[ChunkKind] = []
    plan_program = chunk_program.plan_program

    def counted(fn, sampler, state, kind, batch):
        calls.append(kind)
        return plan_program(fn, sampler, state, kind, batch)

    monkeypatch.setattr(chunk_program, "plan_program", counted)
    return calls


def program(engine: Engine, cache: PlanCache | None) -> ChunkProgram:
    """A fresh program of the engine's sampler (a new process's), with the engine's text bound."""
    prog = ChunkProgram(engine.sampler, text=TextShape(16), plan_cache=cache)
    text = engine.transformer.encode_text(torch.randn(1, 16, engine.transformer.config.text_dim,
                                                      generator=torch.Generator().manual_seed(1)))  # fmt: skip
    prog.set_text(text)
    return prog


def run_chunks(prog: ChunkProgram, kinds: list[ChunkKind], seed: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [prog.run(kind, g).clone() for kind in kinds]


KINDS = [KIND, ChunkKind(False, False), ChunkKind(False, False)]


def test_a_second_program_loads_the_plans_and_computes_the_same_bits(engine, cache, plan_calls) -> None:
    uncached = run_chunks(program(engine, None), KINDS)
    assert plan_calls == [KIND, ChunkKind(False, False)]
    first = program(engine, cache)
    stored = run_chunks(first, KINDS)
    assert all(torch.equal(a, b) for a, b in zip(stored, uncached, strict=True))
    assert len(plan_calls) == 4 and len(list(cache.folder.glob("*.json"))) == 2
    second = program(engine, cache)
    again = run_chunks(second, KINDS)
    assert len(plan_calls) == 4, "the second program planned instead of loading"
    assert second.cold.plans_loaded == 2 and second.cold.plans_made == 0
    assert all(torch.equal(a, b) for a, b in zip(again, uncached, strict=True))
    assert all(second.plans[k].steps == first.plans[k].steps for k in set(KINDS))
    assert second.plans[KIND].memory.offsets == first.plans[KIND].memory.offsets


@pytest.mark.slow  # two fresh processes, each importing torch and running a stream: ~13 s
def test_a_second_process_skips_planning(engine, tmp_path) -> None:
    script = textwrap.dedent("""
        import json, sys, torch
        from helios_rt import Engine, EngineConfig
        from helios_rt.demo.untrained import write_untrained_checkpoint
        model = write_untrained_checkpoint(sys.argv[1])
        engine = Engine.from_pretrained(model, EngineConfig(height=64, width=64, device="cpu", dtype="float32",
                                                            kernels="reference", graphs="chunk"))
        with engine.generate_stream("a fish", num_frames=66, seed=2) as stream:
            chunks = list(stream)
        t = stream.timings
        print(json.dumps({"loaded": t["plans_loaded"], "made": t["plans_made"],
                          "sum": [float(c.latents.double().sum()) for c in chunks]}))
    """)
    env = {**os.environ, "HELIOS_RT_CACHE_DIR": str(tmp_path), "HELIOS_RT_PLAN_CACHE": "1"}

    def run() -> dict:
        model = tmp_path / "untrained"
        done = subprocess.run([sys.executable, "-c", script, str(model)], env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert (first["loaded"], first["made"]) == (0, 2)
    assert (second["loaded"], second["made"]) == (2, 0)
    assert first["sum"] == second["sum"]


def _rewrite(path, edit) -> None:
    """Edit a cache file's payload and give it a valid checksum again (only the executor can object)."""
    raw = path.read_bytes()
    magic, header, payload = raw.split(b"\n", 2)
    data = json.loads(payload)
    edit(data)
    payload = json.dumps(data).encode()
    head = json.loads(header)
    head["sha256"] = hashlib.sha256(payload).hexdigest()
    path.write_bytes(magic + b"\n" + json.dumps(head).encode() + b"\n" + payload)


def _tamper_op(data: dict) -> None:
    """Step 40 now claims another op: a plan of some other program, with a consistent memory plan."""
    ops, step = data["ops"], data["steps"][40]
    ops.append("aten.this_is_not_the_op.default")
    step[0] = len(ops) - 1


def _tamper_shape(data: dict) -> None:
    """The last step's first input shape changed: the history update of a program of another size."""
    step = data["steps"][-1]
    step[1][0][1][0] += 1


@pytest.mark.slow  # two tamperings, each planned, run and re-planned: ~24 s
@pytest.mark.parametrize("tamper", [_tamper_op, _tamper_shape])
def test_a_tampered_entry_fails_the_executor_and_is_replanned(engine, cache, plan_calls, tamper, caplog) -> None:
    expected = run_chunks(program(engine, cache), KINDS)
    (entry,) = [p for p in cache.folder.glob("*.json") if _holds_kind(p, engine, KIND)]
    _rewrite(entry, tamper)
    prog = program(engine, cache)
    with caplog.at_level(logging.WARNING, logger="helios_rt"):
        got = run_chunks(prog, KINDS)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), "a tampered plan changed the result"
    assert prog.cold.plans_loaded == 2 and prog.cold.plans_made == 1 and cache.rejected == 1
    assert plan_calls.count(KIND) == 2
    assert [r.message for r in caplog.records if "failed verification" in r.message]
    assert decode_plan(entry.read_bytes(), entry.stem).steps == prog.plans[KIND].steps  # the fresh plan, stored


def _holds_kind(path, engine, kind) -> bool:
    from helios_rt.compile.plan_cache import key_fields, plan_key

    return path.stem == plan_key(key_fields(engine.sampler, 1, TextShape(16), kind))


CORRUPTIONS = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "empty": lambda raw: b"",
    "not a plan": lambda raw: b"\x80\x04\x95 a pickle, say",
    "bad json header": lambda raw: raw.replace(b'"format"', b"'format'", 1),
    # a digit of persistent_bytes (the payload's end): still valid JSON and a consistent plan, only the sha256 sees it
    "payload bit flip": lambda raw: raw[:-3] + bytes([raw[-3] ^ 1]) + raw[-2:],
    "other format": lambda raw: raw.replace(b'"format": "', b'"format": "0', 1),
}


@pytest.mark.slow  # six corruptions, each re-planned: ~45 s in all
@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_a_corrupt_entry_is_replanned_with_one_log_line(engine, cache, plan_calls, corrupt, caplog) -> None:
    expected = run_chunks(program(engine, cache), KINDS[:1])
    (entry,) = cache.folder.glob("*.json")
    entry.write_bytes(CORRUPTIONS[corrupt](entry.read_bytes()))
    prog = program(engine, cache)
    with caplog.at_level(logging.WARNING, logger="helios_rt"):
        got = run_chunks(prog, KINDS[:1])
    assert torch.equal(got[0], expected[0])
    assert prog.cold.plans_made == 1 and prog.cold.plans_loaded == 0 and len(plan_calls) == 2
    lines = [r.getMessage() for r in caplog.records if "plan cache" in r.getMessage()]
    assert len(lines) == 1 and str(entry) in lines[0], lines
    assert decode_plan(entry.read_bytes(), entry.stem).steps == prog.plans[KIND].steps  # rewritten


def test_an_inconsistent_memory_plan_is_rejected(engine, cache) -> None:
    """Two buffers live at once moved onto the same bytes (checksum valid): refused at load."""
    run_chunks(program(engine, cache), KINDS[:1])
    (entry,) = cache.folder.glob("*.json")

    def overlap(data: dict) -> None:
        offsets = data["memory"]["offsets"]
        reqs = {r[0]: r for r in data["memory"]["requests"]}
        a, b = next((x, y) for x in reqs for y in reqs
                    if x < y and reqs[x][2] <= reqs[y][3] and reqs[y][2] <= reqs[x][3])  # fmt: skip
        offsets[[o[0] for o in offsets].index(b)][1] = dict(map(tuple, offsets))[a]

    _rewrite(entry, overlap)
    assert PlanCache(cache.folder).load(entry.stem) is None


def test_the_key_changes_with_what_changes_the_plan(engine, make_tiny_engine) -> None:
    from helios_rt.compile.plan_cache import key_fields, plan_key

    base = key_fields(engine.sampler, 1, TextShape(16), KIND)
    variants = [
        key_fields(engine.sampler, 2, TextShape(16), KIND),
        key_fields(engine.sampler, 1, TextShape(17), KIND),
        key_fields(engine.sampler, 1, TextShape(16, (16, 9)), KIND),
        key_fields(engine.sampler, 1, TextShape(16), ChunkKind(True, False)),
        {**base, "torch": "0.0"},
        {**base, "helios_rt": "0.0"},
        {**base, "source": "0"},
        {**base, "format": "0"},
    ]
    keys = {plan_key(base)} | {plan_key(v) for v in variants}
    assert len(keys) == len(variants) + 1
    bf16 = make_tiny_engine(graphs="chunk", dtype="bfloat16", vae_dtype="float32")
    bigger = make_tiny_engine(graphs="chunk", height=128)
    others = [key_fields(e.sampler, 1, TextShape(16), KIND) for e in (bf16, bigger)]
    assert len({plan_key(base)} | {plan_key(o) for o in others}) == 3


def test_where_the_cache_lives_and_the_switch(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("HELIOS_RT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "helios_rt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "helios_rt"
    monkeypatch.setenv("HELIOS_RT_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine" and PlanCache().folder == tmp_path / "mine" / "plans"
    monkeypatch.delenv("HELIOS_RT_PLAN_CACHE", raising=False)
    assert cache_enabled(torch.device("cuda")) and not cache_enabled(torch.device("cpu"))
    monkeypatch.setenv("HELIOS_RT_PLAN_CACHE", "0")
    assert not cache_enabled(torch.device("cuda")) and PlanCache.for_device(torch.device("cuda")) is None
    monkeypatch.setenv("HELIOS_RT_PLAN_CACHE", "1")
    assert cache_enabled(torch.device("cpu"))
    monkeypatch.setenv("HELIOS_RT_PLAN_CACHE", "yes")
    with pytest.raises(ValueError, match="HELIOS_RT_PLAN_CACHE='yes'"):
        cache_enabled(torch.device("cpu"))


def test_an_unwritable_cache_is_a_log_line(engine, tmp_path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = PlanCache(blocker / "plans")
    with caplog.at_level(logging.WARNING, logger="helios_rt"):
        run_chunks(program(engine, cache), KINDS[:1])
    assert any("could not write" in r.getMessage() for r in caplog.records)


def test_encode_decode_round_trip(engine) -> None:
    prog = program(engine, None)
    plan = prog.plan(KIND)
    back = decode_plan(encode_plan(plan, "k"), "k")
    assert back.steps == plan.steps and back.memory.offsets == plan.memory.offsets
    assert back.memory.requests == plan.memory.requests and back.persistent_bytes == plan.persistent_bytes
    assert back.arena_bytes == plan.arena_bytes and back.lower_bound_bytes == plan.lower_bound_bytes
