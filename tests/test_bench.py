"""bench.py --quick keeps working (it asserts no timings: figures come from real runs, see the README)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_every_section(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench.py"), "--quick", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for heading in (
        "## Training step: LoRA",
        "## Training step: our LoRA layer vs PEFT's",
        "## One epoch",
        "## Inference",
    ):
        assert heading in result.stdout
    report = json.loads(out.read_text())
    modes = {row["mode"]: row for row in report["train_step"]}
    assert {"lora", "full", "peft"} <= modes.keys()
    assert modes["lora"]["trainable"] == modes["peft"]["trainable"] < modes["full"]["trainable"]
    assert all(row["median_step_s"] > 0 and row["peak_mib"] > 0 for row in report["train_step"])
    assert [row["implementation"] for row in report["ours_vs_peft"]] == ["ours", "peft"]
    assert [row["batches"] for row in report["epoch"]] == [185, 185]  # same rows, same batch count
    assert {(row["batch"], row["model"]) for row in report["inference"]} == {
        (b, m) for b in (1, 16) for m in ("base", "unmerged adapter", "merged adapter")
    }
