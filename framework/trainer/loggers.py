"""Metric sinks, all on rank 0: a progress bar, metrics.jsonl, TensorBoard, wandb (offline unless configured)."""

from __future__ import annotations

import json
import os
import sys

from framework.config import LoggerConfig


class MetricLogger:
    """Fans one dict of metrics per step out to every enabled sink. A no-op off rank 0."""

    def __init__(self, cfg: LoggerConfig, run_dir: str, total_steps: int, start_step: int, enabled: bool,
                 run_config: dict | None = None, run_name: str = "run"):
        self.enabled = enabled
        self.bar = self.tb = self.wandb = None
        self.jsonl = None
        if not enabled:
            return
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            file=sys.stderr, disable=None)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if cfg.wandb:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=cfg.wandb_project, name=run_name, dir=run_dir, mode=cfg.wandb_mode,
                                    config=run_config, resume="allow")

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(metrics) + "\n")
        step = metrics["step"]
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if "loss" not in metrics:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                 tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
        else:  # no terminal (CI, Slurm logs): one line per logged step instead of a bar
            self.write(f"[train] step={step} loss={metrics['loss']:.4f} lr={metrics['lr']:.2e} "
                       f"grad_norm={metrics['grad_norm'] or 0:.3f} tok/s={metrics['tokens_per_s']:.0f}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, line: str) -> None:
        """A human line on rank 0, printed above the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()


def link_scheduler_logs(run_dir: str) -> list[str]:
    """Under a submitit (Hydra Slurm launcher) job, link the job's stdout/stderr files into the run directory,
    so every run's logs are found beside its metrics. Returns the links made (none outside such a job)."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return []
    try:
        import submitit

        env = submitit.JobEnvironment()
        paths = env.paths
        targets = [(paths.stdout, f"slurm-{env.job_id}.out"), (paths.stderr, f"slurm-{env.job_id}.err")]
    except Exception:  # noqa: BLE001 - not a submitit job after all: nothing to link
        return []
    made = []
    for target, name in targets:
        link = os.path.join(run_dir, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.abspath(str(target)), link)
        made.append(link)
    return made
