"""What every front end of the engine does before it builds the engine: check the engine keys, find the export,
join the process group, validate the layout, plan the stages, load the tokenizer.

``framework.generate`` (runner.py) and ``framework.serve`` (server/) differ only in what they feed the engine;
this is their shared start-up, in the order that lets a bad input fail in one line before any weight is read.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from framework.cli import UserError


@dataclass
class StageSetup:
    """This rank's place in the inference job, before its weights are loaded."""

    model_dir: str
    args: object  # framework.models.llama.ModelArgs
    device: torch.device
    dtype_name: str
    dtype: torch.dtype
    rank: int
    world: int
    stages: list  # framework.infer.plan.Stage, one per pipeline stage
    tokenizer: object
    say: Callable[[str], None]  # prints on rank 0 only


def check_engine_keys(inf) -> int:
    """The engine keys a user can get wrong, refused before anything starts; returns max_batch."""
    max_batch = inf.batch_size if inf.batch_size is not None else inf.max_batch
    if max_batch < 1:
        raise UserError(f"infer.max_batch={max_batch}: at least one running sequence is needed (e.g. 256)")
    if inf.scheduler not in ("continuous", "static"):
        raise UserError(f"infer.scheduler={inf.scheduler}: use continuous or static")
    if inf.prefill_chunk < 1:
        raise UserError(f"infer.prefill_chunk={inf.prefill_chunk}: prefill at least 1 prompt token a step (e.g. 512)")
    for key, allowed in (("transport", ("auto", "shm", "backend")), ("allreduce", ("auto", "shm", "backend"))):
        if getattr(inf, key) not in allowed:
            raise UserError(f"infer.{key}={getattr(inf, key)}: use one of {', '.join(allowed)}")
    return max_batch


def start_stage_ranks(model_dir: str | None, inf, timeout_s: int | None = None) -> StageSetup:
    """Resolve the model, join the process group (``timeout_s`` overrides ``infer.timeout_s``), check that
    pp x tp matches the world and the model, plan the stages and load the tokenizer. Every rank calls this."""
    from framework.checkpoint.convert import export_step_dir
    from framework.data.tokenizer import load_tokenizer
    from framework.infer.loader import default_dtype, read_model_args, resolve_model_dir
    from framework.infer.plan import format_plan, plan_stages
    from framework.parallel.distributed import init_distributed, pick_device
    from framework.parallel.topology import build_topology

    check_engine_keys(inf)
    model_dir, export_from = resolve_model_dir(model_dir)
    if export_from is None:
        args = read_model_args(model_dir)
    device = pick_device(inf.device)
    if export_from is None:
        dtype_name, dtype = default_dtype(inf.dtype, model_dir, device)
    rank, world = init_distributed(device, inf.backend, timeout_s if timeout_s is not None else inf.timeout_s)
    if world != inf.pp * inf.tp:
        raise UserError(f"infer.pp={inf.pp} x infer.tp={inf.tp} = {inf.pp * inf.tp} processes, but {world} were "
                        f"launched: use torchrun --nproc_per_node={inf.pp * inf.tp}")
    if export_from is not None:  # a training checkpoint: every rank writes its share of the export first
        if rank == 0:
            print(f"[miaotui] exporting {export_from} -> {model_dir}", file=sys.stderr, flush=True)
        export_step_dir(export_from, model_dir)
        args = read_model_args(model_dir)
        dtype_name, dtype = default_dtype(inf.dtype, model_dir, device)
    build_topology(world, rank, tp=inf.tp, pp=inf.pp, n_heads=args.n_heads, n_kv_heads=args.kv_heads,
                   ffn_dim=args.ffn_dim, key="infer.tp")
    stages = plan_stages(args, inf.pp, inf.split, torch.tensor([], dtype=dtype).element_size())
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if rank == 0 else (lambda s: None)
    say(f"[miaotui] {model_dir}: {args.num_params() / 1e6:.2f}M parameters, {args.n_layers} layers, "
        f"pp={inf.pp} x tp={inf.tp}, dtype={dtype_name}, device={device.type}\n{format_plan(stages)}")
    return StageSetup(model_dir, args, device, dtype_name, dtype, rank, world, stages, load_tokenizer(model_dir), say)
