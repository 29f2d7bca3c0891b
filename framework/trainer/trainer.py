"""The trainer: ``train(cfg)`` is what ``python -m framework.train`` calls and what tests call with a composed config.

It runs the steps its docstring lists, each a function of this file; nothing is written to the run directory
until the checkpoint to resume from (if any) has passed its checks.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from framework.checkpoint.export import export_from_module
from framework.checkpoint.faults import maybe_fail
from framework.checkpoint.manager import CheckpointManager, model_shape, restore_rng
from framework.checkpoint.universal import UniversalReader, load_universal_optimizer, load_universal_weights
from framework.cli import UserError
from framework.config import TrainConfig, TrainerConfig
from framework.data.dataset import TokenData, planned_tokenizer, prepare_data
from framework.data.loader import ShardedLoader
from framework.data.packing import as_batch, resolve_packing
from framework.data.sources import validate_data_config
from framework.models.hf import from_hf_config, has_tokenizer, read_hf_config
from framework.models.llama import ModelArgs, build_model
from framework.parallel.deepspeed_hooks import tensor_parallel_group
from framework.parallel.distributed import barrier, env_rank_world, init_distributed, pick_device
from framework.parallel.materialize import build_in_dtype, build_meta, build_partitioned, builds_partitioned, fill_tp_shards
from framework.parallel.parallelize import accumulation_steps, build_deepspeed_config, parallelize, quiet_deepspeed
from framework.parallel.topology import Topology, build_topology
from framework.trainer.distill import build_distiller, with_distill_from
from framework.trainer.evaluate import evaluate
from framework.trainer.loggers import MetricLogger, link_scheduler_logs
from framework.trainer.loss import global_divisor, lm_loss  # chunked: no fp32 copy of the (B, T, V) logits
from framework.trainer.metrics import current_memory_gb, device_peak_tflops, peak_memory_gb, reset_peak_memory, warmup_cosine
from framework.weights.dtypes import PRECISION_DTYPES
from framework.weights.io import hf_slice_reader, load_hf_weights

__all__ = ["PRECISION_DTYPES", "model_shape", "train", "validate", "resolve_model_args", "export_engine"]


def as_train_config(cfg) -> TrainConfig:
    if isinstance(cfg, TrainConfig):
        return cfg
    if isinstance(cfg, DictConfig):
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        return OmegaConf.to_object(merged)
    raise TypeError(f"expected TrainConfig or DictConfig, got {type(cfg)}")


def with_init_from(cfg: TrainConfig) -> TrainConfig:
    """``trainer.init_from``: the model's shape comes from the HF config it loads, and its tokenizer from the same
    directory unless ``data.tokenizer`` names another (a fresh BPE would pair new ids with trained embeddings)."""
    src = cfg.trainer.init_from
    if not src:
        return cfg
    args = from_hf_config(read_hf_config(src), name=cfg.model.name)
    data = cfg.data
    if data.tokenizer is None:
        if not has_tokenizer(src):
            raise UserError(f"trainer.init_from={src} has no tokenizer files: set data.tokenizer=<the directory of the "
                            "tokenizer the model was trained with>")
        data = replace(data, tokenizer=src)
    return replace(cfg, model=args, data=data)


def validate(cfg: TrainConfig, world_size: int, rank: int) -> Topology:
    """Every check that needs no heavy work and writes nothing, run identically on every rank (only rank 0 prints
    the failure). ``cfg`` has been through ``with_init_from``: the model is the one that will be built."""
    p, t, m = cfg.parallel, cfg.trainer, cfg.model
    if p.precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"parallel.precision={p.precision}: use fp32, bf16 or fp16")
    if p.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"parallel.zero_stage={p.zero_stage}: use 0, 1, 2 or 3")
    if p.precision == "fp16" and pick_device(p.device).type != "cuda":
        raise UserError("parallel.precision=fp16 needs a CUDA device (DeepSpeed has no fp16 on CPU): use bf16 or fp32")
    what = f" of trainer.init_from={t.init_from}" if t.init_from else ""
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
        raise UserError(f"trainer.seq_len={t.seq_len} exceeds the context of {m.max_seq_len} tokens of the model{what}")
    if t.max_steps < 1:
        raise UserError("trainer.max_steps must be >= 1")
    if t.stop_at is not None and not 0 < t.stop_at <= t.max_steps:
        raise UserError(f"trainer.stop_at={t.stop_at} must be between 1 and trainer.max_steps={t.max_steps}")
    validate_data_config(cfg.data)
    if t.init_from and cfg.data.tokenizer:
        check_init_tokenizer(cfg)
    return topo


def check_init_tokenizer(cfg: TrainConfig) -> None:
    """The tokenizer must index the embedding it starts from: no id past its rows, and another tokenizer than the
    model's own only if its vocabulary is exactly the embedding's."""
    from framework.data.tokenizer import load_tokenizer

    n, rows = len(load_tokenizer(cfg.data.tokenizer)), cfg.model.vocab_size
    own = os.path.realpath(cfg.data.tokenizer) == os.path.realpath(cfg.trainer.init_from)
    if n > rows or (not own and n != rows):
        raise UserError(f"data.tokenizer={cfg.data.tokenizer} has {n} tokens but the embedding of trainer.init_from="
                        f"{cfg.trainer.init_from} has {rows} rows: use the model's own tokenizer (leave data.tokenizer "
                        "unset)")


def check_fits(cfg: TrainConfig, world: int, device: torch.device) -> None:
    """On a GPU, the planner's peak memory per device against the device's: a layout that cannot fit stops here,
    in one line, rather than after minutes of building. (Unknown until the tokenizer exists: the vocabulary.)"""
    from framework.plan import Device, plan_training, train_layout

    if cfg.model.vocab_size is None:
        return
    props = torch.cuda.get_device_properties(device)
    dev = Device(props.name, props.total_memory / 2**30, 989.0, 3.35, 450.0, 50.0, 0.75, 0.4)
    plan = plan_training(cfg.model, train_layout(cfg, world), dev)
    if not plan.fits:
        raise UserError(f"{cfg.model.name} at {world} processes (tp={cfg.parallel.tp}, ZeRO {cfg.parallel.zero_stage}, "
                        f"micro-batch {cfg.trainer.micro_batch_size} x {cfg.trainer.seq_len}) needs about "
                        f"{plan.total / 2**30:.1f} GiB per GPU of {dev.memory_gib:.1f} (python -m framework.plan shows "
                        "the parts): turn on parallel.activation_checkpointing, raise parallel.zero_stage or "
                        "parallel.tp, or lower trainer.micro_batch_size")


def write_run_config(cfg: TrainConfig, run_dir: str, topo: Topology) -> None:
    os.makedirs(run_dir, exist_ok=True)
    conf = OmegaConf.structured(cfg)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(f"# command: {' '.join(sys.argv)}\n# layout: {topo}\n")
        f.write(OmegaConf.to_yaml(conf))


def resolve_model_args(cfg: TrainConfig, vocab_size: int | None) -> ModelArgs:
    """The model to build: the config's (the HF one after ``with_init_from``), its vocabulary the tokenizer's unless
    set. ``vocab_size`` None (not known yet) leaves an unset vocabulary unset."""
    args = cfg.model
    if args.vocab_size is None:
        args = replace(args, vocab_size=vocab_size)
    elif vocab_size is not None and args.vocab_size < vocab_size:
        raise UserError(f"model.vocab_size={args.vocab_size} is smaller than the tokenizer's {vocab_size}")
    return args


def export_engine(engine, cfg: TrainConfig, args: ModelArgs, topo: Topology, out_dir: str, step: int,
                  max_shard_mb: int | None = None) -> str:
    """Write the HF export of a training engine's model (every rank calls this)."""
    return export_from_module(engine.module, args, out_dir, os.path.join(cfg.run_dir, "tokenizer"), tp=topo.tp,
                              tp_group=tp_group(topo),
                              max_shard_mb=max_shard_mb or cfg.checkpoint.max_shard_size_mb,
                              dtype=PRECISION_DTYPES[cfg.parallel.precision], extra_manifest={"step": step})


