"""``python -m framework.compress``: quantize (int8, int4) or prune (magnitude, wanda) an export.

    python -m framework.compress model_dir=runs/x out=runs/x/int8 method=int8
    python -m framework.compress model_dir=runs/x out=runs/x/int4 method=int4 quant.group_size=64
    python -m framework.compress model_dir=runs/x out=runs/x/w24 method=wanda sparsity=2:4 calib.data=stdlib
    torchrun --nproc_per_node=2 -m framework.compress ...     # 2 pipeline stages, each with only its layers

``framework.compress`` is the package (framework/compress/), so its entry point lives here.
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from framework.cli import reports_user_errors, run_entry
from framework.config import CompressConfig


@hydra.main(config_path="../../configs", config_name="compress", version_base="1.3")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    from framework.compress.run import compress
    from framework.parallel.distributed import destroy

    compress(OmegaConf.to_object(cfg))
    destroy()


if __name__ == "__main__":
    run_entry(main, "compress", CompressConfig)
