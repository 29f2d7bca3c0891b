"""The stage worker: runs this rank's layers for one engine step, against the static KV cache.

A step is a flat list of tokens: first one token for each decoding row, then the prompt chunks being prefilled
(each a segment of one sequence). Every linear layer runs once over all of them, so the step reads each weight
once whatever its mix; only attention treats the two kinds apart:

- decode rows attend with a batched matmul against their slots' cached keys up to a shared window (the
  longest row's length, rounded up), one boolean mask hiding each row's unwritten tail. Grouped-query heads
  are a reshape (B, n_kv, group, hd), never a copy of K/V per query head.
- a prompt chunk attends with SDPA against its slot's cache up to its end: causal from position 0 (the flash
  kernels), with an offset mask for a chunk that continues a prompt.

The weights are the model's own modules, rearranged once at load (``StageWeights.from_model``): q|k|v and
gate|up fused into one matrix each, the rest as they are; the model file stays the training definition.
The decode-only step has fixed shapes for a given (rows, window), so ``torch.compile`` applies to it
(inductor on CPU; CUDA graphs through mode "reduce-overhead" on GPU, rows and window padded to buckets).

On CUDA, by construction (each rule is cited where the code follows it):
- every (rows, window) bucket's graph is compiled and captured at load (``warm_up``), none while serving;
- the attention of a compiled step reads only the live window: the longest row's context rounded up to a power
  of two (``window_buckets``), not the whole cache;
- a compiled step's output handed to another stage is a copy, never the graph's static output buffer, which the
  next replay rewrites while NCCL may still be reading it;
- a step's integer lists reach the device in one pinned, non-blocking copy (``HostStaging``);
- busy time is measured by CUDA events around the step's kernels, not by the host's enqueue time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from framework.infer.cache import KVCache
from framework.infer.tensor_parallel import TPGroup
from framework.models.llama import Llama, rope_inv_freq

SERIAL_KERNEL_ROWS = 1  # decode rows up to which a compiled CPU step with int8 kernels runs inductor's on one thread


def cpu_int8_kernels(weights: nn.Module) -> bool:
    """Whether a stage's linears run framework/kernels' int8 CPU decode kernel (opaque calls in a graph)."""
    from framework.compress.quantize import Int8Linear

    return any(isinstance(m, Int8Linear) and m.gemv_rows for m in weights.modules())


def path_rows(weights: nn.Module) -> list[int]:
    """Row counts past which a linear of the stage leaves this project's CPU kernel for the GEMM (``gemv_rows`` of
    cpu_linear.StreamLinear and quantize.Int8Linear): a compiled step's graph guards on each of them."""
    return sorted({m.gemv_rows for m in weights.modules() if getattr(m, "gemv_rows", 0)})


def fuse_linears(linears: list[nn.Module]) -> nn.Module:
    """One module computing ``cat([m(x) for m in linears], -1)``: nn.Linear by concatenating weights, other
    (quantized) modules through their ``cat`` classmethod."""
    if all(type(m) is nn.Linear for m in linears):
        first = linears[0]
        out = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None,
                        device="meta")  # no initialisation: the weight is the concatenation
        out.weight = nn.Parameter(torch.cat([m.weight for m in linears]), requires_grad=False)
        if first.bias is not None:
            out.bias = nn.Parameter(torch.cat([m.bias for m in linears]), requires_grad=False)
        return out
    return type(linears[0]).cat(linears)


class RMSNormW(nn.Module):
    """RMSNorm as transformers computes it (fp32 statistics, cast back, then the weight)."""

    def __init__(self, weight: torch.Tensor | None, eps: float):
        super().__init__()
        self.weight = None if weight is None else nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or self.weight is None:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused kernel
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class InferLayer(nn.Module):
    def __init__(self, layer, eps: float):
        """Takes the loaded layer's weights; the separate q/k/v and gate/up are dropped from ``layer`` as soon as
        they are fused, so loading peaks at one layer's copy, not the model's."""
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = RMSNormW(layer.input_layernorm.weight.detach(), eps)
        self.qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        self.qkv_sizes = [m.out_features for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        attn.q_proj = attn.k_proj = attn.v_proj = None
        self.o = attn.o_proj
        self.post_norm = RMSNormW(layer.post_attention_layernorm.weight.detach(), eps)
        self.gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj])
        mlp.gate_proj = mlp.up_proj = None
        self.down = mlp.down_proj


