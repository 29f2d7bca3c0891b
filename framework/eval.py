"""``python -m framework.eval model_dir=<dir> data=stdlib``: held-out token perplexity of any model directory
(ours, compressed, or a Hugging Face one), loaded and run by the inference engine's own loader.
"""

import os
import sys

if __package__ in (None, ""):  # run as a path by a launcher
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from framework.cli import reports_user_errors, run_entry  # noqa: E402
from framework.config import EvalConfig  # noqa: E402


@hydra.main(config_path="../configs", config_name="eval", version_base="1.3")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    from framework.compress.evaluate import evaluate

    evaluate(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    run_entry(main, "eval", EvalConfig)