def tp_group(topo: Topology):
    return tensor_parallel_group(topo.tp)


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


@dataclass
class Job:
    """What every step of ``train`` shares: the config, where this rank runs, and the run's state so far."""

    cfg: TrainConfig
    device: torch.device
    topo: Topology
    world: int
    ckpt: CheckpointManager
    resume_from: str | None = None
    state: dict | None = None  # the checkpoint's trainer_state
    timings: dict = field(default_factory=dict)
    tokenizer_sha256: str | None = None  # the run's tokenizer, recorded in every checkpoint
    distiller: object | None = None  # trainer.distill_from: the frozen target and the KL loss (distill.py)

    @property
    def layout(self) -> dict:
        return {"dp": self.topo.dp, "tp": self.topo.tp, "zero_stage": self.cfg.parallel.zero_stage}

    @property
    def from_universal(self) -> bool:
        """Resume through the per-parameter state: another layout, or a checkpoint without DeepSpeed's shards."""
        return self.state is not None and (not self.same_layout or not self.state.get("deepspeed_shards", True))

    @property
    def same_layout(self) -> bool:
        return self.state is not None and self.state.get("layout") == self.layout \
            and self.state.get("world_size") == self.world

    def log(self, msg: str) -> None:
        if self.topo.is_rank0:
            print(msg, file=sys.stderr, flush=True)


