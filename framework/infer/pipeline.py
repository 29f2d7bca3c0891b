"""The pipeline schedule: prefill, then a decode ring with several micro-batches in flight.

Every stage runs the same deterministic schedule over the micro-batches of a batch. Stage 0 embeds and runs its
layers, each stage passes hidden states on (point-to-point, NCCL or gloo), and the last stage samples and sends
the token ids back to stage 0. While micro-batch m is on stage s, micro-batch m+1 is on stage s-1, so with at
least as many micro-batches as stages no stage waits. When every row of a micro-batch has finished, stage 0
sends a STOP for it down the chain and all stages drop it from their rotation.

Prompts of different lengths share a micro-batch through left padding, with per-row positions and masks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from framework.infer.sampling import SamplingParams, sample_token
from framework.models.llama import KVCache, Llama

GO, STOP = 1, 0


@dataclass
class Request:
    index: int
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class RowState:
    request: Request
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""
    generator: torch.Generator | None = None
    t_first: float | None = None
    t_last: float | None = None


@dataclass
class MicroBatch:
    rows: list[Request]
    pad: torch.Tensor  # (b,) left padding of each row
    length: int  # padded prompt length
    cache_len: int = 0  # positions written to the cache so far
    caches: dict | None = None
    padded: bool = True  # any row left-padded (decode then needs a mask)


def build_micro_batch(rows: list[Request], pad_id: int, device) -> tuple[MicroBatch, torch.Tensor]:
    length = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    pad = torch.zeros(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.prompt_ids)
        ids[i, length - n:] = torch.tensor(r.prompt_ids)
        pad[i] = length - n
    return MicroBatch(rows=rows, pad=pad.to(device), length=length, padded=bool(pad.any())), ids.to(device)


def prefill_inputs(mb: MicroBatch):
    """positions (b, L) and boolean mask (b, 1, L, L): causal, padding keys hidden (pad rows see themselves)."""
    L = mb.length
    ar = torch.arange(L, device=mb.pad.device)
    positions = (ar[None, :] - mb.pad[:, None]).clamp(min=0)
    if not mb.padded:
        return positions, None  # plain causal attention
    causal = ar[None, :] <= ar[:, None]  # (L, L)
    keys_ok = ar[None, :] >= mb.pad[:, None]  # (b, L)
    mask = causal[None] & keys_ok[:, None, :]
    mask = mask | torch.eye(L, dtype=torch.bool, device=mask.device)[None]
    return positions, mask[:, None]


def decode_inputs(mb: MicroBatch):
    """positions (b, 1) and mask (b, 1, 1, S) for one new token at cache position ``mb.cache_len``."""
    S = mb.cache_len + 1
    positions = (mb.cache_len - mb.pad)[:, None]
    if not mb.padded:
        return positions, None  # no padding: the new token sees the whole cache
    mask = torch.arange(S, device=mb.pad.device)[None, :] >= mb.pad[:, None]
    return positions, mask[:, None, None, :]


class StageRunner:
    """Runs one stage's share of every micro-batch, and (on the last stage) sampling."""

    def __init__(self, model: Llama, stage: int, pp: int, device: torch.device, dtype: torch.dtype, tokenizer=None,
                 eos_id: int | None = None, pad_id: int = 0):
        self.model, self.stage, self.pp, self.device, self.dtype = model, stage, pp, device, dtype
        self.first, self.last = stage == 0, stage == pp - 1
        self.tokenizer, self.eos_id, self.pad_id = tokenizer, eos_id, pad_id
        self.busy_s = 0.0
        args = model.args
        self.kv_heads, self.head_dim, self.dim = args.kv_heads, args.head_dim, args.dim

    # -- compute ----------------------------------------------------------------------------------
    def _alloc_caches(self, mb: MicroBatch, max_new: int) -> None:
        S = mb.length + max_new
        mb.caches = {k: KVCache(len(mb.rows), self.kv_heads, S, self.head_dim, self.dtype, self.device)
                     for k in self.model.model.layers.keys()}

    @torch.inference_mode()
    def forward(self, mb: MicroBatch, x: torch.Tensor, prefill: bool) -> torch.Tensor:
        t0 = time.perf_counter()
        positions, mask = prefill_inputs(mb) if prefill else decode_inputs(mb)
        kw = {"tokens": x} if self.first else {"hidden": x}
        out = self.model(**kw, positions=positions, mask=mask, caches=mb.caches, cache_start=mb.cache_len)
        mb.cache_len += x.shape[1]
        if self.last:
            out = out[:, -1].float()  # (b, V) logits of the newest position
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.busy_s += time.perf_counter() - t0
        return out

    def sample(self, mb: MicroBatch, logits: torch.Tensor, states: list[RowState]) -> tuple[torch.Tensor, bool]:
        """Sample one token per row; update finish state; returns (token ids (b,), all finished)."""
        t0 = time.perf_counter()
        now = time.perf_counter()
        tokens = []
        greedy = logits.argmax(-1).tolist()  # one batched argmax serves every plain-greedy row
        for i, st in enumerate(states):
            if st.finish_reason is not None:
                tokens.append(self.pad_id)
                continue
            p = st.request.params
            if p.temperature <= 0 and p.repetition_penalty == 1.0:
                tok = greedy[i]
            else:
                seen = torch.tensor(st.request.prompt_ids + st.generated, dtype=torch.long, device=logits.device)
                tok = sample_token(logits[i], p, seen, st.generator)
            st.generated.append(tok)
            st.t_first = st.t_first or now
            st.t_last = now
            tokens.append(tok)
            if self.eos_id is not None and tok == self.eos_id and not p.ignore_eos:
                st.finish_reason = "stop"
            elif p.stop and self.tokenizer is not None:
                text = self.tokenizer.decode(st.generated, skip_special_tokens=True)
                hit = [text.index(s) for s in p.stop if s in text]
                if hit:
                    st.finish_reason, st.text = "stop", text[: min(hit)]
            if st.finish_reason is None and len(st.generated) >= p.max_new_tokens:
                st.finish_reason = "length"
        self.busy_s += time.perf_counter() - t0
        done = all(st.finish_reason is not None for st in states)
        return torch.tensor(tokens, dtype=torch.long, device=self.device), done

    # -- point-to-point ---------------------------------------------------------------------------
    # One message a hop: the control flag rides in the last element of the activations and the first element of
    # the token ids, so each hop costs one wake-up of the receiver, not two. Every message is sent with isend, and
    # the receive for the next message is posted before this stage computes: gloo (like NCCL) moves the bytes only
    # once the receiver has posted its buffer, so a receive posted late puts a round trip on the critical path.
    def _send_hidden(self, flag: int, hidden: torch.Tensor | None, numel: int, dst: int):
        msg = torch.empty(numel + 1, dtype=self.dtype, device=self.device)
        msg[:numel] = 0 if hidden is None else hidden.reshape(-1)
        msg[numel] = flag
        return dist.isend(msg, dst)

    def _send_tokens(self, flag: int, tokens: torch.Tensor, dst: int):
        return dist.isend(torch.cat([torch.tensor([flag], dtype=torch.long, device=self.device), tokens]), dst)

    # -- the schedule -----------------------------------------------------------------------------
    def run_batch(self, requests: list[Request], n_micro: int, on_done=None) -> list[RowState] | None:
        """Generate for ``requests`` (every stage calls this with the same list); the last stage returns states."""
        n_micro = max(1, min(n_micro, len(requests)))
        chunks = [requests[i::n_micro] for i in range(n_micro)]
        chunks = [c for c in chunks if c]
        max_new = max(r.params.max_new_tokens for r in requests)
        mbs, ids = [], []
        for rows in chunks:
            mb, x = build_micro_batch(rows, self.pad_id, self.device)
            self._alloc_caches(mb, max_new)
            mbs.append(mb)
            ids.append(x)
        states = None
        if self.last:
            states = [[RowState(r, generator=torch.Generator().manual_seed(r.params.seed)) for r in mb.rows]
                      for mb in mbs]
        if self.pp == 1:
            return self._run_single(mbs, ids, states, on_done)
        nxt, pending = self.stage + 1, []
        active = list(range(len(mbs)))
        prefilled = [False] * len(mbs)

        def hidden_numel(m: int) -> int:
            return len(mbs[m].rows) * (1 if prefilled[m] else mbs[m].length) * self.dim

        # Stage 0 hears token ids from the last stage, every other stage hidden states from the one before. Both
        # arrive in the rotation order of ``active``, so the size of the next message is always known.
        src = self.pp - 1 if self.first else self.stage - 1
        inbox = _Inbox(src, torch.long if self.first else self.dtype, self.device)
        expect = (lambda m: len(mbs[m].rows) + 1) if self.first else (lambda m: hidden_numel(m) + 1)
        inbox.post(expect(0))
        if self.first:
            for m in active:
                out = self.forward(mbs[m], ids[m], prefill=True)
                pending.append(self._send_hidden(GO, out, out.numel(), nxt))
                prefilled[m] = True
        i = 0
        while active:
            m = active[i]
            msg = inbox.take()
            flag = int(msg[0]) if self.first else int(msg[-1].item())
            if flag == STOP:  # every row of m is finished: pass the word on and drop m from the rotation
                if not self.last:
                    pending.append(self._send_hidden(STOP, None, hidden_numel(m), nxt))
                active.pop(i)
                if self.first and on_done:
                    on_done(len(mbs[m].rows))
            else:
                i += 1
                was_prefilled, prefilled[m] = prefilled[m], True
            if active:
                i %= len(active)
                inbox.post(expect(active[i]))  # the next message may now arrive while this stage computes
            if flag == STOP:
                continue
            if self.first:
                out = self.forward(mbs[m], msg[1:, None], prefill=False)
            else:
                hidden = msg[:-1].view(len(mbs[m].rows), -1, self.dim)
                out = self.forward(mbs[m], hidden, prefill=not was_prefilled)
            if self.last:
                tokens, done = self.sample(mbs[m], out, states[m])
                pending.append(self._send_tokens(STOP if done else GO, tokens, 0))
            else:
                pending.append(self._send_hidden(GO, out, out.numel(), nxt))
            # Free the buffers of sends that completed, so memory stays flat on long generations.
            pending = [w for w in pending if not w.is_completed()]
        for w in pending:
            w.wait()
        return [st for mb_states in states for st in mb_states] if self.last else None

    def _run_single(self, mbs, ids, states, on_done):
        """pp=1: the same schedule without communication (micro-batches still bound memory per step)."""
        for m, mb in enumerate(mbs):
            tokens, done = self.sample(mb, self.forward(mb, ids[m], prefill=True), states[m])
            while not done:
                tokens, done = self.sample(mb, self.forward(mb, tokens[:, None], prefill=False), states[m])
            if on_done:
                on_done(len(mb.rows))
        return [st for mb_states in states for st in mb_states]


class _Inbox:
    """Receives from one peer in order, with the next message's buffer posted ahead of time."""

    def __init__(self, src: int, dtype: torch.dtype, device: torch.device):
        self.src, self.dtype, self.device = src, dtype, device
        self.posted: list[tuple[torch.Tensor, object]] = []

    def post(self, numel: int) -> None:
        buf = torch.empty(numel, dtype=self.dtype, device=self.device)
        self.posted.append((buf, dist.irecv(buf, self.src)))

    def take(self) -> torch.Tensor:
        buf, work = self.posted.pop(0)
        work.wait()
        return buf
