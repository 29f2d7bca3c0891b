"""The planner against this machine: each rank's peak memory of real training runs (the model's share: the peak
minus what the process held before the model was built) within 15% of the plan: runs where the model states
dominate (ZeRO 2 over two processes; ZeRO 3 on one and on two, DeepSpeed's stage-3 buffers and gathers), and one
where the activations do (a long sequence).

The runs set glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_) so that every tensor above 64 KiB has pages of its own,
returned when it is freed: the resident peak then counts the tensors alive at once, as torch.cuda's
max_memory_allocated does on a GPU, which is what the planner plans. With glibc's default (a threshold that rises
to the largest block freed so far, up to 32 MiB) the heap keeps freed tensors of up to that size, and the peak
depends on the order of allocations (ZeRO 3 gathers and frees every layer's weights each step)."""

import json
from dataclasses import replace

import pytest
from omegaconf import OmegaConf

from framework.plan import Layout
from tests.helpers import REPO, TINY_TRAIN, assert_ok, run_module

pytestmark = pytest.mark.distributed


GiB = 2**30


@pytest.fixture(autouse=True)
def _tensors_own_their_pages(monkeypatch):
    """The runs' environment (run_module copies it): see the module docstring."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")


def cpu_sdpa_is_flash(args) -> bool:
    """Whether CPU SDPA runs a flash kernel (saving no (T, T) probabilities) for this model's causal attention."""
    import torch

    q = torch.zeros(1, args.n_heads, 64, args.head_dim)
    kv = torch.zeros(1, args.kv_heads, 64, args.head_dim)
    return torch._fused_sdp_choice(q, kv, kv, None, 0.0, True, enable_gqa=args.kv_heads != args.n_heads) != 0


def train_run(tmp_path, flavor: str, nproc: int, zero: int, micro: int, seq: int, gbs: int,
              n_layers: int | None = None) -> tuple[float, object, Layout]:
    """(the model's share of rank 0's peak in GiB, the model, its layout) of a 2-step training run."""
    from framework.data.tokenizer import load_tokenizer
    from framework.models.llama import ModelArgs

    base = [a for a in TINY_TRAIN if not a.startswith(("model=", "trainer.seq_len", "trainer.global_batch_size",
                                                       "trainer.micro_batch_size"))]
    proc = run_module("framework.train", [*base, f"model={flavor}", f"trainer.seq_len={seq}",
                                          f"trainer.global_batch_size={gbs}", f"trainer.micro_batch_size={micro}",
                                          f"parallel.zero_stage={zero}", "trainer.max_steps=2", f"run_dir={tmp_path}",
                                          *([f"model.n_layers={n_layers}"] if n_layers else [])],
                      nproc=nproc)
    assert_ok(proc)
    summary = json.loads((tmp_path / "summary.json").read_text())
    args = ModelArgs(**OmegaConf.to_container(OmegaConf.load(f"{REPO}/configs/model/{flavor}.yaml")))
    args = replace(args, n_layers=n_layers or args.n_layers)
    if args.vocab_size is None:
        args = replace(args, vocab_size=len(load_tokenizer(str(tmp_path / "tokenizer"))))
    # on CPU: torch's single-tensor AdamW (not fused), gloo's collectives, and SDPA's kernel as torch picks it
    lay = Layout(nproc, 1, zero, "fp32", micro, seq, gbs, False, flash_attention=cpu_sdpa_is_flash(args),
                 backend="gloo")
    return summary["peak_mem_gb"] - summary["base_mem_gb"], args, lay


def measured_and_planned(tmp_path, flavor: str, nproc: int, zero: int, micro: int, seq: int, gbs: int,
                         n_layers: int | None = None):
    """(measured GiB, planned GiB, the plan). The plan's ``runtime`` (a GPU's CUDA context and NCCL) is here what
    the same layout holds beyond its plan when training the debug model (a few MB of weights, 32-token
    sequences): the Python modules and kernels loaded on first use, DeepSpeed's engine."""
    from framework.plan import DEVICES, plan_training

    (tmp_path / "debug").mkdir()
    (tmp_path / "run").mkdir()
    tiny, tiny_args, tiny_lay = train_run(tmp_path / "debug", "debug", nproc, zero, 2, 32, 2 * nproc)
    runtime = tiny - plan_training(tiny_args, tiny_lay, DEVICES["h100"], 0.0, fused_optimizer=False).total / GiB
    measured, args, lay = train_run(tmp_path / "run", flavor, nproc, zero, micro, seq, gbs, n_layers)
    plan = plan_training(args, lay, DEVICES["h100"], runtime_gib=runtime, fused_optimizer=False)
    return measured, plan.total / GiB, plan


def test_model_states_dominate_zero2_two_ranks(tmp_path):
    measured, planned, plan = measured_and_planned(tmp_path, "125m", 2, 2, 2, 64, 4, n_layers=4)
    assert plan.memory["optimizer"] > 4 * plan.memory["activations"]
    assert abs(planned - measured) <= 0.15 * measured, (planned, measured, plan.memory)


def test_activations_dominate_long_sequence(tmp_path):
    measured, planned, plan = measured_and_planned(tmp_path, "small", 1, 1, 16, 512, 16)
    assert plan.memory["activations"] > 4 * plan.memory["optimizer"]
    assert abs(planned - measured) <= 0.15 * measured, (planned, measured, plan.memory)


@pytest.mark.parametrize("nproc", [1, 2])
def test_zero3_stage3_buffers(tmp_path, nproc):
    """ZeRO 3, 58M parameters: the partitions (weights, gradients, fp32 master, moments), the ipg bucket, the
    reduce-scatter's copies at the end of backward, the weights gathered for compute, the optimizer step."""
    measured, planned, plan = measured_and_planned(tmp_path, "125m", nproc, 3, 2, 64, 4, n_layers=4)
    assert plan.memory["gathered_weights"] > 0 and plan.memory["reduce_scatter_copy"] > 0
    assert abs(planned - measured) <= 0.15 * measured, (planned, measured, plan.phases, plan.memory)
