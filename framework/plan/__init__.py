"""Memory and roofline estimates for training and inference layouts (``python -m framework.plan``).

``plan_training`` and ``plan_inference`` are pure functions of the model shape, the layout and a device's
figures; ``make_plan`` turns a ``PlanConfig`` into the printed table, a JSON-able dict, and the one line that
says why a layout cannot fit (None when it fits).
"""

from __future__ import annotations

from dataclasses import asdict

from framework.cli import UserError
from framework.plan.devices import DEVICES, Device, get_device
from framework.plan.inference import InferPlan, plan_inference
from framework.plan.training import GiB, Layout, TrainPlan, plan_training

__all__ = ["DEVICES", "Device", "InferPlan", "Layout", "TrainPlan", "get_device", "make_plan", "plan_inference",
           "plan_training", "train_layout"]


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def train_layout(cfg, gpus: int | None = None) -> Layout:
    """The Layout of a PlanConfig or TrainConfig (its parallel and trainer groups), validated like a launch."""
    from framework.parallel.topology import build_topology

    p, t, m = cfg.parallel, cfg.trainer, cfg.model
    gpus = gpus or p.tp
    topo = build_topology(gpus, 0, tp=p.tp, n_heads=m.n_heads, n_kv_heads=m.kv_heads, ffn_dim=m.ffn_dim)
    if t.global_batch_size % (t.micro_batch_size * topo.dp):
        raise UserError(f"trainer.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x dp = "
                        f"{t.micro_batch_size} x {topo.dp}: make it a multiple of {t.micro_batch_size * topo.dp}")
    return Layout(gpus=gpus, tp=p.tp, zero_stage=p.zero_stage, precision=p.precision, micro_batch=t.micro_batch_size,
                  seq_len=t.seq_len, global_batch=t.global_batch_size,
                  activation_checkpointing=p.activation_checkpointing,
                  gpus_per_node=getattr(getattr(cfg, "cluster", None), "gpus_per_node", 8))


def _training(cfg, dev: Device) -> tuple[list[str], dict, str | None]:
    from dataclasses import replace

    args = cfg.model
    lay = train_layout(cfg, cfg.cluster.gpus)
    plan = plan_training(args, lay, dev)
    other = plan_training(args, replace(lay, activation_checkpointing=not lay.activation_checkpointing), dev)
    ac = "on" if lay.activation_checkpointing else "off"
    lines = [f"plan: train {args.name} ({args.num_params() / 1e9:.2f}B parameters) on {lay.gpus} x {dev.name} "
             f"({dev.memory_gib:.1f} GiB): dp={lay.dp} x tp={lay.tp}, ZeRO {lay.zero_stage}, {lay.precision}, "
             f"micro-batch {lay.micro_batch} x {lay.seq_len} tokens, accumulation {lay.accumulation}, "
             f"activation checkpointing {ac}",
             "memory per device (GiB)"]
    lines += [f"  {k:<26}{_gib(v)}" for k, v in plan.memory.items()]
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"  {'peak':<26}{_gib(plan.total)}   of {dev.memory_gib:.1f}: {verdict}")
    lines.append(f"  {'peak, checkpointing ' + ('off' if ac == 'on' else 'on'):<26}{_gib(other.total)}")
    t = plan.time
    lines.append("time per step (roofline: the device's GEMM and attention efficiencies, HBM and link bandwidths)")
    lines += [f"  {k[:-2]:<26}{t[k]:8.3f} s" for k in ("matmul_s", "attention_s", "elementwise_s", "optimizer_s",
                                                        "tp_comm_s", "dp_comm_s", "dp_exposed_s", "step_s")]
    lines.append(f"  {t['tokens_per_s']:,.0f} tokens/s ({t['tokens_per_s_per_device']:,.0f} per device), "
                 f"MFU {100 * t['mfu']:.1f}%: a ceiling, not a forecast")
    data = {"mode": "train", "device": asdict(dev), "layout": {**asdict(lay), "dp": lay.dp, "accumulation":
                                                                lay.accumulation}, "memory_bytes": plan.memory,
            "peak_bytes": plan.total, "fits": plan.fits, "time": t,
            "peak_bytes_other_checkpointing": other.total}
    error = None
    if not plan.fits:
        fixes = []
        if not lay.activation_checkpointing and other.total <= dev.memory_gib * GiB:
            fixes.append(f"parallel.activation_checkpointing=true ({other.total / GiB:.1f} GiB)")
        if lay.zero_stage < 3:
            fixes.append("a higher parallel.zero_stage")
        fixes += ["more cluster.gpus or a larger parallel.tp", "a smaller trainer.micro_batch_size"]
        error = (f"{args.name} at dp={lay.dp} x tp={lay.tp}, ZeRO {lay.zero_stage}, micro-batch {lay.micro_batch} x "
                 f"{lay.seq_len} does not fit a {dev.name}: {plan.total / GiB:.1f} GiB per device of "
                 f"{dev.memory_gib:.1f}; try {', or '.join(fixes)}")
    return lines, data, error


