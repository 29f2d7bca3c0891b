"""Typed config schemas behind the YAML in ``configs/``.

Each dataclass is the schema of one config group; ``TrainConfig``, ``ExportConfig`` and ``GenerateConfig`` are
the roots registered in Hydra's ConfigStore. Because the YAML merges into these types, a mistyped key fails
at start and the error lists the valid ones (``framework.cli``). What can be derived (dp, per-rank batch,
accumulation steps) is derived in code, never a knob.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from framework.models.llama import ModelArgs


@dataclass
class SyntheticConfig:
    """Synthetic tasks with a known answer; eval reports exact-match accuracy."""

    task: str = "reverse"
    """One of copy, reverse, sort, add."""
    num_examples: int = 20000
    """Training examples generated (the validation set is separate, of val_examples)."""
    val_examples: int = 256
    """Held-out examples for loss and exact-match accuracy."""
    min_len: int = 3
    """Fewest digits in an operand."""
    max_len: int = 8
    """Most digits in an operand."""


@dataclass
class MixtureSource:
    """One source of ``data.mixture``: where its documents come from and its share of the mixture."""

    source: str = "stdlib"
    """synthetic (data.synthetic), stdlib, files or hub."""
    weight: float = 1.0
    """Share of the mixture's characters (weights need not sum to 1); the mixture ends when a source runs out."""
    paths: list[str] = field(default_factory=list)
    """Files, directories or globs for source=files."""
    text_field: str = "text"
    """Column holding the text in JSONL/Parquet/hub data."""
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    max_chars: int | None = None
    """Opt-in cap on the characters read from this source; None reads all of it."""


@dataclass
class DataConfig:
    """Where text comes from, the token store it becomes, and how blocks are drawn from it."""

    source: str = "synthetic"
    """synthetic, stdlib (this Python's own standard library source), files (local text/JSONL/Parquet) or hub."""
    paths: list[str] = field(default_factory=list)
    """Local files, directories or globs for source=files (.txt, .md, .py, .jsonl, .json, .parquet)."""
    text_field: str = "text"
    """Column holding the text in JSONL/Parquet/hub data."""
    hub_name: str | None = None
    """Hub dataset name (or a local dataset directory) for source=hub, read with datasets' streaming."""
    hub_config: str | None = None
    """Hub dataset configuration name."""
    hub_split: str = "train"
    """Hub split to read."""
    max_chars: int | None = None
    """Opt-in cap on the corpus characters read; None (the default) reads every document."""
    mixture: list[MixtureSource] = field(default_factory=list)
    """Several weighted sources instead of ``source``: [{source: stdlib, weight: 0.3}, {source: files, paths: [..],
    weight: 0.7}]."""
    store: str | None = None
    """A token store made by ``python -m framework.prepare``; None prepares one into run_dir/data."""
    packing: str | None = None
    """concat (blocks run across documents) or document (positions restart and attention stops at each document;
    fine-tuning formats: whole examples packed best-fit-decreasing into the blocks); None: document for the
    fine-tuning formats, concat for text."""
    format: str = "text"
    """What a row of JSONL/Parquet/hub data is: text ({"text"}), prompt_completion ({"prompt", "completion"}),
    messages ({"messages": [{"role", "content"}]}, rendered with the tokenizer's chat template), alpaca
    ({"instruction", "input", "output"}), or auto (told by each row's fields). framework/data/formats.py."""
    train_on_prompt: bool | None = None
    """Count the prompt's tokens in the loss too; None: false for the fine-tuning formats (the loss falls on the
    completion / assistant turns and their end-of-turn token only)."""
    tokenizer: str | None = None
    """A local Hugging Face tokenizer directory; None trains a byte-level BPE on the corpus."""
    vocab_size: int = 2048
    """Vocabulary of the trained BPE tokenizer."""
    bpe_train_chars: int = 200_000_000
    """The trained BPE learns from the corpus' first this many characters (its memory grows with their words)."""
    val_fraction: float = 0.02
    """Share of documents held out for validation (a seeded, evenly spaced rule; synthetic data has its own)."""
    num_proc: int | None = None
    """Tokenizing worker processes; None uses every core available."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ParallelConfig:
    """Layout and precision. dp is derived: world_size / tp."""

    tp: int = 1
    """Tensor-parallel degree (DeepSpeed AutoTP)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage, 0-3."""
    precision: str = "fp32"
    """fp32, bf16 or fp16."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward to save memory."""
    device: str = "auto"
    """auto (cuda if present, else cpu), cuda or cpu."""
    backend: str = "auto"
    """auto (nccl on cuda, gloo on cpu), nccl or gloo."""
    timeout_s: int = 600
    """Collective timeout."""