def start(cfg: TrainConfig) -> Job:
    """Device, process group and the validated layout; nothing written."""
    quiet_deepspeed()
    device = pick_device(cfg.parallel.device)
    if device.type == "cuda":
        # TF32 matmuls and convolutions: the fp32 peak of the MFU table assumes them.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # validated from the launcher's variables before joining the process group: a refused config stops every rank
    # before any gloo/NCCL handshake, so a slow peer is never left connecting to one that has already exited
    rank, _, world = env_rank_world()
    topo = validate(cfg, world, rank)
    init_distributed(device, cfg.parallel.backend, cfg.parallel.timeout_s)
    if device.type == "cuda":
        check_fits(cfg, world, device)
    return Job(cfg, device, topo, world,
               CheckpointManager(cfg.run_dir, cfg.checkpoint.keep, topo.is_rank0, cfg.checkpoint.verify))


def check_resume(job: Job) -> None:
    """The checkpoint to resume from, checked (model shape, manifest) before anything is written: a refused resume
    leaves the run directory as it was. The vocabulary is compared when it is known without building the data."""
    cfg = job.cfg
    job.resume_from = job.ckpt.resolve(cfg.checkpoint.resume)
    if job.resume_from is None:
        return
    planned = planned_tokenizer(cfg.data, cfg.seed, cfg.run_dir)
    vocab = cfg.model.vocab_size or (planned[1] if planned else None)
    job.state = job.ckpt.inspect(job.resume_from, model_shape(resolve_model_args(cfg, vocab)))
    check_same_tokenizer(job, planned)
    saved = job.state.get("layout") or {}
    if not job.same_layout and job.state.get("precision") == "fp16" and saved.get("zero_stage") == 0:
        # DeepSpeed's fp16 optimizer at ZeRO 0 keeps the fp32 masters and moments in flat buffers of its own: the
        # per-parameter state holds the fp16 weights and no moments, not enough to continue on another layout
        raise UserError(f"checkpoint {job.resume_from} was saved with fp16 at ZeRO 0, whose optimizer state only "
                        f"resumes at its own layout (dp={saved.get('dp')}, tp={saved.get('tp')}, "
                        "parallel.zero_stage=0): resume it there, or train fp16 at ZeRO >= 1 to change layouts")


def check_same_tokenizer(job: Job, planned: tuple[str, int] | None) -> None:
    """The tokenizer never changes under a run: a resume whose data config would give another tokenizer than the
    checkpoint's is refused here, before anything is written. (Checkpoints older than the recorded hash rely on the
    vocabulary check of ``prepare``.)"""
    saved = job.state.get("tokenizer_sha256")
    if saved is None or (planned is not None and planned[0] == saved):
        return
    what = ("would train a new tokenizer (its data differs from the run's store)" if planned is None
            else f"gives another tokenizer (sha256 {planned[0][:12]})")
    raise UserError(f"checkpoint {job.resume_from} was trained with tokenizer sha256 {saved[:12]} but this data config "
                    f"{what}: resume with the run's data config, keep the run's tokenizer with data.tokenizer="
                    f"{os.path.join(job.cfg.run_dir, 'tokenizer')}, or set checkpoint.resume=none")


