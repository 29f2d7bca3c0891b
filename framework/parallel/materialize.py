"""Build a model that need not fit one rank: every rank materialises only what it keeps.

Under ZeRO 3 (tp 1) the model is constructed inside ``deepspeed.zero.Init``: each module's parameters are
partitioned across the data-parallel ranks as the module is created, so no rank ever holds more than one module
whole. Under tensor parallelism (AutoTP) the model is built on the meta device; DeepSpeed's AutoTP shards the meta
tensors inside ``deepspeed.initialize`` (its own split: column-parallel layers by rows, row-parallel ones by
columns, with the shard sizes it froze per layer), and each rank then materialises its shard of every sharded
parameter and the whole of every replicated one (norms, embedding, head), before ZeRO sees the model.

Either way each rank writes its own values from

- the seeded initial stream: the same generator, drawn in the same order, as ``Llama.init_weights``, so the
  weights are those of a single-process build at any layout (drawn a block of rows at a time, the rank's rows,
  columns or partition kept);
- or a checkpoint (``trainer.init_from``'s HF safetensors, a layout-changing resume's per-parameter state), read
  memory-mapped through safetensors slices: only the rows (or columns) the rank keeps.
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
from framework.parallel.deepspeed_hooks import autotp_shard_spec, partition_only_init, record_param_names
from framework.parallel.topology import Topology
from framework.weights.io import read_part


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


def _rows_covering(sl, start: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
    """The ``(offset, flat values)`` chunk of a safetensors slice's flattened tensor that covers [start, stop): only
    the rows that hold it are read."""
    shape = tuple(sl.get_shape())
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    r0, r1 = start // row, min(shape[0], -(-stop // row))
    if r0 >= r1:
        return iter(())
    return iter([(r0 * row, sl[r0:r1].reshape(-1))])


def build_partitioned(args: ModelArgs, ds_config: dict, topo: Topology, seed: int | None,
                      weights: Callable[[str], object] | None = None) -> Llama:
    """The model under ``deepspeed.zero.Init``, each rank's partitions written from ``seed`` or from
    ``weights(name)``, a safetensors slice of which only the rows covering the partition are read."""

    from framework.parallel.parallelize import init_deepspeed_comm

    init_deepspeed_comm(topo)
    # torch's own F.linear (mem_efficient_linear would swap in DeepSpeed's, whose rounding differs from the
    # whole-model build)
    with _no_default_init(), partition_only_init(config_dict_or_path=ds_config, mem_efficient_linear=False):
        model = Llama(args)
    model.tie_weights()
    gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    for name, p in model.named_parameters():  # init_weights' order: the same numbers at any dp
        shape = tuple(p.ds_shape)
        if weights is not None:
            sl = weights(name)
            check_shape(name, tuple(sl.get_shape()), shape)
            chunks = _rows_covering(sl, *_partition_range(p))
        elif name.endswith("norm.weight"):
            chunks = iter([(0, torch.ones(math.prod(shape)))])
        elif name.endswith(".bias"):
            chunks = iter([(0, torch.zeros(math.prod(shape)))])
        else:
            chunks = normal_chunks(shape, args.init_std, gen)
        set_partition(p, chunks)
    model.inv_freq = rope_inv_freq(args).to(model.inv_freq.device)
    return model


def check_shape(name: str, saved: tuple[int, ...], model: tuple[int, ...]) -> None:
    if saved != model:
        raise UserError(f"shape mismatch for {name}: checkpoint {saved} vs model {model}")


def build_in_dtype(args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int | None) -> Llama:
    """The whole model (ZeRO 0-2, or one data-parallel rank, at tp 1) built straight in the training dtype:
    never an fp32 copy of the model on the GPU. Cast on the meta device (free), allocated once in ``dtype``, then
    ``init_weights`` draws each tensor in fp32 on the host and rounds it into place: the values DeepSpeed's cast
    of an fp32 build gives (it casts the parameters to bf16/fp16 in ``deepspeed.initialize`` and makes its fp32
    masters from those), so the run is the same; the rotary buffer stays fp32, as DeepSpeed keeps buffers."""
    with torch.device("meta"):
        model = Llama(args)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)  # also resets inv_freq, in fp32
    return model


def build_meta(args: ModelArgs) -> Llama:
    """The model on the meta device: shapes only, nothing allocated (AutoTP shards it, ``fill_tp_shards`` fills it)."""
    with torch.device("meta"):
        model = Llama(args)
    model.tie_weights()
    return model


def tp_shards(model: torch.nn.Module) -> dict[str, tuple[int, int, int, tuple[int, ...]]]:
    """``name -> (dim, start, size, full shape)`` of every parameter DeepSpeed's AutoTP sharded, read from the layers
    it put in place (``autotp_shard_spec``: column-parallel layers split by rows, row-parallel ones by columns, each
    into the sizes AutoTP froze for the layer, shard ``tp_index`` on this rank)."""
    shards = {}
    for mname, m in model.named_modules():
        spec = autotp_shard_spec(m)
        if spec is None:
            continue
        sizes, r, dims = spec
        for pname, (dim, full) in dims.items():
            p = getattr(m, pname, None)
            if p is None:
                continue
            if p.shape[dim] != sizes[r] or sum(sizes) != full[dim]:
                raise RuntimeError(f"AutoTP's shard of {mname}.{pname} is {tuple(p.shape)}, not row/column block "
                                   f"{r} of {sizes} of {tuple(full)} along dim {dim}")
            shards[f"{mname}.{pname}"] = (dim, sum(sizes[:r]), sizes[r], tuple(full))
    return shards


def _drawn_shard(full: tuple[int, ...], dim: int, start: int, size: int, std: float, gen: torch.Generator | None,
                 scratch: torch.Tensor) -> torch.Tensor:
    """This rank's block of ``torch.empty(full).normal_(0, std, generator=gen)``, along ``dim`` from ``start``.

    Drawn in blocks of whole rows (the same numbers as one draw when a row holds a multiple of 16 values, see
    ``normal_chunks``): a row-sharded weight's own rows straight into the shard, every other block into ``scratch``
    (reused, so that no transient buffers are freed between the long-lived shards: glibc's heap would keep the
    holes)."""
    row = math.prod(full[1:])
    if row % 16 or len(full) < 2:
        return torch.empty(full).normal_(0.0, std, generator=gen).narrow(dim, start, size).clone()
    shape = list(full)
    shape[dim] = size
    out = torch.empty(shape)
    per_block = max(1, scratch.numel() // row)
    r = 0
    while r < full[0]:
        if dim == 0 and start <= r < start + size:
            n = start + size - r
            out[r - start: r - start + n].normal_(0.0, std, generator=gen)
        else:
            stop = start if dim == 0 and r < start else full[0]
            n = min(per_block, stop - r)
            block = scratch[: n * row].view(n, *full[1:]).normal_(0.0, std, generator=gen)
            if dim != 0:
                out[r: r + n] = block.narrow(dim, start, size)
        r += n
    return out


def _materialize(p: torch.nn.Parameter, value: torch.Tensor, owners: list[tuple[torch.nn.Module, str]]) -> None:
    """Put a real parameter of ``value`` where meta parameter ``p`` was (every module that holds it: a tied head
    shares the embedding's), with the attributes AutoTP set on it. (A meta tensor can take neither ``.data`` from
    another device nor, with DeepSpeed's weak references on it, ``swap_tensors``.)"""
    new = torch.nn.Parameter(value, requires_grad=p.requires_grad)
    new.__dict__.update(p.__dict__)
    for module, name in owners:
        setattr(module, name, new)


def fill_tp_shards(model: Llama, args: ModelArgs, device: torch.device, seed: int | None,
                   weights: Callable[[str], object] | None = None) -> None:
    """After AutoTP sharded the meta model: give every parameter this rank's values, the shard of a sharded one and
    the whole of a replicated one, from ``seed`` (``init_weights``' stream, the single-process numbers) or from
    ``weights(name)``, a safetensors slice of which only the shard's rows or columns are read."""
    shards = tp_shards(model)
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for pname, q in module._parameters.items():
            if q is not None:
                owners.setdefault(id(q), []).append((module, pname))
    gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    scratch = torch.empty(1 << 22)
    with torch.no_grad():
        for name, p in list(model.named_parameters()):  # init_weights' order: the same numbers at any tp
            dim, start, size, full = shards.get(name, (None, 0, 0, tuple(p.shape)))
            if weights is not None:
                sl = weights(name)
                check_shape(name, tuple(sl.get_shape()), full)
                value = read_part(sl, None if dim is None else (dim, start, start + size))
            elif name.endswith("norm.weight"):
                value = torch.ones(p.shape)
            elif name.endswith(".bias"):
                value = torch.zeros(p.shape)
            elif dim is None:
                value = torch.empty(full).normal_(0.0, args.init_std, generator=gen)
            else:
                value = _drawn_shard(full, dim, start, size, args.init_std, gen, scratch)
            _materialize(p, value.to(device=device, dtype=torch.float32).contiguous(), owners[id(p)])
    model.inv_freq = rope_inv_freq(args).to(device)
    record_param_names(model)  # DeepSpeed's names of the parameters, now the real ones
