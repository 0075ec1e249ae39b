"""Sweep LoRA's rank, the matrices it adapts and the learning rate on any base and data: the grid behind the
LoRA paper's Table 6 (a small r already suffices), its Table 5 (which matrices to adapt) and "LoRA Without
Regret"'s comparison of attention-only LoRA with LoRA on every layer.

    python scripts/sweep.py --out sweeps/banking                      # flan-t5-base, the bundled data
    python scripts/sweep.py --out sweeps/tiny --ranks 4 16 --targets qv all --lrs 3e-3 -- --model tiny --max-steps 40
    python scripts/sweep.py --out sweeps/banking --estimate           # the time it should take, without training

Each cell of the grid is one train.py run in OUT/runs/r{R}-{TARGETS}-lr{LR}/, with alpha = 2r: the scale
alpha/r stays 2 at every rank, as the paper keeps alpha/r fixed rather than retuning it per rank. Everything
after `--` goes to every run unchanged: the base (--model), the data (--data, --val-data), epochs, batch size.
A cell is scored by its best validation loss, which any base and data have.

Run the same command again and the sweep resumes: a finished cell is read, not trained again; a cell stopped
in the middle (Ctrl-C or SIGTERM: train.py finishes its step and saves) resumes from its latest checkpoint
with train.py --resume, which trains the batches the unstopped run would have; ranks, target sets or
learning rates added to the command add cells. OUT/results.md holds the table, OUT/results.json the same
figures, OUT/results.png the validation loss against the rank, one line per target set.

--estimate trains nothing: for each cell it runs one training step of the base's architecture (random
weights) on this CPU at the data's mean lengths, counts its FLOPs (torch.utils.flop_counter) and the
operations it dispatches, and prints the time the grid should take on a GPU as the larger of two bounds,
FLOPs at --gpu-tflops x --assume-mfu and operations at --op-overhead-us each (eager PyTorch launches one
kernel per operation), with the memory plan of the largest cell: an estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import encode_examples, training_splits  # noqa: E402
from lora import inject_lora, lora_param_groups, set_base_dtype  # noqa: E402
from lora.files import loads_json  # noqa: E402
from lora.inspect import check_figure_place, save_figure  # noqa: E402
from lora.save import WEIGHTS_NAME  # noqa: E402
from support.checkpoints import latest_checkpoint  # noqa: E402
from support.cli import UsageError, run_cli, terminate_as_interrupt  # noqa: E402
from support.files import atomic_write_text  # noqa: E402
from support.memory import plan_memory  # noqa: E402
from support.metrics import METRICS_FILE  # noqa: E402
from support.models import RANDOM, load_model_and_tokenizer, resolve_model_path  # noqa: E402
from support.tiny_model import TINY  # noqa: E402
from support.train_args import parse_args as parse_train_args  # noqa: E402
from support.train_args import validate_args  # noqa: E402

TARGET_SETS = {  # None: every linear layer but lm_head, whose names depend on the feed-forward (gated or not)
    "qv": ("q", "v"),  # the LoRA paper's choice and train.py's default
    "qkvo": ("q", "k", "v", "o"),  # every attention projection
    "all": None,  # attention and feed-forward: "LoRA Without Regret"'s recommendation
}
SWEPT_OPTIONS = ("--r", "--alpha", "--target-modules", "--lr", "--output-dir", "--resume", "--overwrite")
STATE_FILE = "sweep.json"  # the train.py arguments the grid was started with, and each cell's seconds
RESULT_FILES = ("results.md", "results.json", "results.png")
ALPHA_PER_RANK = 2  # alpha = 2r: the scale alpha/r is 2 in every cell


@dataclass(frozen=True)
class Cell:
    r: int
    targets: str
    lr: float

    @property
    def name(self) -> str:
        return f"r{self.r}-{self.targets}-lr{self.lr:g}"

    def train_options(self, modules: tuple[str, ...]) -> list[str]:
        return ["--r", str(self.r), "--alpha", str(ALPHA_PER_RANK * self.r), "--lr", repr(self.lr),
                "--target-modules", *modules]  # fmt: skip


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The sweep's own options, and the train.py arguments after `--`."""
    own, train_argv = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(
        prog="scripts/sweep.py",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- go to every train.py run (its --help lists them); the sweep sets "
        + ", ".join(SWEPT_OPTIONS)
        + " itself.",
    )
    p.add_argument("--out", type=Path, required=True, help="the sweep's directory: runs, table, plot")
    p.add_argument(
        "--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64], help="LoRA ranks (default: 1 2 4 8 16 64)"
    )
    p.add_argument("--targets", nargs="+", choices=list(TARGET_SETS), default=list(TARGET_SETS),
                   help="qv: q and v; qkvo: every attention projection; all: every linear layer but lm_head "
                   "(default: all three)")  # fmt: skip
    p.add_argument(
        "--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3], help="learning rates (default: 1e-4 3e-4 1e-3)"
    )
    estimate = p.add_argument_group("--estimate: the time on a GPU, without training")
    estimate.add_argument(
        "--estimate", action="store_true", help="print each cell's cost and the grid's time; train nothing"
    )
    estimate.add_argument(
        "--gpu-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (default: 989, an H100 SXM)"
    )
    estimate.add_argument(
        "--assume-mfu", type=float, default=0.4, help="share of the peak the FLOPs run at (default: 0.4)"
    )
    estimate.add_argument("--op-overhead-us", type=float, default=10.0,
                          help="microseconds per dispatched operation in eager PyTorch (default: 10)")  # fmt: skip
    args = p.parse_args(own)
    for name, values in (("--ranks", args.ranks), ("--lrs", args.lrs)):
        if min(values) <= 0 or not all(math.isfinite(v) for v in values):
            raise UsageError(f"{name} must be positive numbers; got {' '.join(map(str, values))}.")
    owned = [
        token
        for token in train_argv
        if any(o.startswith(token.split("=")[0]) for o in SWEPT_OPTIONS if token.startswith("--"))
    ]
    if owned:
        raise UsageError(f"{owned[0]} after -- is the sweep's to set (its grid and directories); leave it out.")
    return args, train_argv


