"""The multi-GPU projection plans rank 0's steady chunk and counts the bytes its Ulysses exchanges move."""

from __future__ import annotations

import pytest
import torch

from helios_rt.compile.cost import ChunkShape
from helios_rt.compile.cost.parallel import Interconnect, project_parallel, rank0_chunk
from helios_rt.compile.cost.planned import build_program
from helios_rt.config import TINY
from helios_rt.parallel.sequence import token_shards

CONFIG = TINY.replace(num_attention_heads=4, attention_head_dim=16)  # 4 heads: 2 and 4 shards
SHAPE = ChunkShape(height=64, width=64)


def _layouts():
    sampler = build_program(CONFIG, SHAPE, torch.bfloat16, "auto", "auto", (1, 1, 1), "native").sampler
    return [sampler.layout(hw)[0] for hw in sampler.plan(False).hw]


@pytest.mark.parametrize(("cfg", "sequence"), [(1, 2), (1, 4)])
def test_exchange_bytes_are_the_ulysses_volume(cfg: int, sequence: int) -> None:
    _, comm = rank0_chunk(CONFIG, SHAPE, torch.bfloat16, cfg, sequence)
    head_share = CONFIG.dim // sequence * 2  # bf16 bytes of one token's heads on one rank
    out_row = CONFIG.out_dim * 4 * 2  # [C * pt * ph * pw] bf16 per noisy token
    expected = 0
    for layout in _layouts():  # one forward per stage at 1+1+1
        s = token_shards(layout.n_hist, layout.n_noisy, sequence)
        mine, total = s.lengths[0], sum(s.lengths)
        per_block = 3 * (total - mine) * head_share + (sequence - 1) * mine * head_share  # q, k, v in; o back
        most = max(n1 - n0 for n0, n1 in s.noisy)
        expected += CONFIG.num_layers * per_block + (cfg * sequence - 1) * most * out_row
    assert comm.calls == 3 * (2 * CONFIG.num_layers + 1)
    assert comm.bytes_in == expected


def test_more_gpus_pay_the_exchanges_on_the_stated_link() -> None:
    one = project_parallel(CONFIG, SHAPE, 1)
    two = project_parallel(CONFIG, SHAPE, 2)
    assert one.comm_s == 0 and one.comm_bytes == 0
    assert two.comm_bytes == sum(c.bytes_in for c in two.per_stage_comm) > 0
    slow = Interconnect("slow", 1.0, 0.0)
    assert project_parallel(CONFIG, SHAPE, 2, link=slow).comm_s == pytest.approx(two.comm_bytes / 1e9)
    with pytest.raises(ValueError, match="must divide the heads"):
        project_parallel(CONFIG, SHAPE, 3)
