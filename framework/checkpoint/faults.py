"""Fault injection for the recovery tests: ``MIAOTUI_FAULT=<point>:<step>:<rank>`` SIGKILLs that rank.

Points: ``step`` (right after the optimizer step ``step``), ``save`` (after the shards of checkpoint ``step`` are
written, before the manifest and ``latest``). Only the first attempt fails (torchrun's restart count is 0), so a
job under ``--max-restarts`` recovers by itself. Unset, this costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import sys


def maybe_fail(point: str, step: int) -> None:
    spec = os.environ.get("MIAOTUI_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    want_point, want_step, want_rank = spec.split(":")
    if point == want_point and step == int(want_step) and os.environ.get("RANK", "0") == want_rank:
        print(f"[fault] SIGKILL rank {want_rank} at {point} {step}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
