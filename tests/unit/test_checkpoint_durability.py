"""Checkpoints that survive a power cut, in one process with a stand-in engine (no training): every file and directory
fsynced before `latest` moves, a torn `latest` skipped for the newest checkpoint that verifies with one warning,
pruning that follows the lineage after a rollback, deletions off the critical path, and a compressed export that
is replaced atomically. The same behaviour under real training: tests/distributed/test_checkpoint_durability.py."""

import json
import os
import pathlib
import types

import pytest

import framework.checkpoint.manager as manager
import framework.checkpoint.manifest as manifest
from framework.checkpoint.manager import CheckpointManager
from framework.cli import UserError


@pytest.fixture
def world_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Engine:
    """Writes a shard (in a subdirectory, as DeepSpeed and the per-parameter state do) whose bytes name the step."""

    def save_checkpoint(self, root, tag, save_latest=False):
        os.makedirs(os.path.join(root, tag, "shards"), exist_ok=True)
        with open(os.path.join(root, tag, "shards", "model.pt"), "wb") as f:
            f.write(f"weights of {tag}".encode() * 100)


def save_steps(mgr: CheckpointManager, steps) -> list[str]:
    tags = [os.path.basename(mgr.save(Engine(), s, {"step": s})) for s in steps]
    mgr.wait_for_deletions()
    return tags


def listing(root: pathlib.Path) -> list[str]:
    return sorted(d for d in os.listdir(root) if d.startswith("step-"))


def parent(root: pathlib.Path, tag: str):
    return json.loads((root / tag / "trainer_state.json").read_text())["parent"]


# -- fsync before latest moves --------------------------------------------------------------------------------------
def test_every_file_and_directory_is_fsynced_before_latest_moves(tmp_path, world_of_one, monkeypatch):
    synced, events = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        events.append(("fsync", (st.st_dev, st.st_ino)))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", os.path.basename(str(dst)), frozenset(synced)))
        return real_replace(src, dst, *a, **k)

    def ident(path):
        st = os.stat(path)
        return st.st_dev, st.st_ino

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(manager, "sync_filesystem", lambda path: False)  # no syncfs: each file is fsynced by name
    mgr = CheckpointManager(str(tmp_path), keep=2, is_rank0=True)
    path = pathlib.Path(mgr.save(Engine(), 4, {"step": 4}))
    root = path.parent

    published = [i for i, e in enumerate(events) if e[0] == "replace" and e[1] == "latest"]
    assert len(published) == 1
    before = events[published[0]][2]
    tree = [path / rel for rel in manifest.list_files(str(path))] + [path / "manifest.json", path / "shards", path]
    missing = [str(p.relative_to(tmp_path)) for p in tree if ident(p) not in before]
    assert not missing, f"not fsynced before latest moved: {missing}"
    assert ident(root) in before and ident(root / "latest") in before  # the step's entry; latest's bytes (tmp)
    # and the rename of latest is made durable by an fsync of checkpoints/ after it
    assert ("fsync", ident(root)) in events[published[0] + 1:]
    assert mgr.latest_tag() == "step-000004"


# -- a torn latest falls back ---------------------------------------------------------------------------------------
def damage(step_dir: pathlib.Path, how: str) -> None:
    shard = step_dir / "shards" / "model.pt"
    if how == "corrupt":  # same size, one byte flipped
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif how == "truncate":
        shard.write_bytes(shard.read_bytes()[:-7])
    elif how == "missing":
        shard.unlink()
    elif how == "torn_step":  # the power went before the manifest reached the disk
        (step_dir / "manifest.json").unlink()
    elif how == "bad_state":
        (step_dir / "trainer_state.json").write_text('{"step": 6, "loa')


