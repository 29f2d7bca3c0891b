"""framework.report: a run's figures from metrics.jsonl, the benchmarks' figures from their JSON, one-line errors."""

from __future__ import annotations

import json
import os
import struct

import pytest

pytest.importorskip("matplotlib")

from framework.cli import UserError  # noqa: E402
from framework.report import plot_json, read_metrics, report, write_bench_json  # noqa: E402
from framework.report.__main__ import main as report_main  # noqa: E402
from framework.report.bench import (  # noqa: E402
    detect_bench,
    plot_bench_compress,
    plot_bench_infer,
    plot_bench_serve,
    plot_bench_train,
    variant_bits,
)

TRAIN_BLUE = (0x1F, 0x77, 0xB4)  # matplotlib's C0 / tab:blue: the training loss
EVAL_ORANGE = (0xFF, 0x7F, 0x0E)  # tab:orange: the validation loss


def png_size(path: str) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def assert_png(path: str, min_w: int = 500, min_h: int = 300) -> None:
    assert os.path.isfile(path), path
    w, h = png_size(path)
    assert min_w <= w <= 4000 and min_h <= h <= 6000, (path, w, h)
    assert os.path.getsize(path) > 8_000, f"{path} is suspiciously small: an empty figure?"


def colour_pixels(path: str, rgb: tuple[int, int, int], tol: int = 12) -> int:
    """How many pixels of the PNG are (nearly) the colour ``rgb``: a line drawn in it is there."""
    import matplotlib.image as mpimg
    import numpy as np

    img = (mpimg.imread(path)[..., :3] * 255).astype(int)
    return int((np.abs(img - np.array(rgb)).max(axis=-1) <= tol).sum())


def write_run(run_dir, train_steps=range(5, 105, 5), eval_steps=(25, 50, 75, 100), mfu=None, extra=()) -> str:
    os.makedirs(run_dir, exist_ok=True)
    lines = []
    for s in train_steps:
        lines.append({"step": s, "loss": 5.0 / (1 + s / 20), "lr": 1e-3 * min(1, s / 20), "grad_norm": 2.0 / (1 + s / 10),
                      "tokens_per_s": 9000.0 + 10 * s, "mfu": mfu, "peak_mem_gb": 0.8, "tokens_seen": 4096 * s})
        if s in eval_steps:
            lines.append({"step": s, "eval_loss": 5.2 / (1 + s / 20), "eval_ppl": 2.0, "eval_exact_match": s / 200})
    lines += list(extra)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines))
    return str(run_dir)


def test_run_figures_show_both_losses_and_skip_absent_keys(tmp_path):
    run = write_run(tmp_path / "run")
    plots = report(run)
    names = sorted(os.path.basename(p) for p in plots.written)
    assert names == ["eval_exact_match.png", "grad_norm.png", "loss.png", "lr.png", "tokens_per_s.png"]
    for p in plots.written:
        assert_png(p)
    loss = os.path.join(run, "loss.png")
    assert colour_pixels(loss, TRAIN_BLUE) > 200, "training loss line missing"
    assert colour_pixels(loss, EVAL_ORANGE) > 200, "validation loss line missing"
    # mfu is null on CPU: one line says so and how to get it; no lm-eval results either
    assert any(s.startswith("mfu.png skipped") and "trainer.peak_tflops" in s for s in plots.skipped), plots.skipped
    assert any(s.startswith("eval_scores.png skipped") for s in plots.skipped)
    assert all("\n" not in s for s in plots.skipped)


def test_mfu_and_eval_scores_when_present(tmp_path):
    run = write_run(tmp_path / "run", mfu=0.41)
    os.makedirs(os.path.join(run, "eval"))
    results = {"results": {"sentiment": {"alias": "sentiment", "acc,none": 0.75, "acc_stderr,none": 0.04},
                           "translation": {"alias": "translation", "bleu,none": 12.5, "bleu_stderr,none": "N/A",
                                           "chrf,none": 40.1}},
               "versions": {"sentiment": 1.0}, "n-shot": {"sentiment": 0}}
    with open(os.path.join(run, "eval", "results.json"), "w") as f:
        json.dump(results, f)
    os.makedirs(os.path.join(run, "export"))
    with open(os.path.join(run, "export", "results.json"), "w") as f:  # exports and checkpoints are not searched
        json.dump(results, f)
    plots = report(run)
    names = {os.path.basename(p) for p in plots.written}
    assert {"mfu.png", "eval_scores.png", "loss.png"} <= names
    assert_png(os.path.join(run, "eval_scores.png"))
    assert not any(s.startswith(("mfu.png", "eval_scores.png")) for s in plots.skipped)
    # the same lm-eval JSON given directly: its chart beside it
    direct = plot_json(os.path.join(run, "eval", "results.json"))
    assert [os.path.basename(p) for p in direct.written] == ["results_scores.png"]


