"""The trainer: validate, prepare data, build and parallelize the model, loop, evaluate, checkpoint, export.

``train(cfg)`` is what ``python -m framework.train`` calls and what tests call with a composed config.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from framework.checkpoint.export import export_from_module
from framework.checkpoint.manager import CheckpointManager
from framework.checkpoint.universal import load_universal_optimizer, load_universal_weights
from framework.cli import UserError
from framework.config import TrainConfig, TrainerConfig
from framework.data.dataset import prepare_data
from framework.data.loader import ShardedLoader
from framework.data.sources import validate_data_config
from framework.models.hf import from_hf_config, load_hf_weights, read_hf_config
from framework.models.llama import ModelArgs, build_model
from framework.parallel.distributed import barrier, init_distributed, pick_device
from framework.parallel.parallelize import accumulation_steps, parallelize, quiet_deepspeed
from framework.parallel.topology import Topology, build_topology
from framework.trainer.evaluate import evaluate, lm_loss
from framework.trainer.faults import maybe_fail
from framework.trainer.loggers import MetricLogger, link_scheduler_logs
from framework.trainer.metrics import device_peak_tflops, peak_memory_gb, warmup_cosine


def as_train_config(cfg) -> TrainConfig:
    if isinstance(cfg, TrainConfig):
        return cfg
    if isinstance(cfg, DictConfig):
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        return OmegaConf.to_object(merged)
    raise TypeError(f"expected TrainConfig or DictConfig, got {type(cfg)}")


def validate(cfg: TrainConfig, world_size: int, rank: int) -> Topology:
    """Every check that needs no heavy work, run identically on every rank (only rank 0 prints the failure)."""
    p, t, m = cfg.parallel, cfg.trainer, cfg.model
    if p.precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"parallel.precision={p.precision}: use fp32, bf16 or fp16")
    if p.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"parallel.zero_stage={p.zero_stage}: use 0, 1, 2 or 3")
    topo = build_topology(world_size, rank, tp=p.tp, n_heads=m.n_heads, n_kv_heads=m.kv_heads, ffn_dim=m.ffn_dim)
    if m.dim % m.n_heads:
        raise UserError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}")
    if m.n_heads % m.kv_heads:
        raise UserError(f"model.n_heads={m.n_heads} is not a multiple of model.n_kv_heads={m.kv_heads}")
    if t.global_batch_size % (t.micro_batch_size * topo.dp):
        raise UserError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x dp = "
            f"{t.micro_batch_size} x {topo.dp}: make it a multiple of {t.micro_batch_size * topo.dp}"
        )
    if t.seq_len > m.max_seq_len:
        raise UserError(f"trainer.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if t.max_steps < 1:
        raise UserError("trainer.max_steps must be >= 1")
    if t.stop_at is not None and not 0 < t.stop_at <= t.max_steps:
        raise UserError(f"trainer.stop_at={t.stop_at} must be between 1 and trainer.max_steps={t.max_steps}")
    if p.zero_stage == 3 and p.tp > 1:
        pass  # supported by DeepSpeed; gathered through both dimensions at export
    validate_data_config(cfg.data)
    if t.init_from is not None:
        read_hf_config(t.init_from)
    return topo


def write_run_config(cfg: TrainConfig, run_dir: str, topo: Topology) -> None:
    os.makedirs(run_dir, exist_ok=True)
    conf = OmegaConf.structured(cfg)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(f"# command: {' '.join(sys.argv)}\n# layout: {topo}\n")
        f.write(OmegaConf.to_yaml(conf))


def resolve_model_args(cfg: TrainConfig, vocab_size: int) -> ModelArgs:
    if cfg.trainer.init_from:
        return from_hf_config(read_hf_config(cfg.trainer.init_from), name=cfg.model.name)
    args = cfg.model
    if args.vocab_size is None:
        args = replace(args, vocab_size=vocab_size)
    elif args.vocab_size < vocab_size:
        raise UserError(f"model.vocab_size={args.vocab_size} is smaller than the tokenizer's {vocab_size}")
    return args


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_engine(engine, cfg: TrainConfig, args: ModelArgs, topo: Topology, out_dir: str, step: int,
                  max_shard_mb: int | None = None) -> str:
    """Write the HF export of a training engine's model (every rank calls this)."""
    return export_from_module(engine.module, args, out_dir, os.path.join(cfg.run_dir, "tokenizer"), tp=topo.tp,
                              tp_group=tp_group(topo),
                              max_shard_mb=max_shard_mb or cfg.checkpoint.max_shard_size_mb,
                              dtype=PRECISION_DTYPES[cfg.parallel.precision], extra_manifest={"step": step})


