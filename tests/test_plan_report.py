"""`helios-rt plan` and `plan_engine`: per-stage arenas, persistent buffers, weights, GPU fit."""

from __future__ import annotations

import argparse
import functools
import json

import pytest
import torch

from helios_rt.compile.report import RESERVE_BYTES, add_plan_parser, plan_engine, run_plan, weights_bytes
from helios_rt.config import HELIOS_14B, TINY
from helios_rt.model.transformer import HeliosTransformer, keeps_fp32


@functools.lru_cache(maxsize=1)
def report_14b():
    return plan_engine(HELIOS_14B, 384, 640, torch.bfloat16, model_name="helios-14b")


def test_14b_at_384x640_plans_tight():
    """How long planning takes is a figure of bench/ (the report carries it), not a test's business."""
    report = report_14b()
    assert report.kernels == "triton"  # what a CUDA engine runs by default
    assert [k.kind for k in report.kinds] == [
        "first chunk (amplified), writes the prefix frame",
        "first chunk (amplified)",
        "chunk",
    ]
    for k in report.kinds:
        assert k.lower_bound_bytes <= k.arena_bytes <= 1.15 * k.lower_bound_bytes, k
    # the residual stream alone is 11040 x 5120 bf16; the FFN hidden 8640+2400 tokens x 13824
    assert report.kinds[-1].lower_bound_bytes > 11040 * 13824 * 2
    assert report.arena_bytes == max(k.arena_bytes for k in report.kinds)
    assert report.persistent["text K/V: 40 blocks x 512 tokens"] == 2 * 40 * 512 * 5120 * 2
    assert 26 * 2**30 < report.weights_bytes < 28 * 2**30  # about 14.3e9 parameters, mostly bf16
    assert 10 * 2**30 < report.text_encoder_bytes < 11 * 2**30  # umT5-XXL's ~5.7e9 parameters in bf16
    assert 4 * 2**30 < report.vae_bytes < 6 * 2**30  # the planned whole-chunk decode at 384x640
    assert report.fits() == {"24 GB": False, "48 GB": True, "80 GB": True}
    assert report.fits_without_text_encoder() == {"24 GB": False, "48 GB": True, "80 GB": True}


def test_the_plan_is_the_engines_compiled_chunk():
    """`helios-rt plan` at the demo's config gives the arenas the engine's own compiled chunk plans."""
    from helios_rt import Engine, EngineConfig
    from helios_rt.compile.chunk_program import ChunkKind
    from helios_rt.compile.cost import ChunkShape
    from helios_rt.demo import DEMO_TRANSFORMER

    engine = Engine.from_pretrained("demo", EngineConfig(height=64, width=64, device="cpu", dtype="float32",
                                                         kernels="reference", graphs="chunk"))  # fmt: skip
    shape = ChunkShape(height=64, width=64, text_len=512)
    report = plan_engine(DEMO_TRANSFORMER, 64, 64, torch.float32, shape=shape, kernels="reference", spec=engine.spec,
                         text_encoder=None)  # fmt: skip
    program = engine.chunk_program
    kinds = [ChunkKind(True, True), ChunkKind(True, False), ChunkKind(False, False)]
    assert [program.plan(k).arena_bytes for k in kinds] == [k.arena_bytes for k in report.kinds]
    assert [program.plan(k).lower_bound_bytes for k in kinds] == [k.lower_bound_bytes for k in report.kinds]
    assert report.arena_bytes == program.arena_bytes


def test_weights_respect_the_float32_kept_parameters():
    with torch.device("meta"):
        model = HeliosTransformer(TINY)
    fp32 = sum(p.numel() for n, p in model.named_parameters() if keeps_fp32(n))
    total = sum(p.numel() for p in model.parameters())
    assert 0 < fp32 < total
    assert weights_bytes(TINY, torch.bfloat16) == 4 * fp32 + 2 * (total - fp32)
    assert weights_bytes(TINY, torch.float32) == 4 * total


def test_report_dict_and_text():
    report = plan_engine(TINY, 64, 128, torch.float32, model_name="tiny", kernels="reference", text_encoder=None)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["total_bytes"] == report.weights_bytes + report.persistent_bytes + report.arena_bytes + report.vae_bytes
    assert [k["arena_bytes"] for k in d["kinds"]] == [k.arena_bytes for k in report.kinds]
    assert all(k["ratio"] >= 1.0 for k in d["kinds"]) and set(d["fits"]) == {"24 GB", "48 GB", "80 GB"}
    text = report.format()
    for needle in ("chunk kind", "lower bound", "history latents", "text K/V", "RoPE", "transformer weights",
                   "planned decode peak", "fits, text encoder resident: 24 GB yes", "reference ops"):  # fmt: skip
        assert needle in text, needle


