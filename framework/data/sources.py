"""Corpora as ``datasets.Dataset`` objects with one ``text`` column.

- ``stdlib``: this Python's own standard-library source files, a real code corpus every install has;
- ``synthetic``: tasks with known answers (``framework.data.synthetic``);
- ``files``: local .txt / .jsonl / .json / .parquet files;
- ``hub``: a Hugging Face hub dataset by name (needs the network).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import datasets

from framework.cli import UserError
from framework.config import DataConfig
from framework.data.synthetic import make_examples


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


def _capped(texts, max_chars: int) -> list[str]:
    out, total = [], 0
    for text in texts:
        if max_chars and total >= max_chars:
            break
        if max_chars:
            text = text[: max_chars - total]
        out.append(text)
        total += len(text)
    return out


def load_stdlib(cfg: DataConfig) -> datasets.Dataset:
    def read(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            return ""

    texts = _capped((t for t in map(read, stdlib_files()) if t), cfg.max_chars)
    return datasets.Dataset.from_dict({"text": texts})


def check_files(cfg: DataConfig) -> list[str]:
    """Fail early, in one line, on missing or unsupported data files."""
    if not cfg.paths:
        raise UserError("data.source=files needs data.paths=[...] (text, JSONL or Parquet files)")
    for p in cfg.paths:
        if not os.path.isfile(p):
            raise UserError(f"data file not found: {p} (fix data.paths)")
        if not p.endswith((".txt", ".text", ".md", ".py", ".jsonl", ".json", ".parquet")):
            raise UserError(f"unsupported data file {p}: use .txt, .jsonl/.json or .parquet")
    return list(cfg.paths)


def load_files(cfg: DataConfig) -> datasets.Dataset:
    paths = check_files(cfg)
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    parts = []
    for p in paths:
        ext = os.path.splitext(p)[1]
        builder = kind.get(ext)
        if builder is None:
            ds = datasets.Dataset.from_dict({"text": [Path(p).read_text(encoding="utf-8")]})
        else:
            ds = datasets.load_dataset(builder, data_files=p, split="train")
            if cfg.text_field not in ds.column_names:
                raise UserError(f"{p} has no '{cfg.text_field}' column (columns: {ds.column_names}); set data.text_field")
            ds = ds.select_columns([cfg.text_field]).rename_column(cfg.text_field, "text") if cfg.text_field != "text" \
                else ds.select_columns(["text"])
        parts.append(ds)
    ds = datasets.concatenate_datasets(parts)
    if cfg.max_chars:
        ds = datasets.Dataset.from_dict({"text": _capped(ds["text"], cfg.max_chars)})
    return ds


def load_hub(cfg: DataConfig) -> datasets.Dataset:
    if not cfg.hub_name:
        raise UserError("data.source=hub needs data.hub_name=<dataset>")
    ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.hub_split)
    if cfg.text_field not in ds.column_names:
        raise UserError(f"hub dataset has no '{cfg.text_field}' column (columns: {ds.column_names}); set data.text_field")
    texts = _capped(ds[cfg.text_field], cfg.max_chars)
    return datasets.Dataset.from_dict({"text": texts})


def load_corpus(cfg: DataConfig, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train texts, held-out texts or None). Only synthetic data has a separate held-out set of examples."""
    if cfg.source == "synthetic":
        s = cfg.synthetic
        train = make_examples(s.task, s.num_examples, seed, s.min_len, s.max_len)
        val = make_examples(s.task, s.val_examples, seed + 10_007, s.min_len, s.max_len)
        return (datasets.Dataset.from_dict({"text": [e.text for e in train]}),
                datasets.Dataset.from_dict({"text": [e.text for e in val]}))
    loaders = {"stdlib": load_stdlib, "files": load_files, "hub": load_hub}
    if cfg.source not in loaders:
        raise UserError(f"unknown data.source '{cfg.source}': use synthetic, stdlib, files or hub")
    return loaders[cfg.source](cfg), None


def validate_data_config(cfg: DataConfig) -> None:
    """Cheap checks every rank runs before any heavy work."""
    if cfg.source == "files":
        check_files(cfg)
    if cfg.tokenizer is not None and not os.path.isfile(os.path.join(cfg.tokenizer, "tokenizer.json")):
        raise UserError(f"no tokenizer.json in data.tokenizer={cfg.tokenizer}: point it at a Hugging Face tokenizer directory")
    if cfg.source == "synthetic":
        from framework.data.synthetic import TASKS

        if cfg.synthetic.task not in TASKS:
            raise UserError(f"unknown synthetic task '{cfg.synthetic.task}': use one of {', '.join(TASKS)}")