@dataclass
class TrainerConfig:
    """The loop, optimizer, schedule and evaluation."""

    max_steps: int = 400
    """Optimizer steps to train."""
    stop_at: int | None = None
    """Stop (after saving a checkpoint) at this step without changing the schedule: a time-sliced job's share."""
    global_batch_size: int = 32
    """Sequences per optimizer step across all data-parallel ranks."""
    micro_batch_size: int = 16
    """Sequences per forward pass on one rank; accumulation steps are derived."""
    seq_len: int = 64
    """Tokens per training sequence."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a share of lr."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms and biases)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    eval_every: int = 100
    """Evaluate every N steps (and at the end); 0 disables."""
    eval_batches: int = 8
    """Validation batches per evaluation."""
    eval_exact_match: int = 128
    """Synthetic examples scored for exact-match accuracy per evaluation."""
    eval_generate: bool = False
    """Fine-tuning formats: also score the exact match of greedy answers to held-out prompts (up to
    eval_exact_match of them) at each evaluation."""
    log_every: int = 10
    """Log metrics every N steps."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per device for MFU; None looks the device up in a table."""
    init_from: str | None = None
    """A Hugging Face safetensors directory (Llama or Qwen2) to start from instead of random weights."""
    distill_from: str | None = None
    """An export (or run directory) of a target model: train this model, on the target's tokenizer, to match the
    target's next-token distributions (KL loss; the target runs forward, frozen, in the same job): a speculative
    decoding draft (framework/trainer/distill.py)."""


@dataclass
class LoggerConfig:
    """Where metrics go. All of it comes from rank 0 only."""

    progress: bool = True
    """A progress bar on rank 0."""
    tensorboard: bool = False
    """Write TensorBoard events under run_dir/tensorboard."""
    wandb: bool = False
    """Log to Weights & Biases."""
    wandb_mode: str = "offline"
    """offline (no account needed) or online."""
    wandb_project: str = "miaotui"


@dataclass
class CheckpointConfig:
    """Sharded checkpoints and the export at the end of a run."""

    every: int = 0
    """Save every N steps (and at the end when > 0 or export is on); 0 saves only at the end."""
    keep: int = 2
    """Keep the newest K checkpoints of the run's lineage (after a rollback, the abandoned branch goes first)."""
    resume: str = "latest"
    """latest (resume if a checkpoint exists; the newest that verifies), none, or a checkpoint path."""
    verify: str = "fast"
    """How a checkpoint is checked before resuming: fast (every file's size, the sha256 of files up to 64 MiB and of
    samples of larger ones) or full (the sha256 of every byte: reads the whole checkpoint once more)."""
    export: bool = True
    """Write run_dir/export (Hugging Face safetensors) at the end."""
    save_final: bool = True
    """Save a checkpoint at the end of training."""
    max_shard_size_mb: int = 2000
    """Largest export shard, in MiB."""
    universal: bool = True
    """Also save every parameter's full fp32 state: resume on another layout, export at any world size."""


@dataclass
class TrainConfig:
    name: str = "default"
    """Run name; the run directory is runs/<name> unless run_dir is set."""
    seed: int = 0
    run_dir: str = "runs/default"
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class PrepareConfig:
    """``python -m framework.prepare``: a corpus becomes a token store (framework/data/prepare.py)."""

    data: DataConfig = field(default_factory=DataConfig)
    out: str | None = None
    """The store's directory; a half-built store there with the same data config is resumed."""
    seed: int = 0
    """Seed of the train/validation split (training's seed gives training's split)."""
    progress: bool = True
    """A progress line (tokens/s, ETA) every few seconds."""


