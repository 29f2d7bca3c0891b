"""Corpora as streams of documents, read a batch at a time: never the whole corpus in memory.

- ``stdlib``: this Python's own standard-library source files, a real code corpus every install has;
- ``synthetic``: tasks with known answers (``framework.data.synthetic``), with their own held-out examples;
- ``files``: local .txt / .md / .py / .jsonl / .json / .parquet files, directories and globs of them, any size;
- ``hub``: a Hugging Face dataset (a hub name, or a local dataset directory) read with ``datasets`` streaming;
- ``data.mixture``: several of these, interleaved in proportion to their weights.

A document is ``(text, split)``: split is "val" or "train" where the source decides (synthetic), None where the
store's seeded rule does. With a fine-tuning ``data.format`` a JSONL/Parquet/hub row travels whole, as its JSON
text (``row_text``), and is rendered into tokens and a loss mask when the store is built (formats.py).
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from framework.cli import UserError
from framework.config import DataConfig

Document = tuple[str, str | None]
TEXT_SUFFIXES = (".txt", ".text", ".md", ".py")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet")
# A text file larger than this is cut at line boundaries into documents of about this size, so one huge file never
# sits whole in memory.
TEXT_DOC_CHARS = 4 << 20


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted for determinism (tests and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel and rel[0] in ("site-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo"):
            continue
        if "tests" in rel or "test" in rel:
            continue
        files.append(path)
    return files


def iter_stdlib() -> Iterator[Document]:
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text:
            yield text, None


def expand_paths(paths: list[str]) -> list[str]:
    """Files behind ``paths`` (files, directories searched recursively, globs), each checked; fails in one line."""
    if not paths:
        raise UserError("data.source=files needs data.paths=[...] (text, JSONL or Parquet files, directories or globs)")
    out = []
    for p in paths:
        if any(c in p for c in "*?["):
            found = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
            if not found:
                raise UserError(f"no data file matches {p} (fix data.paths)")
        elif os.path.isdir(p):
            found = sorted(str(f) for f in Path(p).rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not found:
                raise UserError(f"no .txt/.jsonl/.json/.parquet file under {p} (fix data.paths)")
        elif os.path.isfile(p):
            found = [p]
        else:
            raise UserError(f"data file not found: {p} (fix data.paths)")
        for f in found:
            if not f.endswith(SUFFIXES):
                raise UserError(f"unsupported data file {f}: use .txt, .md, .py, .jsonl/.json or .parquet")
        out.extend(found)
    return out


def iter_text_file(path: str) -> Iterator[Document]:
    piece, size = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            piece.append(line)
            size += len(line)
            if size >= TEXT_DOC_CHARS:
                yield "".join(piece), None
                piece, size = [], 0
    if piece:
        yield "".join(piece), None


def row_text(row: dict) -> str:
    """A fine-tuning row as one document's text: its JSON (read back by ``framework.data.formats``)."""
    return json.dumps(row, ensure_ascii=False, default=str)


def _field(row: dict, field: str | None, where: str) -> str:
    """The row's text field; field None: the whole row (fine-tuning formats)."""
    if field is None:
        if not isinstance(row, dict):
            raise UserError(f"{where} is {type(row).__name__}, not an object: fine-tuning rows are JSON objects")
        return row_text(row)
    if field not in row:
        raise UserError(f"{where} has no '{field}' field (fields: {sorted(row)}); set data.text_field")
    text = row[field]
    if not isinstance(text, str):
        raise UserError(f"{where}: '{field}' is {type(text).__name__}, not text; set data.text_field")
    return text


def iter_jsonl(path: str, field: str | None) -> Iterator[Document]:
    with open(path, "rb") as f:
        first = f.read(1 << 10).lstrip()[:1]
        f.seek(0)
        if first == b"[":  # a JSON array: read whole (JSON Lines is the format for big corpora)
            for i, row in enumerate(json.load(f)):
                yield _field(row, field, f"{path} item {i}"), None
            return
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {n} is not JSON ({e.msg}): fix the file or leave it out") from None
                yield _field(row, field, f"{path} line {n}"), None


