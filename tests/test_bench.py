"""bench.py --quick keeps working (it asserts no timings: figures come from real runs, see the README)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import toy_t5
from torch.utils.flop_counter import FlopCounterMode

import bench
from benchmarks.serving import SERVERS
from lora import inject_lora

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_every_section(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--output", str(out)]) == 0  # its distributed workers still run under torchrun
    stdout = capsys.readouterr().out
    for heading in (
        "## Training step: LoRA",
        "## Training step: ours vs PEFT's LoRA with T5's own loss",
        "## LoRA's variants",
        "## Bigger bases",
        "## Two processes",
        "## One epoch",
        "## Inference",
        "## Training throughput",
    ):
        assert heading in stdout
    assert "## Serving" not in stdout  # opt-in: --only serving
    report = json.loads(out.read_text())
    modes = {row["mode"]: row for row in report["train_step"]}
    assert {"lora", "full", "peft"} <= modes.keys()
    assert modes["lora"]["trainable"] == modes["peft"]["trainable"] < modes["full"]["trainable"]
    assert all(row["median_step_s"] > 0 and row["peak_mib"] > 0 for row in report["train_step"])
    assert [row["implementation"].split()[0] for row in report["ours_vs_peft"]] == ["ours", "PEFT"]
    assert 0 < report["ours_vs_peft"][0]["ours_over_peft"] < 10
    variants = {row["variant"]: row for row in report["variants"]}
    pissa = ["LoRA, init=pissa", "LoRA, init=pissa_niter_4"]
    assert list(variants) == ["LoRA (ours)", "DoRA (ours)", "DoRA (PEFT)", *pissa]
    assert variants["DoRA (ours)"]["trainable"] == variants["DoRA (PEFT)"]["trainable"] > modes["lora"]["trainable"]
    assert variants["LoRA, init=pissa"]["trainable"] == modes["lora"]["trainable"]
    configs = [row["config"] for row in report["memory"]]
    assert [c.split()[0] for c in configs] == ["(b)", "(d)", "(e)"]  # --quick: the code paths, not the figures
    assert all(row["step_peak_mib"] > 0 and row["load_peak_mib"] > 0 for row in report["memory"])
    held = {(row["parallel"].split()[0], row["rank"]): row["frozen_held_mib"] for row in report["distributed"]}
    assert sorted(held) == [("DDP", 0), ("DDP", 1), ("FSDP2", 0), ("FSDP2", 1)]
    for rank in (0, 1):  # FSDP holds each rank's half of the frozen weights, up to the shards' padding
        assert 0.49 * held["DDP", rank] < held["FSDP2", rank] < 0.51 * held["DDP", rank]
    assert [row["batches"] for row in report["epoch"]] == [185, 185, "-"]  # same rows, same batch count
    bucketed, padded, unpadded = (row["matmul_tflop"] for row in report["epoch"])
    assert unpadded < bucketed < padded
    assert [(row["mode"], row["precision"]) for row in report["throughput"]] == [("lora", "fp32"), ("full", "fp32")]
    assert all(row["tflops"] > 0 and row["mfu"] is None for row in report["throughput"])  # no peak for a CPU
    assert {(row["batch"], row["model"]) for row in report["inference"]} == {
        (b, m) for b in (1, 16) for m in ("base", "unmerged adapter", "merged adapter")
    } | {(16, "2 adapters, mixed batch")}


@pytest.mark.parametrize("targets", [None, ("q", "v", "wo")])
def test_model_flops_match_pytorchs_count_of_the_linear_layers(targets):
    """The MFU numerator: encoder weights meet source tokens, decoder weights, cross-attention q and o and
    lm_head meet target tokens, cross-attention k and v the source tokens; checked against PyTorch's
    own FLOP counter on a batch without padding (source 3x7 tokens, target 3x5)."""
    model = toy_t5()
    if targets:
        inject_lora(model, targets, r=4, alpha=8)
    input_ids, labels = torch.randint(2, 64, (3, 7)), torch.randint(2, 64, (3, 5))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, labels=labels)
    counted = counter.get_flop_counts()["Global"]
    linear_flops = sum(v for op, v in counted.items() if str(op) in ("aten.mm", "aten.addmm"))
    assert linear_flops > 0
    assert bench.forward_matmul_flops(model, source_tokens=21, target_tokens=15) == linear_flops


@pytest.mark.parametrize("where", ["a directory", "under a missing directory"])
def test_an_output_that_cannot_be_written_is_refused_before_any_benchmark(tmp_path, capsys, monkeypatch, where):
    """--output was written after every section had run, non-atomically: a directory, or a path under a
    missing one, lost the whole run's JSON at its end. It is refused first, in one sentence."""
    monkeypatch.setattr(bench, "encoded_rows", lambda *a: pytest.fail("a benchmark ran"))
    output = tmp_path if where == "a directory" else tmp_path / "missing" / "bench.json"
    assert bench.main(["--quick", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output {output} ") and err.count("\n") == 1


def test_the_serving_benchmark_drives_three_servers_and_draws_its_plot(tmp_path, capsys):
    """--only serving --quick: the three servers under 1 and 8 clients, every request answered once (the
    section is opt-in: a plain run leaves it out, as test_quick_benchmark_runs_every_section shows)."""
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--only", "serving", "--output", str(out), "--figures", str(tmp_path)]) == 0
    rows = json.loads(out.read_text())["serving"]
    assert [(row["server"], row["clients"]) for row in rows] == [
        (server, clients) for server in SERVERS for clients in (1, 8)
    ]
    assert all(row["failed"] == 0 and row["answers_per_s"] > 0 and row["p99_s"] >= row["p50_s"] for row in rows)
    assert (tmp_path / "serving.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Serving: serve.py on the tiny model" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["without --only serving", "a file", "a link in the plot's place"])
def test_a_figures_directory_that_cannot_take_the_plot_is_refused_before_any_benchmark(
    tmp_path, capsys, monkeypatch, where
):
    """--figures is read by the serving section alone: without it, the option would be silently ignored. A
    file, or a symbolic link where serving.png goes, is refused, as lora.inspect refuses them for --out."""
    monkeypatch.setattr(bench, "encoded_rows", lambda *a: pytest.fail("a benchmark ran"))
    only = ["--only", "train"] if where == "without --only serving" else ["--only", "serving"]
    figures = tmp_path
    if where == "a file":
        figures = tmp_path / "plot"
        figures.write_text("")
    if where == "a link in the plot's place":
        (tmp_path / "serving.png").symlink_to(tmp_path / "elsewhere.png")
    assert bench.main(["--quick", *only, "--figures", str(figures)]) == 2
    err = capsys.readouterr().err
    words = {
        "without --only serving": "--figures draws the serving section's plot only",
        "a file": f"--figures {figures} is no directory",
        "a link in the plot's place": "is a symbolic link (to ",
    }[where]
    assert err.startswith("error: ") and words in err and err.count("\n") == 1
    assert not (tmp_path / "elsewhere.png").exists()
