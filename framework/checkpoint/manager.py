"""Sharded save and resume of everything stateful: model, optimizer, schedule, loader, RNG, step.

Layout (one directory per step, every rank writing its own shards through DeepSpeed)::

    checkpoints/step-000200/   universal/ (every parameter's full fp32 weight and moments: resume on any layout,
                               export), trainer_state.json, manifest.json; DeepSpeed's per-rank model and
                               optimizer shards only where the per-parameter state is off or cannot carry
                               everything (fp16: the loss scaler), as they would be a second copy of the state
    checkpoints/latest         names the newest complete checkpoint; replaced atomically, last

``latest`` moves only after every rank finished writing and the manifest is written, so a crash mid-save leaves
the previous checkpoint as ``latest`` and the half-written directory is never used. A complete checkpoint is never
deleted to make room for its replacement: saving a step whose directory already holds one (a run resumed from an
older checkpoint reaches the step again) writes ``step-N-r1`` (``-r2``, ...) beside it and removes the old one only
once ``latest`` names the new.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from framework.checkpoint.faults import maybe_fail
from framework.checkpoint.manifest import hash_files, list_files, verify_on_all_ranks, write_manifest
from framework.checkpoint.universal import save_universal
from framework.cli import UserError
from framework.parallel.distributed import barrier, broadcast_object

STEP_PREFIX = "step-"
_TAG = re.compile(r"^step-(\d+)(?:-r(\d+))?$")


def model_shape(args) -> dict:
    """What a checkpoint must agree on to be loaded into a model of ``args`` (a ModelArgs)."""
    return {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "kv_heads", "ffn_dim", "vocab_size",
                                          "tie_embeddings", "qkv_bias")}


def tag_order(tag: str) -> tuple[int, int] | None:
    """(step, revision) of a checkpoint directory name, None for anything else: steps sort as numbers."""
    m = _TAG.match(tag)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def read_state(step_dir: str) -> dict:
    """A checkpoint's trainer_state.json, or a UserError naming what is wrong with it."""
    path = os.path.join(step_dir, "trainer_state.json")
    if not os.path.isfile(path):
        raise UserError(f"missing file {path}: the checkpoint is incomplete")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON: the file is corrupted") from exc


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["cuda"]), dtype=np.uint8).copy()))


def restore_rng(state: dict) -> None:
    """This rank's RNG as saved, when the checkpoint was written by as many ranks."""
    rngs = state.get("rng") or []
    if len(rngs) == dist.get_world_size():
        set_rng_state(rngs[dist.get_rank()])


