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


def write_manifest(directory: str, extra: dict | None = None) -> dict:
    files = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel == MANIFEST or rel.endswith(".tmp"):
                continue
            files[rel] = {"size": os.path.getsize(path), "sha256": sha256_file(path)}
    manifest = {"files": dict(sorted(files.items())), **(extra or {})}
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(directory, MANIFEST))
    return manifest


def verify_manifest(directory: str, check_hash: bool = True) -> dict:
    """Check every listed file exists with its size (and hash); raise UserError naming the first bad one."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f"{directory} has no {MANIFEST}: it is incomplete or not one of ours")
    with open(path) as f:
        manifest = json.load(f)
    for rel, meta in manifest["files"].items():
        fpath = os.path.join(directory, rel)
        if not os.path.isfile(fpath):
            raise UserError(f"missing file {fpath} listed in the manifest: the checkpoint is incomplete")
        size = os.path.getsize(fpath)
        if size != meta["size"]:
            raise UserError(f"{fpath} is {size} bytes, the manifest says {meta['size']}: the file is truncated or altered")
        if check_hash and sha256_file(fpath) != meta["sha256"]:
            raise UserError(f"{fpath} does not match its sha256 in the manifest: the file is corrupted")
    return manifest