def prepare(job: Job) -> tuple[TokenData, ModelArgs]:
    """Write config.yaml, build (or reuse) the tokenizer and token blocks; the model's final shape."""
    cfg, topo = job.cfg, job.topo
    if topo.is_rank0:
        write_run_config(cfg, cfg.run_dir, topo)
        link_scheduler_logs(cfg.run_dir)
    data = prepare_data(cfg.data, cfg.trainer.seq_len, cfg.seed, cfg.run_dir, topo.is_rank0)
    args = resolve_model_args(cfg, len(data.tokenizer))
    saved = (job.state or {}).get("model", {}).get("vocab_size")
    if saved is not None and saved != args.vocab_size:  # known only now when the data config changed
        raise UserError(f"checkpoint {job.resume_from} is of another model (vocab_size {saved} vs {args.vocab_size} "
                        "in this run): resume it with its own data and tokenizer, or set checkpoint.resume=none")
    job.tokenizer_sha256 = data.tokenizer_sha256
    job.log(f"[miaotui] data: {data.train.shape[0]} train / {data.val.shape[0]} val blocks of {cfg.trainer.seq_len} "
            f"tokens ({resolve_packing(cfg.data)} packing{', fine-tuning' if data.fine_tuning else ''}), vocab "
            f"{len(data.tokenizer)}, unigram entropy {data.unigram_entropy:.3f} nats, "
            f"store {data.store.dir if data.store else '-'}")
    if data.fine_tuning and hasattr(data.train, "fill"):
        job.log(f"[miaotui] fine-tuning: {data.train.shape[0]} packed rows, {100 * data.train.fill:.0f}% of their "
                f"tokens are examples (the rest padding), {data.train.truncated} examples cut to fit")
    if data.val.shape[0] == 0 and cfg.trainer.eval_every:
        job.log("[miaotui] no held-out block (too few documents for data.val_fraction): evaluation is off")
        cfg.trainer.eval_every = 0
    job.log(f"[miaotui] model {args.name}: {args.num_params() / 1e6:.2f}M parameters "
            f"({args.n_layers} layers, dim {args.dim}, {args.n_heads} heads / {args.kv_heads} kv)")
    return data, args


def build_engine(job: Job, args: ModelArgs):
    """The model, its starting weights (a layout-changing resume's or init_from's) and the parallelism. Each rank
    materialises only what it keeps (parallel/materialize.py): under ZeRO 3 (tp 1) its partitions, under tensor
    parallelism its shards (built on the meta device, filled once AutoTP has cut them); otherwise the whole model
    is built on every rank and DeepSpeed shards it."""
    cfg, t, topo = job.cfg, job.cfg.trainer, job.topo
    # what the process held before the model: peak_mem_gb (from here on) minus this is the model's, the planner's
    # subject; the peak restarts here so that a transient of the data preparation before it is not counted
    job.timings["base_mem_gb"] = current_memory_gb(job.device)
    reset_peak_memory(job.device)
    slices, source = None, None  # name -> safetensors slice of the full tensor
    if job.from_universal:
        slices = UniversalReader(job.resume_from).get_slice
    elif t.init_from:
        slices, source = hf_slice_reader(t.init_from), t.init_from
    materialize = None
    if builds_partitioned(cfg.parallel, topo):
        model = build_partitioned(args, build_deepspeed_config(cfg.parallel, t, topo), topo, cfg.seed, slices)
    elif topo.tp > 1:
        model = build_meta(args)
        materialize = lambda m: fill_tp_shards(m, args, job.device, cfg.seed, slices)
    else:
        # in the training dtype: no fp32 copy of the model on the GPU (DeepSpeed would cast it anyway)
        model = build_in_dtype(args, job.device, PRECISION_DTYPES[cfg.parallel.precision], cfg.seed)
        if job.from_universal:
            load_universal_weights(model, job.resume_from)
        elif source:
            load_hf_weights(model, source)
    if source:
        job.log(f"[miaotui] initialised from {source}")
    return parallelize(model, cfg.parallel, t, topo,
                       lambda s: warmup_cosine(s, t.warmup_steps, t.max_steps, t.min_lr_ratio), device=job.device,
                       materialize=materialize)