@dataclass
class ExportConfig:
    checkpoint: str | None = None
    """A checkpoint step directory or a run directory (its latest checkpoint)."""
    out: str | None = None
    """Output directory; defaults to <run>/export."""
    max_shard_size_mb: int = 2000


@dataclass
class InferConfig:
    """The inference engine: pp x tp stage workers, continuous batching, static KV cache (framework/infer)."""

    pp: int = 1
    """Pipeline stages; world size = pp x tp."""
    tp: int = 1
    """Tensor-parallel ranks inside each stage (each reads 1/tp of every layer: lower latency)."""
    allreduce: str = "auto"
    """tp all-reduce on CPU: auto (DeepSpeed's shared-memory op where it applies, else the backend), shm, backend."""
    transport: str = "auto"
    """Messages between pipeline stages: auto (shared memory where every rank is a CPU process of one host, else
    the process groups: NCCL/gloo), shm, backend."""
    split: list[int] | None = None
    """Layers per stage, e.g. [3,5,5,3]; None splits evenly."""
    micro_batches: int = 0
    """Groups of running sequences in flight around the pipeline ring; 0 picks pp (one per stage)."""
    max_batch: int = 256
    """Most sequences running at once (vLLM's max_num_seqs); the KV cache has this many slots at most."""
    batch_size: int | None = None
    """Alias of max_batch (older configs)."""
    prefill_chunk: int = 512
    """Most prompt tokens prefilled in one round of the pipeline ring (shared equally by its micro-batches'
    steps), interleaved with the decode of running rows."""
    scheduler: str = "continuous"
    """continuous (finished rows leave and waiting requests take their slots between steps) or static (the
    baseline: a group of max_batch requests runs until its last row finishes)."""
    max_seq_len: int | None = None
    """Longest sequence (prompt + new tokens) a KV slot holds; None: the model's context, capped by the
    longest request of a batch job."""
    kv_cache_gb: float = 4.0
    """CPU: KV cache memory per stage, in GiB (slots = min(max_batch, what fits))."""
    gpu_memory_utilization: float = 0.9
    """CUDA: share of the device's free memory (after the weights) given to the KV cache."""
    compile: bool | None = None
    """torch.compile the decode step (CUDA graphs on GPU); None: on for CUDA, off for CPU."""
    quant: str | None = None
    """Quantize while loading: int8 or int4 (weight-only); None keeps the export's weights."""
    quant_group_size: int = 128
    """int4 quantization group size (quant=int4)."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 means greedy."""
    top_k: int = 0
    """Keep the k most likely tokens (0 disables)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 disables)."""
    repetition_penalty: float = 1.0
    seed: int = 0
    """Default per-request sampling seed (a request's own "seed" field wins)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings."""
    ignore_eos: bool = False
    """Keep generating past EOS up to max_new_tokens (benchmarks)."""
    dtype: str | None = None
    """fp32, bf16 or fp16; None: the export's torch_dtype on CUDA, fp32 on CPU."""
    device: str = "auto"
    backend: str = "auto"
    packed_weights: bool = True
    """fp32 on CPU: lay the linear weights out once at load for the decode batch (transposed for one row a call,
    oneDNN's blocked layout for several; framework/infer/cpu_linear.py). False keeps F.linear."""
    summary: str | None = None
    """Write a JSON summary (tokens_per_s, ttft_s, tpot_s, stage busy fractions) here."""
    progress: bool = True
    timeout_s: int = 600
    speculative: str = "none"
    """Speculative decoding (framework/infer/speculative.py): none, ngram (prompt lookup over the request's prompt
    and output) or draft (a small model with the same tokenizer, infer.draft_model_dir, run on rank 0)."""
    num_speculative_tokens: int = 4
    """Most draft tokens a row proposes a step; each request adapts its own k from its running acceptance."""
    ngram_min: int = 1
    """Shortest suffix of the sequence that prompt lookup matches (speculative=ngram)."""
    ngram_max: int = 4
    """Longest suffix tried first (speculative=ngram)."""
    draft_model_dir: str | None = None
    """The draft model (an export or run directory; same tokenizer as the target) for speculative=draft."""
    draft_compile: bool | None = None
    """torch.compile the draft's decode steps (at load); None: on. A draft's eager step costs its Python and kernel
    launches rather than its weights, so compiling it is most of what a small draft gains."""
    speculative_policy: str = "cost"
    """How many drafts a step verifies (framework/infer/speculative.py): cost (the drafts whose expected tokens pay
    for their rows, by the step cost against rows measured at load on this machine) or acceptance (k from the
    request's acceptance alone, whatever a row costs)."""
    speculative_max_batch: int = 16
    """Decode rows in a step from which no drafts are added at all (also a bound on the rows a step can have).
    Below it the policy decides. Measured (30M Llama, CPU, eager, scripts/bench_spec.py): a step of 5r rows costs
    1.4-1.7x one of r rows at r = 1, 2.0-2.5x at 4 and 2.1-2.7x at 16, and with the bound at 32 the cost policy
    still lost 20-25% at batch 16 (its step cost does not count the work a draft row brings outside the stage's
    step), so 16. GPUs stay weight-bound to larger batches: the bench's "forced on" column measures it there."""