@pytest.mark.parametrize("how,reason", [
    ("corrupt", "does not match its sha256"),
    ("truncate", "the file is truncated or altered"),
    ("missing", "missing file"),
    ("torn_step", "has no manifest.json"),
    ("bad_state", "is not valid JSON"),
])
def test_a_torn_latest_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, world_of_one, capsys, how, reason):
    root = tmp_path / "checkpoints"
    save_steps(CheckpointManager(str(tmp_path), keep=3, is_rank0=True), [2, 4, 6])
    damage(root / "step-000006", how)
    capsys.readouterr()

    mgr = CheckpointManager(str(tmp_path), keep=3, is_rank0=True)
    path = mgr.resolve("latest")
    assert path == str(root / "step-000004")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert "step-000006" in warnings[0] and reason in warnings[0] and "resuming from step-000004" in warnings[0]
    assert mgr.inspect(path, {})["step"] == 4
    # the next save continues the lineage of step 4; saving step 6 again supersedes the torn one (one without a
    # manifest is a stale half-written save: cleared at once, its name reused)
    new = "step-000006" if how == "torn_step" else "step-000006-r1"
    assert save_steps(mgr, [6]) == [new]
    assert parent(root, new) == "step-000004"
    assert listing(root) == ["step-000002", "step-000004", new]


def test_fallback_follows_the_lineage_not_the_step_numbers(tmp_path, world_of_one, capsys):
    """After a rollback from 8 to 4, the new line saved 6-r1; if it is torn, step 4 (its parent) is next, not the
    abandoned step 8 of the old line."""
    root = tmp_path / "checkpoints"
    save_steps(CheckpointManager(str(tmp_path), keep=5, is_rank0=True), [4, 8])
    mgr = CheckpointManager(str(tmp_path), keep=5, is_rank0=True)
    mgr.resolve(str(root / "step-000004"))
    save_steps(mgr, [6])
    damage(root / "step-000006", "truncate")
    assert CheckpointManager(str(tmp_path), keep=5, is_rank0=True).resolve("latest") == str(root / "step-000004")
    assert "resuming from step-000004" in capsys.readouterr().err


def test_latest_naming_nothing_and_nothing_verifying(tmp_path, world_of_one, capsys):
    root = tmp_path / "checkpoints"
    save_steps(CheckpointManager(str(tmp_path), keep=3, is_rank0=True), [2, 4])
    (root / "latest").write_text("step-000009\n")  # a directory that never got written
    assert CheckpointManager(str(tmp_path), keep=3, is_rank0=True).resolve("latest") == str(root / "step-000004")
    assert "step-000009" in capsys.readouterr().err
    damage(root / "step-000004", "corrupt")
    damage(root / "step-000002", "missing")
    with pytest.raises(UserError, match=r"no checkpoint in .* passes verification .*checkpoint.resume=none") as err:
        CheckpointManager(str(tmp_path), keep=3, is_rank0=True).resolve("latest")
    assert "\n" not in str(err.value) and "step-000002" in str(err.value)
    # an explicitly named checkpoint is refused, never swapped for another
    with pytest.raises(UserError, match="does not match its sha256"):
        mgr = CheckpointManager(str(tmp_path), keep=3, is_rank0=True)
        mgr.inspect(mgr.resolve(str(root / "step-000004")), {})


def test_fast_verification_hashes_small_files_and_samples_of_large_ones(tmp_path, monkeypatch):
    """The cost of a resume: `fast` reads every small file and SAMPLE_BLOCKS blocks of a large one; `full` reads
    everything. (The thresholds are shrunk so that a 64 KiB file counts as large.)"""
    monkeypatch.setattr(manifest, "FULL_HASH_MAX_BYTES", 4096)
    monkeypatch.setattr(manifest, "SAMPLE_BLOCK_BYTES", 256)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(64 << 10))
    (tmp_path / "small.json").write_text("{}")
    manifest.write_manifest(str(tmp_path))
    entries = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert "sample_sha256" in entries["big.bin"] and "sample_sha256" not in entries["small.json"]

    def flip(offset):
        data = bytearray(big.read_bytes())
        data[offset] ^= 0xFF
        big.write_bytes(bytes(data))

    flip(len(big.read_bytes()) - 1)  # inside the last block: a torn tail is seen by the fast check
    with pytest.raises(UserError, match="sampled sha256"):
        manifest.verify_manifest(str(tmp_path), full=False)
    flip(len(big.read_bytes()) - 1)
    flip(300)  # between the first two samples: only the full check reads it
    manifest.verify_manifest(str(tmp_path), full=False)
    with pytest.raises(UserError, match="does not match its sha256"):
        manifest.verify_manifest(str(tmp_path), full=True)


