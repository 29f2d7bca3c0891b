"""A model that need not fit one rank: a 506M-parameter Llama (the 1b flavor's shape, 4 layers) built under ZeRO 3
at dp=4 holds at most 40% of the memory of the same build at dp=1 on each rank (measured: the resident peak above
what the process held before the build)."""

import json

import pytest

from tests.helpers import assert_ok, run_module

pytestmark = pytest.mark.distributed


def build(nproc: int) -> dict:
    proc = run_module("scripts.bench_build", ["--model", "1b", "--layers", "4"], nproc=nproc)
    assert_ok(proc)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_zero3_build_at_dp4_holds_at_most_40_percent_per_rank():
    one, four = build(1), build(4)
    assert one["params"] >= 500_000_000 and four["dp"] == 4
    whole = one["ranks"][0]["build_gb"]
    assert whole >= 4 * one["params"] / 2**30  # the fp32 weights, at least
    peaks = [r["build_gb"] for r in four["ranks"]]
    assert max(peaks) <= 0.4 * whole, (peaks, whole)
    # each rank holds a quarter of the parameters
    assert all(r["partition_params"] * 4 >= four["params"] for r in four["ranks"])