@dataclass
class GenerateConfig:
    model_dir: str | None = None
    """An export directory, a run directory, or a training checkpoint."""
    prompt: str | None = None
    prompts: str | None = None
    """JSONL file of requests with a "prompt" field."""
    output: str | None = None
    """JSONL of results."""
    infer: InferConfig = field(default_factory=InferConfig)


@dataclass
class QuantConfig:
    """Weight-only quantization (method=int8 or int4; framework/compress/quantize.py)."""

    group_size: int = 128
    """int4: input features sharing a scale and a zero point (32, 64, 128 or 256; must divide every layer's)."""
    head: bool = False
    """Also quantize the LM head (never a head tied to the embedding); the embedding always stays as it is."""
    symmetric: bool = False
    """int4: zero point fixed at 0 (scale = max|w| / 7.5) instead of min/max with an integer zero point per group;
    less accurate, but what transformers + compressed-tensors 0.20 can load (it cannot size packed zero points)."""


@dataclass
class CalibConfig:
    """Calibration text for Wanda: the inputs of every linear layer are measured on these tokens."""

    data: str | None = "stdlib"
    """A data source: a config of configs/data (stdlib, synthetic, files with calib.paths, hub)."""
    paths: list[str] = field(default_factory=list)
    """Files for calib.data=files (.txt, .jsonl, .json, .parquet)."""
    samples: int = 128
    """Sequences of calib.seq_len tokens."""
    seq_len: int = 128
    """Tokens per calibration sequence."""
    max_chars: int = 1_000_000
    """Corpus characters read."""
    seed: int = 0
    """Which blocks are drawn."""


@dataclass
class CompressConfig:
    model_dir: str | None = None
    """The model to compress: an export or a run directory (its export/), or any Llama/Qwen2 HF directory."""
    out: str | None = None
    """Output directory (a compressed export); defaults to <model_dir>-<method>."""
    method: str | None = None
    """int8 (per channel) or int4 (groupwise) weight-only quantization; magnitude or wanda pruning."""
    sparsity: str | None = None
    """Pruning: a ratio in (0, 1) such as 0.5, or an N:M pattern such as 2:4 (N kept of every M)."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    max_shard_size_mb: int = 2000
    """Largest output shard, in MiB."""


@dataclass
class EvalConfig:
    model_dir: str | None = None
    """Any model directory: an export or run directory of ours, a compressed export, a Hugging Face one."""
    data: DataConfig = field(default_factory=DataConfig)
    """The corpus; its held-out blocks are scored (the same split as training given the same data keys, seq_len
    and seed)."""
    seq_len: int = 128
    """Tokens per scored block."""
    seed: int = 0
    """Seed of the train/validation split (training's seed gives training's split)."""
    batch_size: int = 8
    max_batches: int = 0
    """Score at most this many batches (0: every held-out block)."""
    dtype: str = "fp32"
    """fp32, bf16 or fp16."""
    quant: str | None = None
    """Quantize while loading (int8 or int4), as infer.quant does."""
    quant_group_size: int = 128
    output: str | None = None
    """Write the result as JSON here (default: print only)."""
    cache_dir: str | None = None
    """Where the tokenized blocks are kept between runs (default: a temporary directory)."""
    tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks (e.g. [miaotui_sentiment,miaotui_translate]): run through the engine instead of
    the perplexity (framework/evaluation/)."""
    include_path: str | None = None
    """A folder of lm-eval task YAMLs (default: the project's offline tasks, configs/lm_eval/)."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt (None: each task's own default)."""
    limit: float | None = None
    """Evaluate at most this many examples per task (a fraction when < 1)."""
    log_samples: bool = False
    """Keep every request and response in the results JSON (lm-eval's --log_samples)."""
    infer: InferConfig = field(default_factory=InferConfig)
    """The engine that runs the tasks: infer.pp, infer.tp, infer.max_batch ... as in framework.generate."""


