"""The step plan: what one lane's step runs, decided by the scheduler at stage 0 and carried to every stage.

A ``StepPlan`` is a few integer lists (slots, positions, chunk bounds, new rows' sampling parameters, input token
ids) encoded into one fixed-size int64 tensor, so that every stage can post the receive for the next plan before
it computes. The scheduler builds plans; the engine, the transport, the workers and the draft proposer read them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import torch

from framework.infer.sampler import MAX_LOGPROBS

GO, STOP = 1, 0


def _f2i(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _i2f(x: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(x)))[0]


@dataclass
class StepPlan:
    """One step of one lane. Tokens are laid out as: one per decode row, then each prompt chunk in turn. A decode
    row that speculates is followed by its draft rows: the same slot at the next positions, the drafts as tokens."""

    lane: int = 0
    flag: int = GO
    dec_slots: list[int] = field(default_factory=list)
    dec_pos: list[int] = field(default_factory=list)  # position of each decode row's input token
    segs: list[tuple[int, int, int]] = field(default_factory=list)  # (slot, start, length) prompt chunks
    seg_sample: list[int] = field(default_factory=list)  # 1 where a chunk ends its prompt (sample after it)
    # prompt_logprobs: per chunk, the token after its last one when its rows are scored (-1: the chunk ends the
    # prompt, its last row samples instead), or -2 when they are not scored
    seg_next: list[int] = field(default_factory=list)
    new_slots: list[int] = field(default_factory=list)  # rows that appear for the first time
    # (temperature, top_k, top_p, repetition_penalty, seed, top logprobs: -1 none) of each new row
    new_params: list[tuple[float, int, float, float, int, int]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # input token ids, in token order

    HEADER = 8

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def token_positions(self) -> list[int]:
        pos = list(self.dec_pos)
        for _, start, length in self.segs:
            pos.extend(range(start, start + length))
        return pos

    def token_slots(self) -> list[int]:
        slots = list(self.dec_slots)
        for slot, _, length in self.segs:
            slots.extend([slot] * length)
        return slots

    def dec_groups(self) -> list[tuple[int, int, int]]:
        """(slot, first row, rows) of each decoding sequence: its input row and the draft rows after it."""
        groups = []
        for i, slot in enumerate(self.dec_slots):
            if groups and groups[-1][0] == slot:
                groups[-1] = (slot, groups[-1][1], groups[-1][2] + 1)
            else:
                groups.append((slot, i, 1))
        return groups

    def sample_rows(self) -> list[int]:
        """Indices (in token order) of the tokens whose logits are sampled: every decode row, and the last
        token of each chunk that ends a prompt."""
        rows, off = list(range(len(self.dec_slots))), len(self.dec_slots)
        for (_, _, length), s in zip(self.segs, self.seg_sample):
            off += length
            if s:
                rows.append(off - 1)
        return rows

    def sample_slots_positions(self) -> tuple[list[int], list[int]]:
        """Slot and position (of the token to be drawn) of every sampled row."""
        slots = list(self.dec_slots)
        pos = [p + 1 for p in self.dec_pos]
        for (slot, start, length), s in zip(self.segs, self.seg_sample):
            if s:
                slots.append(slot)
                pos.append(start + length)
        return slots, pos

    @property
    def n_sample(self) -> int:
        return len(self.dec_slots) + sum(self.seg_sample)

    def score_rows(self) -> tuple[list[int], list[int], list[int]]:
        """Prompt rows whose next token is scored (prompt_logprobs), in token order, with that token and the
        row's slot: every row of a scored chunk but a sampling last row. (rows, target ids, slots)"""
        rows, targets, slots = [], [], []
        off = len(self.dec_slots)
        for (slot, _, length), nxt in zip(self.segs, self.seg_next):
            if nxt != -2:
                n = length if nxt >= 0 else length - 1
                rows.extend(range(off, off + n))
                targets.extend(self.tokens[off + 1: off + length] + ([nxt] if nxt >= 0 else []))
                slots.extend([slot] * n)
            off += length
        return rows, targets, slots

    # -- wire format ------------------------------------------------------------------------------------
    def encode(self, capacity: int) -> torch.Tensor:
        n_dec, n_seg, n_new = len(self.dec_slots), len(self.segs), len(self.new_slots)
        body = [self.flag, self.lane, n_dec, n_seg, n_new, len(self.tokens), 0, 0]
        body += self.dec_slots + self.dec_pos
        nexts = self.seg_next or [-2] * n_seg
        for (slot, start, length), s, nxt in zip(self.segs, self.seg_sample, nexts):
            body += [slot, start, length, s, nxt]
        for slot, (t, k, p, r, seed, lp) in zip(self.new_slots, self.new_params):
            body += [slot, _f2i(t), k, _f2i(p), _f2i(r), seed, lp]
        body += self.tokens
        if len(body) > capacity:
            raise ValueError(f"step plan of {len(body)} ints exceeds its buffer of {capacity}")
        out = torch.zeros(capacity, dtype=torch.int64)
        out[: len(body)] = torch.tensor(body, dtype=torch.int64)
        return out

    @classmethod
    def decode(cls, buf: torch.Tensor) -> StepPlan:
        v = buf.tolist()
        flag, lane, n_dec, n_seg, n_new, n_tok = v[:6]
        i = cls.HEADER
        plan = cls(lane=lane, flag=flag)
        plan.dec_slots, plan.dec_pos = v[i: i + n_dec], v[i + n_dec: i + 2 * n_dec]
        i += 2 * n_dec
        for _ in range(n_seg):
            slot, start, length, s, nxt = v[i: i + 5]
            plan.segs.append((slot, start, length))
            plan.seg_sample.append(s)
            plan.seg_next.append(nxt)
            i += 5
        for _ in range(n_new):
            slot, t, k, p, r, seed, lp = v[i: i + 7]
            plan.new_slots.append(slot)
            plan.new_params.append((_i2f(t), k, _i2f(p), _i2f(r), seed, lp))
            i += 7
        plan.tokens = v[i: i + n_tok]
        return plan

    @staticmethod
    def capacity(n_slots: int, prefill_chunk: int, draft_rows: int = 0) -> int:
        """Ints a plan can need: every slot decoding (and at most ``draft_rows`` draft rows), admitted and chunked in
        one step, plus the prompt tokens."""
        return StepPlan.HEADER + n_slots * (2 + 5 + 7 + 1) + draft_rows * 3 + prefill_chunk

    @staticmethod
    def reply_capacity(n_slots: int, prefill_chunk: int, draft_rows: int = 0) -> int:
        """Ints a step's reply can need: every row sampling with the most alternatives, every prompt row scored."""
        row = 1 + 2 * MAX_LOGPROBS
        return (n_slots + draft_rows) * (1 + row) + prefill_chunk * row
