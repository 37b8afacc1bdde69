"""Loading reads one tensor at a time: peak host memory is the weights plus a small multiple of the largest tensor.

The checkpoint here is transformer-shaped (16 blocks of width 512, about 270 MB of float32 in one
shard) and is loaded in bfloat16 in a fresh process, so the peak resident size (VmHWM, reset just
before the load) measures the load alone. The double-buffered staging loop that CUDA uses is run
here on CPU with a fake event, to check that a buffer is reused only after its copy's event.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helios_rt.checkpoint import index_tensors
from helios_rt.config import ModelConfig
from helios_rt.model.transformer import HeliosTransformer
from helios_rt.staging import DoubleBuffer, FileReader, in_file_order, staged_to_device

pytestmark = [  # a 276 MiB checkpoint written and read
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status"),
]

CONFIG = ModelConfig(
    num_attention_heads=8,
    attention_head_dim=64,
    rope_dim=(20, 22, 22),
    text_dim=512,
    ffn_dim=2048,
    num_layers=16,
)
MiB = 1 << 20
# Interpreter and module objects made during the load (the model's Python objects, the parsed header,
# allocator bookkeeping); independent of the checkpoint's size.
SLACK = 16 * MiB
# CUDA: driver bookkeeping and lazily loaded kernels beyond those the warm-up touched (not run on CPU CI).
CUDA_SLACK = 48 * MiB

_LOAD = r"""
import json, re, sys, torch
from safetensors import safe_open
import helios_rt.checkpoint, helios_rt.staging, helios_rt.fp8.loading  # imported before the baseline
from helios_rt.config import ModelConfig
from helios_rt.model.transformer import HeliosTransformer, load_transformer

device = sys.argv[3]
if device == "cuda":  # the context, the pinned allocator and the kernels the load uses: not the load's
    x = torch.ones(4, device=device)
    torch.stack([torch.isfinite(x.to(torch.bfloat16)).all()]).cpu()
    torch.empty(1, pin_memory=True)

def status(key):
    return int(re.search(rf"^{key}:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1)) * 1024

with torch.device("meta"):  # the first build loads libraries (~150 MB, once per process): not the load's
    HeliosTransformer(ModelConfig.from_json(sys.argv[1] + "/transformer/config.json"))
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # resets VmHWM to the current resident size
before = status("VmRSS")
model = load_transformer(sys.argv[1], dtype=torch.bfloat16, device=device)
peak = status("VmHWM")
state = model.state_dict()
loaded = sum(t.numel() * t.element_size() for t in state.values())
mismatched = []
with safe_open(sys.argv[2], framework="pt", device="cpu") as fh:
    keys = list(fh.keys())
    for name in keys:
        if not torch.equal(state[name].cpu(), fh.get_tensor(name).to(state[name].dtype)):
            mismatched.append(name)
print(json.dumps(dict(growth=peak - before, loaded=loaded, mismatched=mismatched, keys=len(keys), state=len(state))))
"""


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    """A float32 transformer checkpoint in one shard, random finite weights at the model's shapes."""
    root = tmp_path_factory.mktemp("big")
    folder = root / "transformer"
    folder.mkdir()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in HeliosTransformer(CONFIG).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    (root / "model_index.json").write_text('{"_class_name": "HeliosPyramidPipeline"}')
    return root


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
        ),
    ],
)
def test_peak_host_memory_is_the_weights_plus_two_of_the_largest_tensor(
    big_checkpoint: Path, tmp_path: Path, device: str
) -> None:
    """Bound: growth <= the weights in host memory (CPU: the loaded bf16 tensors themselves; CUDA: none)
    + 2 x the largest stored tensor (the two staging buffers, pinned on CUDA; on CPU the cast is the copy
    out of them and the finite check makes no tensor-sized temporary) + SLACK (CUDA: + CUDA_SLACK).
    Reading a whole shard first would add the shard's float32 bytes (~276 MiB); a tensor-sized temporary
    freed per tensor leaves allocator holes worth tens of MiB."""
    shard = big_checkpoint / "transformer" / "model.safetensors"
    infos = index_tensors([shard])
    largest = max(info.nbytes for info in infos.values())
    shard_bytes = sum(info.nbytes for info in infos.values())
    assert shard_bytes > 200 * MiB and largest <= 8 * MiB  # a shard far larger than its largest tensor
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run(
        [sys.executable, "-c", _LOAD, str(big_checkpoint), str(shard), device],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mismatched"] == [] and result["keys"] == result["state"] == len(infos)
    on_host = result["loaded"] if device == "cpu" else 0
    bound = on_host + 2 * largest + SLACK + (CUDA_SLACK if device == "cuda" else 0)
    assert result["growth"] <= bound, (
        f"peak host memory grew {result['growth'] / MiB:.0f} MiB while loading {result['loaded'] / MiB:.0f} MiB "
        f"onto {device} "
        f"of weights (bound {bound / MiB:.0f} MiB; largest tensor {largest / MiB:.0f} MiB, "
        f"shard {shard_bytes / MiB:.0f} MiB)"
    )


class FakeEvent:
    """Records on the shared log what the loop asks of a CUDA event."""

    count = 0

    def __init__(self, log: list) -> None:
        self.log = log
        self.id = FakeEvent.count
        FakeEvent.count += 1

    def record(self) -> None:
        self.log.append(("record", self.id))

    def synchronize(self) -> None:
        self.log.append(("sync", self.id))


def test_staging_reuses_a_buffer_only_after_its_copy_event(big_checkpoint: Path) -> None:
    """Tensor i is read into buffer i % 2 only after waiting on the event recorded behind tensor i-2's copy;
    two buffers of the largest tensor's size are all the host staging there is; values are the file's."""
    shard = big_checkpoint / "transformer" / "model.safetensors"
    infos = dict(in_file_order(index_tensors([shard]))[:6])
    log: list = []
    FakeEvent.count = 0
    buffers = DoubleBuffer(max(i.nbytes for i in infos.values()), pin=False, make_event=lambda: FakeEvent(log))
    reader = FileReader()
    sources: list[int] = []

    def read_into(info, out) -> None:
        log.append(("read", info.begin))
        reader.read_into(info, out)

    def copy(dst, src) -> None:
        sources.append(src.data_ptr())
        dst.copy_(src)

    loaded = dict(staged_to_device(in_file_order(infos), "cpu", buffers, read_into, copy))
    reader.close()
    expected: list = []
    for i, info in enumerate(infos.values()):
        if i >= 2:
            expected.append(("sync", i - 2))
        expected += [("read", info.begin), ("record", i)]
    assert log == expected
    assert len(buffers.buffers) == 2 and buffers.nbytes == 2 * max(i.nbytes for i in infos.values())
    assert sources == [b.data_ptr() for b in buffers.buffers] * 3
    with safe_open(str(shard), framework="pt", device="cpu") as fh:
        for name, t in loaded.items():
            assert torch.equal(t, fh.get_tensor(name)), name
