"""``python -m framework.compress``: a model directory in, a compressed export out.

Every check (method, sparsity, group size against every layer, calibration source, an already compressed
input) runs on the config and the model's shape before any weight is read.
"""

from __future__ import annotations

import os
import time

import torch

from framework.cli import UserError
from framework.compress import format as fmt
from framework.compress.prune import METHODS as PRUNE_METHODS
from framework.compress.prune import Sparsity, check_n_m, parse_sparsity, prunable_linears
from framework.compress.quantize import METHODS as QUANT_METHODS
from framework.compress.quantize import check_int4_shape, quantizable_linears, quantize_int4, quantize_int8
from framework.config import CompressConfig
from framework.models.hf import from_hf_config, read_hf_config
from framework.models.llama import Llama, ModelArgs
from framework.weights import shards
from framework.weights.dtypes import config_dtype
from framework.weights.io import load_hf_weights, pack_int32, weight_map
from framework.weights.layout import split_layers, stage_tensor_names


def source_dir(model_dir: str | None) -> str:
    from framework.checkpoint.resolve import resolve_export_dir

    return resolve_export_dir(model_dir)


def meta_model(args: ModelArgs) -> Llama:
    with torch.device("meta"):
        return Llama(args)


def validate(cfg: CompressConfig) -> tuple[str, dict, ModelArgs, Sparsity | None]:
    """(source dir, its config.json, its shape, the sparsity) or UserError naming the fix."""
    methods = QUANT_METHODS + PRUNE_METHODS
    if cfg.method not in methods:
        raise UserError(f"method={cfg.method}: use one of {', '.join(methods)}")
    src = source_dir(cfg.model_dir)
    hf = read_hf_config(src)
    done = fmt.is_compressed(hf)
    if done:
        raise UserError(f"{src} is already compressed ({done}): compress the original model instead")
    args = from_hf_config(hf, name=os.path.basename(os.path.abspath(src)))
    weight_map(src)
    out = cfg.out or src.rstrip("/") + f"-{cfg.method}"
    if os.path.abspath(out) == os.path.abspath(src):
        raise UserError(f"out={out} is the model directory itself: write the compressed model elsewhere")
    model = meta_model(args)
    sparsity = None
    if cfg.method in QUANT_METHODS:
        if cfg.sparsity is not None:
            raise UserError(f"sparsity={cfg.sparsity} applies to method=magnitude or wanda, not {cfg.method}")
        if cfg.method == "int4":
            for name, lin in quantizable_linears(model, cfg.quant.head):
                check_int4_shape(lin.out_features, lin.in_features, cfg.quant.group_size, name)
    else:
        if cfg.sparsity is None:
            raise UserError(f"method={cfg.method} needs sparsity=: a ratio such as 0.5 or a pattern such as 2:4")
        sparsity = parse_sparsity(cfg.sparsity)
        check_n_m(model, sparsity)
        if cfg.method == "wanda":
            from framework.compress.calibrate import calib_data_config

            if not os.path.isfile(os.path.join(src, "tokenizer.json")):
                raise UserError(f"{src} has no tokenizer.json: Wanda tokenizes its calibration text with the model's")
            calib_data_config(cfg.calib, src)
    return src, hf, args, sparsity


def load_plain(src: str, args: ModelArgs, layers: list[int] | None = None, first: bool = True,
               last: bool = True) -> Llama:
    """The model in fp32 with its separate projections (the export's names): all of it, or one pipeline stage's
    share (``layers``, embedding on the first, norm and head on the last), reading only those tensors."""
    model = meta_model(args)
    if layers is not None:
        model.keep_only(layers, first, last)
    model = model.to_empty(device="cpu").float()
    model.tie_weights()
    load_hf_weights(model, src, names=list(model.state_dict().keys()))
    from framework.models.llama import rope_inv_freq

    model.inv_freq = rope_inv_freq(args)
    return model.eval()


def export_names(model: Llama, args: ModelArgs) -> list[str]:
    names = list(model.state_dict().keys())
    return [n for n in names if not (args.tie_embeddings and n == "lm_head.weight")]


