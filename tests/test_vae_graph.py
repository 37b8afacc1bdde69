"""The decode's fast path: cuDNN autotuning scoped to the decode, channels-last weights, the fused norm + SiLU
in the blocks, and `GraphedDecode` (its capture logic on a CPU with a fake graph; replay vs eager on a GPU)."""

from __future__ import annotations

import pytest
import torch

from helios_rt.model.vae import VAEConfig, WanVAE, resolve_norm_silu
from helios_rt.model.vae_blocks import RMSNorm, rms_norm_silu
from helios_rt.model.vae_graph import GraphedDecode

CFG = VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, latents_mean=[0.1] * 4,
                latents_std=[1.5] * 4)  # fmt: skip
SHAPE = (1, 4, 3, 4, 5)  # 3 latent frames -> 9 frames of 32x40


def _vae(device: str = "cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
    torch.manual_seed(0)
    vae = WanVAE(CFG).eval()
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, RMSNorm):  # gains away from one, so a norm that ignores them is seen
                m.gamma.add_(torch.randn(m.gamma.shape) * 0.3)
    vae._init_latent_stats()
    return vae.to(device, dtype).prepare_decode(device)


def _latents(seed: int, shape=SHAPE, device: str = "cpu") -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _cudnn_flags() -> dict:
    c = torch.backends.cudnn
    names = ("enabled", "benchmark", "deterministic", "allow_tf32", "fp32_precision", "depthwise_kernel")
    return {n: getattr(c, n) for n in names}


# -- cuDNN autotuning, scoped ------------------------------------------------------------------------
def test_decode_autotunes_cudnn_inside_the_call_only():
    vae = _vae()
    seen = []
    hook = vae.decoder.conv_in.register_forward_pre_hook(lambda *_: seen.append(_cudnn_flags()))
    try:
        # the host application's own settings: cuDNN off, no autotuning, deterministic, no TF32
        with torch.backends.cudnn.flags(enabled=False, benchmark=False, deterministic=True, allow_tf32=False):
            host = _cudnn_flags()
            vae.decode(_latents(1))
            vae.decode_frames(_latents(1)[0])
            after = _cudnn_flags()
    finally:
        hook.remove()
    assert after == host, "a decode changed the host application's cuDNN flags"
    assert len(seen) == 2
    for inside in seen:
        assert inside["enabled"] and inside["benchmark"], "the decode's convs did not run with cuDNN autotuning"
        kept = {k: v for k, v in inside.items() if k not in ("enabled", "benchmark")}
        assert kept == {k: v for k, v in host.items() if k not in ("enabled", "benchmark")}


def test_the_flags_are_restored_when_the_decode_raises():
    vae = _vae()
    before = _cudnn_flags()
    hook = vae.decoder.conv_in.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(KeyError("boom")))
    try:
        with pytest.raises(KeyError):
            vae.decode(_latents(1))
    finally:
        hook.remove()
    assert _cudnn_flags() == before


# -- channels-last weights, norm + SiLU backend ---------------------------------------------------------
def test_prepare_decode_lays_conv_weights_out_channels_last_with_the_same_frames():
    vae = _vae()
    convs = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in convs)
    z = _latents(2)
    fresh = WanVAE(CFG).eval()  # the same weights in the default layout
    fresh.load_state_dict({k: v.contiguous() for k, v in vae.state_dict().items()})
    fresh._init_latent_stats()
    assert torch.equal(vae.decode(z), fresh.decode(z))  # oneDNN: the same float32 bits in either layout


def test_norm_silu_resolution():
    assert resolve_norm_silu("cpu") == "reference" and resolve_norm_silu("cuda") == "triton"
    assert resolve_norm_silu("cuda", "reference") == "reference"
    assert resolve_norm_silu("cpu", "triton") == "triton"  # tests/conftest.py sets TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="kernels must be"):
        resolve_norm_silu("cpu", "fast")
    assert all(m.norm_silu is rms_norm_silu for m in _vae().modules() if isinstance(m, RMSNorm))


def test_decode_with_the_fused_norm_silu_matches_the_reference_decode():
    """Every residual block's norm + SiLU on the Triton kernel (the CPU interpreter here): the same frames
    up to float32 rounding (one rounding instead of three; measured max 1.5e-6 on [-1, 1], bound 1e-5)."""
    vae, z = _vae(), _latents(3)
    expected = vae.decode(z)
    triton_vae = _vae().use_norm_silu("triton")
    from helios_rt.kernels.vae_norm import rms_norm_silu as fused

    assert all(m.norm_silu is fused for m in triton_vae.modules() if isinstance(m, RMSNorm))
    err = (triton_vae.decode(z) - expected).abs().max().item()
    assert err <= 1e-5, f"decode with the fused norm differs by {err}"


