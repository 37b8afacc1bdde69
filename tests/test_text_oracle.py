"""Text -> umT5 embeddings -> latents against diffusers' pipeline, and cleaning prompts as it does (ftfy).

A small random umT5 encoder and a word-level tokenizer are saved with the small Helios pipeline as
one checkpoint folder; the engine reads them and must make the pipeline's first chunk from the
same text, at the engine oracles' bound (test_engine_oracle.py). The prompt needs ftfy (a curly
apostrophe the vocabulary only knows straight), HTML unescaping and whitespace collapsing.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from support.pipelines import HEIGHT, TRANSFORMER, WIDTH, build_pipeline, decode_like_pipeline
from support.untrained import untrained_engine

from helios_rt import Engine, EngineConfig
from helios_rt.cli import EXIT_USAGE, main
from helios_rt.model.text import clean_prompt

PROMPT = "a red  kite &amp;amp; the fish\u2019s\n beach"
WORDS = ["a", "red", "kite", "&", "the", "fish", "'", "s", "beach"]
SEED = 77


def text_pipeline():
    """The distilled test pipeline with a random umT5 (d_model = the transformer's text_dim) and a tokenizer."""
    from diffusers import HeliosPyramidPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(21)
    config = UMT5Config(
        vocab_size=len(vocab),
        d_model=TRANSFORMER["text_dim"],
        d_kv=6,
        d_ff=32,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
    )
    base = build_pipeline("distilled")
    return HeliosPyramidPipeline(
        tokenizer=tokenizer,
        text_encoder=UMT5EncoderModel(config).eval(),
        vae=base.vae,
        scheduler=base.scheduler,
        transformer=base.transformer,
        is_distilled=True,
    )


@pytest.mark.oracle
def test_text_to_latents_matches_pipeline(tmp_path) -> None:
    assert clean_prompt(PROMPT) != clean_prompt(PROMPT, fix_text=False), "the prompt must need ftfy"
    pipe = text_pipeline()
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    ref = pipe(
        prompt=PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_frames=33,
        pyramid_num_inference_steps_list=[1, 1, 1],
        is_amplify_first_chunk=True,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
    ).frames
    config = EngineConfig(
        height=HEIGHT,
        width=WIDTH,
        device="cpu",
        dtype="float32",
        kernels="reference",
        pyramid_steps=(1, 1, 1),
        amplify_first_chunk=True,
    )
    engine = Engine.from_pretrained(tmp_path, config)
    with engine.generate_stream(PROMPT, num_frames=33, seed=SEED) as stream:
        chunk = next(stream)
    diff = (chunk.latents - ref[:, :, -9:]).abs()
    assert diff.max().item() <= 1e-3, f"latents differ by {diff.max().item():.2e} (> 1e-3) at {diff.argmax().item()}"
    level = np.abs(chunk.frames.astype(np.int16) - decode_like_pipeline(pipe, ref, chunks=1).astype(np.int16))
    assert level.max() <= 1, f"{(level > 1).sum()} frame values differ by more than one level (max {level.max()})"


def test_without_ftfy_text_prompts_fail_naming_the_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ftfy", None)  # import ftfy now raises ImportError
    with pytest.raises(ImportError, match="pip install ftfy"):
        clean_prompt("a fish\u2019s fin")
    assert clean_prompt(" \n ") == ""  # blank text: nothing for ftfy to fix (the empty negative prompt)
    assert clean_prompt("a  fish\u2019s &amp; fin", fix_text=False) == "a fish\u2019s & fin"


def test_cli_refuses_a_text_prompt_without_ftfy_before_the_load(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ftfy", None)
    (tmp_path / "text_encoder").mkdir()  # nothing else: a load would fail with the checkpoint's exit code
    code = main(["generate", "--model", str(tmp_path), "--prompt", "a fish", "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert "pip install ftfy" in err and "Traceback" not in err


def test_an_fp8_text_encoder_is_what_the_engine_loads(tmp_path) -> None:
    """EngineConfig(text_encoder_precision="fp8") reaches the checkpoint's umT5 (its linears weight-only e4m3,
    within the encoder gate of the native engine's embedding); a model without umT5 refuses it by name."""
    from helios_rt.fp8.weight_only import FP8WeightOnlyLinear, encoder_drift_bound

    text_pipeline().save_pretrained(tmp_path, safe_serialization=True)
    config = EngineConfig(height=HEIGHT, width=WIDTH, device="cpu", dtype="bfloat16", kernels="reference")
    native = Engine.from_pretrained(tmp_path, config)
    fp8 = Engine.from_pretrained(tmp_path, config.replace(text_encoder_precision="fp8"))
    umt5 = [e._prompts.encoder for e in (native, fp8)]  # the engines' own encoders, behind their prompt caches
    assert not any(isinstance(m, FP8WeightOnlyLinear) for m in umt5[0].encoder.modules())
    assert any(isinstance(m, FP8WeightOnlyLinear) for m in umt5[1].encoder.modules())
    a, b = (u.encode([PROMPT]).float() for u in umt5)
    drift = ((b - a).norm() / a.norm()).item()
    assert 0 < drift <= encoder_drift_bound(2), f"FP8 umT5 drift {drift:.3g}"
    with pytest.raises(ValueError, match="text_encoder_precision='fp8'.*no text_encoder"):
        untrained_engine(config.replace(text_encoder_precision="fp8"))