def test_unknown_verify_mode_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"checkpoint.verify=quick: use fast .* or full"):
        CheckpointManager(str(tmp_path), keep=2, is_rank0=True, verify="quick")


# -- pruning follows the lineage ------------------------------------------------------------------------------------
def test_pruning_after_a_rollback_keeps_the_rolled_back_to_checkpoint(tmp_path, world_of_one):
    root = tmp_path / "checkpoints"
    first = CheckpointManager(str(tmp_path), keep=3, is_rank0=True)
    save_steps(first, [2, 4, 6, 8])
    assert listing(root) == ["step-000004", "step-000006", "step-000008"]
    assert [parent(root, t) for t in listing(root)] == ["step-000002", "step-000004", "step-000006"]

    mgr = CheckpointManager(str(tmp_path), keep=3, is_rank0=True)  # roll back to step 4 (say, a loss spike)
    mgr.inspect(mgr.resolve(str(root / "step-000004")), {})
    save_steps(mgr, [5])  # by step number, 4 would go; the abandoned branch's newest (8) goes instead
    assert listing(root) == ["step-000004", "step-000005", "step-000006"]
    assert parent(root, "step-000005") == "step-000004"
    save_steps(mgr, [6])  # the abandoned step 6 is superseded by this line's
    assert listing(root) == ["step-000004", "step-000005", "step-000006-r1"]
    assert parent(root, "step-000006-r1") == "step-000005"
    save_steps(mgr, [7])  # only now, with three newer ones in its own line, does step 4 go
    assert listing(root) == ["step-000005", "step-000006-r1", "step-000007"]
    assert manager.lineage(str(root), mgr.latest_tag()) == ["step-000007", "step-000006-r1", "step-000005"]


def test_pruning_runs_in_the_background_after_the_last_barrier(tmp_path, world_of_one, monkeypatch):
    """Rank 0 deletes in a thread once every rank passed the save's last barrier: no collective waits on it."""
    import threading

    m = manager
    gate, started, calls = threading.Event(), threading.Event(), []
    real_barrier, real_remove = m.barrier, m.remove_checkpoint

    def slow_remove(path):
        calls.append(("remove", os.path.basename(path)))
        started.set()
        gate.wait(10)
        real_remove(path)

    monkeypatch.setattr(m, "barrier", lambda: (calls.append(("barrier",)), real_barrier()))
    monkeypatch.setattr(m, "remove_checkpoint", slow_remove)
    mgr = CheckpointManager(str(tmp_path), keep=1, is_rank0=True)
    mgr.save(Engine(), 2, {"step": 2})
    mgr.save(Engine(), 4, {"step": 4})  # returns while step 2 is still being deleted
    assert started.wait(10) and (tmp_path / "checkpoints" / "step-000002").exists()
    assert calls == [("barrier",)] * 4 + [("remove", "step-000002")]  # after the second save's last barrier
    mgr.save(Engine(), 6, {"step": 6})  # the next save does not wait for it either
    gate.set()
    mgr.wait_for_deletions()
    assert listing(tmp_path / "checkpoints") == ["step-000006"]


def test_an_interrupted_deletion_leaves_a_plainly_incomplete_directory(tmp_path, world_of_one):
    root = tmp_path / "checkpoints"
    mgr = CheckpointManager(str(tmp_path), keep=5, is_rank0=True)
    save_steps(mgr, [2, 4])
    (root / "step-000002" / "manifest.json").unlink()  # what remove_checkpoint does first
    assert manager.complete_tags(str(root)) == ["step-000004"]
    save_steps(mgr, [6])  # the next pruning removes the remains
    assert listing(root) == ["step-000004", "step-000006"]


