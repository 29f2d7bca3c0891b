"""Manifests: size and sha256 of every file of a checkpoint or an export, and their verification."""

from __future__ import annotations

import hashlib
import json
import os

from framework.cli import UserError

MANIFEST = "manifest.json"


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_files(directory: str) -> list[str]:
    out = []
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MANIFEST and not rel.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def hash_files(directory: str, rels: list[str], rank: int = 0, world: int = 1) -> dict:
    """Size and sha256 of every ``world``-th file starting at ``rank`` (ranks split the hashing)."""
    return {rel: {"size": os.path.getsize(os.path.join(directory, rel)),
                  "sha256": sha256_file(os.path.join(directory, rel))}
            for i, rel in enumerate(rels) if i % world == rank}


def write_manifest(directory: str, extra: dict | None = None, files: dict | None = None) -> dict:
    """Write ``manifest.json``; ``files`` are precomputed entries (see ``hash_files``), else hashed here."""
    if files is None:
        files = hash_files(directory, list_files(directory))
    manifest = {"files": dict(sorted(files.items())), **(extra or {})}
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(directory, MANIFEST))
    return manifest


def verify_on_all_ranks(directory: str) -> None:
    """Every launched rank checks its share of the files; all raise the first error any found (a world of one
    checks them all)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        verify_manifest(directory)
        return
    error = None
    try:
        verify_manifest(directory, rank=dist.get_rank(), world=dist.get_world_size())
    except UserError as exc:
        error = str(exc)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    error = next((e for e in errors if e), None)
    if error:
        raise UserError(error)


def verify_manifest(directory: str, check_hash: bool = True, rank: int = 0, world: int = 1) -> dict:
    """Check every listed file exists with its size (and hash); raise UserError naming the first bad one.

    With ``world`` > 1 this rank checks every ``world``-th file from ``rank`` on (the ranks split the hashing).
    """
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f"{directory} has no {MANIFEST}: it is incomplete or not one of ours")
    with open(path) as f:
        manifest = json.load(f)
    for i, (rel, meta) in enumerate(manifest["files"].items()):
        if i % world != rank:
            continue
        fpath = os.path.join(directory, rel)
        if not os.path.isfile(fpath):
            raise UserError(f"missing file {fpath} listed in the manifest: the checkpoint is incomplete")
        size = os.path.getsize(fpath)
        if size != meta["size"]:
            raise UserError(f"{fpath} is {size} bytes, the manifest says {meta['size']}: the file is truncated or altered")
        if check_hash and sha256_file(fpath) != meta["sha256"]:
            raise UserError(f"{fpath} does not match its sha256 in the manifest: the file is corrupted")
    return manifest