def grid(args: argparse.Namespace) -> list[Cell]:
    order = sorted(set(args.targets), key=list(TARGET_SETS).index)
    return [Cell(r, targets, lr) for targets in order for r in sorted(set(args.ranks)) for lr in sorted(set(args.lrs))]


def target_modules(model_name: str) -> dict[str, tuple[str, ...]]:
    """Each target set's layer names for this base: "all" is q k v o and the feed-forward's layers."""
    from transformers import AutoConfig

    if random_twin(model_name).startswith(RANDOM):
        gated = True  # every flan-t5 size has a gated-GELU feed-forward
    else:
        try:
            gated = AutoConfig.from_pretrained(resolve_model_path(model_name)).is_gated_act
        except (OSError, ValueError) as err:
            raise UsageError(
                f"could not read the config of --model {model_name!r} ({err}); pass a base train.py can load."
            ) from None
    feed_forward = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
    return {name: modules or ("q", "k", "v", "o", *feed_forward) for name, modules in TARGET_SETS.items()}


def check_out(out: Path, train_argv: list[str]) -> dict:
    """The sweep's state in `out`: new, or the one this command resumes (same train.py arguments)."""
    check_figure_place(out, RESULT_FILES, "the sweep")
    state_path = out / STATE_FILE
    if not state_path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise UsageError(f"--out {out} holds files but no {STATE_FILE}: it is not a sweep; choose another --out.")
        return {"train_args": train_argv, "seconds": {}}
    try:
        state = loads_json(state_path.read_text(encoding="utf-8"))
        assert isinstance(state, dict) and isinstance(state.get("train_args"), list)
    except (ValueError, UnicodeDecodeError, AssertionError):
        raise UsageError(f"{state_path} is damaged; move {out} away and start the sweep again.") from None
    if state["train_args"] != train_argv:
        raise UsageError(
            f"{out} was swept with the train.py arguments {' '.join(state['train_args']) or '(none)'}, not "
            f"{' '.join(train_argv) or '(none)'}: its cells would not compare; pass the same ones, or another --out."
        )
    return state