def test_resumed_run_keeps_the_later_attempt_and_tolerates_a_cut_last_line(tmp_path):
    run = write_run(tmp_path / "run", train_steps=range(1, 11), eval_steps=(10,))
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:  # resumed from step 5: steps 6.. again, then a crash
        for s in range(6, 13):
            f.write(json.dumps({"step": s, "loss": 100.0 + s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0,
                                "tokens_seen": 4096 * s}) + "\n")
        f.write('{"step": 13, "loss": 1')
    train, evals = read_metrics(run)
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["loss"] for r in train[5:]] == [100.0 + s for s in range(6, 13)]
    assert [r["step"] for r in evals] == [10]  # an eval line not repeated by the later attempt stays


@pytest.mark.parametrize("setup,needle", [
    (lambda d: None, "no such run directory or file"),
    (lambda d: os.makedirs(d), "has no metrics.jsonl"),
    (lambda d: (os.makedirs(d), open(os.path.join(d, "metrics.jsonl"), "w").close()), "has no metric lines yet"),
    (lambda d: (os.makedirs(d), open(os.path.join(d, "metrics.jsonl"), "w").write('{"step": 1, "loss": 2}\nnot json\n'
                                                                                 '{"step": 2, "loss": 1}\n')),
     "line 2 is not JSON"),
])
def test_bad_run_dir_is_one_line_naming_the_fix(tmp_path, capsys, setup, needle):
    run = str(tmp_path / "run")
    setup(run)
    with pytest.raises(SystemExit) as exc:
        report_main([run])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert "framework.train" in err or "trainer.log_every" in err or "remove that line" in err


def test_cli_prints_the_paths_it_wrote(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert report_main([run]) == 0
    out = capsys.readouterr()
    printed = out.out.split()
    assert os.path.join(run, "loss.png") in printed and all(os.path.isfile(p) for p in printed)
    assert "mfu.png skipped" in out.err


def test_unknown_json_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"hello": 1}')
    with pytest.raises(UserError, match="neither a benchmark's JSON"):
        report(str(path))
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        report(str(path))


# -- the benchmarks' figures, from small synthetic results -------------------------------------------------------
def infer_result() -> dict:
    cases = []
    for system, base in (("miaotui (30m)", 100.0), ("transformers generate() (30m)", 60.0)):
        cases += [{"part": "a", "series": system, "batch": b, "metric": "tokens_per_s", "values": [base * b, base * b * 1.1]}
                  for b in (1, 8)]
    for label, pp, micro, tps in (("pp=1", 1, 1, 900.0), ("pp=2, 2 micro-batches", 2, 2, 1500.0)):
        for metric in ("tokens_per_s", "decode_tokens_per_s"):
            cases.append({"part": "b", "label": label, "pp": pp, "micro": micro, "batch": 256, "metric": metric,
                          "values": [tps, tps * 0.95, tps * 1.02]})
    for pp in (1, 2):
        for pol, scale in (("continuous", 1.0), ("static", 1.8)):
            cases.append({"part": "d", "label": f"{pol}, pp={pp}", "pp": pp, "scheduler": pol, "metric": "tokens_per_s",
                          "values": [500.0 / scale], "latencies_s": [scale * (0.1 + i / 50) for i in range(60)]})
    return {"bench": "infer", "device": "CPU, 2 cores", "parts": {"a": "(a) ours vs transformers"}, "cases": cases}


