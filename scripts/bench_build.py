"""Peak memory of building a model, per rank: partitioned under ZeRO 3 at any data-parallel size, or sharded under
tensor parallelism (CPU/gloo or CUDA/NCCL).

    python scripts/bench_build.py --model 1b --layers 4                       # ZeRO 3, dp=1
    torchrun --nproc_per_node=4 scripts/bench_build.py --model 1b --layers 4  # ZeRO 3, dp=4
    python scripts/bench_build.py --model 1b --layers 6 --vocab 32000 --tp 1                       # whole model
    torchrun --nproc_per_node=2 scripts/bench_build.py --model 1b --layers 6 --vocab 32000 --tp 2  # tp=2

Builds the model the way training does (``framework/parallel/materialize.py``). ZeRO 3: partitioned as it is
constructed, each rank drawing the seeded stream and keeping its slice. ``--tp``: on the meta device, sharded by
DeepSpeed's AutoTP inside ``deepspeed.initialize`` and each rank's shards filled from the stream (``--tp 1``: the
whole model, built on every rank as training does without tensor parallelism); the engine is made at ZeRO 0, which
allocates nothing more before the first step. Prints one JSON line from rank 0: the parameter count and, per rank,
the resident peak minus what the process held before the build (GiB) and the parameters it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b", help="a flavor of configs/model")
    ap.add_argument("--layers", type=int, default=None, help="override the flavor's layer count")
    ap.add_argument("--vocab", type=int, default=None, help="override the flavor's vocabulary size")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--tp", type=int, default=None,
                    help="the tensor-parallel build at this tp (the world is dp x tp); unset: the ZeRO-3 build")
    a = ap.parse_args()

    from dataclasses import replace

    import torch.distributed as dist
    from omegaconf import OmegaConf

    from framework.config import ParallelConfig, TrainerConfig
    from framework.models.llama import ModelArgs, build_model
    from framework.parallel.distributed import destroy, init_distributed, pick_device
    from framework.parallel.materialize import build_meta, build_partitioned, fill_tp_shards
    from framework.parallel.parallelize import build_deepspeed_config, init_deepspeed_comm, parallelize, quiet_deepspeed
    from framework.parallel.topology import build_topology
    from framework.trainer.metrics import current_memory_gb

    quiet_deepspeed()
    device = pick_device("auto")
    rank, world = init_distributed(device)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ModelArgs(**OmegaConf.to_container(OmegaConf.load(os.path.join(repo, "configs", "model", f"{a.model}.yaml"))))
    args = replace(args, n_layers=a.layers or args.n_layers, vocab_size=a.vocab or args.vocab_size)
    tp = a.tp or 1
    topo = build_topology(world, rank, tp=tp, n_heads=args.n_heads, n_kv_heads=args.kv_heads, ffn_dim=args.ffn_dim)
    parallel = ParallelConfig(zero_stage=3 if a.tp is None else 0, precision=a.precision, tp=tp)
    trainer = TrainerConfig(global_batch_size=topo.dp, micro_batch_size=1)
    init_deepspeed_comm(topo)  # the communication layer is the process's, not the model's
    base = current_memory_gb(device)
    if a.tp is None:
        model = build_partitioned(args, build_deepspeed_config(parallel, trainer, topo), topo, seed=0)
        held = sum(p.ds_tensor.numel() for p in model.parameters())
    else:
        def materialize(meta_model):
            fill_tp_shards(meta_model, args, device, seed=0)

        if tp > 1:
            model = build_meta(args)
        else:
            model, materialize = build_model(args, device=device, seed=0), None
        engine = parallelize(model, parallel, trainer, topo, lambda s: 1.0, device=device, materialize=materialize)
        held = sum(p.numel() for p in engine.module.parameters())
    if device.type == "cuda":
        import torch

        peak = torch.cuda.max_memory_allocated(device) / 2**30
        base = 0.0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rows = [None] * world
    dist.all_gather_object(rows, {"rank": rank, "base_gb": base, "peak_gb": peak, "build_gb": peak - base,
                                  "partition_params": held})
    if rank == 0:
        print(json.dumps({"model": a.model, "layers": args.n_layers, "vocab": args.vocab_size,
                          "params": args.num_params(), "dp": topo.dp, "tp": tp, "zero_stage": parallel.zero_stage,
                          "precision": a.precision, "ranks": rows}), flush=True)
    destroy()


if __name__ == "__main__":
    main()
    from framework.cli import leave

    leave()  # a worker that joined a process group exits without finalisation (see leave)