@dataclass
class ServeConfig:
    """The OpenAI-compatible HTTP server on rank 0 (framework/infer/server/)."""

    host: str = "127.0.0.1"
    """Address to bind; 0.0.0.0 exposes the server beyond this machine (then set an API key)."""
    port: int = 8000
    """TCP port; 0 picks a free one (printed at start)."""
    api_key: str | None = None
    """Bearer token required on /v1/*; None reads MIAOTUI_API_KEY, and no key at all leaves the API open."""
    model_name: str | None = None
    """The model id of /v1/models and the "model" field requests must name; None: the model directory's name."""
    max_queue: int = 256
    """Requests waiting for a slot beyond the running ones; more get 429 with Retry-After."""
    max_n: int = 8
    """Largest "n" (choices per request) served; more is a 400."""
    default_max_tokens: int | None = None
    """max_tokens when a request gives none; None: infer.max_new_tokens, capped by the room left in the context."""
    chat_template: str | None = None
    """A Jinja chat template (file path or text) overriding the tokenizer's; None: the tokenizer's, else the default
    documented in framework/infer/server/protocol.py."""
    log_requests: bool = False
    """One log line per HTTP request (uvicorn's access log)."""
    dead_grace_s: float = 2.0
    """After a rank dies: seconds during which the server still answers 503 before it exits non-zero."""
    max_body_mb: float = 8.0
    """Largest request body in MiB; a larger one is a 413, refused before it is read."""
    max_prompt_chars: int | None = None
    """Most characters of prompt text (all prompts, or all messages' content) a request may send, checked before
    tokenizing; None: 32 characters per token of the KV slot length (no tokenizer makes longer tokens of text)."""
    group_timeout_s: int = 30 * 24 * 3600
    """Timeout of every process group of the server (the world's and the engine's own, given explicitly): how long
    a collective or receive may wait, and on CUDA how long rank 0 waits for a step before it declares a stage dead.
    Idle, the engine re-arms every receive at a quarter of it (keep-alive plans), so no idle server times out."""


@dataclass
class ServeRootConfig:
    model_dir: str | None = None
    """An export directory, a run directory, or a training checkpoint."""
    infer: InferConfig = field(default_factory=InferConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


@dataclass
class ClusterConfig:
    """The machines a plan is for (python -m framework.plan)."""

    gpus: int | None = None
    """Devices in the job; None: parallel.tp for training, infer.pp x infer.tp for inference."""
    gpu: str = "h100"
    """The device: h100, h100-96gb, h200, a100, a100-40gb, l40s, mi300x (framework/plan/devices.py)."""
    gpus_per_node: int = 8
    """Devices a node joins with its fast links; data parallelism beyond a node crosses the network."""


@dataclass
class PlanConfig:
    """``python -m framework.plan``: memory per device and a roofline time of a training or inference layout."""

    mode: str = "auto"
    """train, infer, or auto (infer when an infer.* key is on the command line)."""
    model: ModelArgs = field(default_factory=ModelArgs)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    out: str | None = None
    """Also write the plan as JSON here."""


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="plan_schema", node=PlanConfig)
    cs.store(name="compress_schema", node=CompressConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="prepare_schema", node=PrepareConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="serve_schema", node=ServeRootConfig)


register_configs()