def restore(job: Job, engine, loader: ShardedLoader) -> tuple[int, int]:
    """Load the checkpoint's state into the engine and the loader; returns (step, tokens seen)."""
    if job.state is None:
        return 0, 0
    state, t = job.state, job.cfg.trainer
    t_load = time.perf_counter()
    if not job.from_universal:
        job.ckpt.load(engine, job.resume_from, state)
    else:
        load_universal_optimizer(engine, job.resume_from, job.topo.tp, job.topo.tp_rank, state["step"],
                                 materialize=lambda: null_step(engine, t, job.device))
        restore_schedule(engine, state["step"], t.global_batch_size)
        restore_rng(state)
    loader.load_state_dict(state["loader"])
    barrier()
    job.timings["load_s"] = time.perf_counter() - t_load
    how = "" if job.same_layout else f" (saved at {state.get('layout')}, now {job.layout}: per-parameter state)"
    job.log(f"[miaotui] resumed from {job.resume_from} at step {state['step']}{how} in {job.timings['load_s']:.2f}s")
    return state["step"], state["tokens_seen"]


def save(job: Job, engine, args: ModelArgs, loader: ShardedLoader, step: int, tokens_seen: int, logger) -> None:
    cfg, topo = job.cfg, job.topo
    universal = None
    if cfg.checkpoint.universal:
        universal = {"tp": topo.tp, "tp_group": tp_group(topo), "max_shard_mb": cfg.checkpoint.max_shard_size_mb}
    # The per-parameter state holds every fp32 weight and moment: DeepSpeed's shards would be a second copy. fp16
    # keeps them (its loss scaler lives there, and at ZeRO 0 its masters).
    shards = universal is None or cfg.parallel.precision == "fp16"
    t_save = time.perf_counter()
    path = job.ckpt.save(engine, step, {"step": step, "tokens_seen": tokens_seen, "loader": loader.state_dict(),
                                        "layout": job.layout, "model": model_shape(args), "model_args": asdict(args),
                                        "precision": cfg.parallel.precision,
                                        "tokenizer_sha256": job.tokenizer_sha256}, universal, shards=shards)
    job.timings["save_s"] = time.perf_counter() - t_save
    logger.write(f"[miaotui] saved checkpoint {path} in {job.timings['save_s']:.2f}s")


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on the device: pinned and copied without blocking the host on CUDA."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


@dataclass
class Window:
    """What the loop counts between logged steps: tokens and time for the throughput, and (fine-tuning) this
    rank's counted and correctly predicted targets, kept on the device so the host waits only at logged steps."""

    right: torch.Tensor
    seen: torch.Tensor
    counted_from: int  # the logged step the counts start after
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)

    def restart(self) -> None:
        self.tokens, self.start = 0, time.perf_counter()


def train_step(job: Job, engine, data: TokenData, loader: ShardedLoader, gas: int, window: Window):
    """One optimizer step over the next global batch, micro batch by micro batch. Returns the sum of the micro
    losses (on the device) and the learning rate the step used."""
    t, device = job.cfg.trainer, job.device
    batch = to_device(as_batch(loader.next_batch()), device)
    lr = engine.get_lr()[0]
    loss_sum = torch.zeros((), device=device)
    # masked or packed rows: each micro loss is a sum over the global batch's counted targets (loss.py)
    divisor = global_divisor(batch.targets, gas) if batch.counts_selectively else None
    for micro in batch.split(t.micro_batch_size):
        logits = engine(micro.inputs, **micro.kwargs)
        if job.distiller is not None:  # trainer.distill_from: KL to the frozen target's logits instead
            loss = job.distiller.loss(logits, micro.inputs, micro.targets, divisor, **micro.kwargs)
        else:
            loss = lm_loss(logits, micro.targets, divisor)
        if data.fine_tuning:
            counted = micro.targets != -100
            window.right += ((logits.detach().argmax(-1) == micro.targets) & counted).sum()
            window.seen += counted.sum()
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().float()
    return loss_sum, lr


def token_counts(job: Job, step: int, window: Window) -> dict:
    """Fine-tuning: the targets the loss counted per step since the last log, and the share the model predicts."""
    dist.all_reduce(window.right)
    dist.all_reduce(window.seen)
    counts = {"tokens_counted": int(window.seen.item()) // job.topo.tp // (step - window.counted_from),
              "token_accuracy": window.right.item() / max(1, window.seen.item())}
    window.right.zero_()
    window.seen.zero_()
    window.counted_from = step
    return counts


