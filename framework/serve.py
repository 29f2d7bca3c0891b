"""``python -m framework.serve``: an OpenAI-compatible HTTP server over the inference engine (configs/serve.yaml).

    python -m framework.serve model_dir=runs/x                                  # http://127.0.0.1:8000
    torchrun --nproc_per_node=2 -m framework.serve model_dir=runs/x infer.pp=2 serve.port=8000
"""

import os
import sys

if __package__ in (None, ""):  # run as a path by the deepspeed launcher
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from framework.cli import reports_user_errors, run_entry  # noqa: E402
from framework.config import ServeRootConfig  # noqa: E402


@hydra.main(config_path="../configs", config_name="serve", version_base="1.3")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    from framework.infer.server.runtime import serve

    code = serve(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    run_entry(main, "serve", ServeRootConfig)