def model_shape(args: ModelArgs) -> dict:
    """What a checkpoint must agree on to be loaded into this model."""
    return {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "kv_heads", "ffn_dim", "vocab_size",
                                          "tie_embeddings", "qkv_bias")}


def tp_group(topo: Topology):
    from deepspeed.utils import groups

    return groups.get_tensor_model_parallel_group() if topo.tp > 1 else None


def null_step(engine, t: TrainerConfig, device: torch.device) -> None:
    """One optimizer step that changes no weight (lr 0, zero gradients): makes DeepSpeed build its optimizer state."""
    groups = engine.optimizer.param_groups
    lrs = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = 0.0
    x = torch.zeros((t.micro_batch_size, t.seq_len + 1), dtype=torch.long, device=device)
    for _ in range(engine.gradient_accumulation_steps()):
        loss = lm_loss(engine(x[:, :-1]), x[:, 1:]) * 0.0
        engine.backward(loss)
        engine.step()
    for g, lr in zip(groups, lrs):
        g["lr"] = lr


def restore_schedule(engine, step: int, global_batch_size: int) -> None:
    """Put DeepSpeed's counters and the LambdaLR schedule at ``step`` (the layout-changing resume)."""
    sched = engine.lr_scheduler
    sched.last_epoch = step
    lrs = [base * lam(step) for base, lam in zip(sched.base_lrs, sched.lr_lambdas)]
    for g, lr in zip(sched.optimizer.param_groups, lrs):
        g["lr"] = lr
    sched._last_lr = lrs
    engine.global_steps, engine.global_samples = step, step * global_batch_size