def step_metrics(job: Job, engine, data: TokenData, step: int, loss_avg: torch.Tensor, lr: float, window: Window,
                 tokens_seen: int, flops_per_token: float, peak: float | None) -> dict:
    """A logged step's metrics: the loss averaged over every rank (refused when not finite), throughput, MFU."""
    device = job.device
    dist.all_reduce(loss_avg)
    loss_value = loss_avg.item() / job.world  # tp ranks hold equal losses: the mean over dp
    if not math.isfinite(loss_value):
        raise UserError(f"loss became {loss_value} at step {step}: lower trainer.lr or use fp32/bf16")
    elapsed = time.perf_counter() - window.start
    tps = window.tokens / max(elapsed, 1e-9)
    gn = engine.get_global_grad_norm()
    # the tokens the loss counted, and how many of them the model predicts
    extra = token_counts(job, step, window) if data.fine_tuning else {}
    return {
        **extra, "step": step, "loss": loss_value, "lr": lr,
        "grad_norm": float(gn) if gn is not None else None,
        "tokens_per_s": tps, "tokens_per_s_per_device": tps / job.world,
        "tflops_per_device": flops_per_token * tps / job.world / 1e12,
        "mfu": (flops_per_token * tps / job.world / (peak * 1e12)) if peak else None,
        "peak_mem_gb": peak_memory_gb(device), "tokens_seen": tokens_seen,
    }


def evaluate_now(job: Job, engine, data: TokenData, step: int, logger) -> dict:
    """Held-out metrics at ``step``, logged and written."""
    ev = {"step": step, **evaluate(engine.module, data, job.cfg.trainer, job.device)}
    logger.log(ev)
    logger.write("[eval] " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in ev.items()))
    return ev


def loop(job: Job, engine, data: TokenData, args: ModelArgs, loader: ShardedLoader, start_step: int,
         tokens_seen: int) -> tuple[int, dict]:
    """Train from ``start_step`` to ``trainer.stop_at`` (or max_steps), logging, evaluating and saving on the way.

    The host waits for the device only at logged steps: the loss is reduced across ranks and read every
    ``log_every`` steps, not every step.
    """
    cfg, t, device, topo = job.cfg, job.cfg.trainer, job.device, job.topo
    gas = accumulation_steps(topo, t)
    flops_per_token = args.flops_per_token(t.seq_len)
    peak = device_peak_tflops(device, cfg.parallel.precision, t.peak_tflops)
    logger = MetricLogger(cfg.logger, cfg.run_dir, t.max_steps, start_step, topo.is_rank0,
                          run_config=OmegaConf.to_container(OmegaConf.structured(cfg)), run_name=cfg.name)
    last: dict = {}
    step = start_step
    stop = t.stop_at or t.max_steps
    step_tokens = t.global_batch_size * t.seq_len
    window = Window(torch.zeros((), dtype=torch.int64, device=device), torch.zeros((), dtype=torch.int64, device=device),
                    start_step)
    engine.train()
    try:  # the loggers close (wandb finishes, TensorBoard flushes) even when a step raises
        while step < stop:
            loss_sum, lr = train_step(job, engine, data, loader, gas, window)
            step += 1
            tokens_seen += step_tokens
            window.tokens += step_tokens
            logger.advance()
            if step % t.log_every == 0 or step == t.max_steps or step == start_step + 1 or step == stop:
                last = step_metrics(job, engine, data, step, loss_sum / gas, lr, window, tokens_seen,
                                    flops_per_token, peak)
                logger.log(last)
                window.restart()
            if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
                last.update(evaluate_now(job, engine, data, step, logger))
                window.start = time.perf_counter()  # evaluation is not training throughput
            maybe_fail("step", step)
            save_now = cfg.checkpoint.every > 0 and step % cfg.checkpoint.every == 0
            save_end = step == stop and (cfg.checkpoint.save_final or step < t.max_steps)
            if save_now or save_end:
                save(job, engine, args, loader, step, tokens_seen, logger)
                window.start = time.perf_counter()
    finally:
        logger.close()
    return step, last


