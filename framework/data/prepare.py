"""Building a token store: streaming, in parallel worker processes, with memory that does not grow with the corpus.

The main process reads documents from the sources (``sources.iter_documents``) and cuts them into chunks of about
``CHUNK_CHARS`` characters; a bounded queue hands the chunks to worker processes, each of which tokenizes its chunk
a batch at a time (the tokenizer's own batch encoding, one thread per worker) and writes the chunk's token and
index files, then its small ``<chunk>.json``, atomically. A re-run with the same data config skips every chunk
that has its json: a killed build resumes where it stopped. At the end the chunks are concatenated into the flat
files of ``store.py`` and ``store.json`` is written last. Only the main process prints (tokens/s, ETA).

Which documents are held out is decided here, by the document's index: an evenly spaced share ``val_fraction``
with a seeded phase (synthetic data brings its own held-out examples).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import shutil
import sys
import time
from dataclasses import asdict

import numpy as np

from framework.cli import UserError
from framework.config import DataConfig
from framework.data.encode import SPLITS, chunk_name, encode_chunk, load_encoder, worker_main, write_json_atomic
from framework.data.sources import iter_documents, size_hint, source_files
from framework.data.store import STORE_VERSION, read_meta, token_dtype

CHUNK_CHARS = 4 << 20  # characters per chunk: the unit of work and of resume
PROGRESS_EVERY_S = 5.0


def fingerprint(cfg: DataConfig, seed: int) -> str:
    """What the store's content depends on: the sources (files by name, size and time), the tokenizer, the split."""
    keys = asdict(cfg)
    for k in ("store", "packing", "num_proc"):
        keys.pop(k)
    files = [(p, os.path.getsize(p), int(os.path.getmtime(p))) for p in source_files(cfg)]
    tok = None
    if cfg.tokenizer:
        from framework.data.tokenizer import tokenizer_dir_sha256

        tok = tokenizer_dir_sha256(cfg.tokenizer)
    blob = json.dumps({"data": keys, "files": files, "tokenizer": tok, "seed": seed, "chunk_chars": CHUNK_CHARS,
                       "v": STORE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def held_out(index: int, fraction: float, seed: int) -> bool:
    """Every 1/fraction-th document, from a seeded phase: exactly ``fraction`` of them, spread evenly."""
    if fraction <= 0:
        return False
    phase = ((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 64)) / float(1 << 64)
    return math.floor((index + 1) * fraction + phase) > math.floor(index * fraction + phase)


def make_tokenizer(cfg: DataConfig, seed: int, out: str) -> None:
    """The store's tokenizer into ``out``: the configured one, or a BPE trained on the corpus' first characters."""
    from framework.data.formats import ensure_chat_template, row_strings
    from framework.data.sources import capped
    from framework.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe

    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    else:
        texts = (text for text, _ in capped(iter_documents(cfg, seed), cfg.bpe_train_chars))
        if cfg.format != "text":  # the rows' own strings, not their JSON
            texts = (t for text in texts for t in row_strings(text))
        tok = train_bpe(texts, cfg.vocab_size)
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer in {cfg.tokenizer} has no EOS token, which ends every document of the store: "
                        "use a tokenizer with one")
    if cfg.format in ("messages", "auto"):
        # conversations are rendered with it: a tokenizer without one gets the project's template, saved with it,
        # so the run's tokenizer, its export, framework.generate and framework.serve render them the same way
        ensure_chat_template(tok)
    save_tokenizer(tok, out)


@contextlib.contextmanager
def main_module_hidden():
    """A spawned process re-imports the parent's ``__main__`` (framework.train: hydra, torch) before running its
    target; the workers need none of it (their target lives in framework.data.encode), so the main module is
    hidden from multiprocessing while they start: each worker then costs tens of megabytes and starts at once."""
    main = sys.modules["__main__"]
    spec, path = getattr(main, "__spec__", None), getattr(main, "__file__", None)
    main.__spec__ = None
    if path is not None:
        del main.__file__
    try:
        yield
    finally:
        main.__spec__ = spec
        if path is not None:
            main.__file__ = path


class Pool:
    """Worker processes behind a bounded task queue: at most ``2 x workers`` chunks (``CHUNK_CHARS`` each) are in
    memory at once, whatever the corpus."""

    def __init__(self, workers: int, args: tuple):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or a process group
        self.tasks, self.results = ctx.Queue(maxsize=workers), ctx.Queue()
        self.procs = [ctx.Process(target=worker_main, args=(*args, self.tasks, self.results), daemon=True)
                      for _ in range(workers)]
        with main_module_hidden():
            for p in self.procs:
                p.start()
        self.in_flight = 0

    def _take(self, timeout: float) -> tuple[int, dict] | None:
        try:
            k, info = self.results.get(timeout=timeout)
        except queue.Empty:
            dead = [p.exitcode for p in self.procs if p.exitcode not in (None, 0)]
            if dead:
                raise UserError(f"a tokenizing worker died (exit code {dead[0]}): rerun to resume the store "
                                "(lower data.num_proc if memory ran out)") from None
            return None
        if k == "error":
            raise UserError(f"tokenizing failed: {info}")
        self.in_flight -= 1
        return k, info

    def _put(self, item, on_done) -> None:
        """Put into the bounded queue; while it is full, take finished chunks (and notice a dead worker)."""
        while True:
            try:
                self.tasks.put(item, timeout=1.0)
                return
            except queue.Full:
                while (r := self._take(0.01)) is not None:
                    on_done(*r)

    def submit(self, task, on_done) -> None:
        self._put(task, on_done)
        self.in_flight += 1
        while (r := self._take(0)) is not None:
            on_done(*r)

    def finish(self, on_done) -> None:
        for _ in self.procs:
            self._put(None, on_done)
        while self.in_flight:
            if (r := self._take(1.0)) is not None:
                on_done(*r)
        for p in self.procs:
            p.join()

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join()


class Progress:
    """One line every few seconds from the main process: tokens, tokens/s, share read, ETA."""

    def __init__(self, total_chars: int | None, enabled: bool):
        self.total, self.enabled = total_chars, enabled
        self.tokens = self.chars = self.skipped_chars = self.skipped_tokens = 0
        self.t0 = self.last = time.perf_counter()

    def done(self, info: dict, skipped: bool = False) -> None:
        tokens = info["train"]["tokens"] + info["val"]["tokens"]
        self.tokens += tokens
        self.chars += info["chars"]
        if skipped:  # finished by an earlier run: not part of this run's rate
            self.skipped_chars += info["chars"]
            self.skipped_tokens += tokens
        now = time.perf_counter()
        if self.enabled and now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        elapsed = max(now - self.t0, 1e-9)
        rate = (self.chars - self.skipped_chars) / elapsed
        msg = (f"[prepare] {self.tokens / 1e6:.1f}M tokens, "
               f"{(self.tokens - self.skipped_tokens) / elapsed / 1e6:.2f}M tokens/s")
        if self.total:
            share = min(self.chars / self.total, 1.0)
            eta = (self.total - self.chars) / rate if rate > 0 else float("inf")
            msg += f", {100 * share:.0f}% read, ETA {eta:.0f}s" if math.isfinite(eta) else f", {100 * share:.0f}% read"
        return msg


def iter_chunks(cfg: DataConfig, seed: int):
    """(k, texts, splits) of about ``CHUNK_CHARS`` characters each, deterministic for a data config."""
    texts, splits, size, k, index = [], [], 0, 0, 0
    for text, split in iter_documents(cfg, seed):
        if split is None:
            split = "val" if held_out(index, cfg.val_fraction, seed) else "train"
        index += 1
        texts.append(text)
        splits.append(split)
        size += len(text)
        if size >= CHUNK_CHARS:
            yield k, texts, splits
            texts, splits, size, k = [], [], 0, k + 1
    if texts:
        yield k, texts, splits


def rendered_chunks(cfg: DataConfig, seed: int, tokenizer_dir: str):
    """``iter_chunks``, with each fine-tuning row rendered into its pieces [(text, counted)] (formats.py) here, in
    the main process (a chat template needs transformers, which the workers do without)."""
    if cfg.format == "text":
        yield from iter_chunks(cfg, seed)
        return
    from framework.data.formats import render_row
    from framework.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    train_on_prompt = bool(cfg.train_on_prompt)
    for k, texts, splits in iter_chunks(cfg, seed):
        yield k, [render_row(t, cfg.format, tok, train_on_prompt) for t in texts], splits


def tokenize_chunks(cfg: DataConfig, seed: int, out: str, plan: dict, progress: bool) -> list[dict]:
    """Every chunk of the corpus tokenized into out/chunks (finished ones kept); their jsons in order."""
    chunk_dir = os.path.join(out, "chunks")
    done: dict[int, dict] = {}
    meter = Progress(size_hint(cfg), progress)
    args = (os.path.join(out, "tokenizer"), plan["eos_id"], plan["dtype"], plan["vocab_size"], chunk_dir)
    workers = cfg.num_proc or len(os.sched_getaffinity(0))
    pool, encoder, pending = None, None, None

    def record(k: int, info: dict) -> None:
        done[k] = info
        meter.done(info)

    try:
        for k, texts, splits in rendered_chunks(cfg, seed, args[0]):
            path = os.path.join(chunk_dir, f"{chunk_name(k)}.json")
            if os.path.isfile(path):  # finished by an earlier run
                with open(path) as f:
                    done[k] = json.load(f)
                meter.done(done[k], skipped=True)
                continue
            if pool is None and pending is None and workers > 1:
                pending = (k, texts, splits)  # one chunk only: encoded here, no processes to start
                continue
            if pool is None and workers > 1:
                pool = Pool(workers, args)
                pool.submit(pending, record)
            if pool is not None:
                pool.submit((k, texts, splits), record)
            else:
                encoder = encoder or load_encoder(args[0])
                record(k, encode_chunk(encoder, *args[1:], k, texts, splits))
        if pending is not None and pool is None:
            k, texts, splits = pending
            record(k, encode_chunk(load_encoder(args[0]), *args[1:], k, texts, splits))
        if pool is not None:
            pool.finish(record)
    finally:
        if pool is not None:
            pool.close()
    return [done[k] for k in sorted(done)]


def merge_chunks(out: str, chunks: list[dict], plan: dict) -> dict:
    """Concatenate the chunks into the flat files; write store.json last and drop the chunks."""
    chunk_dir = os.path.join(out, "chunks")
    splits = {}
    masked = any(c.get("masked") for c in chunks)
    for s in SPLITS:
        lengths = [np.load(os.path.join(chunk_dir, f"{chunk_name(k)}.{s}.len.npy")) for k in range(len(chunks))]
        with open(os.path.join(out, f"{s}.bin.tmp"), "wb") as dst:
            for k in range(len(chunks)):
                with open(os.path.join(chunk_dir, f"{chunk_name(k)}.{s}.bin"), "rb") as src:
                    shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(os.path.join(out, f"{s}.bin.tmp"), os.path.join(out, f"{s}.bin"))
        if masked:
            with open(os.path.join(out, f"{s}.mask.bin.tmp"), "wb") as dst:
                for k in range(len(chunks)):
                    with open(os.path.join(chunk_dir, f"{chunk_name(k)}.{s}.mask.bin"), "rb") as src:
                        shutil.copyfileobj(src, dst, 16 << 20)
            os.replace(os.path.join(out, f"{s}.mask.bin.tmp"), os.path.join(out, f"{s}.mask.bin"))
        all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(all_lengths)]).astype(np.int64)
        np.save(os.path.join(out, f"{s}.idx.npy"), offsets)
        splits[s] = {"tokens": int(offsets[-1]), "documents": int(len(all_lengths))}
    counts = np.zeros(plan["vocab_size"], dtype=np.int64)
    for k in range(len(chunks)):
        counts += np.load(os.path.join(chunk_dir, f"{chunk_name(k)}.counts.npy"))
    np.save(os.path.join(out, "counts.npy"), counts)
    meta = {"version": STORE_VERSION, "tokens": sum(v["tokens"] for v in splits.values()),
            "documents": sum(v["documents"] for v in splits.values()), "splits": splits,
            "arrays": {"mask": "uint8"} if masked else {},
            "chars": sum(c["chars"] for c in chunks), **plan}
    write_json_atomic(os.path.join(out, "store.json"), meta)
    shutil.rmtree(chunk_dir, ignore_errors=True)
    os.remove(os.path.join(out, "build.json"))
    return meta


