"""The Llama-family decoder: one definition for training and inference.

Parameter names are those of Hugging Face ``LlamaForCausalLM`` (``model.layers.3.self_attn.q_proj.weight``),
so a Hugging Face checkpoint loads into it, its export loads into ``transformers``, and DeepSpeed's AutoTP
shards it by name patterns. The file is single-device: no process group appears here. Tensor parallelism
is applied from outside (``framework.parallel.parallelize``); attention infers its local head count from the
projection shapes so a column-sharded ``q_proj`` just works.

A pipeline stage is this model with modules deleted (``keep_only``): ``forward`` skips what the stage does not
hold, so the state-dict keys of a stage are the checkpoint's keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    """Shape of a Llama-family decoder. Also the Hydra schema of the ``model`` config group."""

    name: str = "debug"
    """Flavor name, for logs and run names."""
    dim: int = 64
    """Hidden size."""
    n_layers: int = 2
    """Number of decoder layers."""
    n_heads: int = 4
    """Attention (query) heads."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None means n_heads."""
    ffn_dim: int = 192
    """Inner size of the SwiGLU MLP."""
    vocab_size: int | None = None
    """Vocabulary size; None takes it from the tokenizer."""
    max_seq_len: int = 2048
    """Largest context the model is meant for (exported as max_position_embeddings)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling_factor: float | None = None
    """Llama-3 RoPE frequency scaling factor (e.g. 8.0 or 32.0); None disables scaling."""
    rope_low_freq_factor: float = 1.0
    """Llama-3 scaling: low-frequency factor."""
    rope_high_freq_factor: float = 4.0
    """Llama-3 scaling: high-frequency factor."""
    rope_original_max_seq_len: int = 8192
    """Llama-3 scaling: the context length of the unscaled model."""
    qkv_bias: bool = False
    """Bias on q/k/v projections (Qwen2)."""
    tie_embeddings: bool = False
    """Share the input embedding with the LM head."""
    init_std: float = 0.02
    """Std of the normal initialisation of linear and embedding weights."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count from the shape alone (no model built)."""
        hd, kv = self.head_dim, self.kv_heads
        attn = self.dim * self.n_heads * hd * 2 + self.dim * kv * hd * 2
        if self.qkv_bias:
            attn += self.n_heads * hd + 2 * kv * hd
        layer = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim
        vocab = self.vocab_size or 0
        emb = vocab * self.dim
        head = 0 if self.tie_embeddings else vocab * self.dim
        return self.n_layers * layer + self.dim + head + (emb if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N plus the attention term (PaLM appendix B)."""
        n = self.num_params(include_embedding=False)
        return 6.0 * n + 12.0 * self.n_layers * self.dim * seq_len


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse RoPE frequencies, with Llama-3 scaling when configured."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    if args.rope_scaling_factor is None:
        return inv_freq
    # Llama 3.1: long wavelengths are divided by the factor, short ones kept, a smooth ramp in between.
    factor, lo, hi = args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    old_len = args.rope_original_max_seq_len
    low_freq_wavelen, high_freq_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for ``positions`` (B, T), computed in fp32 like transformers. Returns (B, T, hd) each."""
    freqs = positions[..., None].float() * inv_freq.float()  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, hd) by position; cos/sin are (B, T, hd)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hd = args.head_dim
        self.head_dim = hd
        self.q_proj = nn.Linear(args.dim, args.n_heads * hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * hd, args.dim, bias=False)

    def forward(self, x, cos, sin, mask=None):
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # -1 heads: under tensor parallelism the projections hold only this rank's heads.
        q = q.view(B, T, -1, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, -1, hd).transpose(1, 2)  # (B, KV, T, hd)
        v = v.view(B, T, -1, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = q.shape[1] != k.shape[1]
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask (document packing on CUDA)
            y = flex_attention_compiled()(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*hd)
        return self.o_proj(y)


_FLEX = []


def flex_attention_compiled():
    """FlexAttention, compiled once per process (uncompiled it materializes the whole score matrix)."""
    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]


def has_flex_attention() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return True


def document_mask(document_ids: torch.Tensor):
    """The attention mask of document packing: a token sees the earlier tokens of its own document only.
    ``document_ids`` (B, T). On CUDA a FlexAttention block mask (blocks that are all masked are skipped, as in
    torchtitan); elsewhere a boolean (B, 1, T, T) mask for SDPA, True where attention is allowed."""
    B, T = document_ids.shape
    if document_ids.is_cuda and has_flex_attention():
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(b, h, q, kv):
            return (document_ids[b, q] == document_ids[b, kv]) & (q >= kv)

        return create_block_mask(same_document_causal, B, None, T, T, device=document_ids.device)
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal)[:, None]  # (B, 1, T, T)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    """``model.*`` of LlamaForCausalLM: embedding, layers keyed by index, final norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        # A dict keyed by the global index keeps names stable when a pipeline stage deletes layers.
        self.layers = nn.ModuleDict({str(i): DecoderLayer(args) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps)


class Llama(nn.Module):
    """Llama-family causal LM. ``forward`` returns logits, or hidden states on a stage without the head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size is None:
            raise ValueError("model.vocab_size is unset: set it or let the tokenizer provide it")
        self.args = args
        self.model = LlamaBackbone(args)
        self.lm_head: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.activation_checkpointing = False

    # -- construction helpers -------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Share the embedding with the head when configured (again after ``to_empty``, which unties)."""
        if self.args.tie_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, init_std) for linear and embedding weights, zeros for biases, ones for norms."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                # Drawn on CPU so that every device and layout gets the same numbers from one seed.
                p.copy_(torch.empty(p.shape).normal_(0.0, self.args.init_std, generator=gen).to(p))
        self.inv_freq = rope_inv_freq(self.args).to(self.inv_freq.device)

    def keep_only(self, layers: list[int], first: bool, last: bool) -> Llama:
        """Delete what a pipeline stage does not hold; names of what stays are unchanged."""
        for key in list(self.model.layers.keys()):
            if int(key) not in layers:
                del self.model.layers[key]
        if not first and not (last and self.args.tie_embeddings):
            self.model.embed_tokens = None
        if not last:
            self.model.norm = None
            self.lm_head = None
        elif self.args.tie_embeddings and not first:
            # The last stage needs the tied weight for its head but never embeds tokens.
            self.model.embed_tokens = None
            self.lm_head.weight = nn.Parameter(self.lm_head.weight)
        return self

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) on the first stage, hidden (B, T, D) on the others.

        positions (B, T) default to 0..T-1; mask is an additive or boolean (B, 1, T, S) attention mask, None
        for plain causal attention. document_ids (B, T), for packed documents, builds the mask instead: attention
        stays inside each document (pass positions that restart at each document with it). Inference runs the
        same weights through framework/infer/worker.py.
        """
        x = self.model.embed_tokens(tokens) if self.model.embed_tokens is not None and tokens is not None else hidden
        B, T = x.shape[:2]
        if document_ids is not None:
            mask = document_mask(document_ids)
        if positions is None:
            positions = torch.arange(T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.model.layers.values():
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        if self.lm_head is None:
            return x
        return self.lm_head(self.model.norm(x))


def build_model(args: ModelArgs, device: str | torch.device = "cpu", dtype=torch.float32, seed: int | None = 0):
    """Build on the meta device, then materialize on ``device`` and initialise from ``seed``."""
    with torch.device("meta"):
        model = Llama(args)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    model.init_weights(seed)
    return model
