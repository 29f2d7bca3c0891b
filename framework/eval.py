"""``python -m framework.eval``: held-out perplexity, or lm-evaluation-harness tasks through the engine.

    python -m framework.eval model_dir=runs/x data=stdlib                     # held-out token perplexity
    python -m framework.eval model_dir=runs/x tasks=[miaotui_sentiment] limit=100 output=results.json
    torchrun --nproc_per_node=2 -m framework.eval model_dir=runs/x tasks=[miaotui_translate] infer.pp=2

Any model directory works (ours, compressed, or a Hugging Face one), loaded by the inference engine's own loader.
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
    obj = OmegaConf.to_object(cfg)
    if obj.tasks:
        from framework.evaluation.tasks import run_tasks

        run_tasks(obj)
        return
    from framework.evaluation.perplexity import evaluate

    evaluate(obj)


if __name__ == "__main__":
    run_entry(main, "eval", EvalConfig)
