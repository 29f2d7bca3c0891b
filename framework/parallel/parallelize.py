"""Apply parallelism to the single-device model from outside, in a fixed order.

1. tensor parallelism: DeepSpeed AutoTP, driven by name patterns for our (Hugging Face) parameter names;
2. activation checkpointing: recompute each decoder layer in backward;
3. ZeRO wrapping: ``deepspeed.initialize`` with the config built here.

Each step is switchable from ``ParallelConfig``; the model file itself never sees a process group.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable

import torch

from framework.config import ParallelConfig, TrainerConfig
from framework.parallel.deepspeed_hooks import (
    after_autotp,
    comm_has_shm_allreduce,
    comm_initialized,
    init_tp_mesh,
    unlink_deepspeed_shm,
)
from framework.parallel.topology import Topology
from framework.weights.layout import COLUMN_PARALLEL, ROW_PARALLEL


def accumulation_steps(topo: Topology, trainer: TrainerConfig) -> int:
    """Derive gradient accumulation from the global batch; the caller validated divisibility."""
    return trainer.global_batch_size // (trainer.micro_batch_size * topo.dp)


def build_deepspeed_config(parallel: ParallelConfig, trainer: TrainerConfig, topo: Topology) -> dict:
    """The DeepSpeed config from ours: batch sizes, precision, ZeRO stage, clipping, AutoTP."""
    cfg: dict = {
        "train_batch_size": trainer.global_batch_size,
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(topo, trainer),
        "gradient_clipping": trainer.grad_clip,
        "zero_optimization": {"stage": parallel.zero_stage},
        "steps_per_print": 10**9,  # our loggers report; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if parallel.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif parallel.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 200}
    if parallel.zero_stage == 3:
        # Gather parameters eagerly in the small models of tests; real runs keep DeepSpeed's defaults.
        cfg["zero_optimization"].update({"stage3_param_persistence_threshold": 0})
    if topo.tp > 1:
        cfg["tensor_parallel"] = {
            "autotp_size": topo.tp,
            "partition_config": {
                "use_default_specs": False,
                "layer_specs": [
                    {"patterns": [COLUMN_PARALLEL], "partition_type": "column"},
                    {"patterns": [ROW_PARALLEL], "partition_type": "row"},
                ],
            },
        }
    return cfg


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices, not norms or biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim  # a ZeRO-3 partitioned parameter is empty
        (no_decay if ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def init_deepspeed_comm(topo: Topology) -> None:
    """DeepSpeed's comm layer wraps the process group we already initialised (it prints from every rank when it
    builds its CPU shared-memory op: rank 0 speaks).

    Where every rank is on one host and says so (LOCAL_SIZE = world, which the deepspeed launcher sets), that op
    gives each rank a 66 MiB segment in /dev/shm named after MASTER_ADDR, MASTER_PORT and the rank, and never
    removes it: every such job left ranks x 66 MiB of memory behind (12 GiB here after a few test runs), and a
    later job on the same address and port could open a dead job's segment. Once every rank has mapped every
    segment (the op opens all of them before it returns), each rank removes its name (``unlink_deepspeed_shm``).
    """
    import deepspeed

    fresh = not comm_initialized()  # a later call finds the segments dealt with
    with contextlib.redirect_stdout(sys.stdout if topo.is_rank0 else io.StringIO()):
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    if not fresh:
        return
    world = torch.distributed.get_world_size()
    if world > 1:
        torch.distributed.barrier()  # on every rank, whatever each one's op did
    if comm_has_shm_allreduce() and os.environ.get("LOCAL_SIZE") == str(world):
        unlink_deepspeed_shm(os.environ.get("MASTER_PORT", ""))


def parallelize(model: torch.nn.Module, parallel: ParallelConfig, trainer: TrainerConfig, topo: Topology,
                lr_lambda: Callable[[int], float], device: torch.device | None = None,
                materialize: Callable[[torch.nn.Module], None] | None = None):
    """Apply TP, activation checkpointing and ZeRO; returns the DeepSpeed engine. A model built on the meta device
    (tp > 1) comes with ``materialize``, which gives each rank its shards once AutoTP has cut them."""
    import deepspeed
    from deepspeed.utils import groups

    init_deepspeed_comm(topo)
    # 1. Tensor parallelism: build the (dp, tp) mesh first so DeepSpeed counts batch sizes over dp, not the world;
    #    AutoTP then shards the matched parameters inside deepspeed.initialize (and ``materialize`` fills them).
    if topo.tp > 1:
        init_tp_mesh(topo.tp)
    # 2. Activation checkpointing, applied per decoder layer inside the model's forward.
    model.activation_checkpointing = parallel.activation_checkpointing
    # 3. ZeRO.
    ds_config = build_deepspeed_config(parallel, trainer, topo)
    # torch's AdamW, handed to DeepSpeed (which wraps it for ZeRO): fused kernels on CUDA, and no JIT-built op to
    # load in every process on CPU. Made by DeepSpeed once the parameters exist (a meta model's are filled first).
    on_cuda = (device or next(model.parameters()).device).type == "cuda"

    def adamw(_):  # the groups of the parameters as they are then (materialize may have replaced them)
        return torch.optim.AdamW(param_groups(model, trainer.weight_decay), lr=trainer.lr,
                                 betas=(trainer.beta1, trainer.beta2), eps=trainer.eps, fused=on_cuda or None)

    with after_autotp(model, materialize) if materialize else contextlib.nullcontext():
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=adamw,
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
            mpu=groups if topo.tp > 1 else None,
        )
    if any(p.is_meta for p in engine.module.parameters()):
        raise RuntimeError("parameters left on the meta device after deepspeed.initialize: tp > 1 builds need "
                           "DeepSpeed's AutoTP (parallel.tp > 1) to shard them")
    return engine


def quiet_deepspeed(rank0: bool | None = None) -> None:
    """DeepSpeed logs at INFO on every rank: keep its warnings only, and name the accelerator so that it does not
    warn about guessing it. Off rank 0 (``rank0`` False; None reads RANK) Python's warnings are silenced: library
    warnings (torch's FutureWarnings raised inside DeepSpeed) then appear once, from rank 0."""
    import logging
    import warnings

    if not os.environ.get("DS_ACCELERATOR"):
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    if rank0 is None:
        rank0 = int(os.environ.get("RANK", "0")) == 0
    if not rank0:
        warnings.simplefilter("ignore")
    else:  # torch's deprecations of the collectives DeepSpeed calls repeat at every call, and they are not ours
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
