"""Triton flow_step, stage_transition and cfg_combine against their references.

The kernels run on `kernel_device()` (the GPU when they are compiled for one, else the CPU interpreter);
inputs are drawn on the CPU and the references computed there (helios_rt.kernels.testing says why)."""

import pytest
import torch
from helios_rt.kernels import sampler as K
from helios_rt.kernels.testing import check_op, kernel_device, to_device, upcast

from helios_rt.ops import sampler as S

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
D = kernel_device()  # the GPU when the kernels are compiled for one, else the CPU interpreter


def _flow_inputs(b, c, t, h, w, patch, dtype, g):  # on the CPU
    pt, ph, pw = patch
    x = torch.randn(b, c, t, h, w, generator=g).to(dtype)
    start = torch.randn(b, c, t, h, w, generator=g).to(dtype)
    v = torch.randn(b, (t // pt) * (h // ph) * (w // pw), pt * ph * pw * c, generator=g).to(dtype)
    return v, x, start


def test_unpatchify_matches_the_transformer_layout():
    # Token (t', h', w') holds channels in (pt, ph, pw, C) order, C fastest (diffusers Helios unpatchify).
    c, patch = 3, (1, 2, 2)
    v = torch.arange(2 * 2 * 4 * c, dtype=torch.float32).reshape(1, 2 * 2, 4 * c)  # the reference only
    lat = S.unpatchify(v, (1, c, 1, 4, 4), patch)
    token, ih, iw, ch = 1 * 2 + 1, 1, 0, 2  # token (h'=1, w'=1), sub-position (1, 0), channel 2
    assert lat[0, ch, 0, 2 * 1 + ih, 2 * 1 + iw] == v[0, token, (ih * 2 + iw) * c + ch]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "dims,patch", [((1, 16, 1, 6, 10), (1, 2, 2)), ((2, 3, 4, 6, 10), (2, 2, 2)), ((1, 5, 2, 9, 7), (1, 3, 1))]
)
@pytest.mark.parametrize("sigma_next", [0.35, -1.0])
def test_flow_step(dims, patch, sigma_next, dtype):
    g = torch.Generator().manual_seed(sum(dims))
    v, x, start = _flow_inputs(*dims, patch, dtype, g)
    st, sn = torch.tensor([0.8125]), torch.tensor([sigma_next])
    out = K.flow_step(*to_device((v, x, start, st, sn), D), patch)
    ref32 = S.flow_step(*upcast((v, x, start)), st, sn, patch)
    # The reference already computes in float64 and rounds once: it is the naive computation too.
    check_op("flow_step", out, ref32, S.flow_step(v, x, start, st, sn, patch), dtype)


def test_flow_step_out_and_strided_tokens():
    g = torch.Generator().manual_seed(3)
    v, x, start = _flow_inputs(1, 4, 2, 6, 10, (1, 2, 2), torch.float32, g)
    wide = torch.randn(1, v.shape[1], v.shape[2] + 5, generator=g)
    wide[:, :, : v.shape[2]] = v
    v_strided = wide[:, :, : v.shape[2]]
    st, sn = torch.tensor([0.5]), torch.tensor([0.25])
    expected = S.flow_step(v, x, start, st, sn, (1, 2, 2))
    v_dev, x_dev, start_dev, st_dev, sn_dev = to_device((v_strided, x, start, st, sn), D)
    out = torch.empty_like(x_dev)
    assert K.flow_step(v_dev, x_dev, start_dev, st_dev, sn_dev, (1, 2, 2), out=out) is out
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-6)
    # The same static buffers with new sigma values: nothing about the step is baked into the launch.
    st_dev.fill_(0.9)
    sn_dev.fill_(-1.0)
    K.flow_step(v_dev, x_dev, start_dev, st_dev, sn_dev, (1, 2, 2), out=out)
    torch.testing.assert_close(out.cpu(), x - 0.9 * S.unpatchify(v, tuple(x.shape), (1, 2, 2)), rtol=0, atol=1e-6)


def test_flow_step_reference_rounds_like_dmd_step_and_takes_float64_sigmas():
    # The engine passes its float64 plan sigmas; x0 is rounded to the model output dtype first.
    from helios_rt.sampling.schedules import dmd_step

    g = torch.Generator().manual_seed(4)
    patch = (1, 2, 2)
    for v_dtype in (torch.float32, torch.bfloat16):
        v, x, start = _flow_inputs(1, 4, 2, 6, 10, patch, torch.float32, g)
        v = v.to(v_dtype)
        flow = S.unpatchify(v, tuple(x.shape), patch)
        for sn in (0.3141592653589793, -1.0):
            st, sn = torch.tensor(0.7182818284590452, dtype=torch.float64), torch.tensor(sn, dtype=torch.float64)
            expected = dmd_step(flow, x, start, st, sn)
            assert torch.equal(S.flow_step(v, x, start, st, sn, patch), expected)
            out = K.flow_step(*to_device((v, x, start, st.reshape(1), sn.reshape(1)), D), patch)
            # the kernel rounds once from float64 (x0 is not rounded to v's dtype first)
            bound = 2 * torch.finfo(v_dtype).eps * max(1.0, expected.abs().max().item())
            torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=bound)