@torch.no_grad()
def quantized_tensors(model: Llama, args: ModelArgs, method: str, group_size: int, head: bool,
                      dtype: torch.dtype, symmetric: bool = False,
                      names: list[str] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The export's tensors with the quantized linears in compressed-tensors' pack-quantized layout, and the
    names of the linear layers left in full precision."""
    targets = dict(quantizable_linears(model, head))
    if args.tie_embeddings:  # a stage without the embedding holds its own copy of the tied head: still tied
        targets.pop("lm_head", None)
    all_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name in names if names is not None else export_names(model, args):
        prefix = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and prefix in targets:
            w = state[name]
            if method == "int8":
                q, scale = quantize_int8(w)
                out[prefix + ".weight_packed"] = pack_int32(q, 8)
                out[prefix + ".weight_scale"] = scale[:, None].to(dtype)
            else:
                q, scale, zp = quantize_int4(w, group_size, symmetric)
                out[prefix + ".weight_packed"] = pack_int32(q, 4)
                out[prefix + ".weight_scale"] = scale.to(dtype)
                if not symmetric:
                    out[prefix + ".weight_zero_point"] = pack_int32(zp, 4, dim=0)
            out[prefix + ".weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
        else:
            out[name] = state[name].to(dtype)
    return out, sorted(set(all_linears) - set(targets))


def owned_names(args: ModelArgs, stages: list[list[int]], rank: int, model: Llama) -> list[str]:
    """The export names this stage writes: its own, less what an earlier stage already holds (a tied embedding
    read again by the last stage) and the tied head."""
    earlier = set()
    for r in range(rank):
        earlier.update(stage_tensor_names(args, stages[r], r == 0, r == len(stages) - 1))
    return [n for n in export_names(model, args) if n not in earlier]


def compress(cfg: CompressConfig) -> str:
    """Compress ``cfg.model_dir`` into ``cfg.out``; returns the output directory. Under ``torchrun`` each of the
    processes is a pipeline stage: it reads only its layers' tensors, quantizes or prunes them (Wanda: fed the
    previous stage's hidden states) and writes its own shard files; rank 0 writes the rest."""
    from framework.parallel.distributed import barrier, env_rank_world, init_distributed

    t0 = time.perf_counter()
    src, hf, args, sparsity = validate(cfg)
    out = cfg.out or src.rstrip("/") + f"-{cfg.method}"
    _, _, world = env_rank_world()
    rank = 0
    if world > 1:
        rank, world = init_distributed(torch.device("cpu"), "gloo")
    stages = split_layers(args.n_layers, world, None)
    first, last = rank == 0, rank == world - 1
    dtype = config_dtype(hf)
    model = load_plain(src, args, stages[rank], first, last)
    names = owned_names(args, stages, rank, model)
    new_hf = dict(hf)
    summary: dict = {"method": cfg.method, "source": os.path.abspath(src)}
    if cfg.method in QUANT_METHODS:
        bits = 8 if cfg.method == "int8" else 4
        group = cfg.quant.group_size if bits == 4 else None
        symmetric = bits == 4 and cfg.quant.symmetric
        tensors, ignored = quantized_tensors(model, args, cfg.method, cfg.quant.group_size, cfg.quant.head, dtype,
                                             symmetric, names)
        ignored = sorted({n for part in gather(ignored, world) for n in part})
        new_hf["quantization_config"] = fmt.quantization_config(bits, group, ignored, symmetric)
        summary.update(bits=bits, group_size=group,
                       scheme="symmetric per output channel, w = q * scale" if bits == 8 else
                       "symmetric per group, w = q * scale" if symmetric else
                       "asymmetric per group, integer zero point: w = (q - zp) * scale",
                       unquantized=["model.embed_tokens", "norms"] + ignored)
    else:
        from framework.compress.prune import magnitude_prune

        if cfg.method == "magnitude":
            magnitude_prune(model, sparsity)
        else:
            summary["calibration"] = wanda_stages(model, args, cfg, src, sparsity, rank, world)
        state = model.state_dict()
        tensors = {n: state[n].to(dtype) for n in names}
        counts = gather(sparsity_counts(model), world)
        summary.update(sparsity=str(sparsity), pattern=f"{sparsity.n_m[0]}:{sparsity.n_m[1]}" if sparsity.n_m else
                       "unstructured", scope="per output row" if cfg.method == "wanda" or sparsity.n_m else "per layer",
                       pruned=sorted({n.split(".")[-1] for n, _ in prunable_linears(meta_model(args))}),
                       measured_sparsity=round(sum(z for z, _ in counts) / max(sum(t for _, t in counts), 1), 4))
    new_hf["compression_config"] = summary
    write_output(src, out, tensors, new_hf, cfg.max_shard_size_mb, rank, world)
    if first:
        before, after = fmt.dir_size_bytes(src), fmt.dir_size_bytes(out)
        print(f"compressed {src} -> {out} ({cfg.method}{f', {world} stages' if world > 1 else ''}): "
              f"{before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB in {time.perf_counter() - t0:.1f} s", flush=True)
    barrier()
    return out


def write_output(src: str, out: str, tensors: dict[str, torch.Tensor], hf_config: dict, max_shard_mb: int,
                 rank: int, world: int) -> None:
    """Every stage writes its shard files into ``out.tmp`` and fsyncs them; rank 0 adds the index, config, tokenizer
    and manifest (``fmt.finalize``, which names the complete directory ``out.new``), fsyncs it all and swaps it in
    for ``out``. An earlier ``out`` stays whole until then: a crash at any point leaves the old or the new output
    complete (on a filesystem without an atomic swap, at worst the old one as ``out.old`` and the new as
    ``out.new``; see ``replace_dir``)."""
    import shutil

    from framework.checkpoint.manifest import fsync_path, publish_dir
    from framework.parallel.distributed import barrier

    tmp, staged = out.rstrip("/") + ".tmp", out.rstrip("/") + ".new"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    planned = shards.plan_shards(shards.tensor_sizes(tensors), max_shard_mb * 2**20)
    counts = gather(len(planned), world)
    wmap = shards.write_shards(tmp, tensors, planned, sum(counts[:rank]), sum(counts))
    for name in set(wmap.values()):  # the writer fsyncs: on a shared filesystem another node cannot flush its writes
        fsync_path(os.path.join(tmp, name))
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    parts = gather((wmap, nbytes), world)
    if rank == 0:
        fmt.finalize(src, tmp, staged, {k: v for w, _ in parts for k, v in w.items()},
                     sum(b for _, b in parts), hf_config)
        publish_dir(staged, out)


def gather(obj, world: int) -> list:
    """Every stage's ``obj``, in stage order (just ``[obj]`` in one process)."""
    import torch.distributed as dist

    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def sparsity_counts(model: Llama) -> tuple[int, int]:
    zeros = total = 0
    for _, lin in prunable_linears(model):
        zeros += int((lin.weight == 0).sum())
        total += lin.weight.numel()
    return zeros, total


def wanda_stages(model: Llama, args: ModelArgs, cfg: CompressConfig, src: str, sparsity, rank: int, world: int) -> dict:
    """Wanda over the stages in turn: stage 0 embeds the calibration tokens; each stage prunes its layers on
    the hidden states it receives and sends its output on (point-to-point, gloo)."""
    import torch.distributed as dist

    from framework.compress.calibrate import calibration_blocks, wanda_prune_layers
    from framework.parallel.distributed import broadcast_object

    blocks = calibration_blocks(cfg.calib, src) if rank == 0 else None
    shape = broadcast_object(None if blocks is None else tuple(blocks.shape))
    with torch.no_grad():
        if rank == 0:
            hidden = model.model.embed_tokens(blocks)  # (S, T, D)
        else:
            hidden = torch.empty(*shape, args.dim)
            dist.recv(hidden, src=rank - 1)
        hidden = wanda_prune_layers(model, hidden, sparsity)
        if rank < world - 1:
            dist.send(hidden.contiguous(), dst=rank + 1)
    return {"data": cfg.calib.data, "samples": shape[0], "seq_len": shape[1], "tokens": shape[0] * shape[1]}
