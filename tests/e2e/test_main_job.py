"""The README's main job, end to end: train the CPU default, export, generate with pp=2; and it learns."""

import json
import os
import subprocess

import pytest

from tests.helpers import REPO, env, read_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_quickstart_trains_exports_and_generates(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=REPO, env={**env(), "RUN_DIR": str(run)},
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = json.loads((run / "summary.json").read_text())
    # It learns: >= 95% exact match on held-out reversals within the CPU default's budget.
    assert summary["eval_exact_match"] >= 0.95, summary
    metrics = read_metrics(str(run))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(metrics[0])
    assert any("eval_loss" in m for m in metrics)
    # The hand-off: export, then pipeline generation at pp=2 answers the prompts correctly.
    assert (run / "export" / "model.safetensors.index.json").exists()
    rows = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        digits = row["prompt"].split(":")[1].split("=")[0].split()
        assert row["text"].split() == digits[::-1], row
    gen = json.loads((run / "generate_summary.json").read_text())
    assert gen["pp"] == 2 and gen["tokens_per_s"] > 0
    assert "reverse: 1 2 3 4 5 = 5 4 3 2 1" in proc.stdout
    assert os.path.exists(run / "config.yaml")
