"""The umT5 prompt encoder read from a checkpoint folder, against transformers' own loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helios_rt.model.text import (
    MAX_TEXT_TOKENS,
    HashPromptEncoder,
    PromptCache,
    UMT5PromptEncoder,
    clean_prompt,
)

WORDS = ["a", "fish", "among", "corals", "red", "kite", "over", "the", "beach"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("text")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "HeliosPyramidPipeline"}))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = UMT5Config(
        vocab_size=len(vocab),
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        tie_word_embeddings=False,
    )
    model = UMT5EncoderModel(config).eval()
    model.save_pretrained(root / "text_encoder", safe_serialization=True)
    return root


def reference_embeds(root, prompt: str) -> torch.Tensor:
    """What the Helios pipelines compute: last hidden state, zeroed past the prompt's tokens."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    model = UMT5EncoderModel.from_pretrained(root / "text_encoder").eval()
    batch = tok(
        [prompt],
        padding="max_length",
        max_length=MAX_TEXT_TOKENS,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = model(batch.input_ids, batch.attention_mask).last_hidden_state
    n = int(batch.attention_mask.sum())
    hidden[:, n:] = 0
    return hidden


def test_umt5_matches_transformers(checkpoint) -> None:
    encoder = UMT5PromptEncoder.from_pretrained(checkpoint)
    prompt = "a red  kite over the beach"
    got = encoder.encode([prompt])
    expected = reference_embeds(checkpoint, clean_prompt(prompt))
    assert got.shape == (1, MAX_TEXT_TOKENS, 16)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert got[0, 7:].abs().max() == 0, "positions past the prompt's 6 tokens + eos must be zero"


def test_token_embedding_is_tied_to_shared(checkpoint, tmp_path) -> None:
    """The released encoder stores the embedding only as shared.weight; the encoder must use it."""
    import shutil

    root = shutil.copytree(checkpoint, tmp_path / "ckpt")
    path = root / "text_encoder" / "model.safetensors"
    tensors = load_file(path)
    tensors.pop("encoder.embed_tokens.weight", None)
    tensors["shared.weight"] = tensors["shared.weight"] * 3.0
    save_file(tensors, path)
    encoder = UMT5PromptEncoder.from_pretrained(root).encoder
    assert encoder.encoder.embed_tokens.weight.data_ptr() == encoder.shared.weight.data_ptr()
    torch.testing.assert_close(encoder.encoder.embed_tokens.weight, tensors["shared.weight"])


def test_html_entities_and_whitespace_are_cleaned() -> None:
    assert clean_prompt("  a &amp;amp; b\n\t c ") == "a & b c"


def test_hash_encoder_is_deterministic_and_prompt_dependent() -> None:
    enc = HashPromptEncoder(8)
    a, b, c = enc.encode(["red kite"]), enc.encode(["red kite"]), enc.encode(["blue kite"])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert a[0, 2:].abs().max() == 0


def test_prompt_cache_encodes_each_prompt_once() -> None:
    calls = []

    class Counting(HashPromptEncoder):
        def encode(self, prompts):
            calls.append(prompts)
            return super().encode(prompts)

    cache = PromptCache(Counting(4), capacity=2)
    for p in ["a", "b", "a", "c", "a", "b"]:
        cache.get(p)
    assert calls == [["a"], ["b"], ["c"], ["b"]]
    with pytest.raises(ValueError, match="prompt is empty"):
        cache.get(" ")


def test_an_offloaded_encoder_runs_on_its_device_and_rests_in_host_memory(checkpoint, monkeypatch) -> None:
    """offload=True: weights move to the encoder's device for each prompt and back to the host after
    (on this CPU machine the device is the host too, so the moves are recorded, not measured)."""
    moves: list[str] = []
    resident = UMT5PromptEncoder.from_pretrained(checkpoint)
    offloaded = UMT5PromptEncoder.from_pretrained(checkpoint, offload=True)
    to = type(offloaded.encoder).to

    def recorded(self, *args, **kwargs):
        moves.append(str(args[0]))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(type(offloaded.encoder), "to", recorded)
    got = offloaded.encode(["a red kite over the beach"])
    assert moves == [str(offloaded.device), "cpu"]
    torch.testing.assert_close(got, resident.encode(["a red kite over the beach"]), rtol=0, atol=0)
    assert all(p.device.type == "cpu" for p in offloaded.encoder.parameters())


def test_an_fp8_encoder_keeps_its_embedding_on_the_host_and_moves_only_its_stack(checkpoint, monkeypatch) -> None:
    """precision="fp8": e4m3 linears (`quantize_umt5_`) on the device, the token embedding in host memory;
    with offload only the stack travels. Its embeddings are within the weight-only gate of the float ones."""
    from helios_rt.fp8.gate import relative_error
    from helios_rt.fp8.weight_only import FP8WeightOnlyLinear, encoder_drift_bound

    prompt = "a red kite over the beach"
    native = UMT5PromptEncoder.from_pretrained(checkpoint).encode([prompt])
    fp8 = UMT5PromptEncoder.from_pretrained(checkpoint, precision="fp8", offload=True)
    assert fp8.device_part is fp8.encoder.encoder and fp8.encoder.encoder.embed_tokens is None
    assert all(isinstance(m, FP8WeightOnlyLinear) for m in fp8.encoder.encoder.modules() if hasattr(m, "in_features"))
    moves: list[str] = []
    to = type(fp8.device_part).to
    monkeypatch.setattr(type(fp8.device_part), "to", lambda self, *a, **k: moves.append(str(a[0])) or to(self, *a, **k))
    got = fp8.encode([prompt])
    assert moves == [str(fp8.device), "cpu"]
    assert got.dtype == torch.float32 and got[0, 7:].abs().max() == 0
    assert 0 < relative_error(got[0, :7], native[0, :7]) <= encoder_drift_bound(2)
    with pytest.raises(ValueError, match="text encoder precision must be one of"):
        UMT5PromptEncoder.from_pretrained(checkpoint, precision="int4")
