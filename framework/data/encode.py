"""What a tokenizing worker process runs: one chunk of documents to token and index files.

Kept free of torch and of the framework's config (a spawned worker imports only this module, numpy and
``tokenizers``), so each worker costs tens of megabytes, not hundreds.
"""

from __future__ import annotations

import json
import os

import numpy as np

SPLITS = ("train", "val")
BATCH_CHARS = 1 << 18  # characters a worker encodes at once: its memory (~100 bytes a token while encoding)


def write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def release_free_memory() -> None:
    """Hand freed heap back to the system. The encoder's many small allocations fragment glibc's heap, and without
    this a worker's resident memory creeps up chunk after chunk (about 2.5x its working set after a few chunks)."""
    if _LIBC:
        _LIBC[0].malloc_trim(0)


def _load_libc() -> list:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return [libc] if hasattr(libc, "malloc_trim") else []
    except OSError:
        return []


_LIBC = _load_libc()


def chunk_name(k: int) -> str:
    return f"{k:06d}"


def _doc_chars(doc) -> int:
    return len(doc) if isinstance(doc, str) else sum(len(t) for t, _ in doc)


def encode_docs(encoder, eos: int, docs: list) -> list[tuple[list[int], list[int] | None]]:
    """(ids, loss mask or None) of each document: a text gets its tokens and EOS; a fine-tuning example comes as
    its pieces [(text, counted)] (formats.py rendered them, EOS included) and gets a 0/1 mask per token."""
    if not docs or isinstance(docs[0], str):
        return [(enc.ids + [eos], None) for enc in encoder.encode_batch_fast(docs, add_special_tokens=False)]
    encs = iter(encoder.encode_batch_fast([t for d in docs for t, _ in d], add_special_tokens=False))
    out = []
    for d in docs:
        ids, mask = [], []
        for _, counted in d:
            piece = next(encs).ids
            ids += piece
            mask += [int(counted)] * len(piece)
        out.append((ids, mask))
    return out


def encode_chunk(encoder, eos: int, dtype: np.dtype, vocab: int, chunk_dir: str, k: int, texts: list,
                 splits: list[str]) -> dict:
    """Tokenize one chunk (a batch of ``BATCH_CHARS`` at a time) and write its files; returns its json. ``texts``
    are documents' texts, or fine-tuning examples' pieces (then a loss-mask file is written beside the tokens)."""
    base = os.path.join(chunk_dir, chunk_name(k))
    masked = bool(texts) and not isinstance(texts[0], str)
    files = {s: open(f"{base}.{s}.bin.tmp", "wb") for s in SPLITS}
    masks = {s: open(f"{base}.{s}.mask.bin.tmp", "wb") for s in SPLITS} if masked else {}
    lengths: dict[str, list[int]] = {s: [] for s in SPLITS}
    counts = np.zeros(vocab, dtype=np.int64)
    start = 0
    while start < len(texts):
        stop, size = start, 0
        while stop < len(texts) and (stop == start or size < BATCH_CHARS):
            size += _doc_chars(texts[stop])
            stop += 1
        flat: dict[str, list[int]] = {s: [] for s in SPLITS}
        flat_mask: dict[str, list[int]] = {s: [] for s in SPLITS}
        for (ids, mask), split in zip(encode_docs(encoder, eos, texts[start:stop]), splits[start:stop]):
            flat[split].extend(ids)
            lengths[split].append(len(ids))
            if masked:
                flat_mask[split].extend(mask)
        for s in SPLITS:
            ids = np.array(flat[s], dtype=dtype)
            files[s].write(ids.tobytes())
            if masked:
                masks[s].write(np.array(flat_mask[s], dtype=np.uint8).tobytes())
            if s == "train":
                counts += np.bincount(ids, minlength=vocab)[:vocab]
        del flat, flat_mask
        release_free_memory()
        start = stop
    for s in SPLITS:
        files[s].close()
        np.save(f"{base}.{s}.len.npy", np.asarray(lengths[s], dtype=np.int64))
        os.replace(f"{base}.{s}.bin.tmp", f"{base}.{s}.bin")
        if masked:
            masks[s].close()
            os.replace(f"{base}.{s}.mask.bin.tmp", f"{base}.{s}.mask.bin")
    np.save(f"{base}.counts.npy", counts)
    info = {s: {"tokens": int(sum(lengths[s])), "documents": len(lengths[s])} for s in SPLITS}
    info["chars"] = sum(_doc_chars(t) for t in texts)
    info["masked"] = masked
    write_json_atomic(f"{base}.json", info)  # last: the chunk is done
    return info


def load_encoder(tokenizer_dir: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))


def worker_main(tokenizer_dir: str, eos: int, dtype: str, vocab: int, chunk_dir: str, tasks, results) -> None:
    """A worker process: chunks from ``tasks`` until None; (k, info) or ("error", message) to ``results``."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread each: the processes are the parallelism
    os.environ["RAYON_NUM_THREADS"] = "1"
    try:
        encoder = load_encoder(tokenizer_dir)
        while (task := tasks.get()) is not None:
            k, texts, splits = task
            results.put((k, encode_chunk(encoder, eos, np.dtype(dtype), vocab, chunk_dir, k, texts, splits)))
    except BaseException as e:  # noqa: BLE001 - reported by the main process, in one line
        results.put(("error", f"{type(e).__name__}: {e}"))
