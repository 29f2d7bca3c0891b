"""``python -m framework.plan``: memory per device and a roofline time of a training or inference layout.

    python -m framework.plan model=70b parallel.tp=8 parallel.zero_stage=3 trainer.micro_batch_size=1 \
        trainer.seq_len=8192 cluster.gpus=64 cluster.gpu=h100
    python -m framework.plan model=8b infer.pp=2 infer.tp=4 infer.max_batch=64 cluster.gpu=h100

Prints the table; a layout that cannot fit ends with one ``error:`` line and exit status 1. (The entry point is
this file: a module framework/plan.py could not sit beside the package framework/plan/, which Python imports
first.)
"""

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from framework.cli import fail, reports_user_errors, run_entry
from framework.config import PlanConfig


def plan_mode(cfg: PlanConfig, overrides: list[str]) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    return "infer" if any(o.lstrip("+~").startswith("infer.") for o in overrides) else "train"


@hydra.main(config_path="../../configs", config_name="plan", version_base="1.3")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from framework.plan import make_plan

    plan_cfg: PlanConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PlanConfig), cfg))
    lines, data, error = make_plan(plan_cfg, plan_mode(plan_cfg, list(HydraConfig.get().overrides.task)))
    print("\n".join(lines), flush=True)
    if plan_cfg.out:
        with open(plan_cfg.out, "w") as f:
            json.dump({**data, "error": error}, f, indent=1)
    if error:
        fail(error, code=1)
    sys.exit(0)


if __name__ == "__main__":
    run_entry(main, "plan", PlanConfig)
