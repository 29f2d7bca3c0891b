"""Per-device memory and the decode latency floor of an inference layout (pp stages x tp ranks, static KV cache).

Each stage holds its layers (stage 0 the embedding, the last stage the final norm and the head); inside a stage
tp ranks split q/k/v/gate/up by rows and o/down by columns, the embedding and the head by vocabulary. The KV cache
is static per slot: slots x kv_heads/tp x max_len x head_dim x 2 (k and v) x layers x bytes. Decode at batch 1
reads every weight once per token, stage after stage: its floor is the weights' bytes over the memory bandwidth
of tp devices, plus one message per stage hop and two all-reduces a layer inside a stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from framework.models.llama import ModelArgs
from framework.plan.devices import Device
from framework.weights.dtypes import element_bytes
from framework.weights.layout import split_layers

GiB = 2**30
QUANT_BYTES = {None: None, "int8": 1.0, "int4": 0.5}


@dataclass
class StagePlan:
    layers: int
    weights: float  # bytes on one tp rank of the stage
    kv_per_slot: float  # bytes of one slot's KV cache on one tp rank
    workspace: float  # activations of one prefill chunk
    slots_fit: int  # the most slots that fit beside the weights


@dataclass
class InferPlan:
    device: Device
    pp: int
    tp: int
    max_batch: int
    max_len: int
    stages: list[StagePlan]
    decode_floor_s: float
    runtime: float

    @property
    def slots(self) -> int:
        """Slots the engine can run: the request's max_batch, capped by the stage with the least room."""
        return max(0, min(self.max_batch, *(s.slots_fit for s in self.stages)))

    @property
    def fits(self) -> bool:
        return self.slots >= 1

    def stage_total(self, s: StagePlan, slots: int) -> float:
        return s.weights + s.kv_per_slot * slots + s.workspace + self.runtime


def plan_inference(args: ModelArgs, dev: Device, pp: int = 1, tp: int = 1, max_batch: int = 256,
                   max_len: int | None = None, dtype: str = "bf16", quant: str | None = None,
                   quant_group_size: int = 128, prefill_chunk: int = 512, memory_utilization: float = 0.9,
                   split: list[int] | None = None, runtime_gib: float = 1.0) -> InferPlan:
    e = float(element_bytes(dtype, "infer.dtype"))
    mat = QUANT_BYTES[quant] if quant else e
    if quant == "int4":
        mat += 2.0 / quant_group_size  # one bf16 scale a group
    h, f, hd, kv = args.dim, args.ffn_dim, args.head_dim, args.kv_heads
    max_len = max_len or args.max_seq_len
    layer_matrices = (h * args.n_heads * hd * 2 + h * kv * hd * 2 + 3 * h * f) / tp
    layer_bytes = layer_matrices * mat + 2 * h * e + (args.n_heads * hd + 2 * kv * hd) / tp * e * args.qkv_bias
    vocab_bytes = args.vocab_size * h * e / tp
    layers = [len(stage) for stage in split_layers(args.n_layers, pp, split)]
    budget = dev.memory_gib * GiB * memory_utilization
    stages = []
    for i, n in enumerate(layers):
        w = n * layer_bytes
        if i == 0:
            w += vocab_bytes
        if i == pp - 1:
            w += h * e + (0 if args.tie_embeddings and i == 0 else vocab_bytes)
        kv_slot = n * kv / tp * max_len * hd * 2 * e
        # one prefill chunk in flight: the widest activation of a layer (gate|up) and the chunk's logits (fp32)
        workspace = prefill_chunk * (2 * f / tp * e + 4 * h * e) + (prefill_chunk * args.vocab_size / tp * 4
                                                                     if i == pp - 1 else 0)
        room = budget - w - workspace - runtime_gib * GiB
        stages.append(StagePlan(n, w, kv_slot, workspace, int(room // kv_slot) if room > 0 else 0))
    bw = dev.hbm_tbps * 1e12
    floor = sum(s.weights for s in stages) / bw
    floor += pp * dev.link_latency_us * 1e-6  # the hops of the ring, the last back to stage 0
    if tp > 1:
        floor += 2 * args.n_layers * dev.link_latency_us * 1e-6
    return InferPlan(dev, pp, tp, max_batch, max_len, stages, floor, runtime_gib * GiB)
