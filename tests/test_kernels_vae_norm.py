"""Triton `rms_norm_silu` (the Wan VAE's channel RMS norm + SiLU) against its PyTorch spec.

The kernel runs on `kernel_device()` (the GPU when compiled for one, else the CPU interpreter); inputs are
drawn on the CPU and the references computed there (helios_rt.kernels.testing says why)."""

import pytest
import torch
from helios_rt.kernels import vae_norm
from helios_rt.kernels.testing import check_op, kernel_device, to_device, upcast

from helios_rt.model.vae_blocks import rms_norm_silu

D = kernel_device()
CL = torch.channels_last_3d
# (B, C, T, H, W): awkward channel counts (13, 203: a partial block), the decoder's 96, batch 2, a tile
# boundary inside a frame (96 channels -> 32 pixels a program; 5x7 pixels a frame).
SHAPES = [(1, 13, 3, 5, 7), (2, 96, 2, 5, 7), (2, 203, 1, 3, 3), (1, 32, 4, 9, 11)]


def _inputs(shape, dtype, g, layout=CL):  # on the CPU
    x = (torch.randn(*shape, generator=g) * 3 + 0.5).to(dtype).contiguous(memory_format=layout)
    gamma = (torch.randn(shape[1], 1, 1, 1, generator=g) * 0.5 + 1).to(dtype)
    return x, gamma


def _check(x, gamma, out, name):
    scale = x.shape[1] ** 0.5
    ref32 = rms_norm_silu(*upcast((x, gamma)), scale)
    naive = rms_norm_silu(x, gamma, scale)
    check_op(name, out, ref32, naive, x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_silu(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x, gamma = _inputs(shape, dtype, g)
    out = vae_norm.rms_norm_silu(*to_device((x, gamma), D), shape[1] ** 0.5)
    assert out.is_contiguous(memory_format=CL), "a channels-last input must give a channels-last output"
    _check(x, gamma, out, f"rms_norm_silu {shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_silu_contiguous_layout(dtype):
    """[B, C, T, H, W] contiguous (channel stride T*H*W): slow, but the strides are followed."""
    g = torch.Generator().manual_seed(5)
    x, gamma = _inputs((2, 24, 3, 5, 6), dtype, g, layout=torch.contiguous_format)
    _check(x, gamma, vae_norm.rms_norm_silu(*to_device((x, gamma), D), 24**0.5), "rms_norm_silu (NCTHW)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_silu_strided_views_in_and_out(dtype):
    """Batch 2; x is a channel and frame slice of a wider channels-last activation, out the body of a
    time-padded buffer (as a residual block writes the next causal conv's input): only the body is written."""
    g = torch.Generator().manual_seed(9)
    base = (torch.randn(2, 64, 6, 5, 7, generator=g) * 2).to(dtype).contiguous(memory_format=CL)
    x = base[:, 10:50, 1:5]  # channel stride 1, pixel strides of the 64-channel tensor
    gamma = (torch.randn(40, 1, 1, 1, generator=g) + 1).to(dtype)
    buf = torch.zeros(2, 40, 2 + 4, 5, 7, dtype=dtype).contiguous(memory_format=CL)
    buf_dev = to_device(buf, D)
    body = buf_dev[:, :, 2:]
    res = vae_norm.rms_norm_silu(*to_device((x, gamma), D), 40**0.5, out=body)
    assert res.data_ptr() == body.data_ptr()
    assert (buf_dev[:, :, :2] == 0).all(), "the kernel wrote into the buffer's leading (pad) frames"
    _check(x, gamma, body, "rms_norm_silu (strided in, out=)")


def test_rms_norm_silu_float32_gain_on_bf16_activations():
    g = torch.Generator().manual_seed(11)
    x, gamma = _inputs((2, 48, 2, 3, 5), torch.bfloat16, g)
    gamma32 = gamma.float() + torch.randn(gamma.shape, generator=g) * 1e-2  # not representable in bf16
    out = vae_norm.rms_norm_silu(*to_device((x, gamma32), D), 48**0.5)
    ref32 = rms_norm_silu(x.float(), gamma32, 48**0.5)
    check_op("rms_norm_silu (fp32 gamma)", out, ref32, rms_norm_silu(x, gamma32, 48**0.5), torch.bfloat16)


def test_rms_norm_silu_validates():
    x = torch.randn(1, 8, 2, 3, 3, device=D)
    gamma = torch.ones(8, 1, 1, 1, device=D)
    with pytest.raises(ValueError, match="gamma must have C=8"):
        vae_norm.rms_norm_silu(x, torch.ones(4, device=D), 1.0)
    with pytest.raises(ValueError, match=r"x must be \[B, C, T, H, W\]"):
        vae_norm.rms_norm_silu(x[0], gamma, 1.0)
    with pytest.raises(ValueError, match="out must have dtype"):
        vae_norm.rms_norm_silu(x, gamma, 1.0, out=torch.empty_like(x, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must have shape"):
        vae_norm.rms_norm_silu(x, gamma, 1.0, out=torch.empty(1, 8, 3, 3, 3, device=D))


def test_rms_norm_silu_is_an_operator_with_a_fake():
    """On meta tensors the op allocates its out and runs nothing: the decode plans with the fused op."""
    x = torch.empty(2, 96, 3, 8, 8, device="meta").contiguous(memory_format=CL)
    out = vae_norm.rms_norm_silu(x, torch.empty(96, 1, 1, 1, device="meta"), 96**0.5)
    assert out.device.type == "meta" and out.shape == x.shape
    assert torch.ops.helios_rt.vae_rms_norm_silu.default is not None
