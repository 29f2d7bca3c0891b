"""What every figure shares: the headless backend, saving, medians with their spread, and notes of what was skipped."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field

from framework.cli import UserError


@dataclass
class Plots:
    """The PNGs a report wrote, and one line for each figure it skipped (with why)."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def extend(self, other: Plots) -> Plots:
        self.written += other.written
        self.skipped += other.skipped
        return self


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, no display needed (CI, Slurm, a GPU box)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise UserError("matplotlib is not installed: pip install matplotlib (or pip install -e . in the repo)") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str) -> str:
    """Write ``fig`` as a PNG and free it; returns the path."""
    plt = pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def spread(values: list[float]) -> tuple[float, float, float]:
    """The median of a benchmark's rounds and how far below and above it the extreme rounds lie (error bars)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return float("nan"), 0.0, 0.0
    mid = statistics.median(xs)
    return mid, mid - min(xs), max(xs) - mid


def style_axes(ax, title: str, xlabel: str, ylabel: str, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def plot_cdf(ax, values: list[float], label: str, **kwargs) -> None:
    """An empirical CDF as a step line: the share of values at or below x."""
    xs = sorted(values)
    n = len(xs)
    # from 0 at the fastest value, so that its jump is drawn too
    ax.step([xs[0], *xs], [0.0] + [(i + 1) / n for i in range(n)], where="post", label=label, **kwargs)
