"""Manifests: size and sha256 of every file of a checkpoint or an export, their verification, and the durable
writes that publish them.

Durability (a power cut, not only a crash of the process): a file's bytes and a directory's entries reach the disk
only when fsynced. Everything that makes a checkpoint or an export visible under its final name (``latest``, the
export directory) happens after every file and every directory under it has been fsynced, and the rename that
publishes it is followed by an fsync of the directory that holds the name. So after a power cut a published name
points at complete data, and anything unpublished is at worst a stale temporary.

Verification: ``full`` reads every byte (sha256 of every file). ``fast`` (the default at resume) checks every
file's size, the sha256 of every file up to ``FULL_HASH_MAX_BYTES`` (the trainer state, the manifests, indexes and
the state shards of small models), and of larger files the sha256 of ``SAMPLE_BLOCKS`` blocks spread over the file,
first and last included: a torn write (zeros or garbage over a range, a short file) is caught by size or by a
sample in the common cases, while resuming a checkpoint of hundreds of GB reads megabytes, not the checkpoint twice
(the load reads it once anyway, and a corrupted tensor that slips past shows as a loss spike: ``full`` is the key to
rule that out).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys

from framework.cli import UserError

MANIFEST = "manifest.json"
FULL_HASH_MAX_BYTES = 64 << 20
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 16, 1 << 20
VERIFY_MODES = ("fast", "full")


# -- durable writes ---------------------------------------------------------------------------------------------
def fsync_path(path: str) -> None:
    """fsync a file or a directory (its entries). Filesystems that cannot fsync a directory (EINVAL) are skipped:
    there the rename itself is what they guarantee."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF) or not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str, files: bool = True) -> None:
    """fsync every file (unless ``files`` is False: already synced by their writers) and every directory under
    ``root``, deepest first, ``root`` last: after this, the tree survives a power cut as it is now."""
    for dirpath, _, names in os.walk(root, topdown=False):
        if files:
            for name in names:
                fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def write_durably(path: str, text: str) -> None:
    """Write ``path`` and fsync it (inside a directory that is published later, so no rename is needed)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` so that it holds the old or the new text at every instant, power cuts included: write a
    temporary, fsync it, rename it over ``path``, fsync the directory (the rename is durable only then)."""
    tmp = path + ".tmp"
    write_durably(tmp, text)
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def sync_filesystem(path: str) -> bool:
    """Flush every write this machine has cached for the filesystem holding ``path`` (Linux ``syncfs``); False
    where the call is missing. Each rank calls it after writing its shards: on a filesystem shared by several
    nodes only the writer's node can flush its cached writes, and DeepSpeed does not say which rank wrote which
    file."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        return fn(fd) == 0
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the OS or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(new: str, dst: str) -> None:
    """Put directory ``new`` at ``dst``, replacing what is there without a moment where neither exists on disk.

    Where the filesystem swaps atomically (ext4, xfs, btrfs, tmpfs), ``dst`` is at every instant the old or the new
    directory. Elsewhere (NFS) the old one is renamed aside (``dst.old``) first and deleted only once the new one is
    in place: a crash between the two renames leaves the old one complete at ``dst.old`` and the new at ``new``.
    The parent directory is fsynced after the swap, before anything old is deleted.
    """
    parent = os.path.dirname(os.path.abspath(dst))
    aside = dst.rstrip("/") + ".old"
    if not os.path.lexists(dst):
        os.replace(new, dst)
        fsync_path(parent)
        shutil.rmtree(aside, ignore_errors=True)  # an interrupted replacement's old copy, superseded now
        return
    if _exchange(new, dst):
        fsync_path(parent)
        shutil.rmtree(new)  # now the old directory
        return
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(dst, aside)
    os.replace(new, dst)
    fsync_path(parent)
    shutil.rmtree(aside, ignore_errors=True)


def publish_dir(staged: str, dst: str) -> None:
    """Make the complete directory ``staged`` durable, then swap it in at ``dst`` (see ``replace_dir``)."""
    fsync_tree(staged)
    replace_dir(staged, dst)


# -- hashing ----------------------------------------------------------------------------------------------------
def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sample_sha256(path: str, size: int) -> str:
    """sha256 of ``SAMPLE_BLOCKS`` blocks at evenly spaced offsets, the first and the last block included."""
    h = hashlib.sha256()
    span = max(size - SAMPLE_BLOCK_BYTES, 0)
    with open(path, "rb") as f:
        for k in range(SAMPLE_BLOCKS):
            f.seek(span * k // (SAMPLE_BLOCKS - 1))
            h.update(f.read(SAMPLE_BLOCK_BYTES))
    return h.hexdigest()


def file_entry(path: str, sync: bool = False) -> dict:
    """A manifest entry: size and sha256, plus the sampled hash of a large file (what ``fast`` checks). ``sync``
    also fsyncs the file: the ranks that hash a checkpoint's files are the ones that make them durable."""
    if sync:
        fsync_path(path)
    size = os.path.getsize(path)
    entry = {"size": size, "sha256": sha256_file(path)}
    if size > FULL_HASH_MAX_BYTES:
        entry["sample_sha256"] = sample_sha256(path, size)
    return entry