def iter_parquet(path: str, field: str | None) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field is None:  # fine-tuning rows: every column
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield row_text(row), None
        return
    if field not in pf.schema_arrow.names:
        raise UserError(f"{path} has no '{field}' column (columns: {pf.schema_arrow.names}); set data.text_field")
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text:
                yield text, None


def iter_files(src, field: str | None) -> Iterator[Document]:
    for path in expand_paths(list(src.paths)):
        if path.endswith(TEXT_SUFFIXES):
            if field is None:
                raise UserError(f"{path} is a text file, but the data format reads rows: give JSONL or Parquet rows, "
                                "or data.format=text")
            yield from iter_text_file(path)
        elif path.endswith(".parquet"):
            yield from iter_parquet(path, field)
        else:
            yield from iter_jsonl(path, field)


def iter_hub(src, field: str | None) -> Iterator[Document]:
    if not src.hub_name:
        raise UserError("data.source=hub needs data.hub_name=<dataset or local dataset directory>")
    import datasets

    ds = datasets.load_dataset(src.hub_name, src.hub_config, split=src.hub_split, streaming=True)
    for i, row in enumerate(ds):
        yield _field(row, field, f"{src.hub_name} row {i}"), None


def iter_synthetic(cfg: DataConfig, seed: int, own_split: bool) -> Iterator[Document]:
    """The training examples, then the held-out ones (another seed), marked as such; in a mixture
    (``own_split=False``) the training examples only, held out by the store's rule like every other source's."""
    from framework.data.synthetic import make_examples

    s = cfg.synthetic
    for ex in make_examples(s.task, s.num_examples, seed, s.min_len, s.max_len):
        yield ex.text, ("train" if own_split else None)
    if own_split:
        for ex in make_examples(s.task, s.val_examples, seed + 10_007, s.min_len, s.max_len):
            yield ex.text, "val"


def capped(docs: Iterator[Document], max_chars: int | None) -> Iterator[Document]:
    """The documents up to ``max_chars`` characters in all (the last one cut); None: all of them."""
    total = 0
    for text, split in docs:
        if max_chars is not None:
            if total >= max_chars:
                return
            text = text[: max_chars - total]
        total += len(text)
        yield text, split


def iter_source(src, cfg: DataConfig, seed: int) -> Iterator[Document]:
    """One source (the data config itself, or an entry of its mixture)."""
    if src.source == "synthetic":
        return capped(iter_synthetic(cfg, seed, own_split=src is cfg), src.max_chars)
    field = src.text_field if cfg.format == "text" else None  # fine-tuning formats: whole rows
    readers = {"stdlib": lambda: iter_stdlib(), "files": lambda: iter_files(src, field),
               "hub": lambda: iter_hub(src, field)}
    if src.source not in readers:
        raise UserError(f"unknown data source '{src.source}': use synthetic, stdlib, files or hub")
    return capped(readers[src.source](), src.max_chars)


def mix(streams: list[Iterator[Document]], weights: list[float]) -> Iterator[Document]:
    """Interleave so that each stream's share of the characters follows its weight: the next document comes from
    the stream furthest below its share (deterministic, no sampling); the mixture ends when any stream runs out,
    so the proportions hold exactly."""
    taken = [0] * len(streams)
    while True:
        i = min(range(len(streams)), key=lambda k: (taken[k] / weights[k], k))
        doc = next(streams[i], None)
        if doc is None:
            return
        taken[i] += len(doc[0]) or 1
        yield doc


def iter_documents(cfg: DataConfig, seed: int) -> Iterator[Document]:
    """Every document of the data config, in a deterministic order."""
    if not cfg.mixture:
        return iter_source(cfg, cfg, seed)
    streams = [iter_source(m, cfg, seed) for m in cfg.mixture]
    return capped(mix(streams, [float(m.weight) for m in cfg.mixture]), cfg.max_chars)