def fold_norm(norm: RMSNormW, linear: nn.Module) -> bool:
    """Move an RMSNorm's weight into the plain linear layer that reads its output: W[:, i] *= g[i], and the norm
    keeps only its 1/rms. The same product, regrouped (float32 rounding apart). A compiled one-row CPU step then
    reads one vector beside each weight row where it read three (the inductor kernel recomputes the normalised
    input inside each dot product). False where it does not apply (quantized layers)."""
    if type(linear) is not nn.Linear or norm.weight is None:
        return False
    linear.weight.data.mul_(norm.weight.detach().to(linear.weight.dtype)[None, :])
    norm.weight = None
    return True


class StageWeights(nn.Module):
    """What one stage holds, laid out for inference: embedding (first stage), layers, norm and head (last)."""

    def __init__(self, model: Llama):
        super().__init__()
        args = model.args
        self.args = args
        self.embed = model.model.embed_tokens
        self.layers = nn.ModuleList(InferLayer(layer, args.norm_eps) for layer in model.model.layers.values())
        self.norm = RMSNormW(model.model.norm.weight.detach(), args.norm_eps) if model.model.norm is not None else None
        self.lm_head = model.lm_head
        device = next(model.parameters()).device
        self.register_buffer("inv_freq", rope_inv_freq(args).to(device), persistent=False)
        self.head_dim = args.head_dim
        self.first, self.last = self.embed is not None, self.lm_head is not None

    def fold_norms(self) -> int:
        """Fold each layer's two norm weights into q|k|v and gate|up (see ``fold_norm``); the final norm stays
        (the head may share the embedding's table). Returns how many were folded."""
        return sum(fold_norm(layer.input_norm, layer.qkv) + fold_norm(layer.post_norm, layer.gate_up)
                   for layer in self.layers)


