"""Per-device memory and a roofline step time for a training layout (DeepSpeed ZeRO + AutoTP, as built here).

Memory follows what DeepSpeed allocates for each ZeRO stage and precision (``parallel/parallelize.py`` builds the
config: default buckets, ``stage3_param_persistence_threshold`` 0), and what this model saves for backward
(``models/llama.py``, counted tensor by tensor below). The peak is what persists plus the largest of three
transients: the backward pass (saved activations, logits, ZeRO 3's gathered weights), ZeRO 3's gradient
reduce-scatter at the end of backward, and the optimizer step. Time is a roofline: matrix products at the device's
GEMM efficiency, causal flash attention at its own, element-wise work at HBM bandwidth, the optimizer step at HBM
bandwidth, tensor-parallel all-reduces on the critical path, data-parallel collectives overlapped with compute
up to its length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from framework.models.llama import ModelArgs
from framework.plan.devices import Device
from framework.weights.dtypes import TABLE as DTYPE_TABLE

GiB = 2**30
# DeepSpeed defaults the engine runs with (zero_optimization), in elements: reduce_bucket_size, sub_group_size,
# stage3_max_reuse_distance.
REDUCE_BUCKET = 500_000_000
SUB_GROUP = 1_000_000_000
MAX_REUSE = 1_000_000_000
PERSISTENT = ("weights", "gradients", "optimizer", "master", "comm_buffers", "runtime")
BACKWARD = ("gathered_weights", "gradient_bucket", "activations", "logits")
REDUCE = ("reduce_scatter_copy", "collective_workspace", "gathered_at_reduce")
STEP = ("step_fp32_gradients", "step_optimizer_workspace")
BYTES = {d.precision: d.bytes for d in DTYPE_TABLE}  # fp32 4, bf16 2, fp16 2: the weights layer's table


@dataclass
class Layout:
    gpus: int
    tp: int
    zero_stage: int
    precision: str
    micro_batch: int
    seq_len: int
    global_batch: int
    activation_checkpointing: bool
    gpus_per_node: int = 8
    flash_attention: bool = True
    """False where SDPA runs its math path and saves the (T, T) probabilities."""
    backend: str = "nccl"
    """The collective backend: gloo's reduce-scatter copies its input (CPU runs), NCCL's works in place."""

    @property
    def dp(self) -> int:
        return self.gpus // self.tp

    @property
    def accumulation(self) -> int:
        return max(1, self.global_batch // (self.micro_batch * self.dp))


def params_per_rank(args: ModelArgs, tp: int) -> tuple[int, int]:
    """(parameters on one tensor-parallel rank, the largest layer's share there). AutoTP splits q/k/v/gate/up by
    rows and o/down by columns; norms, the embedding and the head are replicated (our AutoTP patterns)."""
    h, f, hd, kv = args.dim, args.ffn_dim, args.head_dim, args.kv_heads
    split = h * args.n_heads * hd * 2 + h * kv * hd * 2 + 3 * h * f
    if args.qkv_bias:
        split += args.n_heads * hd + 2 * kv * hd
    layer = split // tp + 2 * h
    vocab = args.vocab_size * h
    total = args.n_layers * layer + h + vocab * (1 if args.tie_embeddings else 2)
    return total, max(layer, vocab)


def model_states(args: ModelArgs, lay: Layout, fused_optimizer: bool = True) -> dict[str, float]:
    """Bytes per device of weights, gradients, optimizer state and DeepSpeed's buffers; of ZeRO 3's transients
    (gathered weights, the gradient reduce-scatter's copies); and of the two transients of the optimizer step (fp32
    gradients, AdamW's workspace)."""
    p, largest = params_per_rank(args, lay.tp)
    e, dp, z = BYTES[lay.precision], lay.dp, lay.zero_stage
    part = p / dp if z >= 1 else p
    bucket = min(REDUCE_BUCKET, p)
    if z == 3:
        # DeepSpeed 0.19 stage3.py, with the config parallelize.py passes
        states = {
            # lp_param_buffer: this rank's partition of every parameter, in the compute dtype
            "weights": e * part,
            # grad_partitions_flat_buffer: the partition of the averaged gradients (grad_accum_dtype: the compute
            # dtype unless configured)
            "gradients": e * part,
            "optimizer": 8 * part,
            # fp32_partitioned_groups_flat: the fp32 master partition, its own copy even when training in fp32
            "master": 4 * part,
            # the ipg bucket (contiguous_gradients), allocated once: every full gradient of this rank is copied into
            # it until it fills (reduce_bucket_size) or backward ends; its resident part
            "comm_buffers": e * bucket,
            "gradient_bucket": 0.0,
            # parameters gathered for compute: from the second step on (the trace complete) a parameter stays
            # gathered after its forward use when its backward use lies within stage3_max_reuse_distance elements of
            # the trace, which is every parameter of a model up to half that; at least two layers (the one computed
            # and the one prefetched)
            "gathered_weights": e * max(2 * largest, min(p, MAX_REUSE / 2)),
            # reduce_scatter_coalesced concatenates the bucket's gradients, interleaved by rank, into a new buffer
            "reduce_scatter_copy": e * bucket,
            # gloo's reduce_scatter_tensor works on a clone of its input; NCCL's needs none
            "collective_workspace": e * bucket if lay.backend == "gloo" else 0.0,
            # the first module of the forward (the embedding) is the last of the backward: still gathered when the
            # bucket is reduced at its end
            "gathered_at_reduce": e * largest,
        }
    else:
        states = {
            "weights": e * p,
            # the compute-dtype gradients: all of them (ZeRO 0); the parameters' .grad and the averaged partition
            # (ZeRO 1, reduced at the accumulation boundary); the partition only (ZeRO 2)
            "gradients": e * {0: p, 1: p + p / dp, 2: p / dp}[z],
            # AdamW's two moments in fp32, partitioned from ZeRO 1 on
            "optimizer": 8 * part,
            # fp32 master weights: DeepSpeed's ZeRO and its bf16/fp16 optimizers copy the weights in fp32 (also in
            # fp32 training from ZeRO 1 on); at ZeRO 0 in fp32 the weights are their own master
            "master": 4 * part if (z >= 1 or e != 4) else 0.0,
            "comm_buffers": 0.0,
            # the contiguous gradient bucket of the backward pass (reduce_bucket_size), allocated anew each
            # micro-step and gone by the optimizer step (ZeRO 1/2: setup_buckets; ZeRO 0's all-reduce flattens the
            # gradients into one)
            "gradient_bucket": e * bucket,
            **dict.fromkeys(("gathered_weights", *REDUCE), 0.0),
        }
    return {
        **states,
        # step: fp32 gradients the optimizer reads (the flattened partition at ZeRO 1/2, one sub-group at a time at
        # ZeRO 3, the accumulation buffer of DeepSpeed's bf16/fp16 optimizer at ZeRO 0) ...
        "step_fp32_gradients": (4 * min(part, SUB_GROUP) if z == 3 else 4 * part if z >= 1 else
                                (4 * p if e != 4 else 0.0)),
        # ... and AdamW's temporaries: none when fused (CUDA); torch's single-tensor AdamW (CPU's default) builds
        # the denominator as exp_avg_sq.sqrt() / bias_correction2_sqrt, two partition-sized tensors alive at once
        "step_optimizer_workspace": 0.0 if fused_optimizer else 2 * 4 * part,
    }


def activation_bytes_per_token_layer(args: ModelArgs, lay: Layout) -> float:
    """What one decoder layer saves for backward per token, tensor by tensor (models/llama.py)."""
    h, f, kvd, e, tp = args.dim, args.ffn_dim, args.kv_heads * args.head_dim, BYTES[lay.precision], lay.tp
    # RMSNorm (x2): the input in fp32 and 1/rms (4 bytes); the normalised output in the compute dtype (the input
    # of the projections); in fp32 the product x * 1/rms is a separate fp32 tensor
    norm = 2 * (4 * h + 4 + e * h)
    # attention: rotated q and k, v, the output and its contiguous copy (o_proj's input), logsumexp in fp32
    attn = e * (2 * h + 2 * kvd + h) / tp + 4 * args.n_heads / tp
    if not lay.flash_attention:  # the math path keeps softmax(QK^T) for every head: seq_len values a token
        attn += e * args.n_heads / tp * lay.seq_len
    # SwiGLU: gate, up, silu(gate), their product (down_proj's input)
    mlp = e * 4 * f / tp
    return norm + attn + mlp


def activations(args: ModelArgs, lay: Layout) -> dict[str, float]:
    """Bytes per device of activations for one micro-batch, and of the logits and loss."""
    tokens = lay.micro_batch * lay.seq_len
    e = BYTES[lay.precision]
    layer = activation_bytes_per_token_layer(args, lay) * tokens
    if lay.activation_checkpointing:
        # each layer keeps its input; backward recomputes one layer at a time
        layers = args.n_layers * e * args.dim * tokens + layer
    else:
        layers = args.n_layers * layer
    # logits (compute dtype), their fp32 copy (low precision), log-softmax (fp32), and at the start of backward its
    # gradient (fp32) and the logits' gradient (compute dtype): the head is replicated under tensor parallelism
    per_logit = 2 * e + 8 + (4 if e != 4 else 0)
    return {"activations": layers, "logits": tokens * args.vocab_size * per_logit}


@dataclass
class TrainPlan:
    device: Device
    layout: Layout
    memory: dict[str, float]
    time: dict[str, float] = field(default_factory=dict)
    reduce_in_backward: bool = False
    """ZeRO 3's bucket fills before backward ends (more gradients than reduce_bucket_size): it is reduce-scattered
    while the activations and the gathered weights are still held."""

    @property
    def phases(self) -> dict[str, float]:
        """The transients of each phase of a step, which do not overlap."""
        m = self.memory
        backward = sum(m[k] for k in BACKWARD)
        reduce = m["reduce_scatter_copy"] + m["collective_workspace"]
        reduce += backward if self.reduce_in_backward else m["gathered_at_reduce"]
        return {"backward": backward, "gradient_reduce": reduce, "step": sum(m[k] for k in STEP)}

    @property
    def total(self) -> float:
        """The peak: what persists, plus the largest phase's transients."""
        return sum(self.memory[k] for k in PERSISTENT) + max(self.phases.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.device.memory_gib * GiB


def step_time(args: ModelArgs, lay: Layout, dev: Device) -> dict[str, float]:
    """Seconds per optimizer step on one device, by part, and the throughput they give."""
    tokens_rank = lay.micro_batch * lay.seq_len * lay.accumulation  # per data-parallel rank and step
    e = BYTES[lay.precision]
    peak = dev.bf16_tflops * 1e12 * (1.0 if e == 2 else 0.5)  # fp32 runs as TF32 at half the bf16 rate
    p, largest = params_per_rank(args, lay.tp)
    n_matmul = args.num_params(include_embedding=False)  # includes the head
    attn_flops = 12.0 * args.n_layers * args.dim * lay.seq_len  # per token, forward + backward, unmasked
    recompute = 4.0 / 3.0 if lay.activation_checkpointing else 1.0  # one more forward
    matmul_s = 6.0 * n_matmul * recompute * tokens_rank / lay.tp / (peak * dev.gemm_efficiency)
    attn_s = 0.5 * attn_flops * recompute * tokens_rank / lay.tp / (peak * dev.attn_efficiency)  # causal: half
    # element-wise work (norms, RoPE, SiLU, products, residuals; forward, backward ~2x) and the loss, at HBM rate
    h, f = args.dim, args.ffn_dim / lay.tp
    elem_bytes = 3 * (e * (16 * h + 6 * f) + 16 * h) * args.n_layers + 3 * 4 * args.vocab_size
    elementwise_s = elem_bytes * recompute * tokens_rank / (dev.hbm_tbps * 1e12)
    # optimizer: read weights, gradients, master and moments, write them back, over this rank's partition
    part = p / lay.dp if lay.zero_stage >= 1 else p
    optimizer_s = part * (2 * e + 4 * 4 + 3 * 4) / (dev.hbm_tbps * 1e12)
    # tensor parallelism: all-reduces of (micro-batch tokens, dim) on the critical path, 2 a layer forward and 2
    # backward (2 more with recomputation); a ring moves 2 (tp-1)/tp of the bytes
    tp_s = 0.0
    tokens_micro = lay.micro_batch * lay.seq_len
    if lay.tp > 1:
        bw = (dev.intra_gbps if lay.tp <= lay.gpus_per_node else dev.inter_gbps) * 1e9
        n = args.n_layers * (6 if lay.activation_checkpointing else 4) * lay.accumulation
        tp_s = n * (2 * (lay.tp - 1) / lay.tp * tokens_micro * h * e / bw + dev.link_latency_us * 1e-6)
    # data parallelism, in volumes of this rank's gradients moved by a ring ((dp-1)/dp of the bytes each):
    # ZeRO 0 all-reduces once a step (2); ZeRO 1 reduce-scatters once and all-gathers the new weights (2); ZeRO 2
    # reduce-scatters every micro-batch (accumulation + 1); ZeRO 3 gathers the weights for forward and backward and
    # reduce-scatters the gradients every micro-batch (3 x accumulation)
    dp_s = 0.0
    if lay.dp > 1:
        bw = (dev.inter_gbps if lay.gpus > lay.gpus_per_node else dev.intra_gbps) * 1e9
        volumes = {0: 2, 1: 2, 2: lay.accumulation + 1, 3: 3 * lay.accumulation}[lay.zero_stage]
        collectives = 3 * args.n_layers * lay.accumulation if lay.zero_stage == 3 else 2 * lay.accumulation
        dp_s = volumes * e * p * (lay.dp - 1) / lay.dp / bw + collectives * dev.link_latency_us * 1e-6
    compute_s = matmul_s + attn_s + elementwise_s
    exposed_dp = max(0.0, dp_s - compute_s)
    total = compute_s + tp_s + exposed_dp + optimizer_s
    tokens_step = lay.global_batch * lay.seq_len
    tps_device = tokens_step / total / lay.gpus
    flops_token = args.flops_per_token(lay.seq_len)
    return {"matmul_s": matmul_s, "attention_s": attn_s, "elementwise_s": elementwise_s, "optimizer_s": optimizer_s,
            "tp_comm_s": tp_s, "dp_comm_s": dp_s, "dp_exposed_s": exposed_dp, "step_s": total,
            "tokens_per_s": tokens_step / total, "tokens_per_s_per_device": tps_device,
            "mfu": flops_token * tps_device / (dev.bf16_tflops * 1e12)}


def plan_training(args: ModelArgs, lay: Layout, dev: Device, runtime_gib: float = 1.0,
                  fused_optimizer: bool = True) -> TrainPlan:
    """Memory per device (with ``runtime_gib`` for the CUDA context, NCCL and allocator slack; ``fused_optimizer``
    False for CPU runs, whose AdamW is torch's single-tensor one) and the step time."""
    memory = {**model_states(args, lay, fused_optimizer), **activations(args, lay), "runtime": runtime_gib * GiB}
    p = params_per_rank(args, lay.tp)[0]
    return TrainPlan(dev, lay, memory, step_time(args, lay, dev),
                     reduce_in_backward=lay.zero_stage == 3 and p > REDUCE_BUCKET)
