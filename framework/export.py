"""``python -m framework.export checkpoint=<run dir or step dir> [out=<dir>]``: a checkpoint to HF safetensors.

Any number of processes (each writes its share of the shards) for a checkpoint with per-parameter state, the
default; see framework/checkpoint/convert.py.
"""

import os
import sys

if __package__ in (None, ""):  # run as a path by the deepspeed launcher
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from framework.cli import reports_user_errors, run_entry  # noqa: E402
from framework.config import ExportConfig  # noqa: E402


@hydra.main(config_path="../configs/export", config_name="export", version_base="1.3")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    from framework.checkpoint.convert import export_checkpoint

    def with_engine(*args):  # only a checkpoint without per-parameter state needs the trainer (and DeepSpeed)
        from framework.trainer.trainer import export_with_engine

        return export_with_engine(*args)

    export_checkpoint(cfg, with_engine=with_engine)


if __name__ == "__main__":
    run_entry(main, "export", ExportConfig, config_dir="export")
