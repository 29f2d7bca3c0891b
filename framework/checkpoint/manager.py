"""Sharded save and resume of everything stateful: model, optimizer, schedule, loader, RNG, step.

Layout (one directory per step, every rank writing its own shards through DeepSpeed)::

    checkpoints/step-000200/   universal/ (every parameter's full fp32 weight and moments: resume on any layout,
                               export), trainer_state.json, manifest.json; DeepSpeed's per-rank model and
                               optimizer shards only where the per-parameter state is off or cannot carry
                               everything (fp16: the loss scaler), as they would be a second copy of the state
    checkpoints/latest         names the newest complete checkpoint; replaced atomically, last

Publishing survives a power cut, not only a crash: every rank flushes what it wrote (``syncfs``), the manifest
records every file's size and sha256, rank 0 fsyncs trainer_state.json, the manifest and every directory of the
step, then the checkpoints directory, and only then replaces ``latest`` (temporary, fsync, rename, fsync of the
directory). A crash or a power cut mid-save leaves the previous checkpoint as ``latest``; a half-written
directory is never used. A complete checkpoint is never deleted to make room for its replacement: saving a step
whose directory already holds one (a run resumed from an older checkpoint reaches the step again) writes
``step-N-r1`` (``-r2``, ...) beside it and removes the old one only once ``latest`` names the new.

Resuming from ``latest`` verifies it first (``checkpoint.verify``: sizes and the sha256 of small files and of samples
of large ones, or every byte; see manifest.py). One that fails (a file missing, truncated or altered, an unreadable
trainer_state.json, no manifest) is skipped for the newest checkpoint that verifies, with one warning line: first
its own lineage's (its parent, grandparent, ...), then any other, most recently saved first.

Lineage: each checkpoint records in trainer_state.json and its manifest its ``parent``, the checkpoint saved before
it by the same line of training (the previous save, or the one the run resumed from). Pruning (``checkpoint.keep``)
follows it: after a rollback to an older checkpoint the abandoned branch's checkpoints go first (highest steps
first), then the current lineage's oldest; the checkpoint ``latest`` names and the one rolled back to while it is
among the newest ``keep`` of the lineage are never deleted. Deletion runs in a thread on rank 0 after the save's
last barrier: no rank waits for it under a collective timeout, the other ranks are already training.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sys
import threading

import torch
import torch.distributed as dist

from framework.checkpoint.faults import maybe_fail
from framework.checkpoint.manifest import (
    MANIFEST,
    VERIFY_MODES,
    fsync_path,
    fsync_tree,
    hash_files,
    list_files,
    sync_filesystem,
    verify_on_all_ranks,
    write_atomically,
    write_durably,
    write_manifest,
)
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
            state = json.load(f)
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON: the file is corrupted") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"{path} holds no trainer state: the file is corrupted")
    return state


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def read_latest(root: str) -> str | None:
    """What ``root/latest`` names (stripped; possibly not a checkpoint at all), None without the file."""
    path = os.path.join(root, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        return f.read().strip()


def complete_tags(root: str) -> list[str]:
    """Checkpoint directories with a manifest (written last, so the save finished), in step order."""
    if not os.path.isdir(root):
        return []
    return sorted((d for d in os.listdir(root)
                   if tag_order(d) is not None and os.path.isfile(os.path.join(root, d, MANIFEST))), key=tag_order)


def parent_of(root: str, tag: str, complete: list[str]) -> str | None:
    """The checkpoint ``tag`` was trained from, as it recorded; for one saved before lineage was recorded (or
    whose state and manifest are both unreadable), the complete checkpoint of the step before."""
    for name in ("trainer_state.json", MANIFEST):
        try:
            with open(os.path.join(root, tag, name)) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and "parent" in meta:
            return meta["parent"]
    order = tag_order(tag)
    return max((t for t in complete if tag_order(t) < order), key=tag_order, default=None) if order else None


def lineage(root: str, head: str | None, complete: list[str] | None = None) -> list[str]:
    """``head`` and its ancestors that are complete checkpoints, newest first."""
    complete = complete_tags(root) if complete is None else complete
    chain: list[str] = []
    while head in complete and head not in chain:
        chain.append(head)
        head = parent_of(root, head, complete)
    return chain


def fallback_order(root: str) -> list[str]:
    """The checkpoints to try for ``latest``: what it names, its lineage, then the others by save time."""
    latest = read_latest(root) or ""
    complete = complete_tags(root)
    chain = lineage(root, parent_of(root, latest, complete), complete) if tag_order(latest) else []
    rest = [t for t in complete if t != latest and t not in chain]
    rest.sort(key=lambda t: (os.path.getmtime(os.path.join(root, t, MANIFEST)), tag_order(t)), reverse=True)
    return [latest, *chain, *rest]


def remove_checkpoint(path: str) -> None:
    """The manifest goes first: a deletion cut short leaves a directory plainly incomplete (skipped at resume,
    removed by the next pruning), never one that claims files it lost."""
    try:
        os.unlink(os.path.join(path, MANIFEST))
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


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


def first_verified(root: str, candidates: list[str], problem, verb: str, otherwise: str, speak: bool) -> str:
    """The first of ``candidates`` (tags under ``root``, newest first) for which ``problem(tag)`` is None, with one
    warning line (where ``speak``) naming what failed before it ("... using/resuming from <tag>"); UserError naming
    every failure and ``otherwise`` (what the user can do instead) when none verifies."""
    failures = []
    for tag in candidates:
        error = problem(tag)
        if error is None:
            break
        failures.append((tag, error))
    else:
        tried = "; ".join(f"{t or '(empty)'}: {e}" for t, e in failures)
        raise UserError(f"no checkpoint in {root} passes verification ({tried}): restore the damaged files, or "
                        f"{otherwise}")
    if failures and speak:
        (first, why), more = failures[0], failures[1:]
        also = "".join(f"; so does {t} ({e})" for t, e in more)
        print(f"[miaotui] warning: the latest checkpoint {first or '(empty)'} fails verification ({why}){also}: "
              f"{verb} {tag}, the newest checkpoint that verifies", file=sys.stderr, flush=True)
    return tag


class CheckpointManager:
    def __init__(self, run_dir: str, keep: int, is_rank0: bool, verify: str = "fast"):
        if verify not in VERIFY_MODES:
            raise UserError(f"checkpoint.verify={verify}: use fast (sizes, sha256 of small files and of samples of "
                            "large ones) or full (sha256 of every byte)")
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep, self.is_rank0, self.full_verify = keep, is_rank0, verify == "full"
        self.head: str | None = None  # this lineage's newest checkpoint: the last saved, or the one resumed from
        self._verified: str | None = None  # what resolve() verified, so that inspect() need not read it again
        self._deleter: threading.Thread | None = None
        self._doomed: set[str] = set()  # tags handed to the deleter and not yet gone
        self._lock = threading.Lock()

    # -- save -----------------------------------------------------------------------------------
    def save(self, engine, step: int, state: dict, universal: dict | None = None, shards: bool = True) -> str:
        """Every rank writes its shards and flushes them; rank 0 adds trainer_state.json and the manifest, fsyncs,
        then moves latest; after the last barrier rank 0 prunes in the background.

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
        synced = sync_filesystem(path)  # this rank's writes, wherever they went, on disk
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state())
        barrier()
        # Every rank hashes its share of the files for the manifest (and fsyncs them where syncfs is missing).
        rels = broadcast_object(list_files(path) if self.is_rank0 else None)
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, hash_files(path, rels, dist.get_rank(), dist.get_world_size(), sync=not synced))
        if self.is_rank0:
            full = {**state, "parent": self.head, "rng": rngs, "world_size": dist.get_world_size(),
                    "deepspeed_shards": shards}
            self._publish(path, step, full, {k: v for part in parts for k, v in part.items()})
        barrier()
        self.head = tag
        if self.is_rank0:
            self.prune(replaces)
        return path

    def _publish(self, path: str, step: int, state: dict, files: dict) -> None:
        """Rank 0: trainer_state.json and the manifest, everything fsynced, then ``latest`` names the step."""
        write_durably(os.path.join(path, "trainer_state.json"), json.dumps(state, indent=1))
        files.update(hash_files(path, ["trainer_state.json"]))
        write_manifest(path, {"step": step, "parent": state["parent"]}, files)
        fsync_tree(path, files=False)  # every directory of the step: the entries of the files written into it
        fsync_path(self.root)  # the step directory's own entry
        write_atomically(os.path.join(self.root, "latest"), os.path.basename(path) + "\n")

    def _free_tag(self, step: int) -> tuple[str, str | None]:
        """(directory to write step into, the complete checkpoint of the same step it supersedes).

        A directory without a manifest is a stale half-written save of this step: deleted. A complete one stays
        until the new checkpoint is complete and named by ``latest``. Names still being deleted are not reused.
        """
        os.makedirs(self.root, exist_ok=True)
        with self._lock:
            doomed = set(self._doomed)
        same = sorted((d for d in os.listdir(self.root) if (tag_order(d) or (None,))[0] == step), key=tag_order)
        complete = [d for d in same if d not in doomed and os.path.isfile(os.path.join(self.root, d, MANIFEST))]
        for d in same:
            if d not in complete and d not in doomed:
                shutil.rmtree(os.path.join(self.root, d))
        taken = [d for d in same if d in complete or d in doomed]
        if not taken:
            return step_dir_name(step), None
        revision = max(tag_order(d)[1] for d in taken) + 1
        return f"{step_dir_name(step)}-r{revision}", complete[-1] if complete else None

    # -- prune ----------------------------------------------------------------------------------
    def prune(self, replaces: str | None = None) -> list[str]:
        """Rank 0: choose what to delete now (cheap: names and small JSON files), delete it in a thread; returns
        the tags chosen. ``replaces`` is the same step's checkpoint the new one superseded."""
        doomed = self._deletions(replaces)
        if doomed:
            with self._lock:
                self._doomed.update(doomed)
            previous = self._deleter
            self._deleter = threading.Thread(target=self._delete, args=(doomed, previous), name="checkpoint-prune")
            self._deleter.start()
        return doomed

    def _deletions(self, replaces: str | None) -> list[str]:
        """Stale half-written directories, then while more than ``keep`` complete checkpoints remain: the
        abandoned branches' (highest step first), then the current lineage's oldest. Never ``latest``'s, the
        lineage head's, or the newest ``keep`` of the lineage."""
        if self.keep <= 0:
            return [replaces] if replaces else []
        with self._lock:
            busy = set(self._doomed) | {replaces}
        tags = [d for d in os.listdir(self.root) if tag_order(d) is not None and d not in busy]
        complete = [d for d in complete_tags(self.root) if d not in busy]
        latest = read_latest(self.root)
        protected = {latest, self.head}
        stale = [d for d in tags if d not in complete and d not in protected]
        chain = lineage(self.root, self.head or latest, complete)
        kept = set(chain[: self.keep]) | protected
        abandoned = sorted((d for d in complete if d not in chain), key=tag_order, reverse=True)
        order = [d for d in abandoned + chain[::-1] if d not in kept]
        return ([replaces] if replaces else []) + stale + order[: max(len(complete) - self.keep, 0)]

    def _delete(self, tags: list[str], previous: threading.Thread | None) -> None:
        if previous is not None:  # one deletion at a time, in the order chosen
            previous.join()
        for tag in tags:
            try:
                remove_checkpoint(os.path.join(self.root, tag))
            except OSError as exc:  # a checkpoint that could not be deleted costs disk space, not the run
                print(f"[miaotui] warning: could not delete checkpoint {tag}: {exc}", file=sys.stderr, flush=True)
            finally:
                with self._lock:
                    self._doomed.discard(tag)

    def wait_for_deletions(self) -> None:
        """Block until the pruning started so far is done (the end of a run, tests)."""
        if self._deleter is not None:
            self._deleter.join()

    # -- resume ---------------------------------------------------------------------------------
    def latest_tag(self) -> str | None:
        return read_latest(self.root) or None

    def resolve(self, resume: str) -> str | None:
        """The checkpoint directory to resume from: ``latest`` (if any; the newest that verifies), ``none``, or a
        path (a run directory stands for its latest). Every rank calls this (verification is collective)."""
        if resume in ("none", "", None):
            return None
        if resume == "latest":
            return self._resolve_latest(self.root)
        if os.path.isfile(os.path.join(resume, "checkpoints", "latest")):
            return self._resolve_latest(os.path.join(resume, "checkpoints"))
        if not os.path.isdir(resume):
            raise UserError(f"checkpoint.resume={resume}: no such checkpoint directory")
        self._adopt(resume)
        return resume

    def _adopt(self, path: str) -> None:
        """A checkpoint of this run resumed from heads the lineage the next saves continue."""
        parent, tag = os.path.split(os.path.normpath(os.path.abspath(path)))
        if os.path.realpath(parent) == os.path.realpath(self.root):
            self.head = tag

    def _resolve_latest(self, root: str) -> str | None:
        if read_latest(root) is None:
            return None
        candidates = broadcast_object(fallback_order(root) if self.is_rank0 else None)
        tag = first_verified(root, candidates, lambda t: self._check(root, t), "resuming from",
                             "start over with checkpoint.resume=none", self.is_rank0)
        path = os.path.join(root, tag)
        self._adopt(path)
        self._verified = os.path.normpath(path)
        return path

    def _check(self, root: str, tag: str) -> str | None:
        """Why checkpoint ``tag`` cannot be resumed from (None: it verifies). Collective."""
        error = None
        if self.is_rank0:
            try:
                if tag_order(tag) is None or not os.path.isdir(os.path.join(root, tag)):
                    raise UserError(f"{os.path.join(root, 'latest')} names {tag!r}, which is not a checkpoint "
                                    "directory")
                read_state(os.path.join(root, tag))
            except UserError as exc:
                error = str(exc)
        error = broadcast_object(error)
        if error is None:
            try:
                verify_on_all_ranks(os.path.join(root, tag), full=self.full_verify)
            except UserError as exc:
                error = str(exc)
        return error

    def inspect(self, path: str, model_shape: dict) -> dict:
        """Before any heavy work or any write: the model shape (rank 0, cheap; keys whose value is None are not
        known yet and not compared), then the manifest (every rank checks its share of the files, unless
        ``resolve`` just did); returns trainer_state or raises UserError naming what is wrong."""
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
        if os.path.normpath(path) != self._verified:
            verify_on_all_ranks(path, full=self.full_verify)
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
