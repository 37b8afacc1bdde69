"""Prompt encoders: the checkpoint's umT5 (through `transformers`) and the demo model's hashed embedder.

Helios conditions on umT5-XXL's last hidden state for a prompt padded to 512 tokens; positions
past the prompt's own tokens are zero (not the encoder's output for padding), and the transformer
sees all 512 rows without a mask. Numerics depend on both, so both are reproduced here.

`text_encoder_precision="fp8"` holds umT5's linears in e4m3, weight-only, per output channel
(`fp8.weight_only`), on the device, and its token embedding in host memory (a row gather there, one
`[B, 512, d_model]` upload): 4.3 GiB on the GPU instead of 10.6 GiB, which is what lets a prompt be
encoded beside the FP8 transformer within 24 GB (`helios-rt plan`'s encode phase).
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import torch

from ..checkpoint import CheckpointError, find_component, index_tensors, load_state_dict, weight_files
from ..errors import InputError

Tensor = torch.Tensor
MAX_TEXT_TOKENS = 512
TEXT_ENCODER_PRECISIONS = ("native", "fp8")


def clean_prompt(text: str, fix_text: bool = True) -> str:
    """The Helios pipelines' `prompt_clean`: ftfy's `fix_text`, HTML entities unescaped twice, whitespace
    collapsed.

    ftfy changes ordinary prompts (curly quotes, full-width letters, mojibake), so umT5 embeddings are
    the reference's only with it: it is required (the `helios_rt[text]` extra), never skipped. With
    `fix_text=False` the ftfy step is left out: for the demo's hashed words and the emptiness check.
    """
    if fix_text and text.strip():  # ftfy cannot turn blank text into words: an empty prompt needs no ftfy
        text = _ftfy().fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _ftfy():
    try:
        import ftfy
    except ImportError:
        raise ImportError(
            "text prompts for a umT5 text encoder are cleaned as the Helios pipelines clean them, with "
            "ftfy, which is not installed: pip install ftfy (or helios_rt[text]), or pass prompt embeddings"
        ) from None
    return ftfy


def require_ftfy() -> None:
    """Fail now, naming the install, if text prompts cannot be cleaned (before a checkpoint is loaded)."""
    _ftfy()


def validate_prompt(text: object, what: str = "prompt") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # bytes that were not UTF-8, decoded with surrogateescape (argv)
        raise InputError(
            f"{what} is not valid UTF-8 text (undecodable byte at character {err.start}); "
            "pass the prompt in UTF-8 (e.g. convert it with iconv)"
        ) from None
    if not clean_prompt(text, fix_text=False):
        raise InputError(f"{what} is empty; describe the video to generate (e.g. 'a tropical fish among corals')")
    return text


class PromptEncoder(Protocol):
    text_dim: int

    def encode(self, prompts: list[str]) -> Tensor:
        """`[B, 512, text_dim]` float32 embeddings, zero past each prompt's tokens."""
        ...


