"""Triton qk_norm_rope and attention against references; attention at every tile config its autotuner may pick.

The kernels run on `kernel_device()` (the GPU when they are compiled for one, else the CPU interpreter);
inputs are drawn on the CPU and the references computed there (helios_rt.kernels.testing says why)."""

import math

import pytest
import torch
from helios_rt.kernels import attention as K
from helios_rt.kernels.testing import check_op, kernel_device, to_device, upcast

from helios_rt.ops import reference as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
D = kernel_device()  # the GPU when the kernels are compiled for one, else the CPU interpreter


def naive_attention(q, k, v):
    """Attention done plainly in q.dtype (scores and probabilities rounded to it), as FA3's attention_ref."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    s = (qt @ kt.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return (p @ vt).transpose(1, 2)


def _prologue_inputs(b, n, heads, dh, dtype, g, strided=False):  # on the CPU
    hd = heads * dh
    if strided:  # q, k as slices of a fused QKV projection output [B, L, 3*H*Dh] (to_device keeps that)
        qkv = torch.randn(b, n, 3 * hd, generator=g).to(dtype)
        q, k = qkv[..., :hd], qkv[..., hd : 2 * hd]
    else:
        q, k = (torch.randn(b, n, hd, generator=g).to(dtype) for _ in range(2))
    qw, kw = (torch.rand(hd, generator=g) + 0.5 for _ in range(2))
    ang = torch.rand(n, dh // 2, generator=g) * 2 * math.pi
    ks = 1 + torch.rand(heads, generator=g) * 9  # 1 + sigmoid(s) * (10 - 1)
    return q, k, qw, kw, ang.cos(), ang.sin(), ks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b,n,heads,dh,n_hist", [(1, 45, 2, 32, 20), (2, 45, 2, 32, 20), (2, 113, 3, 16, 0), (1, 7, 5, 64, 7)]
)  # n == 45: q, k strided slices of one QKV output
def test_qk_norm_rope(b, n, heads, dh, n_hist, dtype):
    g = torch.Generator().manual_seed(n * heads)
    q, k, qw, kw, cos, sin, ks = _prologue_inputs(b, n, heads, dh, dtype, g, strided=n == 45)
    args = (qw, kw, cos, sin, heads, 1e-6, ks, n_hist)
    qo, ko = K.qk_norm_rope(*to_device((q, k, *args), D))
    ref32 = R.qk_norm_rope(*upcast((q, k)), *args)
    naive = R.qk_norm_rope(q, k, *args)
    check_op("qk_norm_rope(q)", qo, ref32[0], naive[0], dtype)
    check_op("qk_norm_rope(k)", ko, ref32[1], naive[1], dtype)


def test_qk_norm_rope_validates():
    inputs = _prologue_inputs(1, 8, 2, 16, torch.float32, torch.Generator().manual_seed(0))
    q, k, qw, kw, cos, sin, ks = to_device(inputs, D)
    with pytest.raises(ValueError, match="cos"):
        K.qk_norm_rope(q, k, qw, kw, cos[:-1], sin, 2, 1e-6, ks, 3)
    with pytest.raises(ValueError, match="key_scale"):
        K.qk_norm_rope(q, k, qw, kw, cos, sin, 2, 1e-6, ks[:1], 3)
    with pytest.raises(ValueError, match="heads"):
        K.qk_norm_rope(q, k, qw, kw, cos, sin, 3, 1e-6, ks, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,lq,lk,heads,dh", [(1, 45, 113, 2, 32), (2, 70, 33, 1, 64), (1, 1, 77, 3, 16)])
def test_attention(b, lq, lk, heads, dh, dtype):
    g = torch.Generator().manual_seed(lq + lk)
    q = torch.randn(b, lq, heads, dh, generator=g).to(dtype)
    kv = torch.randn(b, lk, 2, heads, dh, generator=g).to(dtype)  # cached text K/V: strided views
    k, v = kv[:, :, 0], kv[:, :, 1]
    out = K.attention(*to_device((q, k, v), D))
    ref32 = R.attention(*upcast((q, k, v)))
    check_op("attention", out, ref32, naive_attention(q, k, v), dtype)


def test_attention_out_view():
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 37, 2, 16, generator=g) for _ in range(3))
    buf = torch.zeros(1, 37, 4, 16, device=D)
    out = buf[:, :, 1:3]  # a non-contiguous view of a planned buffer
    assert K.attention(*to_device((q, k, v), D), out=out).data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.cpu(), R.attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert (buf[:, :, 0] == 0).all() and (buf[:, :, 3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_per_row_key_lengths(dtype):
    """Cross-attention of a CFG batch whose halves own 24 and 16 of 24 text keys (TextContext.lengths):
    one call per row on its own keys, into that row of one output; equals attending to the unpadded keys."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 37, 2, 32, generator=g).to(dtype)
    k, v = (torch.randn(2, 24, 2, 32, generator=g).to(dtype) for _ in range(2))
    q_d, k_d, v_d = to_device((q, k, v), D)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=D)
    for row, n in enumerate((24, 16)):
        K.attention(q_d[row : row + 1], k_d[row : row + 1, :n], v_d[row : row + 1, :n], out=out[row : row + 1])
    for row, n in enumerate((24, 16)):
        args = (q[row : row + 1], k[row : row + 1, :n], v[row : row + 1, :n])
        check_op(f"attention row {row}", out[row : row + 1], R.attention(*upcast(args)), naive_attention(*args), dtype)


