"""How every front end of the engine starts it: ``start_stage_ranks`` checks the engine keys, finds the export,
joins the process group, validates the layout, plans the stages and loads the tokenizer; ``build_engine`` then
loads this rank's weights, sizes the KV cache and wires the engine's parts.

``framework.generate`` (runner.py), ``framework.serve`` (server/) and ``framework.eval`` (evaluation/tasks.py)
differ only in what they feed the engine; this is their shared start-up, in the order that lets a bad input fail
in one line before any weight is read.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from framework.cli import UserError

if TYPE_CHECKING:
    from framework.infer.engine import Engine


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
    from framework.checkpoint.resolve import resolve_model_dir
    from framework.data.tokenizer import load_tokenizer
    from framework.infer.loader import default_dtype, read_model_args
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


def read_eos_ids(model_dir: str, tokenizer) -> frozenset[int]:
    """The ids that end a sequence: ``eos_token_id`` of generation_config.json and config.json (an int or a list,
    e.g. Llama 3's ``<|end_of_text|>`` and ``<|eot_id|>``) and the tokenizer's own EOS, as ``generate()`` does."""
    ids = set()
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                value = json.load(f).get("eos_token_id")
        except (OSError, ValueError, AttributeError) as exc:
            raise UserError(f"{path}: not a readable JSON object ({exc}): fix or remove the file") from None
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and not isinstance(i, bool):
                ids.add(i)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def agree_slots(slots: int, world: int) -> int:
    """The fewest KV slots any rank can hold: a step's rows must fit every stage's cache."""
    if world == 1:
        return slots
    import torch.distributed as dist

    box = [None] * world
    dist.all_gather_object(box, slots)
    return min(box)


def build_scheduler(inf, model_dir: str, tokenizer, slots: int, lanes: int, max_len: int, device: torch.device,
                    dtype: torch.dtype, k: int, step_cost=None):
    """Rank 0's scheduler, with the model's EOS ids and the speculative proposer (``k`` draft tokens a row;
    ``step_cost``: stage 0's step seconds against rows, for the cost policy)."""
    from framework.infer.scheduler import Scheduler
    from framework.infer.speculative import build_proposer

    return Scheduler(slots, lanes, inf.prefill_chunk, eos_ids=read_eos_ids(model_dir, tokenizer),
                     tokenizer=tokenizer, policy=inf.scheduler, max_len=max_len,
                     proposer=build_proposer(inf, tokenizer, slots, max_len, device, dtype),
                     num_speculative_tokens=k, speculative_max_batch=inf.speculative_max_batch, step_cost=step_cost)


def build_engine(inf, model_dir: str, args, stages, rank: int, device: torch.device, dtype: torch.dtype,
                 n_requests: int, max_len: int, tokenizer, say: Callable[[str], None]) -> tuple[Engine, int]:
    """Load this rank's slice of its stage, size the KV cache (every rank agrees on the slot count), and wire
    the parts. Returns the engine and its KV slot count. Every rank calls this, after ``start_stage_ranks``."""
    import torch.distributed as dist

    from framework.infer.cache import KVCache, bytes_per_slot, fit_slots, kv_budget_bytes
    from framework.infer.engine import Engine
    from framework.infer.loader import load_stage
    from framework.infer.sampler import Sampler
    from framework.infer.speculative import check_speculative_keys
    from framework.infer.step import StepPlan
    from framework.infer.tensor_parallel import TPGroup
    from framework.infer.transport import make_transport
    from framework.infer.worker import StageWorker

    check_speculative_keys(inf)  # every rank, before any weight is read
    k = inf.num_speculative_tokens if inf.speculative != "none" else 0  # draft rows a decode row may bring
    pp, tp = inf.pp, inf.tp
    stage, tp_rank = stages[rank // tp], rank % tp
    max_batch = inf.batch_size if inf.batch_size is not None else inf.max_batch
    lanes = inf.micro_batches or pp
    kv_heads = args.kv_heads // tp
    per_slot = bytes_per_slot(len(stage.layers), kv_heads, args.head_dim, max_len, dtype)

    def fitting_slots() -> int:
        budget = kv_budget_bytes(device, inf.kv_cache_gb, inf.gpu_memory_utilization)
        return fit_slots(budget, per_slot, max_batch, max_len)

    slots = fitting_slots() if device.type == "cpu" else None  # on CPU refused before any weight is read
    wanted = max(1, min(max_batch, n_requests))
    rows_hint = -(-wanted // lanes) if inf.packed_weights else None
    compile_decode = inf.compile if inf.compile is not None else device.type == "cuda"
    weights = load_stage(model_dir, args, stage, device, dtype, quant=inf.quant, group_size=inf.quant_group_size,
                         rows_hint=rows_hint, tp=tp, tp_rank=tp_rank, compiled=compile_decode)
    slots = min(slots if slots is not None else fitting_slots(), wanted)  # CUDA: what the weights left free
    slots = agree_slots(slots, pp * tp)
    cache = KVCache(stage.layers, slots, kv_heads, max_len, args.head_dim, dtype, device)
    # a step has draft rows only while its lane decodes fewer than speculative_max_batch rows
    draft_rows = min(slots, inf.speculative_max_batch - 1) * k
    tpg = TPGroup(pp, tp, rank, device, dtype, args.vocab_size, allreduce=inf.allreduce)
    worker = StageWorker(weights, cache, device, dtype, compile_decode=compile_decode, tp=tpg,
                         max_rows=slots + draft_rows)
    worker.warm_up(rows_hint or 1)  # the compiled step is built at load, not on the first request
    step_cost = None
    if k and inf.speculative_policy == "cost" and rank < tp:  # stage 0's ranks time their steps together
        from framework.infer.speculative import StepCost

        step_cost = StepCost.measure(worker, slots + draft_rows)
    capacity = StepPlan.capacity(slots, inf.prefill_chunk, draft_rows)
    transport = make_transport(inf.transport, rank, pp, tp, device, capacity, slots + draft_rows + inf.prefill_chunk,
                               args.dim, dtype, lanes, reply_ints=StepPlan.reply_capacity(slots, inf.prefill_chunk,
                                                                                          draft_rows))
    sampler = Sampler(slots, args.vocab_size, device) if stage.last and tp_rank == 0 else None
    scheduler = (build_scheduler(inf, model_dir, tokenizer, slots, lanes, max_len, device, dtype, k, step_cost)
                 if rank == 0 else None)
    ar = "-" if tp == 1 else ("shared memory" if tpg.shm else dist.get_backend(tpg.group))
    say(f"[miaotui] KV cache: {slots} slots x {max_len} tokens, {cache.nbytes() / 2**20:.1f} MiB a rank; "
        f"{lanes} lane(s) in flight, prefill chunk {inf.prefill_chunk}, compiled decode {compile_decode}, "
        f"tp all-reduce {ar}, ring {'-' if transport is None else transport.kind}")
    engine = Engine(worker, rank, pp, device, capacity, sampler=sampler, scheduler=scheduler, transport=transport)
    return engine, slots