def size_hint(cfg: DataConfig) -> int | None:
    """Characters the corpus is expected to hold (from file sizes), for an ETA; None when unknown (hub)."""
    def one(src) -> int | None:
        if src.source == "files":
            n = sum(os.path.getsize(p) for p in expand_paths(list(src.paths)))
        elif src.source == "stdlib":
            n = sum(p.stat().st_size for p in stdlib_files())
        elif src.source == "synthetic":
            s = cfg.synthetic
            n = (s.num_examples + s.val_examples) * (len(s.task) + 6 + 4 * (s.min_len + s.max_len))
        else:
            return None
        return min(n, src.max_chars) if src.max_chars is not None else n

    if not cfg.mixture:
        return one(cfg)
    sizes = [one(m) for m in cfg.mixture]
    if any(s is None for s in sizes):
        return None
    # the mixture ends when the first source runs out
    total = sum(float(m.weight) for m in cfg.mixture)
    n = int(min(s / (float(m.weight) / total) for s, m in zip(sizes, cfg.mixture)))
    return min(n, cfg.max_chars) if cfg.max_chars is not None else n


def source_files(cfg: DataConfig) -> list[str]:
    """The local files the corpus reads (for the store's fingerprint)."""
    srcs = cfg.mixture or [cfg]
    return [p for s in srcs if s.source == "files" for p in expand_paths(list(s.paths))]


def load_corpus(cfg: DataConfig, seed: int) -> tuple[list[str], list[str] | None]:
    """(texts, held-out texts or None) in memory: only for small samples such as calibration text, bounded by an
    explicit ``data.max_chars``. Training goes through the token store."""
    if cfg.max_chars is None and cfg.source != "synthetic":
        raise UserError("reading a corpus into memory needs a character cap: set max_chars")
    train, val = [], []
    for text, split in iter_documents(cfg, seed):
        (val if split == "val" else train).append(text)
    return train, (val if cfg.source == "synthetic" else None)


def validate_data_config(cfg: DataConfig) -> None:
    """Cheap checks every rank runs before any heavy work."""
    from framework.data.synthetic import TASKS

    for src in cfg.mixture or [cfg]:
        if src.source not in ("synthetic", "stdlib", "files", "hub"):
            raise UserError(f"unknown data source '{src.source}': use synthetic, stdlib, files or hub")
        if src.source == "files":
            expand_paths(list(src.paths))
        if src.source == "hub" and not src.hub_name:
            raise UserError("data.source=hub needs data.hub_name=<dataset or local dataset directory>")
        if src.max_chars is not None and src.max_chars < 1:
            raise UserError(f"max_chars={src.max_chars}: leave it unset (no cap) or give a positive number")
    for m in cfg.mixture:
        if not float(m.weight) > 0:
            raise UserError(f"data.mixture weight {m.weight} of source {m.source}: weights must be positive")
    if cfg.tokenizer is not None and not os.path.isfile(os.path.join(cfg.tokenizer, "tokenizer.json")):
        raise UserError(f"no tokenizer.json in data.tokenizer={cfg.tokenizer}: point it at a Hugging Face tokenizer directory")
    if cfg.synthetic.task not in TASKS and any(s.source == "synthetic" for s in cfg.mixture or [cfg]):
        raise UserError(f"unknown synthetic task '{cfg.synthetic.task}': use one of {', '.join(TASKS)}")
    if cfg.packing not in (None, "concat", "document"):
        raise UserError(f"data.packing={cfg.packing}: use concat or document")
    from framework.data.formats import FORMATS

    if cfg.format not in (*FORMATS, "auto"):
        raise UserError(f"data.format={cfg.format}: use one of {', '.join(FORMATS)} or auto")
    if cfg.format != "text" and any(s.source in ("stdlib", "synthetic") for s in cfg.mixture or [cfg]):
        raise UserError(f"data.format={cfg.format} reads rows of JSONL/Parquet/hub data: use data.source=files (or "
                        "hub) with such rows, or data.format=text")
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"data.val_fraction={cfg.val_fraction}: use a share in [0, 1)")
    if cfg.store is not None and not os.path.isfile(os.path.join(cfg.store, "store.json")):
        raise UserError(f"data.store={cfg.store} is not a finished token store (no store.json): run "
                        f"`python -m framework.prepare data=<config> out={cfg.store}` first")
