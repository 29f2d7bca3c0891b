"""Export any saved checkpoint: rebuild the engine at the layout it was saved with, load it, write the export.

    python -m framework.export checkpoint=runs/x                      # the run's latest checkpoint
    torchrun --nproc_per_node=4 -m framework.export checkpoint=runs/x/checkpoints/step-000200 out=/tmp/e
"""

from __future__ import annotations

import json
import os

from omegaconf import OmegaConf

from framework.cli import UserError
from framework.config import ExportConfig, TrainConfig


def find_checkpoint(path: str | None) -> tuple[str, str]:
    """(run_dir, step_dir) from a run directory or a step directory."""
    if not path:
        raise UserError("checkpoint= is required: a run directory or a checkpoints/step-N directory")
    path = os.path.normpath(path)
    latest = os.path.join(path, "checkpoints", "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            return path, os.path.join(path, "checkpoints", f.read().strip())
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return os.path.dirname(os.path.dirname(path)), path
    raise UserError(f"{path} is neither a run directory with checkpoints/latest nor a checkpoint step directory")


def export_checkpoint(cfg) -> str:
    if not isinstance(cfg, ExportConfig):
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExportConfig), cfg))
    run_dir, step_dir = find_checkpoint(cfg.checkpoint)
    conf_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(conf_path):
        raise UserError(f"{conf_path} is missing: the export needs the run's resolved config")
    with open(os.path.join(step_dir, "trainer_state.json")) as f:
        state = json.load(f)
    train_cfg: TrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig),
                                                                 OmegaConf.load(conf_path)))
    train_cfg.run_dir = run_dir
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != state["world_size"]:
        raise UserError(f"{step_dir} was saved by {state['world_size']} processes (dp={state['layout']['dp']}, "
                        f"tp={state['layout']['tp']}): launch with torchrun --nproc_per_node={state['world_size']}")

    from framework.checkpoint.manager import CheckpointManager
    from framework.data.tokenizer import load_tokenizer
    from framework.models.llama import build_model
    from framework.parallel.distributed import init_distributed, pick_device
    from framework.parallel.parallelize import parallelize, quiet_deepspeed
    from framework.trainer.trainer import export_engine, resolve_model_args, validate

    quiet_deepspeed()
    device = pick_device(train_cfg.parallel.device)
    rank, world = init_distributed(device, train_cfg.parallel.backend, train_cfg.parallel.timeout_s)
    topo = validate(train_cfg, world, rank)
    tokenizer = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    args = resolve_model_args(train_cfg, len(tokenizer))
    model = build_model(args, device=device, seed=train_cfg.seed)
    engine = parallelize(model, train_cfg.parallel, train_cfg.trainer, topo, lambda s: 1.0)
    CheckpointManager(run_dir, 0, topo.is_rank0).load(engine, step_dir, state)
    out = cfg.out or os.path.join(run_dir, "export")
    export_engine(engine, train_cfg, args, topo, out, state["step"], max_shard_mb=cfg.max_shard_size_mb)
    if topo.is_rank0:
        print(f"[miaotui] exported {step_dir} -> {out}", flush=True)
    return out
