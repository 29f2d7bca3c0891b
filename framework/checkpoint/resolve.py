"""The one resolver from what a user points at (an export, a run directory, a checkpoint step directory) to the model
directory the engine, the compressor, the evaluator and distillation read.

A run directory stands for its export/, else for its newest checkpoint that verifies: ``latest`` first, then its
lineage, then the others (the fallback order of resuming, framework/checkpoint/manager.py), each checked the ``fast``
way (sizes, sha256 of small files and of samples of large ones). Nothing here is collective: every rank of a job
may resolve before the process group exists, and all reach the same answer from the same files.
"""

from __future__ import annotations

import os

from framework.checkpoint.manager import fallback_order, first_verified, read_latest, read_state, tag_order
from framework.checkpoint.manifest import verify_manifest
from framework.cli import UserError

CONFIG = "config.json"


def checkpoint_problem(root: str, tag: str, full: bool = False) -> str | None:
    """Why checkpoint ``root/tag`` cannot be used (None: it verifies). One process, no collectives."""
    path = os.path.join(root, tag)
    try:
        if tag_order(tag) is None or not os.path.isdir(path):
            raise UserError(f"{os.path.join(root, 'latest')} names {tag!r}, which is not a checkpoint directory")
        read_state(path)
        verify_manifest(path, full=full)
    except UserError as exc:
        return str(exc)
    return None


def newest_verified(root: str, full: bool = False) -> str:
    """The checkpoint directory under ``root`` (a run's checkpoints/) to use for ``latest``: what it names if that
    verifies, else the newest that does, with one warning line (from rank 0 of a launch). UserError when none does."""
    tag = first_verified(root, fallback_order(root), lambda t: checkpoint_problem(root, t, full), "using",
                         "point at a checkpoint step directory", int(os.environ.get("RANK", "0")) == 0)
    return os.path.join(root, tag)


def find_checkpoint(path: str | None, key: str = "checkpoint") -> tuple[str, str]:
    """(run_dir, step_dir) from a run directory (its newest checkpoint that verifies) or a step directory."""
    if not path:
        raise UserError(f"{key}= is required: a run directory or a checkpoints/step-N directory")
    path = os.path.normpath(path)
    root = os.path.join(path, "checkpoints")
    if read_latest(root) is not None:
        return path, newest_verified(root)
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return os.path.dirname(os.path.dirname(path)), path
    raise UserError(f"{path} is neither a run directory with checkpoints/latest nor a checkpoint step directory")


def has_universal(step_dir: str) -> bool:
    """Whether a checkpoint carries per-parameter state (exportable by any number of processes, no engine)."""
    from framework.checkpoint.universal import INDEX, UNIVERSAL

    return os.path.isfile(os.path.join(step_dir, UNIVERSAL, INDEX))


def resolve_model_dir(path: str | None, key: str = "model_dir") -> tuple[str, str | None]:
    """(export directory, checkpoint to export into it first or None) from an export, a run directory (its
    export/, else its newest checkpoint that verifies) or a checkpoint step directory. ``key`` names the setting in
    the errors. Raises UserError naming the fix."""
    if not path:
        raise UserError(f"{key} is required: an export directory or a run directory")
    if not os.path.isdir(path):
        raise UserError(f"model directory not found: {path}" + ("" if key == "model_dir" else f" ({key})"))
    for export in (path, os.path.join(path, "export")):
        if os.path.isfile(os.path.join(export, CONFIG)):
            return export, None
    if os.path.isfile(os.path.join(path, "trainer_state.json")) or os.path.isdir(os.path.join(path, "checkpoints")):
        _, step_dir = find_checkpoint(path, key)
        export = os.path.join(step_dir, "export")
        if os.path.isfile(os.path.join(export, CONFIG)):
            return export, None
        if not has_universal(step_dir):
            raise UserError(f"{step_dir} has no per-parameter state to export from: run "
                            f"`python -m framework.export checkpoint={step_dir}` (same launcher as training) first")
        return export, step_dir
    raise UserError(f"{path} holds no config.json nor export/: point {key} at an export or a run directory")


def resolve_export_dir(path: str | None, key: str = "model_dir") -> str:
    """The export directory ``path`` stands for (``resolve_model_dir``), for the readers that do not export a
    checkpoint themselves: one with a checkpoint but no export yet is a UserError naming the export command."""
    model_dir, checkpoint = resolve_model_dir(path, key)
    if checkpoint is not None:
        raise UserError(f"{path} has a checkpoint but no export: run `python -m framework.export "
                        f"checkpoint={checkpoint}` first")
    return model_dir
