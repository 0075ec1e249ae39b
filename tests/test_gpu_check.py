"""scripts/gpu_check.sh --dry-run: every step of the GPU check runs on the CPU, so the script cannot rot
while no GPU is at hand (the figures of a dry run mean nothing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHON": sys.executable}  # the environment running the tests, whatever python is on PATH


def test_the_gpu_check_runs_dry_and_writes_its_report(tmp_path):
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(tmp_path / "report"), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["dry_run"] and [c["ok"] for c in report["checks"]] == [True] * 3
    assert [c["check"].split()[0] for c in report["checks"]] == ["CUDA", "tiny", "throughput"]
    assert report["checks"][1]["final_train_loss"] > 0
    assert [(row["shape"].split(",")[-1].strip(), row["checkpointing"]) for row in report["throughput"]] == [
        ("batch 2 x 16/8 tokens", False),
        ("bundled lengths", True),
    ]
    assert all(row["tokens_per_s"] > 0 and row["mfu"] is None for row in report["throughput"])  # no peak for a CPU
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "# GPU check" in markdown and "dry run" in markdown and "FAILED" not in markdown


def test_without_a_gpu_it_refuses_to_run_for_real(tmp_path):
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=120
    )
    assert result.returncode == 2 and "no CUDA GPU is visible" in result.stderr and "Traceback" not in result.stderr