def test_flow_step_validates():
    v, x, start = to_device(_flow_inputs(1, 4, 2, 6, 10, (1, 2, 2), torch.float32, torch.Generator().manual_seed(0)), D)
    st = torch.tensor([0.5], device=D)
    with pytest.raises(ValueError, match="v_patch"):
        K.flow_step(v[:, :-1], x, start, st, st, (1, 2, 2))
    with pytest.raises(ValueError, match="sigma_next"):
        K.flow_step(v, x, start, st, torch.tensor([0.5, 0.1], device=D), (1, 2, 2))
    with pytest.raises(ValueError, match="patch"):
        K.flow_step(v, x, start, st, st, (1, 4, 4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(1, 16, 2, 3, 5), (2, 3, 1, 7, 113)])
def test_stage_transition(dims, dtype):
    g = torch.Generator().manual_seed(dims[-1])
    b, c, t, h, w = dims
    x = torch.randn(*dims, generator=g).to(dtype)
    noise = torch.randn(b, c, t, 2 * h, 2 * w, generator=g).to(dtype)
    x_dev, noise_dev = to_device((x, noise), D)
    out = K.stage_transition(x_dev, noise_dev, 0.8717, 0.4091)
    ref32 = S.stage_transition(x.float(), noise.float(), 0.8717, 0.4091)
    check_op("stage_transition", out, ref32, S.stage_transition(x, noise, 0.8717, 0.4091), dtype)
    into = torch.empty_like(noise_dev)
    assert K.stage_transition(x_dev, noise_dev, 0.8717, 0.4091, out=into) is into
    assert torch.equal(into, out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero_star", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 3, 5, 7), (4, 16, 1, 9, 1000)])
def test_cfg_combine(shape, zero_star, dtype):
    g = torch.Generator().manual_seed(shape[-1])
    cond = torch.randn(*shape[1:], generator=g)
    pred = torch.stack([0.7 * cond + 0.3 * torch.randn(*shape[1:], generator=g) for _ in range(shape[0])])
    pred = pred.to(dtype)  # [cond (B) ; uncond (B)] with correlated halves, as real predictions are
    out = K.cfg_combine(to_device(pred, D), 5.0, zero_star)
    ref32 = S.cfg_combine(pred.float(), 5.0, zero_star)
    check_op("cfg_combine", out, ref32, S.cfg_combine(pred, 5.0, zero_star), dtype)


def test_cfg_zero_star_matches_the_pipeline_formula():
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(4, 3, 2, 5, 6, generator=g)
    cond, uncond = pred.chunk(2)  # the order of sampling.guidance.split_cond_uncond
    u, c = uncond.reshape(2, -1), cond.reshape(2, -1)
    alpha = ((u * c).sum(1, keepdim=True) / ((u**2).sum(1, keepdim=True) + 1e-8)).view(2, 1, 1, 1, 1)
    expected = uncond * alpha + 5.0 * (cond - uncond * alpha)  # diffusers pipeline_helios_pyramid
    out = torch.empty(2, 3, 2, 5, 6, device=D)
    assert K.cfg_combine(to_device(pred, D), 5.0, True, out=out) is out
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S.cfg_combine(pred, 5.0, True), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zero_star", [False, True])
def test_cfg_combine_takes_cond_first_like_split_cond_uncond(zero_star):
    # Swapping the halves must change the result: the op and guidance.py agree on [cond; uncond].
    from helios_rt.sampling.guidance import cfg_combine as cfg_plain
    from helios_rt.sampling.guidance import cfg_zero_star, split_cond_uncond

    g = torch.Generator().manual_seed(9)
    pred = torch.randn(2, 4, 2, 3, 5, generator=g)
    cond, uncond = split_cond_uncond(pred)
    expected = cfg_zero_star(cond, uncond, 4.0) if zero_star else cfg_plain(cond, uncond, 4.0)
    assert torch.equal(S.cfg_combine(pred, 4.0, zero_star), expected)  # the reference reproduces guidance.py
    torch.testing.assert_close(K.cfg_combine(to_device(pred, D), 4.0, zero_star).cpu(), expected, rtol=1e-5, atol=1e-5)
    swapped = torch.cat([uncond, cond])
    assert not torch.allclose(K.cfg_combine(to_device(swapped, D), 4.0, zero_star).cpu(), expected, atol=1e-3)
