"""Build a model that need not fit one rank: under ZeRO 3 every rank holds only its partition from the start.

The model is constructed inside ``deepspeed.zero.Init``: each module's parameters are partitioned across the
data-parallel ranks as the module is created, so no rank ever holds more than one module whole. Each rank then
writes its own partition of every parameter, from

- the seeded initial stream: the same generator, drawn in the same order, as ``Llama.init_weights``, so the
  weights are those of a single-process build at any dp (drawn a block of rows at a time, the rank's slice
  kept);
- or a checkpoint (``trainer.init_from``'s HF safetensors, a layout-changing resume's per-parameter state), read
  memory-mapped one tensor at a time, the rank's slice kept.

Tensor parallelism (AutoTP) shards inside ``deepspeed.initialize`` from whole weights, so with tp > 1 the model
is still built whole on each rank first (see the README's limits).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from framework.cli import UserError
from framework.config import ParallelConfig
from framework.models.llama import Llama, ModelArgs, rope_inv_freq
from framework.parallel.topology import Topology


def builds_partitioned(parallel: ParallelConfig, topo: Topology) -> bool:
    """ZeRO 3 without tensor parallelism over more than one rank: build the model partitioned."""
    return parallel.zero_stage == 3 and topo.tp == 1 and topo.dp > 1


def _partition_range(param) -> tuple[int, int]:
    """[start, stop) of this rank's ZeRO-3 partition in the flattened parameter (DeepSpeed's layout: equal, end-padded
    slices, slice r on partition rank r)."""
    n = param.ds_tensor.ds_numel
    start = n * dist.get_rank(group=param.ds_process_group)
    return start, start + n


def set_partition(param: torch.nn.Parameter, chunks: Iterator[tuple[int, torch.Tensor]]) -> None:
    """Write this rank's partition of ``param`` from ``(offset, flat values)`` chunks of its flattened full value,
    keeping the part that falls in the partition (the padding past the end is zero)."""
    start, stop = _partition_range(param)
    part = param.ds_tensor.data
    with torch.no_grad():
        part.zero_()
        for offset, flat in chunks:
            lo, hi = max(start, offset), min(stop, offset + flat.numel(), param.ds_numel)
            if lo < hi:
                part[lo - start: hi - start].copy_(flat[lo - offset: hi - offset].to(part.dtype))


def normal_chunks(shape: tuple[int, ...], std: float, gen: torch.Generator | None,
                  chunk_elems: int = 1 << 22) -> Iterator[tuple[int, torch.Tensor]]:
    """``torch.empty(shape).normal_(0, std, generator=gen)``, flattened, drawn a block of rows at a time: CPU
    normal_ fills a tensor's uniforms in order and transforms them 16 at a time, so blocks of whole rows whose
    size is a multiple of 16 give the same numbers as one draw (tests/unit/test_materialize.py) without the whole
    tensor in memory. Other shapes are drawn whole."""
    row = math.prod(shape[1:]) if len(shape) > 1 else 0
    if row == 0 or row % 16:
        yield 0, torch.empty(shape).normal_(0.0, std, generator=gen).reshape(-1)
        return
    rows = max(1, chunk_elems // row)
    for r in range(0, shape[0], rows):
        n = min(rows, shape[0] - r)
        yield r * row, torch.empty(n * row).normal_(0.0, std, generator=gen)


@contextlib.contextmanager
def _no_default_init():
    """Skip nn.Linear's and nn.Embedding's own initialisation while constructing: every value is overwritten, and
    untouched memory is never resident (zero.Init allocates each module whole before partitioning it)."""
    saved = torch.nn.Linear.reset_parameters, torch.nn.Embedding.reset_parameters
    torch.nn.Linear.reset_parameters = torch.nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        torch.nn.Linear.reset_parameters, torch.nn.Embedding.reset_parameters = saved


def _partition_only_class():
    import deepspeed

    class PartitionOnly(deepspeed.zero.Init):
        """zero.Init without its broadcast of every new parameter from rank 0: the values are written per rank right
        after, and receiving the broadcast would make each module whole and resident on every rank (DeepSpeed
        0.18-0.19 ``Init._zero_init_param``)."""

        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    return PartitionOnly


def _PartitionOnly(**kwargs):  # noqa: N802 - a class made on first use (DeepSpeed is imported lazily)
    return _partition_only_class()(**kwargs)


def build_partitioned(args: ModelArgs, ds_config: dict, topo: Topology, seed: int | None,
                      weights: Callable[[str], torch.Tensor] | None = None) -> Llama:
    """The model under ``deepspeed.zero.Init``, each rank's partitions written from ``seed`` or ``weights(name)``."""

    from framework.parallel.parallelize import init_deepspeed_comm

    init_deepspeed_comm(topo)
    # torch's own F.linear (mem_efficient_linear would swap in DeepSpeed's, whose rounding differs from the
    # whole-model build)
    with _no_default_init(), _PartitionOnly(config_dict_or_path=ds_config, mem_efficient_linear=False):
        model = Llama(args)
    model.tie_weights()
    gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    for name, p in model.named_parameters():  # init_weights' order: the same numbers at any dp
        shape = tuple(p.ds_shape)
        if weights is not None:
            full = weights(name)
            if tuple(full.shape) != shape:
                raise UserError(f"shape mismatch for {name}: checkpoint {tuple(full.shape)} vs model {shape}")
            chunks = iter([(0, full.reshape(-1))])
        elif name.endswith("norm.weight"):
            chunks = iter([(0, torch.ones(math.prod(shape)))])
        elif name.endswith(".bias"):
            chunks = iter([(0, torch.zeros(math.prod(shape)))])
        else:
            chunks = normal_chunks(shape, args.init_std, gen)
        set_partition(p, chunks)
    model.inv_freq = rope_inv_freq(args).to(model.inv_freq.device)
    return model
