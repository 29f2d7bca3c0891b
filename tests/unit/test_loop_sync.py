"""The training loop waits for the device only at logged steps: one loss all-reduce (and one host read) every
``log_every`` steps, not every step."""

import pytest
import torch

from framework.checkpoint.manager import CheckpointManager
from framework.config import CheckpointConfig, LoggerConfig, TrainConfig, TrainerConfig
from framework.data.dataset import TokenData
from framework.data.loader import ShardedLoader
from framework.models.llama import ModelArgs
from framework.parallel.topology import Topology


@pytest.fixture
def world_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Engine:
    """A stand-in DeepSpeed engine: logits from one learnable row, no-op steps."""

    def __init__(self, vocab: int):
        self.w = torch.zeros(vocab, requires_grad=True)
        self.module = None

    def __call__(self, x):
        return self.w.expand(*x.shape, -1) * 1.0  # (B, T, V)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass

    def get_lr(self):
        return [0.1]

    def get_global_grad_norm(self):
        return 1.0

    def train(self):
        pass


def test_loss_is_reduced_and_read_only_at_logged_steps(tmp_path, world_of_one, monkeypatch):
    import framework.trainer.trainer as trainer

    reduces, items = [], []
    real_reduce, real_item = trainer.dist.all_reduce, torch.Tensor.item
    monkeypatch.setattr(trainer.dist, "all_reduce", lambda t, *a, **k: reduces.append(1) or real_reduce(t, *a, **k))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: items.append(1) or real_item(self))
    vocab, seq = 11, 8
    cfg = TrainConfig(run_dir=str(tmp_path), model=ModelArgs(vocab_size=vocab),
                      trainer=TrainerConfig(max_steps=10, log_every=5, eval_every=0, global_batch_size=4,
                                            micro_batch_size=2, seq_len=seq),
                      logger=LoggerConfig(progress=False), checkpoint=CheckpointConfig(save_final=False))
    topo = Topology(world_size=1, rank=0)
    job = trainer.Job(cfg, torch.device("cpu"), topo, 1, CheckpointManager(str(tmp_path), 2, True))
    blocks = torch.randint(0, vocab, (64, seq + 1), generator=torch.Generator().manual_seed(0))
    data = TokenData(train=blocks, val=blocks[:4], tokenizer=None, unigram_entropy=0.0, eval_examples=[])
    loader = ShardedLoader(blocks, 4, 1, 0, seed=0)
    step, last = trainer.loop(job, Engine(vocab), data, cfg.model, loader, 0, 0)
    assert step == 10 and last["step"] == 10
    # logged at step 1 (the first), 5 and 10: three reductions and three reads, for ten steps
    assert len(reduces) == 3 and len(items) == 3
