"""``python -m framework.train``: train a Llama-family model from a Hydra config (see configs/train.yaml).

Also runnable as a path (``deepspeed --num_gpus 8 framework/train.py experiment=llama3_8b``); the deepspeed
launcher's ``--local_rank=N`` is accepted.
"""

import os
import sys

if __package__ in (None, ""):  # run as a path by the deepspeed launcher
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from framework.cli import reports_user_errors, run_entry  # noqa: E402
from framework.config import TrainConfig  # noqa: E402


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    from framework.trainer.trainer import train

    train(cfg)  # the process group stays for the next job of a sweep; the process leaves through cli.leave


if __name__ == "__main__":
    run_entry(main, "train", TrainConfig)