def start_build(cfg: DataConfig, seed: int, out: str, fp: str) -> dict:
    """The build plan (tokenizer, dtype, fingerprint) of ``out``: an unfinished build of the same data config is
    continued; anything else there is cleared first."""
    plan_path = os.path.join(out, "build.json")
    if os.path.isfile(plan_path):
        with open(plan_path) as f:
            plan = json.load(f)
        if plan.get("fingerprint") == fp and os.path.isdir(os.path.join(out, "tokenizer")):
            return plan
    for name in ("chunks", "tokenizer", "store.json", "build.json", "counts.npy",
                 *(f"{s}.{ext}" for s in SPLITS for ext in ("bin", "idx.npy", "mask.bin"))):
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else (os.path.exists(path) and os.remove(path))
    os.makedirs(os.path.join(out, "chunks"))
    make_tokenizer(cfg, seed, os.path.join(out, "tokenizer"))
    from framework.data.tokenizer import load_tokenizer, tokenizer_sha256

    tok = load_tokenizer(os.path.join(out, "tokenizer"))
    vocab = len(tok)
    plan = {"fingerprint": fp, "tokenizer_sha256": tokenizer_sha256(tok), "vocab_size": vocab,
            "dtype": token_dtype(vocab).name, "eos_id": int(tok.eos_token_id), "seed": seed,
            "val_fraction": cfg.val_fraction, "source": cfg.source if not cfg.mixture else "mixture",
            "format": cfg.format}
    write_json_atomic(plan_path, plan)
    return plan


def build_store(cfg: DataConfig, out: str, seed: int, progress: bool = True, replace: bool = True) -> dict:
    """Prepare (or resume, or reuse) the token store of ``cfg`` in ``out``; returns its store.json.

    ``replace=False`` refuses an ``out`` that holds a store of another data config instead of clearing it."""
    fp = fingerprint(cfg, seed)
    meta = read_meta(out)
    if meta is not None and meta.get("fingerprint") == fp:
        return meta
    if meta is not None and not replace:
        raise UserError(f"out={out} holds a token store of another data config: choose another out= or remove it")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    plan = start_build(cfg, seed, out, fp)
    chunks = tokenize_chunks(cfg, seed, out, plan, progress)
    meta = merge_chunks(out, chunks, plan)
    if progress:
        rate = meta["tokens"] / max(time.perf_counter() - t0, 1e-9)
        print(f"[prepare] {out}: {meta['tokens']:,} tokens in {meta['documents']:,} documents "
              f"({meta['splits']['val']['documents']:,} held out), {meta['dtype']}, {rate / 1e6:.2f}M tokens/s",
              file=sys.stderr, flush=True)
    return meta