def run_cell(cell: Cell, modules: tuple[str, ...], run_dir: Path, train_argv: list[str]) -> int:
    """Train one cell with train.py, resuming it when it stopped with a checkpoint; train.py's exit status."""
    command = [sys.executable, "-m", "train", *train_argv, *cell.train_options(modules), "--output-dir", str(run_dir)]
    if latest_checkpoint(run_dir) is not None:
        command.append("--resume")
    elif run_dir.exists():
        command.append("--overwrite")  # stopped before its first checkpoint: nothing to resume
    # In a session of its own the run does not see the terminal's Ctrl-C: the sweep passes it on once, and
    # train.py finishes its step, saves a checkpoint and stops (a second Ctrl-C stops it at once).
    child = subprocess.Popen(command, start_new_session=True)
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        try:
            child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)
            child.wait()
        raise KeyboardInterrupt(f"{cell.name} stopped; run the same command again to resume the sweep") from None


def cell_result(run_dir: Path) -> dict | None:
    """A finished cell's figures, from what its train.py run wrote; None while it is not finished."""
    from safetensors import safe_open

    if not (run_dir / WEIGHTS_NAME).is_file():  # train.py writes the final adapter last
        return None
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines() if line]
    val_losses = [row["val_loss"] for row in rows if row.get("val_loss") is not None]
    train_rows = [row for row in rows if "train_loss" in row]
    with safe_open(run_dir / WEIGHTS_NAME, "pt") as weights:
        trainable = sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    return {
        "trainable_parameters": trainable,
        "best_val_loss": min(val_losses) if val_losses else None,
        "final_train_loss": train_rows[-1]["train_loss"] if train_rows else None,
        "steps": max((row["step"] for row in rows), default=0),
        "skipped_steps": train_rows[-1]["skipped_steps"] if train_rows else 0,
    }


def write_results(out: Path, cells: list[Cell], results: dict[str, dict | None], seconds: dict) -> None:
    rows = [{"cell": c.name, "r": c.r, "targets": c.targets, "lr": c.lr, **(results[c.name] or {}),
             "train_s": seconds.get(c.name)} for c in cells]  # fmt: skip
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / "results.md", results_table(cells, rows))
    plot_results(out / "results.png", cells, rows)


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_table(cells: list[Cell], rows: list[dict]) -> str:
    """Two markdown tables: the best validation loss of each target set at each rank (the paper's tables'
    shape), then every cell."""
    ranks = sorted({c.r for c in cells})
    best = best_over_lrs(rows)
    lines = ["Best validation loss over the learning rates (lower is better):", ""]
    lines.append("| targets | " + " | ".join(f"r={r}" for r in ranks) + " |")
    lines.append("| --- " * (1 + len(ranks)) + "|")
    for targets in dict.fromkeys(c.targets for c in cells):
        lines.append(f"| {targets} | " + " | ".join(fmt(best.get((targets, r)), ".4f") for r in ranks) + " |")
    lines += ["", "Every cell:", ""]
    lines.append("| targets | r | lr | trainable | best val loss | final train loss | steps | time |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        loss = fmt(row.get("best_val_loss"), ".4f")
        if row.get("skipped_steps"):
            loss += f" ({row['skipped_steps']} non-finite steps)"
        cells_of_row = (row["targets"], row["r"], f"{row['lr']:g}", fmt(row.get("trainable_parameters"), ","), loss,
                        fmt(row.get("final_train_loss"), ".4f"), fmt(row.get("steps"), "d"),
                        fmt(row.get("train_s"), ".0f") + " s")  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells_of_row)) + " |")
    return "\n".join(lines) + "\n"