def _inference(cfg, dev: Device) -> tuple[list[str], dict, str | None]:
    from framework.parallel.topology import build_topology

    i, args = cfg.infer, cfg.model
    build_topology(i.pp * i.tp, 0, tp=i.tp, pp=i.pp, n_heads=args.n_heads, n_kv_heads=args.kv_heads,
                   ffn_dim=args.ffn_dim, n_layers=args.n_layers)
    dtype = i.dtype or "bf16"
    plan = plan_inference(args, dev, pp=i.pp, tp=i.tp, max_batch=i.max_batch, max_len=i.max_seq_len, dtype=dtype,
                          quant=i.quant, quant_group_size=i.quant_group_size, prefill_chunk=i.prefill_chunk,
                          memory_utilization=i.gpu_memory_utilization, split=list(i.split) if i.split else None)
    lines = [f"plan: infer {args.name} ({args.num_params() / 1e9:.2f}B parameters) on {i.pp * i.tp} x {dev.name} "
             f"({dev.memory_gib:.1f} GiB, {100 * i.gpu_memory_utilization:.0f}% used): pp={i.pp} x tp={i.tp}, "
             f"{dtype}{', ' + i.quant if i.quant else ''}, KV slots of {plan.max_len} tokens"]
    for k, s in enumerate(plan.stages):
        lines.append(f"  stage {k}: {s.layers} layers, weights {s.weights / GiB:.2f} GiB per device, KV "
                     f"{s.kv_per_slot / GiB:.3f} GiB per sequence, room for {s.slots_fit} sequences, "
                     f"{plan.stage_total(s, plan.slots) / GiB:.2f} GiB at {plan.slots} slots")
    lines.append(f"  infer.max_batch={i.max_batch}: {plan.slots} slots fit"
                 + ("" if plan.slots >= i.max_batch else f" (lower infer.max_seq_len or add devices for {i.max_batch})"))
    lines.append(f"  decode floor at batch 1: {1e3 * plan.decode_floor_s:.2f} ms a token "
                 f"({1 / plan.decode_floor_s:,.0f} tokens/s): every weight read once, stage after stage")
    data = {"mode": "infer", "device": asdict(dev), "pp": i.pp, "tp": i.tp, "max_len": plan.max_len,
            "slots": plan.slots, "fits": plan.fits, "decode_floor_s": plan.decode_floor_s,
            "stages": [asdict(s) for s in plan.stages]}
    error = None
    if not plan.fits:
        worst = max(plan.stages, key=lambda s: s.weights)
        error = (f"{args.name} at pp={i.pp} x tp={i.tp} does not fit a {dev.name}: a stage holds "
                 f"{worst.weights / GiB:.1f} GiB of weights and one {plan.max_len}-token sequence needs "
                 f"{worst.kv_per_slot / GiB:.2f} GiB of KV cache of {dev.memory_gib * i.gpu_memory_utilization:.1f}; "
                 "raise infer.pp or infer.tp, lower infer.max_seq_len, or quantize (infer.quant=int8)")
    return lines, data, error


def make_plan(cfg, mode: str) -> tuple[list[str], dict, str | None]:
    """(table lines, the plan as a dict, the one-line reason it cannot fit or None) for ``mode`` train or infer."""
    if cfg.model.vocab_size is None:
        raise UserError("model.vocab_size is unset: set it (the tokenizer's vocabulary) to plan this model")
    dev = get_device(cfg.cluster.gpu)
    if mode == "infer":
        return _inference(cfg, dev)
    if mode != "train":
        raise UserError(f"mode={mode}: use train, infer or auto")
    return _training(cfg, dev)
