"""The weights layer and the one model-directory resolver: the dtype table, the tensor-parallel slices of the
inference loader, the shard planner, a rank's part of a packed int4 weight read from disk, and a run directory
resolved to its newest checkpoint that verifies without any collective."""

import json
import os

import pytest
import torch

from framework.cli import UserError
from framework.weights import dtypes, shards
from framework.weights.io import WeightFiles, pack_int32, read_packed, unpack_int32
from framework.weights.layout import split_layers, tp_slice, vocab_range


def test_dtype_table_round_trips_every_name():
    for d in dtypes.TABLE:
        assert dtypes.torch_dtype(d.precision) is d.torch
        assert dtypes.hf_name(d.torch) == d.hf
        assert dtypes.config_precision({"torch_dtype": d.hf}) == d.precision
        assert dtypes.element_bytes(d.precision) == torch.tensor([], dtype=d.torch).element_size()
    assert dtypes.config_dtype({"dtype": "bfloat16"}) is torch.bfloat16  # transformers' newer key
    assert dtypes.config_precision({"torch_dtype": "int8"}) == "fp32" and dtypes.config_precision({}) == "fp32"
    with pytest.raises(UserError, match=r"^infer.dtype=fp8: use fp32, bf16 or fp16$"):
        dtypes.torch_dtype("fp8", "infer.dtype")


def test_tp_slices_follow_the_layout_table():
    assert tp_slice("model.layers.0.self_attn.k_proj.weight", (32, 64), 100, 2, 1) == (0, 16, 32)
    assert tp_slice("model.layers.0.self_attn.q_proj.bias", (64,), 100, 4, 3) == (0, 48, 64)
    assert tp_slice("model.layers.0.mlp.down_proj.weight", (64, 128), 100, 2, 0) == (1, 0, 64)
    assert tp_slice("model.layers.0.self_attn.o_proj.bias", (64,), 100, 2, 1) is None  # added after the all-reduce
    assert tp_slice("lm_head.weight", (100, 64), 100, 3, 2) == (0, 68, 100) == (0, *vocab_range(100, 3, 2))
    assert tp_slice("model.norm.weight", (64,), 100, 2, 1) is None
    assert tp_slice("model.layers.1.mlp.up_proj.qweight", (128, 8), 100, 2, 1) == (0, 64, 128)  # packed names too


def test_split_layers_is_the_one_stage_check():
    assert split_layers(5, 2, None) == [[0, 1, 2], [3, 4]]
    with pytest.raises(UserError, match=r"infer.pp=4 stages is more than the model's 3 layers: use infer.pp <= 3"):
        split_layers(3, 4, None)
    from framework.parallel.topology import build_topology

    with pytest.raises(UserError, match=r"infer.pp=4 stages is more than the model's 3 layers"):
        build_topology(4, 0, pp=4, n_layers=3)


def test_one_shard_planner():
    sizes = [("a", 40), ("b", 70), ("c", 200), ("d", 10), ("e", 10)]
    assert shards.plan_shards(sizes, 100) == [["a"], ["b"], ["c"], ["d", "e"]]  # a larger tensor gets a shard alone
    assert shards.plan_shards([], 100) == []
    assert shards.shard_name(1, 3) == "model-00002-of-00003.safetensors"


