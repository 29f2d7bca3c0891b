"""``python -m framework.export checkpoint=<run dir or step dir> [out=<dir>]``: a checkpoint to HF safetensors.

Launch it the way the checkpoint was trained (same number of processes); see framework/checkpoint/convert.py.
"""

import hydra
from omegaconf import DictConfig

from framework.cli import reports_user_errors, run_entry
from framework.config import ExportConfig


@hydra.main(config_path="../configs/export", config_name="export", version_base="1.3")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    from framework.checkpoint.convert import export_checkpoint

    export_checkpoint(cfg)


if __name__ == "__main__":
    run_entry(main, "export", ExportConfig, config_dir="export")