def train(cfg) -> dict:
    """Run one training job; returns the last logged metrics and the paths it wrote."""
    cfg = as_train_config(cfg)
    quiet_deepspeed()
    device = pick_device(cfg.parallel.device)
    rank, world = init_distributed(device, cfg.parallel.backend, cfg.parallel.timeout_s)
    topo = validate(cfg, world, rank)
    run_dir = cfg.run_dir
    if topo.is_rank0:
        write_run_config(cfg, run_dir, topo)
        link_scheduler_logs(run_dir)
    torch.manual_seed(cfg.seed)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if topo.is_rank0 else (lambda s: None)
    log(f"[miaotui] run_dir={run_dir} layout {topo} zero={cfg.parallel.zero_stage} precision={cfg.parallel.precision} "
        f"device={device.type}")

    # Data: rank 0 builds tokenizer and blocks once; every rank loads them.
    data = prepare_data(cfg.data, cfg.trainer.seq_len, cfg.seed, run_dir, topo.is_rank0)
    args = resolve_model_args(cfg, len(data.tokenizer))
    log(f"[miaotui] data: {data.train.shape[0]} train / {data.val.shape[0]} val blocks of {cfg.trainer.seq_len} tokens, "
        f"vocab {len(data.tokenizer)}, unigram entropy {data.unigram_entropy:.3f} nats")
    log(f"[miaotui] model {args.name}: {args.num_params() / 1e6:.2f}M parameters "
        f"({args.n_layers} layers, dim {args.dim}, {args.n_heads} heads / {args.kv_heads} kv)")

    t = cfg.trainer
    layout = {"dp": topo.dp, "tp": topo.tp, "zero_stage": cfg.parallel.zero_stage}
    ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep, topo.is_rank0)
    resume_from = ckpt.resolve(cfg.checkpoint.resume)
    state = ckpt.inspect(resume_from, model_shape(args)) if resume_from else None
    same_layout = state is not None and state.get("layout") == layout and state.get("world_size") == world

    model = build_model(args, device=device, seed=cfg.seed)
    if state is not None and not same_layout:
        load_universal_weights(model, resume_from)
    elif cfg.trainer.init_from:
        load_hf_weights(model, cfg.trainer.init_from)
        log(f"[miaotui] initialised from {cfg.trainer.init_from}")
    engine = parallelize(model, cfg.parallel, t, topo,
                         lambda s: warmup_cosine(s, t.warmup_steps, t.max_steps, t.min_lr_ratio))

    loader = ShardedLoader(data.train, t.global_batch_size, topo.dp, topo.dp_rank, cfg.seed)
    start_step, tokens_seen = 0, 0
    timings: dict[str, float] = {}
    if state is not None:
        t_load = time.perf_counter()
        if same_layout:
            ckpt.load(engine, resume_from, state)
        else:
            load_universal_optimizer(engine, resume_from, topo.tp, topo.tp_rank, state["step"],
                                     materialize=lambda: null_step(engine, t, device))
            restore_schedule(engine, state["step"], t.global_batch_size)
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        loader.load_state_dict(state["loader"])
        barrier()
        timings["load_s"] = time.perf_counter() - t_load
        how = "" if same_layout else f" (saved at {state.get('layout')}, now {layout}: per-parameter state)"
        log(f"[miaotui] resumed from {resume_from} at step {start_step}{how} in {timings['load_s']:.2f}s")

    gas = accumulation_steps(topo, t)
    flops_per_token = args.flops_per_token(t.seq_len)
    peak = device_peak_tflops(device, cfg.parallel.precision, t.peak_tflops)
    logger = MetricLogger(cfg.logger, run_dir, t.max_steps, start_step, topo.is_rank0,
                          run_config=OmegaConf.to_container(OmegaConf.structured(cfg)), run_name=cfg.name)
    last: dict = {}
    step = start_step
    window_tokens, window_time = 0, 0.0
    stop = t.stop_at or t.max_steps
    engine.train()
    while step < stop:
        t0 = time.perf_counter()
        batch = loader.next_batch().to(device)
        lr = engine.get_lr()[0]
        loss_sum = torch.zeros((), device=device)
        for micro in batch.split(t.micro_batch_size):
            loss = lm_loss(engine(micro[:, :-1]), micro[:, 1:])
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
        loss_avg = loss_sum / gas
        dist.all_reduce(loss_avg)
        loss_value = loss_avg.item() / world  # tp ranks hold equal losses: the mean over dp
        dt = time.perf_counter() - t0
        step += 1
        step_tokens = t.global_batch_size * t.seq_len
        tokens_seen += step_tokens
        window_tokens += step_tokens
        window_time += dt
        logger.advance()
        if step % t.log_every == 0 or step == t.max_steps or step == start_step + 1:
            tps = window_tokens / max(window_time, 1e-9)
            gn = engine.get_global_grad_norm()
            last = {
                "step": step, "loss": loss_value, "lr": lr,
                "grad_norm": float(gn) if gn is not None else None,
                "tokens_per_s": tps, "tokens_per_s_per_device": tps / world,
                "tflops_per_device": flops_per_token * tps / world / 1e12,
                "mfu": (flops_per_token * tps / world / (peak * 1e12)) if peak else None,
                "peak_mem_gb": peak_memory_gb(device), "tokens_seen": tokens_seen,
            }
            logger.log(last)
            window_tokens, window_time = 0, 0.0
        if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
            ev = {"step": step, **evaluate(engine.module, data, t, device)}
            logger.log(ev)
            logger.write("[eval] " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in ev.items()))
            last.update(ev)
        if not math.isfinite(loss_value):
            raise UserError(f"loss became {loss_value} at step {step}: lower trainer.lr or use fp32/bf16")
        maybe_fail("step", step)
        save_now = cfg.checkpoint.every > 0 and step % cfg.checkpoint.every == 0
        save_end = step == stop and (cfg.checkpoint.save_final or step < t.max_steps)
        if save_now or save_end:
            universal = None
            if cfg.checkpoint.universal:
                universal = {"tp": topo.tp, "tp_group": tp_group(topo),
                             "max_shard_mb": cfg.checkpoint.max_shard_size_mb}
            t_save = time.perf_counter()
            path = ckpt.save(engine, step, {"step": step, "tokens_seen": tokens_seen, "loader": loader.state_dict(),
                                            "layout": layout, "model": model_shape(args),
                                            "model_args": asdict(args), "precision": cfg.parallel.precision},
                            universal)
            timings["save_s"] = time.perf_counter() - t_save
            logger.write(f"[miaotui] saved checkpoint {path} in {timings['save_s']:.2f}s")
    logger.close()

    export_dir = None
    if cfg.checkpoint.export and step == t.max_steps:
        t_export = time.perf_counter()
        export_dir = export_engine(engine, cfg, args, topo, os.path.join(run_dir, "export"), step)
        timings["export_s"] = time.perf_counter() - t_export
        log(f"[miaotui] exported {export_dir} in {timings['export_s']:.2f}s")
    barrier()
    summary = {"run_dir": run_dir, "export_dir": export_dir, "step": step, "unigram_entropy": data.unigram_entropy,
               **last, **timings}
    if topo.is_rank0:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary
