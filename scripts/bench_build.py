"""Peak memory of building a model under ZeRO 3, per rank, at any data-parallel size (CPU/gloo or CUDA/NCCL).

    python scripts/bench_build.py --model 1b --layers 4                       # dp=1
    torchrun --nproc_per_node=4 scripts/bench_build.py --model 1b --layers 4  # dp=4

Builds the model the way training does under ZeRO 3 (``framework/parallel/materialize.py``: partitioned as it is
constructed, each rank drawing the seeded stream and keeping its slice) and prints one JSON line from rank 0:
the parameter count and, per rank, the resident peak minus what the process held before the build (GiB).
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
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    a = ap.parse_args()

    from dataclasses import replace

    import torch.distributed as dist
    from omegaconf import OmegaConf

    from framework.config import ParallelConfig, TrainerConfig
    from framework.models.llama import ModelArgs
    from framework.parallel.distributed import destroy, init_distributed, pick_device
    from framework.parallel.materialize import build_partitioned
    from framework.parallel.parallelize import build_deepspeed_config, quiet_deepspeed
    from framework.parallel.topology import build_topology
    from framework.trainer.metrics import current_memory_gb

    quiet_deepspeed()
    device = pick_device("auto")
    rank, world = init_distributed(device)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ModelArgs(**OmegaConf.to_container(OmegaConf.load(os.path.join(repo, "configs", "model", f"{a.model}.yaml"))))
    args = replace(args, n_layers=a.layers or args.n_layers)
    topo = build_topology(world, rank)
    parallel = ParallelConfig(zero_stage=3, precision=a.precision)
    trainer = TrainerConfig(global_batch_size=world, micro_batch_size=1)
    base = current_memory_gb(device)
    model = build_partitioned(args, build_deepspeed_config(parallel, trainer, topo), topo, seed=0)
    if device.type == "cuda":
        import torch

        peak = torch.cuda.max_memory_allocated(device) / 2**30
        base = 0.0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    held = sum(p.ds_tensor.numel() for p in model.parameters())
    rows = [None] * world
    dist.all_gather_object(rows, {"rank": rank, "base_gb": base, "peak_gb": peak, "build_gb": peak - base,
                                  "partition_params": held})
    if rank == 0:
        print(json.dumps({"model": a.model, "layers": args.n_layers, "params": args.num_params(), "dp": world,
                          "precision": a.precision, "ranks": rows}), flush=True)
    destroy()


if __name__ == "__main__":
    main()