# -- GraphedDecode on a fake graph ---------------------------------------------------------------------
class FakeGraphs:
    """Records warm-ups and captures; its graph "replays" by running the captured function again."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.capturing_now = False

    def capturing(self) -> bool:
        return self.capturing_now

    def warm_up(self, fn, runs: int) -> None:
        self.events.append(f"warm_up x{runs}")
        for _ in range(runs):
            fn()

    def capture(self, fn):
        self.events.append("capture")
        events = self.events

        class Replay:
            def replay(self) -> None:
                events.append("replay")
                fn()

        return Replay()


def test_graphed_decode_captures_once_then_replays_from_its_static_buffers():
    vae, fake = _vae(), FakeGraphs()
    graphed = GraphedDecode(vae, SHAPE, graphs=fake)
    assert not graphed.captured and fake.events == []
    first = graphed(_latents(4))
    assert fake.events == ["warm_up x1", "capture"]  # the warm-up's frames are the first call's
    assert first.data_ptr() == graphed.static_out.data_ptr()
    assert torch.equal(first, vae.decode_frames(_latents(4), normalized=True))
    second = graphed(_latents(5))
    assert fake.events == ["warm_up x1", "capture", "replay"]
    assert second.data_ptr() == first.data_ptr(), "replay must write the static output buffer"
    assert torch.equal(second, vae.decode_frames(_latents(5), normalized=True))


def test_graphed_decode_keeps_the_slices_and_normalisation_it_was_built_with():
    vae, fake = _vae(), FakeGraphs()
    graphed = GraphedDecode(vae, SHAPE[1:], graphs=fake, normalized=False, slice_frames=2)
    graphed(_latents(6)[0])
    out = graphed(_latents(7)[0])
    assert torch.equal(out, vae.decode_frames(_latents(7)[0], slice_frames=2))


def test_graphed_decode_refuses_another_shape_or_device_by_name():
    graphed = GraphedDecode(_vae(), SHAPE, graphs=FakeGraphs())
    with pytest.raises(ValueError, match=r"decodes latents of shape \[1, 4, 3, 4, 5\], got \[1, 4, 2, 4, 5\]"):
        graphed(_latents(1, shape=(1, 4, 2, 4, 5)))
    with pytest.raises(ValueError, match="floating point"):
        graphed(torch.zeros(SHAPE, dtype=torch.int64))
    with pytest.raises(ValueError, match="on cpu"):
        graphed(torch.zeros(SHAPE, device="meta"))
    assert not graphed.captured


def test_graphed_decode_is_never_captured_inside_another_capture():
    fake = FakeGraphs()
    graphed = GraphedDecode(_vae(), SHAPE, graphs=fake)
    fake.capturing_now = True
    with pytest.raises(RuntimeError, match="inside another CUDA graph capture"):
        graphed(_latents(1))
    assert fake.events == [] and not graphed.captured
    fake.capturing_now = False
    graphed.capture()  # ahead of time (an engine's warm-up): the first call then replays
    graphed(_latents(1))
    assert fake.events == ["warm_up x1", "capture", "replay"]


# -- on a GPU ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replay_equals_the_eager_decode_bit_for_bit_on_cuda():
    """bf16, channels-last, fused norm + SiLU, autotuned cuDNN: replaying the graph on a second stream gives
    exactly the eager decode's frames (same algorithms: the autotuner's choices are cached per shape)."""
    vae = _vae("cuda", torch.bfloat16)
    assert vae.norm_silu == "triton"
    lane = torch.cuda.Stream()
    graphed = GraphedDecode(vae, SHAPE, device="cuda")
    with torch.cuda.stream(lane):
        graphed(_latents(8, device="cuda"))
        replayed = graphed(_latents(9, device="cuda")).clone()
    torch.cuda.synchronize()
    eager = vae.decode_frames(_latents(9, device="cuda"), normalized=True)
    assert graphed.captured
    assert torch.equal(replayed, eager), f"{int((replayed != eager).sum())} values differ"
    with torch.cuda.stream(lane):
        again = graphed(_latents(9, device="cuda")).clone()
    torch.cuda.synchronize()
    assert torch.equal(again, eager)
