"""Benchmark of the token store: memory, throughput and completeness of ``framework.prepare`` at growing sizes.

    python scripts/bench_data.py [--sizes 0.2 0.8 2] [--workers N] [--workdir DIR] [--out bench_data.json]

For each size (GB of JSONL built from this Python's standard-library source, repeated) it runs
``python -m framework.prepare`` and samples the resident memory of its whole process tree (the sum over the main
process and its workers; the peak is reported), then encodes the same corpus with the tokenizer's own parallel
batch encoding (``encode_batch_fast`` on every core, texts already in memory: the time of the encode calls alone)
and compares every document's ids with the store. Last, a training rank (``framework.train``, the debug model) runs
a few steps over the biggest store and its peak resident memory is sampled. Prints a table; writes JSON.
Run it with the machine otherwise idle: the numbers are throughputs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def stdlib_docs() -> list[str]:
    from framework.data.sources import iter_stdlib

    return [text for text, _ in iter_stdlib()]


def build_corpus(path: str, gigabytes: float, docs: list[str]) -> int:
    """JSONL of the stdlib files, repeated until ``gigabytes`` (1e9 bytes); returns the documents written."""
    target, size, n = int(gigabytes * 1e9), 0, 0
    with open(path, "w") as f:
        while size < target:
            for text in docs:
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                size += len(line.encode())
                n += 1
                if size >= target:
                    break
    return n


class TreeRss:
    """Samples the summed resident memory of a process and all its descendants; keeps the peak."""

    def __init__(self, pid: int, every_s: float = 0.1):
        self.root, self.every, self.peak, self.samples = psutil.Process(pid), every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                for p in [self.root, *self.root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            self.peak, self.samples = max(self.peak, total), self.samples + 1
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_sampled(cmd: list[str], env: dict) -> tuple[float, int, subprocess.CompletedProcess]:
    """(seconds, peak tree RSS in bytes, the finished process)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = TreeRss(proc.pid)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    peak = rss.stop()
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return seconds, peak, done


def reference_pass(corpus: str, tok_dir: str, store_dir: str) -> tuple[float, int, bool]:
    """The tokenizer's own parallel batch encoding over the corpus (tokens/s of the encode calls alone), and
    whether every document's ids are the store's, in its order and split."""
    from tokenizers import Tokenizer

    from framework.data.prepare import held_out
    from framework.data.store import TokenStore

    store = TokenStore(store_dir)
    meta = store.meta
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    eos = meta["eos_id"]
    cursor = {"train": 0, "val": 0}
    encode_s, tokens, index, same = 0.0, 0, 0, True

    def check(batch: list[str]) -> None:
        nonlocal encode_s, tokens, index, same
        t0 = time.perf_counter()
        encs = tok.encode_batch_fast(batch, add_special_tokens=False)
        encode_s += time.perf_counter() - t0
        for enc in encs:
            split = "val" if held_out(index, meta["val_fraction"], meta["seed"]) else "train"
            s = getattr(store, split)
            d = cursor[split]
            a, b = int(s.offsets[d]), int(s.offsets[d + 1])
            ids = np.asarray(enc.ids + [eos], dtype=s.tokens.dtype)
            same = same and b - a == len(ids) and np.array_equal(np.asarray(s.tokens[a:b]), ids)
            cursor[split] += 1
            tokens += len(ids) - 1
            index += 1

    batch, size = [], 0
    with open(corpus) as f:
        for line in f:
            text = json.loads(line)["text"]
            batch.append(text)
            size += len(text)
            if size >= 8 << 20:
                check(batch)
                batch, size = [], 0
    if batch:
        check(batch)
    same = same and cursor["train"] == store.train.documents and cursor["val"] == store.val.documents
    return tokens / max(encode_s, 1e-9), tokens, same


