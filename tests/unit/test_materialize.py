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


@pytest.mark.parametrize("dim,start,size", [(0, 96, 96), (0, 0, 50), (1, 32, 32), (1, 0, 16)])
def test_a_tensor_parallel_shard_is_the_block_of_one_whole_draw(dim, start, size):
    """fill_tp_shards draws rows in blocks and keeps this rank's rows (column-parallel) or columns (row-parallel)."""
    from framework.parallel.materialize import _drawn_shard

    shape = (192, 64)
    whole = torch.empty(shape).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    # a small scratch, so that the draw takes several blocks and a shard starts inside one
    got = _drawn_shard(shape, dim, start, size, 0.02, gen, scratch=torch.empty(40 * 64))
    assert torch.equal(got, whole.narrow(dim, start, size))
    # and the generator is left where one draw leaves it
    after = torch.Generator().manual_seed(5)
    torch.empty(shape).normal_(0.0, 0.02, generator=after)
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=after))


@pytest.mark.parametrize("start,stop", [(0, 10), (130, 700), (64 * 9, 64 * 10), (64 * 99 + 5, 64 * 100)])
def test_a_zero3_partition_reads_only_the_rows_that_cover_it(tmp_path, start, stop):
    """trainer.init_from / a layout-changing resume under ZeRO 3: the rows of the safetensors slice that hold the
    rank's flat range [start, stop), and no more."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from framework.parallel.materialize import _rows_covering

    full = torch.randn(100, 64)
    save_file({"w": full}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        [(offset, flat)] = list(_rows_covering(f.get_slice("w"), start, stop))
    assert offset == start // 64 * 64 and flat.numel() == (-(-stop // 64) - start // 64) * 64
    assert torch.equal(flat[start - offset: stop - offset], full.reshape(-1)[start:stop])
