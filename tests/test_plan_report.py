"""`helios-rt plan` and `plan_engine`: per-stage arenas, persistent buffers, weights, GPU fit."""

from __future__ import annotations

import argparse
import functools
import json

import pytest
import torch
from support.untrained import untrained_engine

from helios_rt.compile.report import RESERVE_BYTES, add_plan_parser, plan_engine, run_plan, weights_bytes
from helios_rt.config import HELIOS_14B, TINY
from helios_rt.model.transformer import HeliosTransformer, keeps_fp32


@functools.lru_cache(maxsize=1)
def report_14b():
    return plan_engine(HELIOS_14B, 384, 640, torch.bfloat16, model_name="helios-14b")


@pytest.mark.slow  # plans the 14B chunk: ~15 s
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


@pytest.mark.slow  # plans the demo chunk twice: ~10 s
def test_the_plan_is_the_engines_compiled_chunk():
    """`helios-rt plan` at the demo's config gives the arenas the engine's own compiled chunk plans."""
    from helios_rt import EngineConfig
    from helios_rt.compile.chunk_program import ChunkKind
    from helios_rt.compile.cost import ChunkShape
    from helios_rt.demo.untrained import UNTRAINED_TRANSFORMER

    engine = untrained_engine(EngineConfig(height=64, width=64, device="cpu", dtype="float32",
                                                         kernels="reference", graphs="chunk"))  # fmt: skip
    shape = ChunkShape(height=64, width=64, text_len=512)
    report = plan_engine(UNTRAINED_TRANSFORMER, 64, 64, torch.float32, shape=shape, kernels="reference",
                         spec=engine.spec,
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
                   "planned decode peak", "encode a prompt", "fits, every phase, EngineConfig(): 24 GB yes",
                   "reference ops"):  # fmt: skip
        assert needle in text, needle


def _parse(argv):
    parser = argparse.ArgumentParser(prog="helios-rt")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.mark.slow  # plans the 14B chunk through the CLI: ~9 s
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
    assert d["budget"] == {"fits": False, "setting": "EngineConfig()"}  # the 1 GiB reserve alone exceeds 0.5 GB
    assert d["model"] == "tiny" and d["dtype"] == "float32" and len(d["kinds"]) == 3


def test_cli_rejects_an_unknown_model():
    with pytest.raises(Exception, match="does not exist"):
        run_plan(_parse(["plan", "--model", "/nonexistent/helios"]))


def test_a_budget_is_answered_from_the_total(capsys):
    report = plan_engine(TINY, 64, 128, torch.float32, model_name="tiny", kernels="reference", text_encoder=None)
    assert report.peak_bytes == report.encode_bytes == report.total_bytes  # no text encoder: nothing to add
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
    assert d["budget"] == {"fits": True, "setting": "EngineConfig(decode_slice_frames=1)"}


def test_the_plan_uses_the_attention_backend_asked_for(capsys):
    """`--attention` plans the backend an engine with EngineConfig(attention=...) would run."""
    args = _parse(["plan", "--model", "tiny", "--height", "64", "--width", "128", "--dtype", "fp32", "--json",
                   "--attention", "sdpa"])  # fmt: skip
    assert run_plan(args) == 0
    assert json.loads(capsys.readouterr().out)["kernels"] == "sdpa"


# ---- the encode phase: umT5 on the GPU beside everything a chunk holds ------------------------------------
@functools.lru_cache(maxsize=1)
def fp8_report_14b():
    return plan_engine(HELIOS_14B, 384, 640, torch.bfloat16, model_name="helios-14b", precision="fp8")


def _umt5_parts(precision: str) -> tuple[int, int]:
    """umT5-XXL's bytes on the GPU and its planned activations, computed here from their own parts: the
    meta encoder as the engine holds it, and `run_umt5` planned on meta tensors."""
    from transformers import UMT5Config, UMT5EncoderModel

    from helios_rt.compile.report import UMT5_XXL
    from helios_rt.compile.workspace import plan_program
    from helios_rt.model.text import quantize_umt5_, run_umt5

    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).to(torch.bfloat16).eval()
    if precision == "fp8":
        quantize_umt5_(model, "meta")
    on_gpu = model.encoder if precision == "fp8" else model
    weights = sum(p.numel() * p.element_size() for p in on_gpu.parameters())
    ids = torch.zeros(1, 512, dtype=torch.long, device="meta")
    mask = torch.ones(1, 1, 512, 512, dtype=torch.bool, device="meta")
    with torch.no_grad():
        acts = plan_program(run_umt5, model, ids, mask, "meta", require_out=False).arena_bytes
    return weights, acts


