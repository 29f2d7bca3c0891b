"""The compiled (CUDA-graph) decode step on one GPU, in process: every graph is compiled and captured at load, none
while serving, whatever the batch sizes and context lengths the requests bring; its tokens equal eager's. Also the
chunked training loss on the device and the loaders' peak memory (no fp32 copy). Skipped, saying why, without CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: none is visible here")]

PROMPTS = ["reverse: 1 2 3 =", "reverse: 9 8 7 6 5 4 3 2 =", "copy: 5 =", "sort: 3 1 2 9 9 0 =", "reverse: 4 =",
           "copy: 1 2 3 4 5 6 =", "sort: 8 =", "reverse: 7 7 1 ="]
MAX_LEN = 128


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from tests.helpers import make_hf_model

    path = str(tmp_path_factory.mktemp("compiled") / "tiny")
    make_hf_model(path, n_layers=4)
    return path


def build(path: str, compiled: bool, max_batch: int):
    """An engine at pp=1 built as framework.generate builds it (startup.build_engine), fp32 on the GPU."""
    from framework.config import GenerateConfig
    from framework.data.tokenizer import load_tokenizer
    from framework.infer.loader import read_model_args
    from framework.infer.plan import plan_stages
    from framework.infer.startup import build_engine

    inf = GenerateConfig().infer
    inf.max_batch, inf.compile, inf.dtype, inf.device, inf.progress = max_batch, compiled, "fp32", "cuda", False
    args = read_model_args(path)
    stages = plan_stages(args, 1, None, 4)
    tok = load_tokenizer(path)
    engine, slots = build_engine(inf, path, args, stages, 0, torch.device("cuda", 0), torch.float32, max_batch,
                                 MAX_LEN, tok, lambda s: None)
    return engine, tok


def generate(engine, tok, n_requests: int) -> list[list[int]]:
    """Greedy tokens for the first ``n_requests`` prompts, each with its own length: the running rows leave one
    by one, so the decode batch passes through every padded size and the window grows through several buckets."""
    from framework.infer.sampler import SamplingParams
    from framework.infer.scheduler import Request

    done = {}
    engine.scheduler.on_finish = lambda seq: done.__setitem__(seq.request.index, list(seq.generated))
    for i, prompt in enumerate(PROMPTS[:n_requests]):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        engine.scheduler.add(Request(i, ids, SamplingParams(max_new_tokens=20 + 11 * i, ignore_eos=True)))
    engine.run()
    return [done[i] for i in range(n_requests)]


class CaptureCounter:
    """Counts the CUDA graphs the CUDA-graph trees record and the graphs dynamo compiles from now on."""

    def __enter__(self):
        from torch._dynamo.utils import counters
        from torch._inductor import cudagraph_trees

        self.recorded = 0
        self._manager = cudagraph_trees.CUDAGraphTreeManager
        self._orig = self._manager.record_function

        def record(mgr, *a, **k):
            self.recorded += 1
            return self._orig(mgr, *a, **k)

        self._manager.record_function = record
        self._graphs0 = counters["stats"]["unique_graphs"]
        return self

    def __exit__(self, *exc):
        from torch._dynamo.utils import counters

        self._manager.record_function = self._orig
        self.compiled = counters["stats"]["unique_graphs"] - self._graphs0


def test_compiled_decode_captures_everything_at_load_and_equals_eager(model_path):
    with CaptureCounter() as at_load:
        engine, tok = build(model_path, compiled=True, max_batch=8)
    assert at_load.recorded >= 4 * 4  # rows 1, 2, 4, 8 x windows 16, 32, 64, 128
    assert engine.worker.windows == [16, 32, 64, 128]
    results = {}
    with CaptureCounter() as serving:
        for n in (1, 3, 8):
            results[n] = generate(engine, tok, n)
    assert serving.recorded == 0 and serving.compiled == 0, (serving.recorded, serving.compiled)
    # the attention reads the live window's bucket, not the whole cache
    from framework.infer.worker import window_from_buckets

    assert window_from_buckets([3], engine.worker.windows) == 16
    assert window_from_buckets([3, 40], engine.worker.windows) == 64
    eager, tok = build(model_path, compiled=False, max_batch=8)
    for n in (1, 3, 8):
        assert generate(eager, tok, n) == results[n], n


def test_chunked_loss_on_cuda_equals_reference_without_the_fp32_copy():
    import torch.nn.functional as F

    from framework.trainer.loss import chunked_cross_entropy

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(2, 1024, 32000, device=dev, generator=gen).to(torch.bfloat16)
    targets = torch.randint(0, 32000, (2, 1024), device=dev, generator=gen)

    def run(fn):
        x = logits.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn(x)
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), x.grad, torch.cuda.max_memory_allocated() - base

    want, want_grad, ref_peak = run(lambda x: F.cross_entropy(x.float().reshape(-1, 32000), targets.reshape(-1)))
    got, got_grad, peak = run(lambda x: chunked_cross_entropy(x, targets, chunk=256))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert ((got_grad.float() - want_grad.float()).abs() <= want_grad.float().abs() * 2**-7 + 1e-9).all()
    fp32_logits = logits.numel() * 4
    assert peak < ref_peak - fp32_logits, (peak, ref_peak)  # at least one whole fp32 copy fewer
    assert peak < 0.6 * fp32_logits + 2 * logits.numel() * 2  # the bf16 gradient and a chunk, no fp32 copy


def _saved_model(path: str) -> None:
    import transformers

    from tests.helpers import make_hf_model

    _, tok = make_hf_model(path, n_layers=1)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)  # fp32 on disk


def test_loader_materializes_the_stage_in_bf16_only(tmp_path):
    from framework.infer.loader import load_stage, read_model_args, weight_bytes
    from framework.infer.plan import plan_stages

    path = str(tmp_path / "m")
    _saved_model(path)
    args = read_model_args(path)
    stage = plan_stages(args, 1, None, 2)[0]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    weights = load_stage(path, args, stage, torch.device("cuda", 0), torch.bfloat16)
    peak = torch.cuda.max_memory_allocated() - base
    held = weight_bytes(weights)
    # an fp32 copy of the stage would put the peak at >= 3x the bf16 weights (fp32 then bf16); fusing q|k|v and
    # gate|up adds one layer's copy at a time
    assert all(p.dtype == torch.bfloat16 for p in weights.parameters())
    assert peak < 1.5 * held, (peak, held)


def test_training_build_in_bf16_has_no_fp32_model_copy():
    from framework.models.llama import ModelArgs
    from framework.parallel.materialize import build_in_dtype

    args = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=4096, ffn_dim=1408, max_seq_len=256)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = build_in_dtype(args, torch.device("cuda", 0), torch.bfloat16, seed=0)
    peak = torch.cuda.max_memory_allocated() - base
    params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert peak <= params * 2 + largest * 4 + (1 << 20), (peak, params)  # bf16 model + one fp32 tensor in flight