def bench_size(gb: float, args, docs: list[str], tok_dir: str, env: dict) -> dict:
    corpus = os.path.join(args.workdir, f"corpus-{gb:g}GB.jsonl")
    n_docs = build_corpus(corpus, gb, docs)
    store = os.path.join(args.workdir, f"store-{gb:g}GB")
    subprocess.run(["rm", "-rf", store], check=True)
    cmd = [sys.executable, "-m", "framework.prepare", "data=files", f"data.paths=[{corpus}]", f"data.tokenizer={tok_dir}",
           f"data.num_proc={args.workers}", f"out={store}"]
    seconds, peak, _ = run_sampled(cmd, env)
    meta = json.load(open(os.path.join(store, "store.json")))
    ref_tps, ref_tokens, same = reference_pass(corpus, tok_dir, store)
    tps = meta["tokens"] / seconds
    row = {"size_gb": gb, "documents": n_docs, "tokens": meta["tokens"], "prepare_s": round(seconds, 2),
           "tokens_per_s": round(tps), "reference_tokens_per_s": round(ref_tps), "ratio": round(tps / ref_tps, 3),
           "peak_rss_gb": round(peak / 2**30, 3), "every_token_in_store": bool(same and ref_tokens + n_docs ==
                                                                                meta["tokens"]),
           "store": store}
    if not args.keep:
        os.remove(corpus)
    return row


def bench_train_rank(store: str, env: dict, steps: int) -> float:
    """Peak RSS (GB) of one training rank over ``store`` (the debug model, a few steps)."""
    run = os.path.join(os.path.dirname(store), "train-run")
    subprocess.run(["rm", "-rf", run], check=True)
    cmd = [sys.executable, "-m", "framework.train", "model=debug", f"data.store={store}", f"run_dir={run}",
           f"trainer.max_steps={steps}", "trainer.seq_len=256", "trainer.global_batch_size=8",
           "trainer.micro_batch_size=8", "trainer.eval_every=0", "logger.progress=false", "checkpoint.export=false",
           "checkpoint.save_final=false", "checkpoint.resume=none"]
    _, peak, _ = run_sampled(cmd, env)
    return peak / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.2, 0.8, 2.0], help="corpus sizes in GB of JSONL")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="tokenizing processes")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary (trained once on the stdlib source)")
    ap.add_argument("--workdir", default="/tmp/miaotui-bench-data")
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--keep", action="store_true", help="keep the JSONL corpora")
    ap.add_argument("--out", default=os.path.join(REPO, "bench_data.json"))
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    # the reference: the tokenizer's own batch encoding on as many threads as prepare has processes (read by
    # tokenizers when it first runs in parallel, so set before it is imported)
    os.environ.update(TOKENIZERS_PARALLELISM="true", RAYON_NUM_THREADS=str(args.workers))
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    from framework.data.tokenizer import save_tokenizer, train_bpe

    docs = stdlib_docs()
    tok_dir = os.path.join(args.workdir, "tokenizer")
    save_tokenizer(train_bpe(docs, args.vocab), tok_dir)
    rows = [bench_size(gb, args, docs, tok_dir, env) for gb in args.sizes]
    biggest = max(rows, key=lambda r: r["size_gb"])
    train_rss = bench_train_rank(biggest["store"], env, args.train_steps)
    print(f"\ntoken store, {args.workers} tokenizing processes, vocab {args.vocab}")
    print("| JSONL GB | documents | tokens | prepare s | tokens/s | tokenizer alone tokens/s | ratio | peak RSS GB "
          "(all processes) | every token in store |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size_gb']:g} | {r['documents']:,} | {r['tokens']:,} | {r['prepare_s']} | {r['tokens_per_s']:,} | "
              f"{r['reference_tokens_per_s']:,} | {r['ratio']:.2f}x | {r['peak_rss_gb']:.3f} | "
              f"{'yes' if r['every_token_in_store'] else 'NO'} |")
    print(f"training rank over the {biggest['size_gb']:g} GB store ({biggest['tokens']:,} tokens): peak RSS "
          f"{train_rss:.3f} GB")
    with open(args.out, "w") as f:
        json.dump({"workers": args.workers, "vocab": args.vocab, "rows": rows, "train_rank_peak_rss_gb": train_rss}, f,
                  indent=1)
    if not all(r["every_token_in_store"] for r in rows):
        raise SystemExit("a store does not hold every token of its corpus")


if __name__ == "__main__":
    main()