class CheckpointManager:
    def __init__(self, run_dir: str, keep: int, is_rank0: bool):
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep, self.is_rank0 = keep, is_rank0

    # -- save -----------------------------------------------------------------------------------
    def save(self, engine, step: int, state: dict, universal: dict | None = None, shards: bool = True) -> str:
        """Every rank writes its shards; rank 0 adds trainer_state.json and the manifest, then moves latest.

        ``universal`` (tp, tp_group, max_shard_mb) also writes the layout-free per-parameter state; ``shards``
        False leaves DeepSpeed's own files out (the per-parameter state then is the only copy of the fp32 state).
        """
        tag, replaces = None, None
        if self.is_rank0:
            tag, replaces = self._free_tag(step)
        tag, replaces = broadcast_object((tag, replaces))
        path = os.path.join(self.root, tag)
        os.makedirs(path, exist_ok=True)
        if shards:
            engine.save_checkpoint(self.root, tag=tag, save_latest=False)
        if universal is not None:
            save_universal(engine, path, optimizer_step=step, **universal)
        maybe_fail("save", step)
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state())
        barrier()
        # Every rank hashes its share of the files for the manifest.
        rels = broadcast_object(list_files(path) if self.is_rank0 else None)
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, hash_files(path, rels, dist.get_rank(), dist.get_world_size()))
        if self.is_rank0:
            full = {**state, "rng": rngs, "world_size": dist.get_world_size(), "deepspeed_shards": shards}
            with open(os.path.join(path, "trainer_state.json"), "w") as f:
                json.dump(full, f, indent=1)
            files = {k: v for part in parts for k, v in part.items()}
            files.update(hash_files(path, ["trainer_state.json"]))
            write_manifest(path, {"step": step}, files)
            tmp = os.path.join(self.root, "latest.tmp")
            with open(tmp, "w") as f:
                f.write(tag + "\n")
            os.replace(tmp, os.path.join(self.root, "latest"))
            if replaces is not None:  # the same step's older checkpoint, superseded now that latest moved
                shutil.rmtree(os.path.join(self.root, replaces), ignore_errors=True)
            self._prune()
        barrier()
        return path

    def _free_tag(self, step: int) -> tuple[str, str | None]:
        """(directory to write step into, the complete checkpoint of the same step it supersedes).

        A directory without a manifest is a stale half-written save of this step: deleted. A complete one stays
        until the new checkpoint is complete and named by ``latest``.
        """
        os.makedirs(self.root, exist_ok=True)
        same = sorted((d for d in os.listdir(self.root) if (tag_order(d) or (None,))[0] == step), key=tag_order)
        complete = [d for d in same if os.path.isfile(os.path.join(self.root, d, "manifest.json"))]
        for d in same:
            if d not in complete:
                shutil.rmtree(os.path.join(self.root, d))
        if not complete:
            return step_dir_name(step), None
        revision = tag_order(complete[-1])[1] + 1
        return f"{step_dir_name(step)}-r{revision}", complete[-1]

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        tags = sorted((d for d in os.listdir(self.root) if tag_order(d) is not None), key=tag_order)
        latest = self.latest_tag()
        for tag in tags[: -self.keep]:
            if tag != latest:
                shutil.rmtree(os.path.join(self.root, tag), ignore_errors=True)

    # -- resume ---------------------------------------------------------------------------------
    def latest_tag(self) -> str | None:
        path = os.path.join(self.root, "latest")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return f.read().strip() or None

    def resolve(self, resume: str) -> str | None:
        """The checkpoint directory to resume from: ``latest`` (if any), ``none``, or a path."""
        if resume in ("none", "", None):
            return None
        if resume == "latest":
            tag = self.latest_tag()
            return os.path.join(self.root, tag) if tag else None
        path = resume
        if os.path.isfile(os.path.join(path, "checkpoints", "latest")):
            path = os.path.join(path, "checkpoints", open(os.path.join(path, "checkpoints", "latest")).read().strip())
        if not os.path.isdir(path):
            raise UserError(f"checkpoint.resume={resume}: no such checkpoint directory")
        return path

    def inspect(self, path: str, model_shape: dict) -> dict:
        """Before any heavy work or any write: the model shape (rank 0, cheap; keys whose value is None are not
        known yet and not compared), then the manifest (every rank hashes its share of the files); returns
        trainer_state or raises UserError naming what is wrong."""
        error, state = None, None
        if self.is_rank0:
            try:
                state = read_state(path)
                saved = state.get("model", {})
                diff = [f"{k} {saved[k]} vs {v}" for k, v in model_shape.items()
                        if k in saved and v is not None and saved[k] != v]
                if diff:
                    raise UserError(f"checkpoint {path} is of another model ({', '.join(diff)} in this run): "
                                    "resume it with its own model config, or set checkpoint.resume=none")
            except UserError as exc:
                error = str(exc)
        error, state = broadcast_object((error, state))
        if error:
            raise UserError(error)
        verify_on_all_ranks(path)
        return state

    def load(self, engine, path: str, state: dict) -> dict:
        """Load every rank's DeepSpeed shards (same layout as saved) and this rank's RNG; returns trainer_state."""
        root, tag = os.path.split(os.path.normpath(path))
        try:
            load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        except RuntimeError as exc:
            raise UserError(f"checkpoint {path} does not fit this model: {str(exc).splitlines()[0][:300]}") from exc
        if load_path is None:
            raise UserError(f"DeepSpeed found no checkpoint files in {path}")
        restore_rng(state)
        return state