def rope(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (N, 1, hd) for positions (N,), computed in fp32 like transformers."""
    freqs = positions[:, None].float() * inv_freq.float()[None, :]  # (N, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, heads, hd) rotated by position."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def decode_mask(positions: torch.Tensor, window: int, runs: SlotRuns | None, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of a masked decode step's scores, (U, 1, r, 1, window): 0 up to each row's position, -inf
    past it (padding rows of ``runs`` at position 0). Made once a step and added in every layer (one op there, where
    building and applying a boolean mask was five, 0.1-0.2 ms of a 5-row CPU step of the 30M shape)."""
    r = 1 if runs is None else runs.r
    if runs is not None and runs.pad_index is not None:
        positions = positions.new_zeros(runs.u * r).index_copy_(0, runs.pad_index, positions)
    hidden = torch.arange(window, device=positions.device)[None, :] > positions[:, None]  # (B, W)
    bias = torch.zeros(hidden.shape, dtype=dtype, device=positions.device).masked_fill_(hidden, float("-inf"))
    return bias.view(-1, 1, r, 1, window)


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor,
                     positions: torch.Tensor, window: int, masked: bool, runs: SlotRuns | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """One new query a row against its cached keys 0..position, within the first ``window`` positions of the
    cache. q (B, H, hd) -> (B, H*hd). One row whose window is exactly its context needs no mask. With ``runs``
    (eager steps: ``slot_runs``), a slot's rows (its row and its draft rows when speculating) read its cache once,
    through a view when the slots are consecutive, else gathered once a slot, runs shorter than the longest padded
    to it; without (the compiled step), a gathered copy a row. ``bias``: the step's ``decode_mask``, if made."""
    n = q.shape[0]
    if masked and bias is None:
        bias = decode_mask(positions, window, runs, q.dtype)
    if runs is not None:
        u, r = runs.u, runs.r
        if runs.first is not None:
            k, v = kc[runs.first: runs.first + u, :, :window], vc[runs.first: runs.first + u, :, :window]
        else:  # one row a slot: the step's own (staged) slots
            idx = runs.slots if runs.slots is not None else slots
            k, v = kc[:, :, :window].index_select(0, idx), vc[:, :, :window].index_select(0, idx)
        if runs.pad_index is not None:  # padding rows at position 0 (decode_mask): finite, and dropped below
            q = q.new_zeros(u * r, *q.shape[1:]).index_copy_(0, runs.pad_index, q)
    else:
        r = 1
        k = kc[:, :, :window].index_select(0, slots)  # (B, KV, W, hd)
        v = vc[:, :, :window].index_select(0, slots)
    B, H, hd = q.shape
    u, kv = B // r, k.shape[1]
    g = H // kv  # grouped-query heads share their K/V head
    # a slot's r rows and g heads against its K/V head: (U, KV, r*g, hd) (with r = 1 a reshape, no copy)
    qg = q.view(u, r, kv, g, hd).transpose(1, 2).reshape(u, kv, r * g, hd)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * hd**-0.5  # (U, KV, r*g, W)
    if masked:  # + 0 leaves a score as it is: the unmasked one-row step computes the same values
        scores = (scores.view(u, kv, r, g, window) + bias).view(u, kv, r * g, window)
    p = scores.float().softmax(-1).to(q.dtype)
    out = torch.matmul(p, v).view(u, kv, r, g, hd).transpose(1, 2).reshape(B, H * hd)  # (U, KV, r*g, hd) -> rows
    return out if B == n else out.index_select(0, runs.pad_index)


def prefill_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slot: int, start: int) -> torch.Tensor:
    """A chunk of T prompt tokens at positions start.. of one sequence. q (T, H, hd) -> (T, H*hd)."""
    T, H, hd = q.shape
    end = start + T
    k, v = kc[slot, :, :end][None], vc[slot, :, :end][None]  # (1, KV, end, hd): views
    qh = q.transpose(0, 1)[None]  # (1, H, T, hd)
    gqa = k.shape[1] != H
    if start == 0:
        y = F.scaled_dot_product_attention(qh, k, v, is_causal=True, enable_gqa=gqa)
    else:
        mask = torch.arange(end, device=q.device)[None, :] <= torch.arange(start, end, device=q.device)[:, None]
        y = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, enable_gqa=gqa)
    return y[0].transpose(0, 1).reshape(T, H * hd)


@dataclass
class SlotRuns:
    """A decode step's rows as runs of one slot each (a slot's row, then its draft rows), found on the host once a
    step for every layer's attention: ``u`` runs, padded to the longest, ``r`` rows; ``first`` when the slots are
    first, first + 1, ... (the cache is read through views), else ``slots`` to gather once a slot (None for one row
    a slot: the step's own row slots); ``pad_index``
    (row -> its place among the u * r padded rows) when the runs differ in length."""

    u: int
    r: int
    first: int | None
    slots: torch.Tensor | None
    pad_index: torch.Tensor | None


def slot_runs(slots: list[int], device: torch.device | str = "cpu") -> SlotRuns:
    """The runs of ``slots`` (a step's decode rows, a slot's rows consecutive)."""
    uniq, counts = [], []
    for s in slots:
        if uniq and uniq[-1] == s:
            counts[-1] += 1
        else:
            uniq.append(s)
            counts.append(1)
    u, r = len(uniq), max(counts)
    first = uniq[0] if uniq == list(range(uniq[0], uniq[0] + u)) else None
    pad = None if all(c == r for c in counts) else torch.tensor(
        [i * r + j for i, c in enumerate(counts) for j in range(c)], device=device)
    # the slots to gather, where not consecutive: none to make for one row a slot (the step's row slots are they)
    return SlotRuns(u, r, first, None if first is not None or r == 1 else torch.tensor(uniq, device=device), pad)


