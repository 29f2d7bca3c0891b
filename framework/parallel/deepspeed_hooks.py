"""Every use of DeepSpeed's private internals, each a small named function (one place to look on an upgrade).

DeepSpeed has no public hook for what these do: fill a meta model right after AutoTP cut it, build the (dp, tp) mesh
before ``deepspeed.initialize``, read the shard sizes AutoTP froze per layer, partition under ``zero.Init`` without
its broadcast, reach the torch optimizer and the per-parameter optimizer state under ZeRO's wrappers, and drive the
CPU shared-memory all-reduce op. Each hook is registered with ``@checked(first, last)``: the DeepSpeed releases whose
sources it was read against (and the last one, the installed 0.19.8, exercised). tests/unit/test_deepspeed_hooks.py
checks each against the installed DeepSpeed (the private name exists with the signature used, and where cheap runs
it on a tiny layer or a one-process engine) and names the hook and its range when an upgrade breaks it.

DeepSpeed is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import torch

# hook name -> (first, last) DeepSpeed release it was checked against
HOOKS: dict[str, tuple[str, str]] = {}


def checked(first: str, last: str) -> Callable:
    """Register a hook with the DeepSpeed releases it was checked against."""

    def register(fn: Callable) -> Callable:
        HOOKS[fn.__name__] = (first, last)
        fn.deepspeed_range = (first, last)
        return fn

    return register


# ---- tensor-parallel training (AutoTP) ----

@checked("0.19.6", "0.19.8")
@contextlib.contextmanager
def after_autotp(model: torch.nn.Module, materialize: Callable[[torch.nn.Module], None]) -> Iterator[None]:
    """Run ``materialize(model)`` inside ``deepspeed.initialize`` right after AutoTP has sharded ``model`` (built on
    the meta device) and before ZeRO wraps it, by wrapping ``DeepSpeedEngine._configure_tensor_parallel(self, model,
    tp_config)`` (present 0.18.0-0.19.8; AutoTP keeps meta tensors meta and freezes its shard sizes from 0.19.6)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = getattr(DeepSpeedEngine, "_configure_tensor_parallel", None)
    if original is None:
        raise RuntimeError("this DeepSpeed has no DeepSpeedEngine._configure_tensor_parallel: tensor-parallel "
                           "training needs DeepSpeed 0.19.6-0.19.x (pip install 'deepspeed>=0.19.6,<0.20')")

    def configure(engine, module, tp_config):
        sources = original(engine, module, tp_config)
        if module is model:
            materialize(module)
        return sources

    DeepSpeedEngine._configure_tensor_parallel = configure
    try:
        yield
    finally:
        DeepSpeedEngine._configure_tensor_parallel = original


@checked("0.18.0", "0.19.8")
def init_tp_mesh(tp: int) -> None:
    """Build DeepSpeed's (dp, tp) mesh of process groups before ``deepspeed.initialize`` (so that it counts batch
    sizes over dp, not the world): ``deepspeed.utils.groups._init_tp_mesh_device(tensor_model_parallel_size=tp)``,
    a no-op once built."""
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=tp)


@checked("0.18.0", "0.19.8")
def tensor_parallel_group(tp: int):
    """The tensor-parallel process group of DeepSpeed's mesh (``init_tp_mesh``), or None at tp 1."""
    if tp <= 1:
        return None
    from deepspeed.utils import groups

    return groups.get_tensor_model_parallel_group()