# -- the compressed export is replaced atomically -------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.helpers import make_hf_model

    path = str(tmp_path_factory.mktemp("hf"))
    make_hf_model(path, n_layers=2, init_std=0.05)
    return path


def compress_to(src, out, method):
    from framework.compress.run import compress
    from framework.config import CompressConfig, QuantConfig

    return compress(CompressConfig(model_dir=src, out=str(out), method=method, quant=QuantConfig(group_size=32)))


def snapshot(path: pathlib.Path) -> dict[str, bytes]:
    return {f: (path / f).read_bytes() for f in sorted(os.listdir(path))}


def bits(path: pathlib.Path) -> int:
    qconfig = json.loads((path / "config.json").read_text())["quantization_config"]
    return qconfig["config_groups"]["group_0"]["weights"]["num_bits"]


def test_a_crash_while_compressing_keeps_the_previous_output(hf_dir, tmp_path, monkeypatch):
    import framework.weights.shards as shards

    out = tmp_path / "out"
    compress_to(hf_dir, out, "int8")
    before = snapshot(out)

    def crash_writing(*a, **k):  # the process dies while the new shards are written
        raise RuntimeError("killed while writing shards")

    with monkeypatch.context() as m:
        m.setattr(shards, "write_shards", crash_writing)
        with pytest.raises(RuntimeError, match="killed while writing"):
            compress_to(hf_dir, out, "int4")
    assert snapshot(out) == before and bits(out) == 8
    manifest.verify_manifest(str(out))

    real_replace = os.replace

    def crash_naming(src, dst, *a, **k):  # dies where the old code had already deleted the output
        if os.path.basename(str(src)) == "out.tmp":
            raise RuntimeError("killed while naming the new output")
        return real_replace(src, dst, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash_naming)
        with pytest.raises(RuntimeError, match="killed while naming"):
            compress_to(hf_dir, out, "int4")
    assert snapshot(out) == before

    def killed_at_cleanup(*a, **k):
        raise RuntimeError("killed at cleanup")

    with monkeypatch.context() as m:  # dies between the swap and the removal of the old output
        m.setattr(manifest, "shutil", types.SimpleNamespace(rmtree=killed_at_cleanup))
        with pytest.raises(RuntimeError, match="killed at cleanup"):
            compress_to(hf_dir, out, "int4")
    manifest.verify_manifest(str(out))  # the new output, complete, is already in place
    assert bits(out) == 4

    compress_to(hf_dir, out, "int4")  # a run that completes replaces it and leaves nothing beside it
    manifest.verify_manifest(str(out))
    assert snapshot(out) != before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_replace_dir_without_an_atomic_swap_keeps_a_complete_copy(tmp_path, monkeypatch):
    """On a filesystem without renameat2's exchange (NFS) the old directory is renamed aside, never deleted first:
    a crash between the two renames leaves the old one whole at dst.old and the new one at its staging name."""
    old, new, dst = tmp_path / "new", tmp_path / "staged", tmp_path / "out"
    old.mkdir()
    (old / "a").write_text("old")
    manifest.replace_dir(str(old), str(dst))
    new.mkdir()
    (new / "a").write_text("new")
    monkeypatch.setattr(manifest, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def crash_second(src, dst_, *a, **k):
        if os.path.basename(str(src)) == "staged":
            raise OSError("power cut")
        return real_replace(src, dst_, *a, **k)

    monkeypatch.setattr(os, "replace", crash_second)
    with pytest.raises(OSError):
        manifest.replace_dir(str(new), str(dst))
    assert (tmp_path / "out.old" / "a").read_text() == "old" and (new / "a").read_text() == "new"
    monkeypatch.setattr(os, "replace", real_replace)
    manifest.replace_dir(str(new), str(dst))
    assert (dst / "a").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]