def test_attention_validates():
    q = torch.randn(1, 4, 2, 16, device=D)
    with pytest.raises(ValueError, match="k must have dtype"):
        K.attention(q, q.half(), q)
    with pytest.raises(ValueError, match="head dim"):
        K.attention(q[..., :12], q[..., :12], q[..., :12])


def _tile_configs():
    """Every (head dim, dtype, config) the autotuner may pick: bf16 at each head dim (fp16 shares the configs;
    it runs at the 14B's head dim 128), float32's one config at 128."""
    cases = [
        (dh, torch.bfloat16, cfg) for dh in sorted(K.HALF_CONFIGS) for cfg in K.attention_configs(dh, torch.bfloat16)
    ]
    cases += [(128, torch.float16, cfg) for cfg in K.attention_configs(128, torch.float16)]
    cases += [(128, torch.float32, cfg) for cfg in K.attention_configs(128, torch.float32)]
    return cases


@pytest.mark.parametrize(
    "dh,dtype,cfg", _tile_configs(), ids=lambda c: c if isinstance(c, int) else str(c).removeprefix("torch.") if
    isinstance(c, torch.dtype) else f"{c['BLOCK_M']}x{c['BLOCK_N']}"
)  # fmt: skip
def test_attention_at_every_tuned_config(dh, dtype, cfg):
    """The real tile sizes: two query tiles (the second ragged) and full key tiles then a ragged last one, so
    the unmasked loop, the masked last tile and the row mask all run; k, v strided views of one buffer."""
    lq, lk = cfg["BLOCK_M"] + 19, 2 * cfg["BLOCK_N"] + 9
    g = torch.Generator().manual_seed(dh + lq + lk)
    q = torch.randn(1, lq, 1, dh, generator=g).to(dtype)
    kv = torch.randn(1, lk, 2, 1, dh, generator=g).to(dtype)
    k, v = kv[:, :, 0], kv[:, :, 1]
    qd, kd, vd = to_device((q, k, v), D)
    out = torch.empty(q.shape, dtype=dtype, device=D)
    K.launch_attention(qd, kd, vd, out, cfg)
    check_op(f"attention {cfg}", out, R.attention(*upcast((q, k, v))), naive_attention(q, k, v), dtype)


def test_attention_full_tiles_only():
    """Lk a multiple of BLOCK_N: no masked tile at all (the branch after the loop is skipped)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, n, 2, 64, generator=g).to(torch.bfloat16) for n in (40, 64, 64))
    out = torch.empty_like(q, device=D)
    K.launch_attention(*to_device((q, k, v), D), out, {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1})
    check_op("attention full tiles", out, R.attention(*upcast((q, k, v))), naive_attention(q, k, v), torch.bfloat16)


def test_attention_configs_cover_the_supported_head_dims():
    for dh in (16, 32, 64, 128, 256):
        for dtype in DTYPES:
            assert K.attention_configs(dh, dtype)
    with pytest.raises(ValueError, match="head dim 512"):
        K.attention(*(torch.empty(1, 4, 1, 512, device=D),) * 3)


def test_a_tuned_pick_is_launched_directly_and_never_tuned_inside_a_capture(monkeypatch):
    """On a GPU the first call of a shape autotunes and records the pick; later calls launch the pick. The
    interpreter stands in for the GPU path here with a recorded pick; a capture before tuning is refused."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, n, 2, 32, generator=g) for n in (33, 50, 50))
    monkeypatch.setattr(K, "interpreting", lambda: False)  # take the GPU launch path
    pick = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    monkeypatch.setitem(K._PICKS, (32, torch.float32, 33, 50), pick)
    out = torch.empty_like(q, device=D)
    monkeypatch.setattr(K, "_attn_fwd_kernel", _Recording(K._attn_fwd_kernel))
    K.launch_attention(*to_device((q, k, v), D), out)
    assert K._attn_fwd_kernel.configs == [pick]
    torch.testing.assert_close(out.cpu(), R.attention(q, k, v), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="Lq=33, Lk=49 .* was not autotuned before this CUDA graph capture"):
        K.launch_attention(*to_device((q, k[:, :49], v[:, :49]), D), out)


class _Recording:
    """A kernel stand-in that records the launch configs and launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.configs = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.configs.append({k: kw[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")})
            return self.kernel[grid](*args, **kw)

        return launch
