"""``python -m framework.generate``: pipeline-parallel generation from an export (see configs/generate.yaml).

    python -m framework.generate model_dir=runs/x prompt="def fibonacci(n):"
    torchrun --nproc_per_node=4 -m framework.generate model_dir=runs/x/export infer.pp=4 prompts=in.jsonl output=out.jsonl
"""

import os
import sys

if __package__ in (None, ""):  # run as a path by the deepspeed launcher
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from framework.cli import reports_user_errors, run_entry  # noqa: E402
from framework.config import GenerateConfig  # noqa: E402


@hydra.main(config_path="../configs", config_name="generate", version_base="1.3")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    from framework.infer.runner import generate
    from framework.parallel.distributed import destroy

    generate(cfg)
    destroy()


if __name__ == "__main__":
    run_entry(main, "generate", GenerateConfig)
