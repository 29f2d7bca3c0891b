"""Shared test helpers: launching the real entry points as processes, tiny models and exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
TORCHRUN = os.path.join(os.path.dirname(PYTHON), "torchrun")

# Small, quick and deterministic: the debug flavor on a small synthetic corpus, no eval, no export.
TINY_TRAIN = [
    "model=debug", "data.synthetic.num_examples=2000", "data.synthetic.val_examples=64",
    "trainer.seq_len=32", "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "trainer.log_every=1",
    "trainer.eval_every=0", "trainer.warmup_steps=5", "trainer.lr=1e-3", "logger.progress=false",
    "checkpoint.export=false", "checkpoint.save_final=false", "checkpoint.resume=none",
]

# A 10-step tiny run that saves every 4 steps and exports: the resume and durability tests' base.
RESUME_STEPS = 10
RESUME_BASE = [a for a in TINY_TRAIN if not a.startswith(("checkpoint.", "trainer.max_steps"))] + [
    f"trainer.max_steps={RESUME_STEPS}", "checkpoint.every=4", "checkpoint.keep=3", "checkpoint.export=true"]


def export_weights(run_dir) -> dict:
    """Every tensor of a run's export (run_dir a pathlib.Path)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run_dir / "export").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# What an in-process process group (world 1) leaves in os.environ: a child process must not take it for a launch.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE")


def env(threads: int = 1) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    e.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
             HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=REPO)
    return e


def run_module(module: str, args: list[str], nproc: int = 1, timeout: int = 600, cwd: str | None = None,
               extra_launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m module args`` (nproc=1) or ``torchrun --nproc_per_node=nproc -m module args``."""
    if nproc == 1 and not extra_launcher:
        cmd = [PYTHON, "-m", module, *args]
    else:
        cmd = [TORCHRUN, f"--nproc_per_node={nproc}", "--standalone", *(extra_launcher or []), "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd or REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run_dir: str) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def make_hf_model(path: str, n_layers: int = 5, qwen: bool = False, tie: bool = False, vocab_texts=None,
                  init_std: float = 0.2, seed: int = 0):
    """A random Llama/Qwen2 model saved with transformers' own save_pretrained, plus a BPE tokenizer."""
    import torch
    import transformers

    from framework.data.synthetic import make_examples
    from framework.data.tokenizer import train_bpe

    texts = vocab_texts or [e.text for e in make_examples("reverse", 500, 0, 3, 8)]
    tok = train_bpe(texts, 300)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie, initializer_range=init_std, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    if qwen:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return model, tok