def test_bench_infer_figures(tmp_path):
    plots = plot_bench_infer(infer_result(), str(tmp_path / "bench_infer"))
    assert sorted(os.path.basename(p) for p in plots.written) == [
        "bench_infer_batch.png", "bench_infer_latency_cdf.png", "bench_infer_layouts.png"]
    for p in plots.written:
        assert_png(p)
    # a result with only part (a): the layout and latency figures are skipped, each in one line
    only_a = {**infer_result(), "cases": [c for c in infer_result()["cases"] if c["part"] == "a"]}
    plots = plot_bench_infer(only_a, str(tmp_path / "a"))
    assert [os.path.basename(p) for p in plots.written] == ["a_batch.png"]
    assert len(plots.skipped) == 2 and all("skipped" in s for s in plots.skipped)


def serve_result(tagged: bool = True) -> dict:
    def rate_record(rate: float, slow: float) -> dict:
        reqs = [{"ttft_s": slow * 0.05 * (1 + i / 10), "latency_s": slow * (0.5 + i / 20), "tpot_s": 0.01, "tokens": 32}
                for i in range(24)]
        summary = {"output_tokens_per_s": 100 * rate / slow, "ttft_p50_s": 0.05 * slow * rate,
                   "ttft_p99_s": 0.2 * slow * rate, "tpot_p50_s": 0.01 * slow, "tpot_p99_s": 0.03 * slow}
        return {"summary": summary, "texts": [""] * 24, "errors": [], "requests": reqs}

    results = {name: {str(r): rate_record(r, slow) for r in (0.5, 2.0, 8.0)}
               for name, slow in (("miaotui", 1.0), ("miaotui static", 1.7), ("transformers", 2.5))}
    doc = {"args": {"rates": "0.5,2,8"}, "results": results}
    return {"bench": "serve", **doc} if tagged else doc


def test_bench_serve_figures_and_untagged_json(tmp_path):
    plots = plot_bench_serve(serve_result(), str(tmp_path / "bench_serve"))
    assert sorted(os.path.basename(p) for p in plots.written) == ["bench_serve_latency_cdf.png", "bench_serve_rates.png"]
    for p in plots.written:
        assert_png(p, min_w=1000)
    # a JSON written before the tag and the per-request timings: recognised; the CDF is skipped in one line
    old = serve_result(tagged=False)
    for per_rate in old["results"].values():
        for rec in per_rate.values():
            del rec["requests"]
    assert detect_bench(old) == "serve"
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    plots = report(str(path))
    assert [os.path.basename(p) for p in plots.written] == ["old_rates.png"]
    assert len(plots.skipped) == 1 and "per-request" in plots.skipped[0]


def test_bench_compress_figure(tmp_path):
    ppl = {"fp32": 6.10, "bf16": 6.11, "int8": 6.12, "int4-g32": 6.30, "int4-g64": 6.35, "int4-g128": 6.41,
           "magnitude-50": 7.9, "wanda-50": 7.1, "wanda-2:4": 7.6}
    plots = plot_bench_compress({"ppl": ppl, "agreement": {}}, str(tmp_path / "bench_compress"))
    assert [os.path.basename(p) for p in plots.written] == ["bench_compress_ppl_vs_bits.png"]
    assert_png(plots.written[0])
    assert variant_bits("int4-g128") == pytest.approx(4.3125) and variant_bits("int8") == 8 and variant_bits("fp32") == 32
    assert detect_bench({"ppl": ppl, "agreement": {}}) == "compress"


def test_bench_train_figure_through_write_bench_json(tmp_path, capsys):
    rows = [{"dp": dp, "ours_tps": 9000.0 * dp, "plain_tps": 9500.0 * dp, "ours_mfu": 0.40, "plain_mfu": 0.42,
             "device": "NVIDIA H100", "model": "1b", "precision": "bf16", "zero": 1, "ac": False, "seq": 2048}
            for dp in (1, 2)]
    direct = plot_bench_train(rows, str(tmp_path / "direct"))
    assert_png(direct.written[0])
    json_path = str(tmp_path / "train.json")
    plots = write_bench_json(rows, json_path)
    with open(json_path) as f:
        assert json.load(f) == rows  # the rows stay a list: scripts/gpu_check.sh reads them
    assert [os.path.basename(p) for p in plots.written] == ["train_throughput.png"]
    assert_png(plots.written[0])
    assert "[report] wrote" in capsys.readouterr().out
