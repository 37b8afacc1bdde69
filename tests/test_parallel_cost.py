"""The multi-GPU projection counts the bytes the Ulysses exchanges move and traces rank 0's share."""

from __future__ import annotations

import pytest
import torch

from helios_rt.compile.cost.chunk import ChunkShape, stage_layouts, trace_chunk
from helios_rt.compile.cost.parallel import Interconnect, _rank0_forward, project_parallel
from helios_rt.config import TINY
from helios_rt.parallel.sequence import token_shards

CONFIG = TINY.replace(num_attention_heads=4, attention_head_dim=16)  # 4 heads: 2 and 4 shards
SHAPE = ChunkShape(height=64, width=64)


@pytest.mark.parametrize(("cfg", "sequence"), [(1, 2), (1, 4), (2, 2)])
def test_exchange_bytes_are_the_ulysses_volume(cfg: int, sequence: int) -> None:
    layout = stage_layouts(CONFIG, SHAPE)[-1]
    _, comm = _rank0_forward(CONFIG, layout, SHAPE, torch.bfloat16, cfg, sequence)
    s = token_shards(layout.n_hist, layout.n_noisy, sequence)
    mine, total = s.lengths[0], sum(s.lengths)
    head_share = CONFIG.dim // sequence * 2  # bf16 bytes of one token's heads on one rank
    per_block = 3 * (total - mine) * head_share + (sequence - 1) * mine * head_share  # q, k, v in; o back
    out_row = CONFIG.out_dim * 4 * 2  # [C * pt * ph * pw] bf16 per noisy token
    most = max(n1 - n0 for n0, n1 in s.noisy)
    gather = (cfg * sequence - 1) * most * out_row
    assert comm.calls == 2 * CONFIG.num_layers + 1
    assert comm.bytes_in == CONFIG.num_layers * per_block + gather


def test_more_gpus_pay_the_exchanges_on_the_stated_link() -> None:
    single = trace_chunk(CONFIG, SHAPE)
    one = project_parallel(CONFIG, single, 1, (1, 1, 1))
    two = project_parallel(CONFIG, single, 2, (1, 1, 1))
    assert one.comm_s == 0 and one.comm_bytes == 0
    assert two.comm_bytes == sum(c.bytes_in for c in two.per_stage_comm) > 0
    slow = Interconnect("slow", 1.0, 0.0)
    assert project_parallel(CONFIG, single, 2, (1, 1, 1), link=slow).comm_s == pytest.approx(two.comm_bytes / 1e9)
    with pytest.raises(ValueError, match="must divide the heads"):
        project_parallel(CONFIG, single, 3, (1, 1, 1))
