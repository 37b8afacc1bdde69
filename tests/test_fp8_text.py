"""umT5 in FP8 weight-only form (`quantize_umt5_`): its numeric gate against the bf16 encoder's embeddings."""

from __future__ import annotations

import copy

import pytest
import torch

from helios_rt.fp8.gate import relative_error
from helios_rt.fp8.weight_only import (
    WEIGHT_ONLY_LAYER_BOUND,
    FP8WeightOnlyLinear,
    encoder_drift_bound,
    quantize_linears_,
)
from helios_rt.model.text import quantize_umt5_, run_umt5

LAYERS = 4


@pytest.fixture(scope="module")
def encoders():
    """A small umT5 (random weights at transformers' init scale) in bf16, and its FP8 weight-only copy."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    config = UMT5Config(vocab_size=300, d_model=128, d_kv=32, d_ff=320, num_layers=LAYERS, num_heads=4)
    bf16 = UMT5EncoderModel(config).to(torch.bfloat16).eval()
    fp8 = quantize_umt5_(copy.deepcopy(bf16), "cpu")
    ids = torch.randint(3, 300, (2, 512))
    mask = torch.zeros(2, 512, dtype=torch.long)
    mask[0, :77], mask[1, :13] = 1, 1  # two prompts of awkward lengths, padded to 512 as the engine pads
    return bf16, fp8, ids, mask


def test_every_umt5_linear_is_e4m3_and_the_embedding_stays_apart(encoders):
    bf16, fp8, _, _ = encoders
    names = [n for n, m in bf16.encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(names) == LAYERS * 7  # q, k, v, o, wi_0, wi_1, wo
    for name in names:
        layer = fp8.encoder.get_submodule(name)
        assert isinstance(layer, FP8WeightOnlyLinear) and layer.weight.dtype == torch.float8_e4m3fn, name
    assert fp8.encoder.embed_tokens is None and fp8.shared.weight.dtype == torch.bfloat16


def test_each_linear_within_the_weight_only_bound(encoders):
    """Each FP8 linear, fed the bf16 encoder's own input to it, within u + 2 bf16 roundings of the bf16 one."""
    bf16, fp8, ids, mask = encoders
    errors: dict[str, float] = {}
    hooks = []
    for name, m in bf16.encoder.named_modules():
        if isinstance(m, torch.nn.Linear):
            q = fp8.encoder.get_submodule(name)
            hooks.append(m.register_forward_hook(
                lambda _m, a, out, q=q, name=name: errors.__setitem__(name, relative_error(q(a[0]), out))
            ))  # fmt: skip
    with torch.no_grad():
        run_umt5(bf16, ids, mask, "cpu")
    for h in hooks:
        h.remove()
    worst = max(errors, key=errors.get)
    assert errors[worst] <= WEIGHT_ONLY_LAYER_BOUND, f"{worst}: {errors[worst]:.4f} > {WEIGHT_ONLY_LAYER_BOUND:.4f}"


def test_the_embeddings_within_the_random_walk_bound_of_the_bf16_encoder(encoders):
    """The gate: per prompt, the FP8 encoder's embeddings within u * sqrt(L / 3) of the bf16 encoder's,
    and zero past the prompt's tokens in both."""
    bf16, fp8, ids, mask = encoders
    with torch.no_grad():
        ref, out = run_umt5(bf16, ids, mask, "cpu"), run_umt5(fp8, ids, mask, "cpu")
    assert out.dtype == torch.float32 and out.shape == ref.shape
    for i, n in enumerate(mask.sum(1).tolist()):
        err = relative_error(out[i, :n], ref[i, :n])
        assert 0 < err <= encoder_drift_bound(LAYERS), f"prompt {i}: {err:.4f} > {encoder_drift_bound(LAYERS):.4f}"
        assert not out[i, n:].any()


def test_a_weight_only_linear_is_its_dequantised_weight_times_the_input():
    """Awkward sizes; one channel of zeros (its scale floors, it stays zero), one far larger than the rest."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(113, 203, bias=True)
    with torch.no_grad():
        linear.weight[7] = 0
        linear.weight[11] *= 1000
    layer = torch.nn.Sequential(linear)
    quantize_linears_(layer)
    q = layer[0]
    x = torch.randn(5, 113)
    w = q.weight.double() * q.weight_scale.double()[:, None]
    torch.testing.assert_close(q(x).double(), x.double() @ w.T + linear.bias.double(), rtol=1e-5, atol=1e-5)
    assert not w[7].any()
    row = linear.weight[11].double()
    assert ((w[11] - row).abs() <= 2.0**-4 * row.abs() + 2.0**-10 * q.weight_scale[11]).all()