def window_buckets(max_len: int, smallest: int = 16) -> list[int]:
    """The windows a compiled CUDA decode step may attend over: powers of two from ``smallest`` below ``max_len``,
    then ``max_len``. A graph is captured for each at load; a step reads at most twice its longest context."""
    out, w = [], smallest
    while w < max_len:
        out.append(w)
        w *= 2
    return out + [max_len]


def window_from_buckets(positions: list[int], buckets: list[int]) -> int:
    """The smallest bucket holding the longest row's context."""
    need = max(positions) + 1
    return next(w for w in buckets if w >= need)


def row_buckets(max_rows: int) -> list[int]:
    """Padded decode batch sizes of the compiled CUDA step: powers of two up to the first one >= ``max_rows``."""
    return [1 << i for i in range((max(max_rows, 1) - 1).bit_length() + 1)]


class HostStaging:
    """A step's integer lists (token ids, slots, positions, ...) as int64 device tensors.

    CPU: one ``torch.tensor`` each, as they are used (no copy to make). CUDA: all of a step's lists packed into one
    pinned host buffer and copied with ``non_blocking=True``: one transfer that does not synchronise the host,
    where each ``torch.tensor(list, device=cuda)`` is a pageable copy that waits for the device. The pinned buffer
    comes from PyTorch's caching host allocator, which records the copy's stream event and reuses the block only
    once the copy has completed (CUDA's rule for asynchronous copies: the source must not be rewritten before the
    copy is done), so no step can overwrite a buffer still being read."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def to_device(self, *lists: list[int]) -> list[torch.Tensor]:
        if not self.cuda:
            return [torch.tensor(xs, dtype=torch.long, device=self.device) for xs in lists]
        flat = [v for xs in lists for v in xs]
        host = torch.tensor(flat, dtype=torch.long).pin_memory()
        dev = host.to(self.device, non_blocking=True)
        ends = list(accumulate(len(xs) for xs in lists))
        return [dev[e - len(xs): e] for xs, e in zip(lists, ends)]  # views of the one copy


def window_for(positions: list[int], bucket: int, max_len: int) -> int:
    """Keys a decode step attends over: the longest row's context, rounded up to ``bucket`` when rows share
    the step (one row: exact)."""
    need = max(positions) + 1
    if len(positions) == 1 and bucket <= 1:
        return need
    return min(-(-need // bucket) * bucket, max_len)


class StageWorker:
    """Runs one stage's layers for a step; the last stage also returns the logits of the rows that sample."""

    def __init__(self, weights: StageWeights, cache: KVCache, device: torch.device, dtype: torch.dtype,
                 compile_decode: bool = False, tp: TPGroup | None = None, max_rows: int | None = None,
                 cpp_wrapper: bool = False):
        """``max_rows``: most decode rows a step can have (every slot, and its draft rows when speculating).
        ``cpp_wrapper`` (CPU, compiled): the compiled step's wrapper is C++ (inductor's ``cpp_wrapper``), for a model
        so small that its step's time is the wrapper's calls, not its weights: a speculative draft (speculative.py)."""
        self.w, self.cache, self.device, self.dtype = weights, cache, device, dtype
        self.max_rows = max_rows or cache.n_slots
        self.tp = tp or TPGroup(1, 1, 0, device, dtype, weights.args.vocab_size)
        self.first, self.last = weights.first, weights.last
        self.cuda = device.type == "cuda"
        self.staging = HostStaging(device)
        self._busy_host = 0.0  # CPU: host time in steps
        self._busy_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA: (start, end) a step
        self._busy_done = 0.0  # CUDA: seconds of the event pairs already folded
        # CUDA graphs want few distinct shapes: rows padded to a power of two, and the window (the keys a step
        # attends over) rounded up to a power of two (``window_buckets``), a mask hiding each row's unwritten
        # tail; a graph for every pair is captured at load. On CPU a step attends over exactly the longest row's
        # context: compiled, the window is a dynamic size of one graph (built at load by ``warm_up``), which
        # reads ~10% less a batch-1 token than buckets of 256 did (the keys past the context, and their copy).
        # Eager CPU pads nothing.
        self.pow2_rows = compile_decode and self.cuda
        self.window_bucket = 64 if self.cuda else 1  # eager steps with a prompt chunk, and eager CUDA decode
        self.windows = window_buckets(cache.max_len) if compile_decode and self.cuda else None
        self._decode, self.compiled = self._decode_step, compile_decode
        if compile_decode:
            from torch import _dynamo  # noqa: F401  (loads the submodules without binding a local torch)
            from torch._inductor import config as _inductor_config  # noqa: F401

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            if self.cuda and hasattr(torch._inductor.config.triton, "cudagraph_dynamic_shape_warn_limit"):
                # one graph per (rows, window) bucket is the design (captured at load), not a shape leak
                torch._inductor.config.triton.cudagraph_dynamic_shape_warn_limit = None
            if self.cuda:  # the cache is written inside the graphs: give it fixed addresses
                for t in cache.k + cache.v:
                    torch._dynamo.mark_static_address(t)
            mode = "reduce-overhead" if self.cuda else None
            # CPU: inductor inlines a cheap producer into every consumer loop, so each dot product of a one-row
            # step recomputed the residual sums and the norm beside every weight vector it streamed (26 against
            # 43 GB/s for a plain input, 30M Llama's shapes). With the threshold at 1, a value that has several
            # users and reads more than one buffer (the residual stream) is stored once instead, which keeps
            # those loops near one input vector and one weight vector: a batch-1 token 3.7 -> 3.1 ms.
            options = None if self.cuda else {"realize_reads_threshold": 1}
            if not self.cuda and self.max_rows <= SERIAL_KERNEL_ROWS and cpu_int8_kernels(weights):
                # int8 layers on framework/kernels: their products are opaque calls that use every thread
                # themselves, and what inductor generates between them (norms, rope, attention) is too small to
                # pay for a parallel region each. Measured, one-row steps on 2 threads: the 125m shape 9.1 -> 4.7 ms
                # a step alone, framework.generate 101-136 -> 147-154 tok/s; 30M 2.4 -> 1.9 ms. Not for int4 (the
                # same engine run: 180-184 -> 151-163 tok/s), fp32 (inductor generates its products: 3.0 -> 5.6
                # ms) or batch 8 (4.2 -> 5.2 ms)
                options["cpp.threads"] = 1
            if not self.cuda and cpp_wrapper:
                options["cpp_wrapper"] = True
            # dynamic=None on both: after a second value of rows or window dynamo builds one graph in which they are
            # symbolic sizes (a handful of compilations at load, whatever the bucket count); on CUDA the CUDA-graph
            # trees then record one graph per concrete (rows, window), each at load (``warm_up``)
            self._decode = torch.compile(self._decode_step, mode=mode, dynamic=None, options=options)
        # cos / sin of every cache position, made once: a step looks its rows up. Computed inside a compiled CPU step
        # they were inlined into the attention's loops, a cos and a sin of the query's rotation for every key it
        # read (125m shape, batch 1: 66 us a layer of a ~4 ms step)
        self.rope_cos, self.rope_sin = rope(weights.inv_freq, torch.arange(cache.max_len, device=device), dtype)
        if compile_decode and self.cuda:  # read by the CUDA graphs where they are, never copied in a replay
            for t in (self.rope_cos, self.rope_sin):
                torch._dynamo.mark_static_address(t)

    # -- the layers -------------------------------------------------------------------------------------
    def _layers(self, x, positions, tok_slots, dec, segs):
        """x (N, D) for N tokens at ``positions`` (N,) written to slots ``tok_slots`` (N,). dec: (slots,
        positions, window) of the first n decode rows or None; segs: (slot, start, length) of prompt chunks."""
        w, cache = self.w, self.cache
        cos, sin = self.rope_cos.index_select(0, positions), self.rope_sin.index_select(0, positions)  # (N, 1, hd)
        n_dec = 0 if dec is None else dec[0].shape[0]
        bias = decode_mask(dec[1], dec[2], dec[4], x.dtype) if n_dec and dec[3] else None
        for i, layer in enumerate(w.layers):
            kc, vc = cache.k[i], cache.v[i]
            h = layer.input_norm(x)
            q, k, v = layer.qkv(h).split(layer.qkv_sizes, dim=-1)
            q = apply_rope(q.view(q.shape[0], -1, w.head_dim), cos, sin)  # (N, H, hd)
            k = apply_rope(k.view(k.shape[0], -1, w.head_dim), cos, sin)  # (N, KV, hd)
            kc[tok_slots, :, positions] = k  # each token's keys and values at its slot and position
            vc[tok_slots, :, positions] = v.view(k.shape)
            parts = []
            if n_dec:
                parts.append(decode_attention(q[:n_dec], kc, vc, *dec, bias=bias))
            off = n_dec
            for slot, start, length in segs:
                parts.append(prefill_attention(q[off: off + length], kc, vc, slot, start))
                off += length
            a = parts[0] if len(parts) == 1 else torch.cat(parts)
            x = x + self.tp.all_reduce(layer.o(a))  # row-parallel: each tp rank holds a part of the sum
            gate, up = layer.gate_up(layer.post_norm(x)).chunk(2, dim=-1)
            x = x + self.tp.all_reduce(layer.down(F.silu(gate) * up))
        return x

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tp.embed(self.w.embed.weight, ids)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_vocab(self.w.lm_head(self.w.norm(x)))

    def _decode_step(self, x, slots, positions, window: int, masked: bool, runs: SlotRuns | None = None):
        """Decode-only step (the compiled one, with ``runs`` None): one token per row."""
        if self.first:
            x = self._embed(x)
        x = self._layers(x, positions, slots, (slots, positions, window, masked, runs), [])
        return self._head(x) if self.last else x

    # -- a step -------------------------------------------------------------------------------------------
    @property
    def busy_s(self) -> float:
        """Seconds this rank's device spent in steps: host time on CPU; on CUDA the time between CUDA events
        recorded on the stream around each step's kernels (the host only enqueues them, so its clock would measure
        the enqueue). Reading it on CUDA waits for the steps still running."""
        if not self.cuda:
            return self._busy_host
        self._fold_busy(wait=True)
        return self._busy_done

    @busy_s.setter
    def busy_s(self, value: float) -> None:
        self._busy_host = self._busy_done = value
        self._busy_events = []

    def _fold_busy(self, wait: bool) -> None:
        """Add up the event pairs whose steps have finished (all of them when ``wait``)."""
        keep = []
        for start, end in self._busy_events:
            if wait or end.query():
                end.synchronize()
                self._busy_done += start.elapsed_time(end) / 1e3
            else:
                keep.append((start, end))
        self._busy_events = keep

    @torch.inference_mode()
    def step(self, plan, x: torch.Tensor | None) -> torch.Tensor:
        """Run the step described by ``plan`` (a step.StepPlan) on x: on the first stage token ids (N,), or
        None to take ``plan.tokens`` (staged with the step's other lists in one copy); hidden states (N, D) on the
        others. Returns hidden states (N, D), or on the last stage the logits (n_sample, V) of the rows that
        sample, in plan order (then those of the prompt rows it scores, ``StepPlan.score_rows``)."""
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        out = self._decode_only(plan, x) if not plan.segs else self._mixed(plan, x)
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._busy_events.append((start, end))
            if len(self._busy_events) > 64:
                self._fold_busy(wait=False)
        else:
            self._busy_host += time.perf_counter() - t0
        return out

    def _mixed(self, plan, x: torch.Tensor | None) -> torch.Tensor:
        """A step with prompt chunks (and maybe decode rows): eager."""
        n_dec = len(plan.dec_slots)
        lists = [plan.token_positions(), plan.token_slots()]
        if self.last:  # the rows whose logits leave the stage: the sampled ones, then the scored prompt rows
            lists.append(plan.sample_rows() + plan.score_rows()[0])
        if x is None:
            lists.append(plan.tokens)
        staged = self.staging.to_device(*lists)
        positions, tok_slots = staged[0], staged[1]
        if x is None:
            x = staged[-1]
        dec = None
        if n_dec:
            win = window_for(plan.dec_pos, self.window_bucket, self.cache.max_len)
            dec = (tok_slots[:n_dec], positions[:n_dec], win, n_dec > 1 or win != plan.dec_pos[0] + 1,
                   slot_runs(plan.dec_slots, self.device))
        h = self._embed(x) if self.first else x
        h = self._layers(h, positions, tok_slots, dec, plan.segs)
        if self.last:
            h = self._head(h.index_select(0, staged[2]))
        return h

    def warm_up(self, rows: int) -> None:
        """Compile the decode step at load, for ``rows`` rows (on the scratch slot), so that the first request
        does not pay for it. On CUDA every (rows, window) bucket a step can use is compiled and its CUDA graph
        captured now (``max_rows`` below), so no capture happens while serving. Every tp rank of a stage calls it
        together (the graph holds the all-reduce)."""
        if not self.compiled:
            return
        from framework.infer.step import StepPlan

        def run(n: int, pos: int) -> None:
            x = (None if self.first  # as a real step calls it: x made outside inference mode (a guard of the graph)
                 else torch.zeros(n, self.w.args.dim, dtype=self.dtype, device=self.device))
            self.step(StepPlan(dec_slots=[self.cache.scratch] * n, dec_pos=[pos] * n, tokens=[0] * n), x)

        if not self.cuda:
            # on CPU a second window makes dynamo build the graph whose window is dynamic, the one every step uses;
            # where steps may have more rows (draft rows, a larger batch), two more row counts make the rows dynamic
            # too (a one-row step keeps its own graph: its linears are the row-dot reductions), so that no
            # verification step compiles while serving
            for pos in (0, 1) if self.cache.max_len > 1 else (0,):
                run(rows, pos)
            for n in range(rows + 1, min(rows + 2, self.max_rows) + 1):
                run(n, 1)
            # past a linear's kernel rows (``path_rows``) the graph is another one: built now too, where a step may
            # have that many rows (a draft catching up 4 sequences 8 tokens each took 1.1 s to compile mid-run)
            for limit in path_rows(self.w):
                for n in range(limit + 1, min(limit + 2, self.max_rows) + 1):
                    run(n, 1)
        else:
            # A decode step has at most every slot decoding (with its draft rows): every padded row count up to that,
            # with every window.
            # The CUDA-graph trees run a new shape once eagerly (their warm-up), record it on the next call and
            # replay it after: three calls leave every graph recorded. The two windows first make dynamo's one
            # graph with a symbolic window before the row counts vary.
            for n in row_buckets(self.max_rows):
                for w in self.windows:
                    for _ in range(3):
                        run(n, w - 1)
            torch.cuda.synchronize(self.device)
        self.busy_s = 0.0

    def time_rows(self, rows: list[int], context: int = 256, reps: int = 3, warm: int = 2) -> list[float]:
        """Seconds of a decode step of r rows for each r of ``rows``, laid out as a speculating step lays them out:
        over min(r, slots) slots (runs of one slot each), every row at about ``context`` positions (capped by the
        cache). ``warm`` untimed rounds of every count first (right after loading, the first few dozen steps ran
        1.2-2x slower than later ones here: a first round of 1-20 rows at batch 4 took 10.7-12.8 ms where the next
        took 5.3-12.7, which made the verification rows look nearly free), then ``reps`` timed rounds, each over
        every count in turn (a slow spell falls on all counts alike); a count's time is its fastest. It writes only
        keys and values past ``context`` of slots no request holds yet (a request's prefill writes its own before
        any row reads them). Every tp rank of a stage calls it together."""
        from framework.infer.step import StepPlan

        n_slots, ctx = self.cache.n_slots, max(0, min(context, self.cache.max_len - 1 - max(rows)))
        steps = []
        for n in rows:
            u = min(n, n_slots)
            counts = [n // u + (i < n % u) for i in range(u)]
            slots = [s for s, c in enumerate(counts) for _ in range(c)]
            pos = [min(ctx + j, self.cache.max_len - 1) for c in counts for j in range(c)]
            x = None if self.first else torch.zeros(n, self.w.args.dim, dtype=self.dtype, device=self.device)
            steps.append((StepPlan(dec_slots=slots, dec_pos=pos, tokens=[0] * n), x))
        best = [float("inf")] * len(steps)
        for r in range(warm + reps):
            for i, (plan, x) in enumerate(steps):
                if self.cuda:
                    torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                self.step(plan, x)
                if self.cuda:
                    torch.cuda.synchronize(self.device)
                if r >= warm:
                    best[i] = min(best[i], time.perf_counter() - t0)
        self.busy_s = 0.0
        return best

    def _decode_only(self, plan, x: torch.Tensor | None) -> torch.Tensor:
        n = len(plan.dec_slots)
        slots, pos = list(plan.dec_slots), list(plan.dec_pos)
        padded = 1 << (n - 1).bit_length() if self.pow2_rows else n
        tokens = list(plan.tokens) if x is None else []
        if padded > n:  # padding rows write to the scratch slot at position 0
            slots += [self.cache.scratch] * (padded - n)
            pos += [0] * (padded - n)
            if x is None:
                tokens += [0] * (padded - n)
            else:
                x = torch.cat([x, x.new_zeros((padded - n, *x.shape[1:]))])
        if self.windows is not None:
            win = window_from_buckets(plan.dec_pos, self.windows)
        else:
            win = window_for(plan.dec_pos, self.window_bucket, self.cache.max_len)
        staged = self.staging.to_device(slots, pos, *([tokens] if x is None else []))
        t_slots, t_pos = staged[0], staged[1]
        if x is None:
            x = staged[2]
        masked = self.compiled or padded > 1 or win != pos[0] + 1  # compiled: one graph whatever the row's length
        if not self.compiled:  # eager: each slot's cache read once (slot_runs)
            out = self._decode_step(x, t_slots, t_pos, win, masked, slot_runs(slots, self.device))
        else:
            if self.compiled and self.cuda:
                # The outputs of the previous replay are no longer read (the rule of CUDA-graph trees for
                # inference loops: mark each iteration so the static buffers may be rewritten).
                torch.compiler.cudagraph_mark_step_begin()
            out = self._decode(x, t_slots, t_pos, win, masked)
        out = out[:n] if padded > n else out
        if self.compiled and self.cuda and not self.last:
            # ``out`` lives in the graph's static output buffer, which the next replay (another lane's step)
            # rewrites, while the isend of these hidden states to the next stage runs on NCCL's stream and may not
            # have read them yet: hand over a copy of our own (the caching allocator keeps it alive until the send
            # is done). The last stage's logits need none: the sampler reads them on this stream before the next
            # step is enqueued.
            out = out.clone()
        return out


@torch.inference_mode()
def forward_logits(weights: StageWeights, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of a whole model (one stage holding everything) over token ids (B, T): causal, no
    cache. What ``framework.eval`` scores with, through the same loaded weights as generation."""
    w = weights
    B, T = tokens.shape
    x = w.embed(tokens)  # (B, T, D)
    positions = torch.arange(T, device=tokens.device)
    cos, sin = rope(w.inv_freq, positions, x.dtype)  # (T, 1, hd)
    cos, sin = cos.transpose(0, 1)[None], sin.transpose(0, 1)[None]  # (1, 1, T, hd)
    hd = w.head_dim
    for layer in w.layers:
        h = layer.input_norm(x)
        q, k, v = layer.qkv(h).split(layer.qkv_sizes, dim=-1)
        q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        x = x + layer.o(y.transpose(1, 2).reshape(B, T, -1))
        gate, up = layer.gate_up(layer.post_norm(x)).chunk(2, dim=-1)
        x = x + layer.down(F.silu(gate) * up)
    return w.lm_head(w.norm(x))
