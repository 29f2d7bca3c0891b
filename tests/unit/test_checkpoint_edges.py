"""Edge cases that lose data or train the wrong thing, each checked in one process without training:
pruning order past step 999999, saving over a complete checkpoint, replacing an export, the import arrow between
checkpoint/ and trainer/, two ranks on one GPU, and evaluation without an fp32 copy of the logits. Power cuts,
torn checkpoints, rollbacks and the compressed export's replacement: tests/unit/test_checkpoint_durability.py."""

import ast
import json
import os
import pathlib

import pytest
import torch

from framework.checkpoint.manager import CheckpointManager
from framework.cli import UserError

REPO = pathlib.Path(__file__).resolve().parents[2]


def fake_checkpoint(root: pathlib.Path, tag: str, complete: bool = True) -> pathlib.Path:
    d = root / tag
    d.mkdir(parents=True)
    (d / "shard.pt").write_bytes(b"x" * 10)
    if complete:
        (d / "manifest.json").write_text(json.dumps({"files": {}}))
    return d


def test_pruning_orders_steps_as_numbers(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (999_998, 999_999, 1_000_000):
        fake_checkpoint(root, f"step-{step:06d}")
    (root / "latest").write_text("step-1000000\n")
    mgr = CheckpointManager(str(tmp_path), keep=2, is_rank0=True)
    assert mgr.prune() == ["step-999998"]  # written before lineage was recorded: the steps in order are the lineage
    mgr.wait_for_deletions()
    assert sorted(os.listdir(root)) == ["latest", "step-1000000", "step-999999"]


@pytest.fixture
def world_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class CrashingEngine:
    """Writes half a checkpoint, then dies (as a kill mid-save would)."""

    def save_checkpoint(self, root, tag, save_latest=False):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        with open(os.path.join(root, tag, "half.pt"), "wb") as f:
            f.write(b"partial")
        raise RuntimeError("killed mid-save")


class Engine:
    def save_checkpoint(self, root, tag, save_latest=False):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        with open(os.path.join(root, tag, "new.pt"), "wb") as f:
            f.write(b"new")


def test_saving_a_step_again_never_deletes_the_checkpoint_latest_names(tmp_path, world_of_one):
    """Resumed from an older checkpoint, the run reaches a step that `latest` already names: a crash mid-save keeps
    the old complete copy in charge; a finished save replaces it only after `latest` moved."""
    root = tmp_path / "checkpoints"
    old = fake_checkpoint(root, "step-000008")
    (root / "latest").write_text("step-000008\n")
    mgr = CheckpointManager(str(tmp_path), keep=3, is_rank0=True)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        mgr.save(CrashingEngine(), 8, {"step": 8})
    assert (old / "shard.pt").read_bytes() == b"x" * 10 and (old / "manifest.json").is_file()
    assert mgr.latest_tag() == "step-000008"

    path = mgr.save(Engine(), 8, {"step": 8})
    assert mgr.latest_tag() == os.path.basename(path) != "step-000008"
    assert (pathlib.Path(path) / "new.pt").is_file() and (pathlib.Path(path) / "manifest.json").is_file()
    mgr.wait_for_deletions()  # deleted by rank 0 in the background, after the save's last barrier
    assert not old.exists()  # superseded once latest named the new one
    assert mgr.resolve("latest") == path
    # a half-written directory of the same step (no manifest) is stale: it is cleared, not kept beside
    fake_checkpoint(root, "step-000012", complete=False)
    assert os.path.basename(mgr.save(Engine(), 12, {"step": 12})) == "step-000012"


def tiny_args():
    from framework.models.llama import ModelArgs

    return ModelArgs(name="t", dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=11, max_seq_len=8)


def test_a_failed_export_replacement_keeps_the_previous_export(tmp_path, monkeypatch):
    import framework.checkpoint.export as export
    from framework.checkpoint.manifest import verify_manifest
    from framework.models.llama import build_model

    out = tmp_path / "export"
    args = tiny_args()
    model = build_model(args, seed=0)
    export.export_from_module(model, args, str(out), None)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}

    real_replace = os.replace

    def crash_publishing(src, dst, *a, **k):  # the step that puts the new export in place fails
        if os.path.basename(str(src)) == "export.tmp":
            raise OSError("crash while publishing")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(export.os, "replace", crash_publishing)
    try:
        export.export_from_module(build_model(args, seed=1), args, str(out), None)
    except OSError:
        pass
    verify_manifest(str(out))  # a complete export is there, the old or the new one
    monkeypatch.undo()
    # and a replacement that completes leaves the new export, complete, and nothing beside it (on a filesystem
    # without an atomic swap the old one is renamed aside first: then a crash leaves it as export.old)
    export.export_from_module(build_model(args, seed=1), args, str(out), None)
    verify_manifest(str(out))
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} != before
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_checkpoint_package_does_not_import_the_trainer():
    for path in (REPO / "framework" / "checkpoint").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("framework.trainer"), (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("framework.trainer") for a in node.names), path.name


def test_two_ranks_on_one_gpu_refused_in_one_line(monkeypatch):
    from framework.parallel.distributed import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"2 processes on this node but 1 GPU\(s\) visible: .*--nproc_per_node=1"):
        pick_device("cuda")


def test_evaluation_makes_no_fp32_copy_of_the_whole_logits():
    """bf16 logits (B, T, V): the loss reads them in fp32 a slice at a time, and equals the whole-tensor loss."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from framework.trainer.evaluate import lm_loss, validation_loss

    B, T, V = 4, 2048, 64
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(V, V, generator=gen).bfloat16()
    model = lambda ids: table[ids]  # (B, T, V) bf16 logits
    blocks = torch.randint(0, V, (B, T + 1), generator=gen)

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32:
                Largest.biggest = max(Largest.biggest, out.numel())
            return out

    with Largest():
        got, _ = validation_loss(model, blocks, batch_size=B, max_batches=1, device="cpu")
    assert Largest.biggest < B * T * V // 4
    assert got == pytest.approx(lm_loss(model(blocks[:, :-1]), blocks[:, 1:]).item(), rel=1e-5)