def list_files(directory: str) -> list[str]:
    out = []
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MANIFEST and not rel.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def hash_files(directory: str, rels: list[str], rank: int = 0, world: int = 1, sync: bool = False) -> dict:
    """Entries (see ``file_entry``) of every ``world``-th file starting at ``rank`` (ranks split the hashing)."""
    return {rel: file_entry(os.path.join(directory, rel), sync) for i, rel in enumerate(rels) if i % world == rank}


def write_manifest(directory: str, extra: dict | None = None, files: dict | None = None) -> dict:
    """Write ``manifest.json`` (fsynced, renamed into place); ``files`` are precomputed entries (see
    ``hash_files``), else hashed here."""
    if files is None:
        files = hash_files(directory, list_files(directory))
    manifest = {"files": dict(sorted(files.items())), **(extra or {})}
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    write_durably(tmp, json.dumps(manifest, indent=1))
    os.replace(tmp, os.path.join(directory, MANIFEST))
    return manifest


# -- verification -----------------------------------------------------------------------------------------------
def verify_on_all_ranks(directory: str, full: bool = True) -> None:
    """Every launched rank checks its share of the files; all raise the first error any found (a world of one
    checks them all). ``full`` False is the ``fast`` check (module docstring)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        verify_manifest(directory, full=full)
        return
    error = None
    try:
        verify_manifest(directory, rank=dist.get_rank(), world=dist.get_world_size(), full=full)
    except UserError as exc:
        error = str(exc)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    error = next((e for e in errors if e), None)
    if error:
        raise UserError(error)


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f"{directory} has no {MANIFEST}: it is incomplete or not one of ours")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is unreadable ({exc.__class__.__name__}): the manifest is corrupted") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UserError(f"{path} lists no files: the manifest is corrupted")
    return manifest


def verify_manifest(directory: str, check_hash: bool = True, rank: int = 0, world: int = 1, full: bool = True) -> dict:
    """Check every listed file exists with its size (and hash); raise UserError naming the first bad one.

    With ``world`` > 1 this rank checks every ``world``-th file from ``rank`` on (the ranks split the hashing).
    ``full`` False hashes only files up to ``FULL_HASH_MAX_BYTES`` and samples of larger ones.
    """
    manifest = read_manifest(directory)
    for i, (rel, meta) in enumerate(manifest["files"].items()):
        if i % world != rank:
            continue
        fpath = os.path.join(directory, rel)
        if not os.path.isfile(fpath):
            raise UserError(f"missing file {fpath} listed in the manifest: the checkpoint is incomplete")
        size = os.path.getsize(fpath)
        if size != meta["size"]:
            raise UserError(f"{fpath} is {size} bytes, the manifest says {meta['size']}: the file is truncated or altered")
        if not check_hash:
            continue
        if full or size <= FULL_HASH_MAX_BYTES:
            if sha256_file(fpath) != meta["sha256"]:
                raise UserError(f"{fpath} does not match its sha256 in the manifest: the file is corrupted")
        elif "sample_sha256" in meta and sample_sha256(fpath, size) != meta["sample_sha256"]:
            raise UserError(f"{fpath} does not match its sampled sha256 in the manifest: the file is corrupted")
    return manifest
