"""``python -m framework.prepare data=<data config> out=<dir>``: a corpus becomes a token store.

Streams the corpus through tokenizing worker processes (memory does not grow with the corpus), shows progress
(tokens/s, ETA) and resumes a half-built store when run again. Train on it with ``data.store=<dir>``; see
framework/data/prepare.py and framework/data/store.py.
"""

import os
import sys

if __package__ in (None, ""):  # run as a path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from framework.cli import UserError, reports_user_errors, run_entry  # noqa: E402
from framework.config import PrepareConfig  # noqa: E402


def prepare(cfg) -> dict:
    """Build (or resume, or find finished) the store of ``cfg.data`` in ``cfg.out``; returns its store.json."""
    from framework.data.prepare import build_store
    from framework.data.sources import validate_data_config
    from framework.data.store import describe

    if not isinstance(cfg, PrepareConfig):
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PrepareConfig), cfg))
    if not cfg.out:
        raise UserError("out= is missing: the directory of the token store to write")
    if cfg.data.store:
        raise UserError("data.store names a finished store to train on: give the directory to write as out=")
    validate_data_config(cfg.data)
    meta = build_store(cfg.data, cfg.out, cfg.seed, progress=cfg.progress, replace=False)
    print(f"[prepare] {cfg.out}: {describe(meta)}", flush=True)
    return meta


@hydra.main(config_path="../configs", config_name="prepare", version_base="1.3")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    prepare(cfg)


if __name__ == "__main__":
    run_entry(main, "prepare", PrepareConfig)