def _parse(argv):
    parser = argparse.ArgumentParser(prog="helios-rt")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_prints_the_report(capsys):
    argv = [
        "plan",
        "--model",
        "tiny",
        "--height",
        "64",
        "--width",
        "128",
        "--dtype",
        "fp32",
        "--json",
        "--gpu-memory",
        "0.5",
    ]
    args = _parse(argv)
    assert args.func is run_plan and run_plan(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["budget"] == {"resident": False, "offloaded": False}  # the 1 GiB reserve alone exceeds 0.5 GB
    assert d["model"] == "tiny" and d["dtype"] == "float32" and len(d["kinds"]) == 3


def test_cli_rejects_an_unknown_model():
    with pytest.raises(Exception, match="does not exist"):
        run_plan(_parse(["plan", "--model", "/nonexistent/helios"]))


def test_a_budget_is_answered_from_the_total(capsys):
    report = plan_engine(TINY, 64, 128, torch.float32, model_name="tiny", kernels="reference", text_encoder=None)
    need_gb = (report.total_bytes + RESERVE_BYTES) / 2**30
    assert report.fits((need_gb * 1.01,)) == {f"{need_gb * 1.01:g} GB": True}
    assert report.fits((need_gb * 0.99,)) == {f"{need_gb * 0.99:g} GB": False}


@functools.lru_cache(maxsize=1)
def tiny_report_and_slices():
    """The tiny model's report at 64x128 (whole-chunk decode) and the decode bytes of each slice size."""
    from helios_rt.compile.cost import ChunkShape
    from helios_rt.compile.report import DECODE_SLICE_CANDIDATES, vae_decode_bytes

    report = plan_engine(TINY, 64, 128, torch.float32, model_name="tiny", kernels="reference", text_encoder=None)
    shape = ChunkShape(height=64, width=128)
    return report, {n: vae_decode_bytes(shape, torch.float32, slice_frames=n) for n in DECODE_SLICE_CANDIDATES}


def test_a_budget_chooses_the_largest_decode_slice_that_fits():
    """Whole chunk when it fits; else the largest slice in DECODE_SLICE_CANDIDATES that fits; else
    the whole chunk, reported as not fitting (slicing cannot help)."""
    from helios_rt.compile.cost import ChunkShape
    from helios_rt.compile.report import choose_decode_slices

    whole, vae = tiny_report_and_slices()
    assert whole.decode_slice_frames is None
    assert vae[3] > vae[2] > vae[1] and whole.vae_bytes > vae[3]

    def choose(gb):
        return choose_decode_slices(whole, ChunkShape(height=64, width=128), torch.float32, gb)

    rest = whole.total_bytes - whole.vae_bytes + RESERVE_BYTES
    between = (rest + (vae[3] + vae[2]) / 2) / 2**30  # slices of 2 fit, slices of 3 do not
    chosen = choose(between)
    assert chosen.decode_slice_frames == 2 and chosen.vae_bytes == vae[2]
    assert chosen.fits((between,)) == {f"{between:g} GB": True}
    assert choose((whole.total_bytes + RESERVE_BYTES) / 2**30 * 1.001) is whole
    hopeless = (rest + vae[1] * 0.5) / 2**30
    assert choose(hopeless).decode_slice_frames is None and not any(choose(hopeless).fits((hopeless,)).values())
    assert "EngineConfig(decode_slice_frames=2)" in chosen.format()


def test_the_cli_budget_switches_the_decode_to_slices(capsys):
    whole, vae = tiny_report_and_slices()
    gb = (whole.total_bytes - whole.vae_bytes + vae[1] + RESERVE_BYTES) / 2**30  # one-frame slices fit
    args = _parse(["plan", "--model", "tiny", "--height", "64", "--width", "128", "--dtype", "fp32", "--json",
                   "--gpu-memory", f"{gb}"])  # fmt: skip
    assert run_plan(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["decode_slice_frames"] == 1 and d["vae_bytes"] == vae[1]
    assert d["budget"] == {"resident": True, "offloaded": True}


def test_the_plan_uses_the_attention_backend_asked_for(capsys):
    """`--attention` plans the backend an engine with EngineConfig(attention=...) would run."""
    args = _parse(["plan", "--model", "tiny", "--height", "64", "--width", "128", "--dtype", "fp32", "--json",
                   "--attention", "sdpa"])  # fmt: skip
    assert run_plan(args) == 0
    assert json.loads(capsys.readouterr().out)["kernels"] == "sdpa"