def test_a_rank_reads_its_part_of_a_packed_int4_weight(tmp_path):
    out_f, in_f, group = 32, 128, 32
    q = torch.randint(-8, 8, (out_f, in_f), dtype=torch.int8)
    zp = torch.randint(-8, 8, (out_f, in_f // group), dtype=torch.int8)
    scale = torch.rand(out_f, in_f // group) + 0.1
    tensors = {"m.weight_packed": pack_int32(q, 4), "m.weight_scale": scale,
               "m.weight_zero_point": pack_int32(zp, 4, dim=0), "m.weight_shape": torch.tensor([out_f, in_f])}
    planned = shards.plan_shards(shards.tensor_sizes(tensors), 2**20)
    wmap = shards.write_shards(str(tmp_path), tensors, planned, 0, len(planned))
    shards.write_index(str(tmp_path), wmap, {"total_size": 0})
    assert torch.equal(unpack_int32(tensors["m.weight_zero_point"], 4, out_f, dim=0), zp)
    files = WeightFiles(str(tmp_path))
    cols = read_packed(files, "m", 4, group, False, (1, 64, 128), tp=2)  # row-parallel: whole groups of columns
    assert torch.equal(cols.q, q[:, 64:]) and torch.equal(cols.scale, scale[:, 2:]) and torch.equal(cols.zero_point, zp[:, 2:])
    rows = read_packed(files, "m", 4, group, False, (0, 16, 32), tp=2)  # column-parallel: output rows
    assert torch.equal(rows.q, q[16:]) and torch.equal(rows.scale, scale[16:]) and torch.equal(rows.zero_point, zp[16:])
    with pytest.raises(UserError, match=r"m: infer.tp=4 cuts its 128 inputs inside an int4 group of 32"):
        read_packed(files, "m", 4, group, False, (1, 16, 48), tp=4)


# -- the resolver --------------------------------------------------------------------------------------------------
@pytest.fixture
def run_with_two_checkpoints(tmp_path):
    """A run directory whose checkpoints step-2 and step-4 each carry an export; latest names step-4."""
    import torch.distributed as dist

    from framework.checkpoint.manager import CheckpointManager

    class Engine:
        def save_checkpoint(self, root, tag, save_latest=False):
            os.makedirs(os.path.join(root, tag, "shards"), exist_ok=True)
            with open(os.path.join(root, tag, "shards", "model.pt"), "wb") as f:
                f.write(f"weights of {tag}".encode() * 100)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        run = tmp_path / "run"
        mgr = CheckpointManager(str(run), keep=3, is_rank0=True)
        for step in (2, 4):
            path = mgr.save(Engine(), step, {"step": step})
            os.makedirs(os.path.join(path, "export"))
            with open(os.path.join(path, "export", "config.json"), "w") as f:
                json.dump({"step": step}, f)
        mgr.wait_for_deletions()
    finally:
        dist.destroy_process_group()
    return run


def test_a_run_resolves_to_its_newest_checkpoint_that_verifies(run_with_two_checkpoints, capsys):
    from framework.checkpoint.resolve import find_checkpoint, resolve_model_dir

    run = run_with_two_checkpoints
    root = run / "checkpoints"
    assert resolve_model_dir(str(run)) == (str(root / "step-000004" / "export"), None)
    (root / "step-000004" / "shards" / "model.pt").write_bytes(b"torn")  # no process group: nothing collective
    assert find_checkpoint(str(run)) == (str(run), str(root / "step-000002"))
    assert resolve_model_dir(str(run)) == (str(root / "step-000002" / "export"), None)
    assert "step-000004 fails verification" in capsys.readouterr().err
    (root / "step-000002" / "trainer_state.json").write_text("{")
    with pytest.raises(UserError, match="no checkpoint in .* passes verification"):
        find_checkpoint(str(run))


def test_the_resolver_names_the_setting_and_the_fix(tmp_path):
    from framework.checkpoint.resolve import resolve_export_dir, resolve_model_dir

    (tmp_path / "run" / "export").mkdir(parents=True)
    (tmp_path / "run" / "export" / "config.json").write_text("{}")
    assert resolve_export_dir(str(tmp_path / "run")) == str(tmp_path / "run" / "export")
    with pytest.raises(UserError, match=r"^model directory not found: .*nope$"):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(UserError, match=r"not found: .*nope \(trainer.distill_from\)$"):
        resolve_export_dir(str(tmp_path / "nope"), key="trainer.distill_from")
    with pytest.raises(UserError, match=r"holds no config.json nor export/: point trainer.distill_from at an export"):
        resolve_export_dir(str(tmp_path), key="trainer.distill_from")