@pytest.mark.slow  # plans the 14B chunk: ~18 s
def test_the_encode_phase_is_the_sum_of_what_a_prompt_switch_holds():
    """At a prompt switch the engine holds the transformer, the static state, the arena (the next chunk runs
    in it), the VAE and its decode memory, and moves umT5 beside them: the phase is their sum, and the peak."""
    from helios_rt.compile.cost import ChunkShape
    from helios_rt.compile.report import vae_decode_bytes

    report = fp8_report_14b()
    umt5, acts = _umt5_parts("native")
    assert 10 * 2**30 < umt5 < 11 * 2**30 and 0 < acts < 2**30
    parts = [
        weights_bytes(HELIOS_14B, torch.bfloat16, "fp8"),
        report.persistent_bytes,
        report.arena_bytes,
        vae_decode_bytes(ChunkShape(height=384, width=640), torch.bfloat16),
        umt5,
        acts,
    ]
    assert list(report.encode_parts.values()) == parts
    assert report.encode_bytes == sum(parts) == report.peak_bytes
    assert report.phases(resident=False)["encode a prompt (stream start, prompt switch)"] == sum(parts)
    assert report.phases(resident=False)["generate a chunk"] == report.total_bytes < sum(parts)
    # the FP8 transformer fits 24 GB while it generates, but not while a bf16 umT5 encodes beside it
    assert report.total_bytes + RESERVE_BYTES <= 24 * 2**30
    assert report.fits() == {"24 GB": False, "48 GB": True, "80 GB": True}


def test_umt5_in_fp8_weight_only_form_is_its_stack_in_e4m3_without_the_embedding():
    from helios_rt.compile.report import UMT5_XXL, text_encoder_bytes

    weights, acts = _umt5_parts("fp8")
    assert text_encoder_bytes(torch.bfloat16, UMT5_XXL, "fp8") == weights
    c = UMT5_XXL
    linears = c["num_layers"] * (4 * c["d_model"] * c["d_kv"] * c["num_heads"] + 3 * c["d_model"] * c["d_ff"])
    rows = c["num_layers"] * (4 * c["d_model"] + 2 * c["d_ff"] + c["d_model"])  # a float32 scale per output
    assert linears + 4 * rows < weights < linears + 4 * rows + 2 * 2**20  # + norms and position bias in bf16
    assert 4.3 * 2**30 < weights < 4.4 * 2**30 and 0 < acts < 2**30


@pytest.mark.slow  # plans the 14B chunk for each setting it tries: ~9 s
def test_the_cli_fits_fp8_in_24_gb_only_with_the_setting_that_fits_the_encode_phase(capsys):
    """`--precision fp8 --gpu-memory 24`: the bf16 umT5 does not fit beside the FP8 chunk at a prompt switch;
    the FP8 weight-only umT5 (with the largest decode slice that then fits) does, and the plan names it."""
    args = _parse(["plan", "--precision", "fp8", "--gpu-memory", "24", "--json"])
    assert run_plan(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["budget"] == {
        "fits": True,
        "setting": "EngineConfig(precision='fp8', text_encoder_precision='fp8', decode_slice_frames=3)",
    }
    assert d["peak_bytes"] == d["encode_bytes"] == sum(d["encode_parts"].values())
    assert d["peak_bytes"] + RESERVE_BYTES <= 24 * 2**30
    # the same engine with umT5 in the model dtype: no decode slice makes the encode phase fit
    args = _parse(["plan", "--precision", "fp8", "--gpu-memory", "24", "--json", "--text-encoder-precision", "fp8"])
    assert run_plan(args) == 0
    assert json.loads(capsys.readouterr().out)["budget"]["fits"]
    from helios_rt.compile.cost import ChunkShape
    from helios_rt.compile.report import choose_decode_slices

    native = choose_decode_slices(fp8_report_14b(), ChunkShape(height=384, width=640), torch.bfloat16, 24)
    assert native.fits((24,)) == {"24 GB": False}
    assert native.encode_bytes + RESERVE_BYTES > 24 * 2**30