def best_over_lrs(rows: list[dict]) -> dict[tuple[str, int], float]:
    best: dict[tuple[str, int], float] = {}
    for row in rows:
        if row.get("best_val_loss") is not None:
            key = (row["targets"], row["r"])
            best[key] = min(best.get(key, math.inf), row["best_val_loss"])
    return best


def plot_results(path: Path, cells: list[Cell], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    best = best_over_lrs(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for targets in dict.fromkeys(c.targets for c in cells):
        points = sorted((r, loss) for (t, r), loss in best.items() if t == targets)
        if points:
            ax.plot(*zip(*points), marker="o", label=targets)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({c.r for c in cells}), [str(r) for r in sorted({c.r for c in cells})])
    ax.set_xlabel("rank r")
    ax.set_ylabel("best validation loss (over learning rates)")
    ax.legend(title="adapted")
    save_figure(fig, path, plt)


def sweep(args: argparse.Namespace, train_argv: list[str]) -> int:
    train_args = parse_train_args([*train_argv, "--output-dir", str(args.out / "runs" / "check")])
    validate_args(train_args)  # a bad train.py argument is refused here, not by the first cell's run
    modules = target_modules(train_args.model)
    cells = grid(args)
    if args.estimate:
        return estimate(args, train_args, cells, modules)
    state = check_out(args.out, train_argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for number, cell in enumerate(cells, 1):
        run_dir = args.out / "runs" / cell.name
        if cell_result(run_dir) is not None:
            print(f"[{number}/{len(cells)}] {cell.name}: done, read from {run_dir}")
            continue
        print(f"[{number}/{len(cells)}] {cell.name}: training in {run_dir}", flush=True)
        start = time.perf_counter()
        try:
            status = run_cell(cell, modules[cell.targets], run_dir, train_argv)
        finally:  # a stopped cell's seconds count too: its time is the sum of its runs
            state["seconds"][cell.name] = state["seconds"].get(cell.name, 0.0) + time.perf_counter() - start
            atomic_write_text(args.out / STATE_FILE, json.dumps(state, indent=2) + "\n")
        if status != 0 and cell_result(run_dir) is None:
            failed.append(f"{cell.name} (train.py exit {status})")
    results = {cell.name: cell_result(args.out / "runs" / cell.name) for cell in cells}
    write_results(args.out, cells, results, state["seconds"])
    print(f"\n{len(cells) - len(failed)} of {len(cells)} cells done; table in {args.out / 'results.md'}, "
          f"plot in {args.out / 'results.png'}")  # fmt: skip
    if failed:
        print(f"error: {len(failed)} cell(s) failed: {', '.join(failed)}; their output is above. Fix the cause "
              "and run the same command again: the finished cells are kept.", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def estimate(args: argparse.Namespace, train_args: argparse.Namespace, cells: list[Cell], modules: dict) -> int:
    """Print each cell's cost and the grid's estimated GPU time (see the module's docstring)."""
    model_name = random_twin(train_args.model)
    tokenizer, tokenizer_note = load_model_and_tokenizer(model_name)[1], ""
    if tokenizer is None:  # a random-weight architecture has none
        tokenizer = load_model_and_tokenizer(TINY)[1]
        tokenizer_note = " under the tiny model's tokenizer (flan-t5's needs the hub; 800 pieces cut text finer)"
    train_rows = training_splits(train_args.data, train_args.val_data, train_args.seed)[0]
    rows, _ = encode_examples(train_rows, tokenizer, train_args.max_source_len, train_args.max_target_len)
    source = round(statistics.mean(len(row.input_ids) for row in rows))
    target = round(statistics.mean(len(row.labels) for row in rows))
    rows_per_step = train_args.batch_size * train_args.grad_accum
    steps = train_args.max_steps or train_args.epochs * math.ceil(len(rows) / rows_per_step)
    micro_batches = steps * train_args.grad_accum  # what one measured step (forward, backward, AdamW) stands for
    print(f"{model_name}: {len(rows)} training rows, mean {source} source / {target} target tokens{tokenizer_note}; "
          f"{steps} steps of {rows_per_step} rows per cell")  # fmt: skip
    print(f"assumed: {args.gpu_tflops:g} TFLOP/s at {args.assume_mfu:.0%} utilisation, "
          f"{args.op_overhead_us:g} µs per operation\n")  # fmt: skip
    print("| targets | r | trainable | GFLOP/step | operations/step | estimated s/step | cells | estimated time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    total_s, largest = 0.0, (0, None)  # (trainable parameters, model) of the largest cell
    for targets, r in dict.fromkeys((c.targets, c.r) for c in cells):
        model = load_model_and_tokenizer(model_name)[0]
        inject_lora(model, modules[targets], r, ALPHA_PER_RANK * r, dropout=0.05)
        flops, operations = step_cost(model, train_args.batch_size, source, target)
        step_s = max(flops / (args.gpu_tflops * 1e12 * args.assume_mfu), operations * args.op_overhead_us * 1e-6)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        count = sum(1 for c in cells if (c.targets, c.r) == (targets, r))
        cells_s = step_s * micro_batches * count
        total_s += cells_s
        print(f"| {targets} | {r} | {trainable:,} | {flops / 1e9:.1f} | {operations:,} | {step_s * 1e3:.1f} ms | "
              f"{count} | {cells_s / 60:.1f} min |")  # fmt: skip
        if trainable > largest[0]:
            largest = (trainable, model)
    set_base_dtype(largest[1], torch.bfloat16)
    longest = (max(len(row.input_ids) for row in rows), max(len(row.labels) for row in rows))
    plan = plan_memory(largest[1], train_args.batch_size, *longest, torch.bfloat16, train_args.gradient_checkpointing)
    print(f"\nestimated time of the {len(cells)} cells: {total_s / 3600:.2f} h (training steps only; each "
          f"validation adds its forward passes). Memory plan of the largest cell, bf16: "
          f"{plan.total_bytes / 2**30:.1f} GiB.")  # fmt: skip
    return 0


def random_twin(name: str) -> str:
    """A flan-t5 hub name's architecture with random weights (random:flan-t5-SIZE): its shapes without a
    download. Any other name is returned as it is."""
    size = re.fullmatch(r"(?:google/)?flan-t5-(small|base|large|xl|xxl)", name)
    return f"{RANDOM}flan-t5-{size.group(1)}" if size else name


def step_cost(model: torch.nn.Module, batch: int, source: int, target: int) -> tuple[float, int]:
    """FLOPs and dispatched operations of one training step (forward, backward, AdamW) on this CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class OperationCount(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    model.train()
    # foreach: a few operations for every parameter at once, as the fused AdamW train.py uses on a GPU launches
    optimizer = torch.optim.AdamW(lora_param_groups(model, lr=1e-4), foreach=True)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, model.config.vocab_size, (batch, source), generator=generator)
    labels = torch.randint(2, model.config.vocab_size, (batch, target), generator=generator)
    flops, operations = FlopCounterMode(display=False), OperationCount()
    with flops, operations:
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels).loss.backward()
        optimizer.step()
    return flops.get_total_flops(), operations.count


def main(argv: list[str] | None = None) -> int:
    status = []

    def work():
        status.append(sweep(*parse_args(sys.argv[1:] if argv is None else argv)))

    with terminate_as_interrupt():  # SIGTERM stops the running cell with a checkpoint, as Ctrl-C does
        return run_cli(work, interrupted="the sweep stopped; run the same command again to resume it") or status[0]


if __name__ == "__main__":
    raise SystemExit(main())