class UMT5PromptEncoder:
    """umT5 encoder + tokenizer read from a checkpoint's `text_encoder/` and `tokenizer/` folders.

    precision: "native" (the whole encoder on `device`) or "fp8" (`quantize_umt5_`: e4m3 linears on
    `device`, the token embedding in host memory). offload: the device part goes back to host memory
    between prompts.
    """

    def __init__(
        self,
        tokenizer,
        encoder: torch.nn.Module,
        device: torch.device,
        offload: bool = False,
        precision: str = "native",
    ) -> None:
        if precision not in TEXT_ENCODER_PRECISIONS:
            raise ValueError(f"text encoder precision must be one of {TEXT_ENCODER_PRECISIONS}, got {precision!r}")
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.device = device
        self.precision = precision
        self.text_dim = encoder.config.d_model
        if precision == "fp8" and not is_weight_only_fp8(encoder):
            quantize_umt5_(encoder, device)
        self.offload = offload  # keep the weights in host memory between prompts (see EngineConfig)
        if offload:
            self._park()

    @classmethod
    def from_pretrained(
        cls,
        root: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        offload: bool = False,
        precision: str = "native",
    ) -> UMT5PromptEncoder:
        """With precision="fp8" the float weights are read into host memory and quantised onto `device` one
        linear at a time: the float encoder (10.6 GiB in bf16) never sits on the device."""
        from transformers import AutoTokenizer

        tokenizer_dir = find_component(root, "tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        except Exception as err:  # transformers raises many types for a broken folder; name the folder
            raise CheckpointError(f"cannot load the tokenizer from {tokenizer_dir}: {err}") from err
        load_on = "cpu" if precision == "fp8" else device
        encoder = load_umt5_encoder(find_component(root, "text_encoder"), dtype, load_on)
        return cls(tokenizer, encoder, torch.device(device), offload, precision)

    @property
    def device_part(self) -> torch.nn.Module:
        """The modules that live on the device while encoding: all of umT5, or with fp8 its stack."""
        return self.encoder.encoder if self.precision == "fp8" else self.encoder

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=MAX_TEXT_TOKENS,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        if self.offload:
            self.device_part.to(self.device)
        try:
            return run_umt5(self.encoder, batch.input_ids, batch.attention_mask.to(self.device), self.device)
        finally:
            if self.offload:
                self._park()

    def _park(self) -> None:
        """Weights to host memory; the device's copy goes back to the allocator (and to the driver)."""
        self.device_part.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def run_umt5(encoder: torch.nn.Module, ids: Tensor, mask: Tensor, device: torch.device | str) -> Tensor:
    """`[B, 512, d_model]` float32 last hidden state on `device`, zero past each prompt's tokens.

    The encode body the engine runs and `helios-rt plan` traces on meta tensors. ids: `[B, 512]` token
    ids (host); mask: the attention mask on `device` (`[B, 512]`, or `[B, 1, 512, 512]` when planning).
    A weight-only FP8 encoder (`quantize_umt5_`) embeds the tokens on the host and uploads the rows.
    """
    if is_weight_only_fp8(encoder):
        embeds = encoder.shared(ids.to(encoder.shared.weight.device)).to(device)
        hidden = encoder.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state.float()
    else:
        hidden = encoder(ids.to(device), mask).last_hidden_state.float()
    keep = mask if mask.ndim == 2 else mask[:, 0, 0, :]  # a planning mask: its first query row is the padding
    return hidden * keep[..., None].to(hidden.dtype)


def is_weight_only_fp8(encoder: torch.nn.Module) -> bool:
    return getattr(encoder, "weight_only_fp8", False)


def quantize_umt5_(encoder: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """umT5 in the FP8 weight-only form, in place: every linear of its stack becomes an
    `FP8WeightOnlyLinear` quantised on `device`, the rest of the stack (norms, relative position
    bias) moves there, and the token embedding stays where it is, untied from the stack.

    The gated FFN is replaced by `_GatedFFN` (the same math): transformers' FFN casts its input to
    `wo.weight.dtype`, which would be e4m3 here.
    """
    from ..fp8.weight_only import quantize_linears_

    stack = encoder.encoder
    stack.embed_tokens = None  # tied to `shared`: moving the stack would move the embedding with it
    for name, module in list(stack.named_modules()):
        if type(module).__name__ == "UMT5DenseGatedActDense":
            parent_name, _, child = name.rpartition(".")
            setattr(stack.get_submodule(parent_name), child, _GatedFFN(module))
    quantize_linears_(stack, device)
    stack.to(device)
    encoder.weight_only_fp8 = True
    return encoder


class _GatedFFN(torch.nn.Module):
    """umT5's gated-GELU FFN, `wo(act(wi_0(x)) * wi_1(x))`, without transformers' cast to `wo.weight.dtype`."""

    def __init__(self, ffn: torch.nn.Module) -> None:
        super().__init__()
        self.wi_0, self.wi_1, self.wo, self.act, self.dropout = ffn.wi_0, ffn.wi_1, ffn.wo, ffn.act, ffn.dropout

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(self.dropout(self.act(self.wi_0(x)) * self.wi_1(x)))


def load_umt5_encoder(folder: Path, dtype: torch.dtype, device: torch.device | str) -> torch.nn.Module:
    """Build `UMT5EncoderModel` from its config and our validated safetensors reader.

    The released weights store the token embedding once, as `shared.weight`; the encoder's own
    `embed_tokens` must be that tensor (tied), whatever `tie_word_embeddings` says, or every token
    embeds to garbage and the video comes out grey.
    """
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config.from_pretrained(str(folder))
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    tied = "encoder.embed_tokens.weight"
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != tied}
    if tied in index_tensors(weight_files(folder)):  # some exports also store the tied copy
        expected[tied] = expected["shared.weight"]
    state = load_state_dict(folder, expected, lambda _: dtype, device)
    state.pop(tied, None)
    model.load_state_dict(state, strict=False, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight
    return model.eval()


class HashPromptEncoder:
    """The demo model's prompt encoder: deterministic pseudo-embeddings, one per word.

    It is not a language model. A word's row is a Gaussian vector seeded by the word's hash, so the
    same word means the same thing on every machine and any word is accepted. With `positional`, each
    row also gets a vector seeded by its position: the transformer's cross-attention sees its text as
    a set, so without it "a red circle on a blue background" and "a blue circle on a red background"
    would be one condition (the trained demo needs the order; the untrained test model does not).
    Empty words are skipped, so an empty prompt is all zeros (the demo's unconditional input).
    """

    def __init__(self, text_dim: int, positional: bool = False) -> None:
        self.text_dim = text_dim
        self.positional = positional

    @classmethod
    def from_config(cls, config: dict) -> HashPromptEncoder:
        """From `text_encoder/config.json` of a checkpoint that names this class (the demo's)."""
        unknown = set(config) - {"_class_name", "text_dim", "positional"}
        if unknown:
            raise CheckpointError(f"text_encoder/config.json of a HashPromptEncoder has unknown keys {sorted(unknown)}")
        return cls(int(config["text_dim"]), bool(config.get("positional", False)))

    def encode(self, prompts: list[str]) -> Tensor:
        out = torch.zeros(len(prompts), MAX_TEXT_TOKENS, self.text_dim)
        for i, prompt in enumerate(prompts):
            words = [w for w in clean_prompt(prompt, fix_text=False).split(" ") if w]
            for j, word in enumerate(words[:MAX_TEXT_TOKENS]):
                out[i, j] = _seeded_vector(word.lower(), self.text_dim)
                if self.positional:
                    out[i, j] += _seeded_vector(f"<position {j}>", self.text_dim)
        return out


def _seeded_vector(key: str, dim: int) -> Tensor:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


class PromptCache:
    """Embeddings per prompt text, least recently used evicted: a stream re-uses its prompt every chunk."""

    def __init__(self, encoder: PromptEncoder, capacity: int = 16) -> None:
        self.encoder = encoder
        self.capacity = capacity
        self._store: OrderedDict[str, Tensor] = OrderedDict()

    def get(self, prompt: str) -> Tensor:
        """`[1, 512, text_dim]` float32 embeddings of one prompt."""
        validate_prompt(prompt)
        if prompt in self._store:
            self._store.move_to_end(prompt)
            return self._store[prompt]
        emb = self.encoder.encode([prompt])
        self._store[prompt] = emb
        if len(self._store) > self.capacity:
            self._store.popitem(last=False)
        return emb


def word_encoder_config(root: str | Path) -> dict | None:
    """The `text_encoder/config.json` of a checkpoint whose encoder is the hashed word embedder, else None.

    The demo checkpoints carry no language model: their `text_encoder/` holds only this config, naming
    `HashPromptEncoder`; any other `text_encoder/` is umT5.
    """
    path = Path(root) / "text_encoder" / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config if config.get("_class_name") == HashPromptEncoder.__name__ else None


def load_prompt_encoder(
    root: str | Path, dtype: torch.dtype, device: torch.device | str, offload: bool = False, precision: str = "native"
) -> PromptEncoder | None:
    """The checkpoint's prompt encoder: the word embedder, umT5, or None when it has no `text_encoder/`."""
    words = word_encoder_config(root)
    if words is not None:
        if precision != "native":
            raise ValueError(
                f"text_encoder_precision={precision!r} sets the precision of a checkpoint's umT5 encoder, and "
                f"{root} has a word embedder, not umT5: leave it 'native'"
            )
        return HashPromptEncoder.from_config(words)
    if not (Path(root) / "text_encoder").is_dir():
        return None
    return UMT5PromptEncoder.from_pretrained(root, dtype, device, offload=offload, precision=precision)
