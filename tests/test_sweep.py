"""scripts/sweep.py: a 2 x 2 grid on the tiny model, stopped in its first cell and resumed, its table and plot;
its refusals; --estimate."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import kill_tree

from data import TRAIN_FILE, VALIDATION_FILE

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "scripts" / "sweep.py"


def load_sweep():
    """scripts/sweep.py as a module (scripts/ is no package), registered as dataclasses need it to be."""
    if "sweep" not in sys.modules:
        spec = importlib.util.spec_from_file_location("sweep", SWEEP)
        sys.modules["sweep"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["sweep"])
    return sys.modules["sweep"]


@pytest.fixture(scope="module")
def train_args(tmp_path_factory):
    """train.py arguments for quick cells: 48 training rows, 16 validation rows, 12 steps, a checkpoint each step."""
    data = tmp_path_factory.mktemp("rows")
    (data / "train.jsonl").write_text("".join(TRAIN_FILE.read_text().splitlines(keepends=True)[:48]))
    (data / "val.jsonl").write_text("".join(VALIDATION_FILE.read_text().splitlines(keepends=True)[:16]))
    return ["--model", "tiny", "--data", str(data / "train.jsonl"), "--val-data", str(data / "val.jsonl"),
            "--batch-size", "8", "--max-steps", "12", "--save-every", "1", "--eval-every", "8",
            "--keep-checkpoints", "1", "--log-every", "4"]  # fmt: skip


def sweep_command(out, grid, train_args):
    return [sys.executable, str(SWEEP), "--out", str(out), *grid, "--", *train_args]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_speed(rows):
    return [{key: value for key, value in row.items() if key != "tokens_per_s"} for row in rows]


def test_a_grid_stopped_in_its_first_cell_resumes_and_gives_the_figures_of_a_run_never_stopped(
    tmp_path, capsys, train_args
):
    out = tmp_path / "sweep"
    grid = ["--ranks", "2", "4", "--targets", "qv", "all", "--lrs", "3e-3"]
    first = out / "runs" / "r2-qv-lr0.003"

    # SIGTERM (or Ctrl-C) reaches the sweep alone, the run being in a session of its own: the sweep passes it
    # on, and the cell finishes its step, saves a checkpoint and stops.
    process = subprocess.Popen(sweep_command(out, grid, train_args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list((first / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
            assert process.poll() is None, "the sweep ended before its first cell wrote a checkpoint"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        kill_tree(process.pid)
    assert process.returncode == 130, stderr[-2000:]
    assert "r2-qv-lr0.003 stopped; run the same command again to resume the sweep" in stderr
    assert not (first / "adapter_model.safetensors").exists() and not (out / "results.md").exists()
    stopped_at = max(int(p.name.split("-")[1]) for p in (first / "checkpoints").glob("step-*"))
    assert 1 <= stopped_at < 12, "the cell was to be stopped in its middle"

    resumed = subprocess.run(sweep_command(out, grid, train_args), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {first / 'checkpoints'}" in resumed.stdout
    assert "4 of 4 cells done" in resumed.stdout

    # The stopped cell's figures equal those of a train.py run that was never stopped.
    never_stopped = tmp_path / "never_stopped"
    cell = ["--r", "2", "--alpha", "4", "--lr", "0.003", "--target-modules", "q", "v"]
    command = [sys.executable, "-m", "train", *train_args, *cell, "--output-dir", str(never_stopped)]
    reference = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert without_speed(metrics(first)) == without_speed(metrics(never_stopped))

    rows = {row["cell"]: row for row in json.loads((out / "results.json").read_text())}
    assert sorted(rows) == ["r2-all-lr0.003", "r2-qv-lr0.003", "r4-all-lr0.003", "r4-qv-lr0.003"]
    for name, row in rows.items():
        assert row["steps"] == 12 and row["skipped_steps"] == 0
        expected = min(m["val_loss"] for m in metrics(out / "runs" / name) if "val_loss" in m)
        assert row["best_val_loss"] == expected
    # A and B hold r x (in + out) values per layer: twice as many at r=4 as at r=2, more on every layer than on q, v.
    assert rows["r4-qv-lr0.003"]["trainable_parameters"] == 2 * rows["r2-qv-lr0.003"]["trainable_parameters"]
    assert rows["r4-all-lr0.003"]["trainable_parameters"] == 2 * rows["r2-all-lr0.003"]["trainable_parameters"]
    assert rows["r2-all-lr0.003"]["trainable_parameters"] > 2 * rows["r2-qv-lr0.003"]["trainable_parameters"]
    table = (out / "results.md").read_text()
    assert (
        f"| qv | {rows['r2-qv-lr0.003']['best_val_loss']:.4f} | {rows['r4-qv-lr0.003']['best_val_loss']:.4f} |" in table
    )
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Once finished, the same command trains nothing and rewrites the same figures.
    sweep = load_sweep()
    assert sweep.main(["--out", str(out), *grid, "--", *train_args]) == 0
    assert capsys.readouterr().out.count(": done, read from") == 4
    assert json.loads((out / "results.json").read_text()) == list(rows.values())

    # Other train.py arguments would make the cells incomparable: refused before any work.
    assert sweep.main(["--out", str(out), *grid, "--", *train_args, "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pass the same ones, or another --out" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ranks", "0"], "--ranks must be positive numbers"),
        (["--", "--lr", "1e-3"], "--lr after -- is the sweep's to set"),
        (["--", "--target", "q"], "--target after -- is the sweep's to set"),  # an abbreviation argparse would take
        (["--", "--output-dir=x"], "--output-dir=x after -- is the sweep's to set"),
        (["--", "--model", "tiny", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_bad_arguments_are_refused_in_one_sentence_before_any_work(tmp_path, capsys, argv, message):
    status = load_sweep().main(["--out", str(tmp_path / "sweep"), *argv])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "sweep").exists()


def test_a_directory_that_is_not_a_sweep_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    status = load_sweep().main(["--out", str(tmp_path), "--", "--model", "tiny"])
    assert status == 2 and "holds files but no sweep.json" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_the_estimate_counts_each_cells_step_and_trains_nothing(tmp_path, capsys, train_args):
    status = load_sweep().main(["--out", str(tmp_path / "sweep"), "--estimate", "--ranks", "2", "8", "--targets",
                                "qv", "all", "--lrs", "1e-3", "3e-3", "--", *train_args])  # fmt: skip
    printed = capsys.readouterr().out
    assert status == 0 and not (tmp_path / "sweep").exists()
    rows = {tuple(line.split(" | ")[:2]): line.split(" | ") for line in printed.splitlines() if line.startswith("| q")
            or line.startswith("| all")}  # fmt: skip
    assert set(rows) == {("| qv", "2"), ("| qv", "8"), ("| all", "2"), ("| all", "8")}
    gflop = {key: float(row[3]) for key, row in rows.items()}
    assert gflop[("| all", "2")] > gflop[("| qv", "2")] and gflop[("| qv", "8")] > gflop[("| qv", "2")]
    assert all(row[6] == "2" for row in rows.values())  # two learning rates: two cells of the same cost
    assert "estimated time of the 8 cells" in printed and "Memory plan of the largest cell" in printed