@checked("0.19.6", "0.19.8")
def autotp_shard_spec(module: torch.nn.Module) -> tuple[tuple[int, ...], int, dict[str, tuple[int, tuple]]] | None:
    """How AutoTP split ``module``: None where it is not one of AutoTP's layers, else ``(sizes, tp_index, {param:
    (dim, full shape)})``: the sizes it froze for the layer along ``dim`` (``_partition_sizes``, heads kept whole),
    this rank's part ``tp_index``, and each split parameter's full shape (``_orig_weight_shape``,
    ``_orig_bias_shape``). Column-parallel ``LinearLayer`` splits weight and bias by rows; row-parallel
    ``LinearAllreduce`` splits the weight by columns (its bias is replicated). These attributes exist from 0.19.6."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer

    if isinstance(module, LinearAllreduce):
        dims = {"weight": (1, tuple(module._orig_weight_shape))}
    elif isinstance(module, LinearLayer):
        dims = {"weight": (0, tuple(module._orig_weight_shape))}
        if module._orig_bias_shape is not None:
            dims["bias"] = (0, tuple(module._orig_bias_shape))
    else:
        return None
    return tuple(module._partition_sizes), module.tp_index, dims


@checked("0.18.0", "0.19.8")
def record_param_names(model: torch.nn.Module) -> None:
    """Give DeepSpeed the names of ``model``'s parameters again once they have been replaced (its debug name table,
    ``deepspeed.utils.debug.debug_extract_module_and_param_names``, which its ZeRO messages read)."""
    from deepspeed.utils.debug import debug_extract_module_and_param_names

    debug_extract_module_and_param_names(model)


# ---- ZeRO 3 construction ----

@functools.cache
def _partition_only_class() -> type:
    import deepspeed

    class PartitionOnly(deepspeed.zero.Init):
        """zero.Init without its broadcast of every new parameter from rank 0."""

        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    return PartitionOnly


@checked("0.18.0", "0.19.8")
def partition_only_init(**kwargs) -> contextlib.AbstractContextManager:
    """``deepspeed.zero.Init(**kwargs)`` that partitions each new parameter without first broadcasting it from rank
    0: the values are written per rank right after, and receiving the broadcast would make each module whole and
    resident on every rank. Overrides ``Init._zero_init_param(self, param)`` (convert, broadcast, partition) with
    its first and last steps (``_convert_to_deepspeed_param``, ``param.partition()``)."""
    return _partition_only_class()(**kwargs)


# ---- the optimizer under ZeRO's wrappers (universal checkpoints) ----

@checked("0.18.0", "0.19.8")
def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (each holds the next as ``.optimizer``): it holds ``state``
    keyed by flat partitions or by parameters."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


@checked("0.18.0", "0.19.8")
def relink_optimizer_state(engine) -> None:
    """Re-link DeepSpeed's per-parameter views of the flat optimizer state (``_hp_optimizer_states_linked``,
    ``_lazy_init_hp_params_optimizer_state()`` of the ZeRO 1/2 and bf16 optimizers; others have none to link).

    They link them once, right after the first param group's first step, when the other groups' state does not
    exist yet; the parameters of those groups (norms, biases) would then have no moments to read or write."""
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked") and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


@checked("0.18.0", "0.19.8")
def has_fp32_master(param: torch.Tensor) -> bool:
    """Whether DeepSpeed keeps a separate fp32 master of ``param`` (ZeRO 3's ``ds_id``, the ZeRO 1/2 and bf16
    optimizers' ``_hp_mapping``); a plain fp32 parameter is its own. ``deepspeed.utils.safe_get_full_*`` read those."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


# ---- the CPU shared-memory all-reduce ----

@checked("0.18.0", "0.19.8")
def comm_initialized() -> bool:
    """Whether DeepSpeed's comm layer already wraps the process group (``deepspeed.comm.comm.cdb``)."""
    import deepspeed.comm.comm as ds_comm

    return ds_comm.cdb is not None


@checked("0.18.0", "0.19.8")
def comm_has_shm_allreduce() -> bool:
    """Whether DeepSpeed's comm layer built its CPU shared-memory all-reduce op (``cdb.shm_comm_op``), which maps a
    segment per rank (``unlink_deepspeed_shm``)."""
    import deepspeed.comm.comm as ds_comm

    return getattr(ds_comm.cdb, "shm_comm_op", None) is not None


@checked("0.18.0", "0.19.8")
def unlink_deepspeed_shm(port: str) -> None:
    """Remove the name of this rank's segment of DeepSpeed's CPU shared-memory all-reduce (csrc/cpu/comm/shm.cpp
    names it ``deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{port}_{rank}``), which DeepSpeed never removes. Call
    it once every rank has mapped every segment (after a barrier): the memory then lives as long as the mappings,
    and goes with the job."""
    import torch.distributed as dist

    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{port}_{dist.get_rank()}"
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:
        pass


@checked("0.18.0", "0.19.8")
def load_shm_allreduce_op():
    """DeepSpeed's CPU shared-memory all-reduce extension (``ShareMemCommBuilder().load()``: built with the host's
    compiler on first use, then cached); raises where it cannot be built."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    return ShareMemCommBuilder().load(verbose=False)


@checked("0.19.8", "0.19.8")
def shm_vector_kernel_level(op) -> int:
    """The vector kernels the op has on this CPU (``op.vector_kernel_level()``: 1 fp32 (avx2), 2 bf16/fp16 too
    (avx512bw)); 0 where the op cannot say (before 0.19.8): without them its kernel faults and its peers hang."""
    level = getattr(op, "vector_kernel_level", None)
    return level() if level is not None else 0


@checked("0.18.0", "0.19.8")
def init_shm_allreduce(op, world: int, rank: int, segment_name: str) -> None:
    """Map every rank's segment of the op (collective over the ranks of one node). The op reads LOCAL_SIZE (it
    serves only when every rank is local: set to ``world``, and left so) and names its segments after MASTER_ADDR
    and MASTER_PORT: ``segment_name`` stands in for the port while it maps them."""
    os.environ["LOCAL_SIZE"] = str(world)
    port = os.environ.get("MASTER_PORT")
    os.environ["MASTER_PORT"] = segment_name
    try:
        op.initialize(world, rank)
    finally:
        if port is None:
            os.environ.pop("MASTER_PORT")
        else:
            os.environ["MASTER_PORT"] = port


@checked("0.18.0", "0.19.8")
def shm_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over every rank through the op's shared memory (``torch.ops.deepspeed.inference_all_reduce``,
    registered by the op: ``load_shm_allreduce_op`` and ``init_shm_allreduce`` first)."""
    return torch.ops.deepspeed.inference_all_reduce(x)
