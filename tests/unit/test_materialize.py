"""Drawing the initial weights a block of rows at a time gives the numbers of one whole draw (the ZeRO-3 build keeps
only its slice of each block, and stays seeded and layout-independent)."""

import pytest
import torch

from framework.parallel.materialize import normal_chunks


@pytest.mark.parametrize("shape,chunk", [((300, 64), 1000), ((128, 48), 16 * 48), ((7, 3), 8), ((1000,), 64),
                                         ((275, 64), 64 * 64)])
def test_row_blocks_draw_the_same_numbers_as_one_draw(shape, chunk):
    whole = torch.empty(shape).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(3)).reshape(-1)
    gen = torch.Generator().manual_seed(3)
    parts = list(normal_chunks(shape, 0.02, gen, chunk_elems=chunk))
    got = torch.cat([flat for _, flat in parts])
    assert [off for off, _ in parts] == sorted(off for off, _ in parts) and torch.equal(got, whole)
    # and the generator is left where one draw leaves it
    after = torch.Generator().manual_seed(3)
    torch.empty(shape).normal_(0.0, 0.02, generator=after)
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=after))
