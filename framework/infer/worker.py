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
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from framework.infer.cache import KVCache
from framework.infer.tensor_parallel import TPGroup
from framework.models.llama import Llama, rope_inv_freq


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


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor,
                     positions: torch.Tensor, window: int, masked: bool, block: int | None = None) -> torch.Tensor:
    """One new query a row against its cached keys 0..position, within the first ``window`` positions of the
    cache. q (B, H, hd) -> (B, H*hd). One row whose window is exactly its context needs no mask. Rows whose slots
    are known on the host to be the block ``block .. block+B-1`` (eager only) read a view of the cache instead of
    a gathered copy."""
    B, H, hd = q.shape
    if block is not None:
        k, v = kc[block: block + B, :, :window], vc[block: block + B, :, :window]
    else:
        k = kc[:, :, :window].index_select(0, slots)  # (B, KV, W, hd)
        v = vc[:, :, :window].index_select(0, slots)
    kv = k.shape[1]
    qg = q.view(B, kv, H // kv, hd)  # grouped-query heads share their K/V head: a reshape, no copy
    scores = torch.matmul(qg, k.transpose(-1, -2)) * hd**-0.5  # (B, KV, G, W)
    if masked:
        hidden = torch.arange(window, device=q.device)[None, :] > positions[:, None]  # (B, W)
        scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
    p = scores.float().softmax(-1).to(q.dtype)
    return torch.matmul(p, v).reshape(B, H * hd)


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


def contiguous_block(slots: list[int]) -> int | None:
    """The first slot when ``slots`` are consecutive (s, s+1, ...), else None."""
    return slots[0] if slots[-1] - slots[0] == len(slots) - 1 and slots == list(range(slots[0], slots[-1] + 1)) else None


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
                 compile_decode: bool = False, tp: TPGroup | None = None):
        self.w, self.cache, self.device, self.dtype = weights, cache, device, dtype
        self.tp = tp or TPGroup(1, 1, 0, device, dtype, weights.args.vocab_size)
        self.first, self.last = weights.first, weights.last
        self.busy_s = 0.0
        self.cuda = device.type == "cuda"
        # CUDA graphs want few distinct shapes: rows padded to a power of two, and every step attends over the
        # whole cache (a mask hides the unwritten tail), as gpt-fast does. On CPU a step attends over exactly the
        # longest row's context: compiled, the window is a dynamic size of one graph (built at load by
        # ``warm_up``), which reads ~10% less a batch-1 token than buckets of 256 did (the keys past the context,
        # and their copy). Eager CPU pads nothing.
        self.pow2_rows = compile_decode and self.cuda
        self.window_bucket = (cache.max_len if compile_decode else 64) if self.cuda else 1
        self._decode, self.compiled = self._decode_step, compile_decode
        if compile_decode:
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
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
            self._decode = torch.compile(self._decode_step, mode=mode, dynamic=False if self.cuda else None,
                                         options=options)

    # -- the layers -------------------------------------------------------------------------------------
    def _layers(self, x, positions, tok_slots, dec, segs):
        """x (N, D) for N tokens at ``positions`` (N,) written to slots ``tok_slots`` (N,). dec: (slots,
        positions, window) of the first n decode rows or None; segs: (slot, start, length) of prompt chunks."""
        w, cache = self.w, self.cache
        cos, sin = rope(w.inv_freq, positions, x.dtype)
        n_dec = 0 if dec is None else dec[0].shape[0]
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
                parts.append(decode_attention(q[:n_dec], kc, vc, *dec))
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

    def _decode_step(self, x, slots, positions, window: int, masked: bool, block: int | None = None):
        """Decode-only step (the compiled one, with ``block`` None): one token per row."""
        if self.first:
            x = self._embed(x)
        x = self._layers(x, positions, slots, (slots, positions, window, masked, block), [])
        return self._head(x) if self.last else x

    # -- a step -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, plan, x: torch.Tensor) -> torch.Tensor:
        """Run the step described by ``plan`` (a scheduler.StepPlan) on x: token ids (N,) on the first stage,
        hidden states (N, D) on the others. Returns hidden states (N, D), or on the last stage the logits
        (n_sample, V) of the rows that sample, in plan order."""
        t0 = time.perf_counter()
        dev = self.device
        n_dec = len(plan.dec_slots)
        if not plan.segs:
            out = self._decode_only(plan, x)
        else:
            positions = torch.tensor(plan.token_positions(), dtype=torch.long, device=dev)
            tok_slots = torch.tensor(plan.token_slots(), dtype=torch.long, device=dev)
            dec = None
            if n_dec:
                win = window_for(plan.dec_pos, self.window_bucket, self.cache.max_len)
                dec = (tok_slots[:n_dec], positions[:n_dec], win, n_dec > 1 or win != plan.dec_pos[0] + 1,
                       contiguous_block(plan.dec_slots))
            h = self._embed(x) if self.first else x
            h = self._layers(h, positions, tok_slots, dec, plan.segs)
            if self.last:
                h = self._head(h.index_select(0, torch.tensor(plan.sample_rows(), dtype=torch.long, device=dev)))
            out = h
        self.busy_s += time.perf_counter() - t0
        return out

    def warm_up(self, rows: int) -> None:
        """Compile the decode step at load, for ``rows`` rows (on the scratch slot), so that the first request
        does not pay for it. Every tp rank of a stage calls it together (the graph holds the all-reduce)."""
        if not self.compiled:
            return
        from framework.infer.scheduler import StepPlan

        x = (torch.zeros(rows, dtype=torch.long, device=self.device) if self.first
             else torch.zeros(rows, self.w.args.dim, dtype=self.dtype, device=self.device))
        # on CPU a second window makes dynamo build the graph whose window is dynamic, the one every step uses
        for pos in (0, 1) if not self.cuda and self.cache.max_len > 1 else (0,):
            plan = StepPlan(dec_slots=[self.cache.scratch] * rows, dec_pos=[pos] * rows, tokens=[0] * rows)
            self.step(plan, x)  # as a real step calls it: x made outside inference mode (a guard of the graph)
        self.busy_s = 0.0

    def _decode_only(self, plan, x: torch.Tensor) -> torch.Tensor:
        n = len(plan.dec_slots)
        slots, pos = list(plan.dec_slots), list(plan.dec_pos)
        padded = 1 << (n - 1).bit_length() if self.pow2_rows else n
        if padded > n:  # padding rows write to the scratch slot at position 0
            slots += [self.cache.scratch] * (padded - n)
            pos += [0] * (padded - n)
            pad_shape = (padded - n,) if self.first else (padded - n, x.shape[-1])
            x = torch.cat([x, torch.zeros(pad_shape, dtype=x.dtype, device=x.device)])
        win = window_for(plan.dec_pos, self.window_bucket, self.cache.max_len)
        t_slots = torch.tensor(slots, device=self.device)
        t_pos = torch.tensor(pos, device=self.device)
        masked = self.compiled or padded > 1 or win != pos[0] + 1  # compiled: one graph whatever the row's length
        block = None if self.compiled else contiguous_block(slots)
        if block is not None:  # eager, slots in one block: views of the cache
            out = self._decode_step(x, t_slots, t_pos, win, masked, block)
        else:
            out = self._decode(x, t_slots, t_pos, win, masked)
        return out[:n] if padded > n else out


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