def finish(job: Job, engine, data: TokenData, args: ModelArgs, step: int, last: dict) -> dict:
    """The export (when training reached max_steps) and summary.json."""
    cfg = job.cfg
    export_dir = None
    if cfg.checkpoint.export and step == cfg.trainer.max_steps:
        t_export = time.perf_counter()
        export_dir = export_engine(engine, cfg, args, job.topo, os.path.join(cfg.run_dir, "export"), step)
        job.timings["export_s"] = time.perf_counter() - t_export
        job.log(f"[miaotui] exported {export_dir} in {job.timings['export_s']:.2f}s")
    barrier()
    summary = {"run_dir": cfg.run_dir, "export_dir": export_dir, "step": step, "unigram_entropy": data.unigram_entropy,
               **last, **job.timings}
    job.ckpt.wait_for_deletions()  # rank 0's background pruning ends before summary.json marks the run done
    if job.topo.is_rank0:
        with open(os.path.join(cfg.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def export_with_engine(cfg, run_dir: str, step_dir: str, state: dict, out: str) -> str:
    """``python -m framework.export`` of a checkpoint without per-parameter state: rebuild the engine at the
    layout it was saved with, load DeepSpeed's shards, export."""
    conf_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(conf_path):
        raise UserError(f"{conf_path} is missing: the export needs the run's resolved config")
    train_cfg: TrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig),
                                                                 OmegaConf.load(conf_path)))
    train_cfg.run_dir = run_dir
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != state["world_size"]:
        raise UserError(f"{step_dir} was saved by {state['world_size']} processes (dp={state['layout']['dp']}, "
                        f"tp={state['layout']['tp']}) without per-parameter state: launch with "
                        f"torchrun --nproc_per_node={state['world_size']}")

    from framework.data.tokenizer import load_tokenizer

    quiet_deepspeed()
    device = pick_device(train_cfg.parallel.device)
    rank, world = init_distributed(device, train_cfg.parallel.backend, train_cfg.parallel.timeout_s)
    train_cfg = with_init_from(train_cfg)
    topo = validate(train_cfg, world, rank)
    tokenizer = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    args = resolve_model_args(train_cfg, len(tokenizer))
    ckpt = CheckpointManager(run_dir, 0, topo.is_rank0)
    state = ckpt.inspect(step_dir, model_shape(args))
    model = build_model(args, device=device, seed=train_cfg.seed)
    engine = parallelize(model, train_cfg.parallel, train_cfg.trainer, topo, lambda s: 1.0)
    ckpt.load(engine, step_dir, state)
    export_engine(engine, train_cfg, args, topo, out, state["step"], max_shard_mb=cfg.max_shard_size_mb)
    if topo.is_rank0:
        print(f"[miaotui] exported {step_dir} -> {out}", flush=True)
    return out


def train(cfg) -> dict:
    """Run one training job; returns the last logged metrics and the paths it wrote.

    1. ``start``: device, process group, the validated layout (init_from's model and tokenizer taken first);
    2. ``check_resume``: the checkpoint to resume from passes its shape and integrity checks, or the run stops
       with the run directory untouched;
    3. ``prepare``: config.yaml, tokenizer and token blocks;
    4. ``build_engine``: the model, its starting weights, TP -> activation checkpointing -> ZeRO;
    5. ``restore``: the checkpoint's weights, optimizer, schedule, loader and RNG;
    6. ``loop``: steps, logs, evaluations, checkpoints;
    7. ``finish``: the export and summary.json.
    """
    job = start(with_distill_from(with_init_from(as_train_config(cfg))))
    job.log(f"[miaotui] run_dir={job.cfg.run_dir} layout {job.topo} zero={job.cfg.parallel.zero_stage} "
            f"precision={job.cfg.parallel.precision} device={job.device.type}")
    check_resume(job)
    torch.manual_seed(job.cfg.seed)
    data, args = prepare(job)
    engine = build_engine(job, args)
    job.distiller = build_distiller(job.cfg, job.device, PRECISION_DTYPES[job.cfg.parallel.precision], args.vocab_size)
    loader = ShardedLoader(data.train, job.cfg.trainer.global_batch_size, job.topo.dp, job.topo.dp_rank, job.cfg.seed)
    start_step, tokens_seen = restore(job, engine, loader)
    step, last = loop(job, engine, data, args, loader, start_step, tokens_seen)
    return finish(job, engine, data, args, step, last)
