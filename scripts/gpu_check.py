"""Every CUDA check in one command, with its report as markdown and JSON (scripts/gpu_check.sh runs this).

    scripts/gpu_check.sh REPORT_DIR            # on a CUDA GPU: about 8 minutes on one H100 or H200
    scripts/gpu_check.sh REPORT_DIR --dry-run  # anywhere: the same steps, tiny and on the CPU (CI runs it)

1. the CUDA checks (scripts/cuda_checks.py, also tests/test_cuda.py under pytest: bf16 autocast step;
   fp16 with the scaler, an injected overflow skipped and the scale backed off; fused AdamW; a compiled
   tiny run against the eager one, dropout off); they need no pytest, which the GPU machine may lack;
2. 50-step tiny runs of train.py in bf16 and in fp16;
3. training throughput of flan-t5-base's architecture (random weights), LoRA r=16 on q, v: batch 32 of
   512 source / 128 target tokens, and batch 32 of the bundled data's lengths; bf16 autocast and fp32
   (TF32 matmuls), eager and compiled, with and without gradient checkpointing; tokens/s and MFU
   against the GPU's data-sheet peak (dense bf16; TF32 counts half). The first step's time is reported
   apart: for a compiled model it is mostly compilation.

A step that fails is reported as failed and the others still run; the exit status is 1 if any failed.
The dry run checks the plumbing only: its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks import harness  # noqa: E402
from data import LengthBucketSampler, bucket_key  # noqa: E402
from lora.files import atomic_write_all  # noqa: E402
from support.tiny_model import TINY  # noqa: E402


def run_command(name: str, command: list[str], timeout: int) -> dict:
    """Run one step as a subprocess; its status, time and the tail of its output."""
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        ok, output = result.returncode == 0, result.stdout + result.stderr
    except subprocess.TimeoutExpired as err:
        ok, output = False, f"timed out after {timeout} s\n{err.stdout or ''}"
    return {"check": name, "ok": ok, "seconds": round(time.perf_counter() - start, 1), "tail": output[-1500:]}


def last_train_loss(output_dir: Path) -> float | None:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return next((row["train_loss"] for row in reversed(rows) if "train_loss" in row), None)


def tiny_runs(report_dir: Path, dry_run: bool) -> list[dict]:
    checks = []
    for precision in ("fp32",) if dry_run else ("bf16", "fp16"):  # a dry run's one stands for both
        out = report_dir / f"tiny_{precision}"
        steps, used = ("2", "fp32") if dry_run else ("50", precision)
        command = [sys.executable, "train.py", "--model", "tiny", "--max-steps", steps, "--precision", used]
        command += ["--val-data", "none", "--log-every", "1", "--overwrite", "--output-dir", str(out)]
        check = run_command(f"tiny run, {steps} steps, {used}", command, timeout=300)
        if check["ok"]:
            check["final_train_loss"] = last_train_loss(out)
        checks.append(check)
    return checks


def throughput(dry_run: bool) -> tuple[dict, list[dict]]:
    """bench.py's worker (a fresh process per configuration; in this one for a dry run) over the
    configurations in the docstring."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = next((value for key, value in harness.PEAK_BF16_FLOPS if key in name), None)
    if dry_run:  # both kinds of batch, with and without checkpointing, tiny, in fp32 on the CPU
        model, reps, warmup, batch_size = TINY, 2, 0, 2
        configs = [("batch 2 x 16/8 tokens", (2, 16, 8), "fp32", False, False)]
        configs += [("batch 2, bundled lengths", None, "fp32", False, True)]
    else:
        model, reps, warmup, batch_size = "flan-t5-base", 5, 2, 32
        shapes = {"batch 32 x 512/128 tokens": (32, 512, 128), "batch 32, bundled lengths": None}
        variants = [(p, c, ckpt) for p in ("bf16", "fp32") for c in (False, True) for ckpt in (False, True)]
        variants = [v for v in variants if not (v[1] and v[2])]  # compiled with checkpointing: left out (time)
        configs = [(name, shape, *variant) for name, shape in shapes.items() for variant in variants]
    encoded = None
    check = {"check": "throughput", "ok": True, "seconds": 0.0, "tail": ""}
    start = time.perf_counter()
    results = []
    for shape_name, shape, precision, compiled, checkpointing in configs:
        spec = {"model": model, "mode": "lora", "tokenizer": None, "reps": reps, "precision": precision}
        spec.update(compile=compiled, checkpointing=checkpointing, warmup=warmup + 2 * compiled)
        if shape is not None:
            spec["shape"] = list(shape)
        else:  # the first batches of an epoch's length-bucketed plan, as train.py makes them
            encoded = encoded or harness.encoded_rows(None)
            keys = [bucket_key(r) for r in encoded]
            spec["batches"] = LengthBucketSampler(keys, batch_size, seed=0).all_batches(0)[:reps]
            spec["pad_multiple"] = 8
        row = {"shape": shape_name, "precision": precision, "compile": compiled, "checkpointing": checkpointing}
        try:
            out = harness.run_worker(spec, in_process=dry_run)  # a dry run's figures mean nothing
        except RuntimeError as err:
            check["ok"], check["tail"] = False, check["tail"] + f"\n{row}: {str(err)[-600:]}"
            results.append({**row, "error": str(err).splitlines()[0]})
            continue
        step = statistics.median(out["times"])
        peak_used = peak and (peak if precision == "bf16" else peak / 2)
        flops = statistics.median(out["model_flops"])
        results.append(
            {
                **row,
                "median_step_s": step,
                "first_step_s": out.get("first_step_s"),
                "tokens_per_s": statistics.median(out["real_tokens"]) / step,
                "tflops": flops / step / 1e12,
                "mfu": flops / step / peak_used if peak_used else None,
                "peak_mib": out["peak_mib"],
            }
        )
    check["seconds"] = round(time.perf_counter() - start, 1)
    return check, results


def markdown(report: dict) -> str:
    lines = [
        "# GPU check\n",
        f"{report['device']}; transformers {report['transformers']}; "
        f"{report['started']}{' (dry run: plumbing only, figures meaningless)' if report['dry_run'] else ''}.\n",
        "| check | result | seconds | details |",
        "|---|---|---|---|",
    ]
    for check in report["checks"]:
        details = f"final train loss {check['final_train_loss']:.4f}" if check.get("final_train_loss") else ""
        if not check["ok"]:
            details = check["tail"].strip().splitlines()[-1][:200] if check["tail"].strip() else "failed"
        lines.append(f"| {check['check']} | {'passed' if check['ok'] else 'FAILED'} | {check['seconds']} | {details} |")
    lines += [
        "",
        "| shape | precision | compile | checkpointing | first step (s) | median step (s) | tokens/s | model TFLOP/s "
        "| MFU | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["throughput"]:
        if "error" in row:
            lines.append(
                f"| {row['shape']} | {row['precision']} | {row['compile']} | {row['checkpointing']} | "
                f"failed: {row['error'][:80]} | | | | | |"
            )
            continue
        mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
        lines.append(
            f"| {row['shape']} | {row['precision']} | {row['compile']} | {row['checkpointing']} | "
            f"{row['first_step_s']:.2f} | {row['median_step_s']:.4f} | {row['tokens_per_s']:,.0f} | "
            f"{row['tflops']:.3g} | {mfu} | "
            f"{row['peak_mib']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("report_dir", type=Path, help="where report.md and report.json go (created if missing)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: check the script, not the GPU")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "error: no CUDA GPU is visible; run on a GPU machine, or pass --dry-run to check the script.",
            file=sys.stderr,
        )
        return 2
    if args.report_dir.exists() and not args.report_dir.is_dir():
        print(f"error: {args.report_dir} is a file: pass a directory for the report.", file=sys.stderr)
        return 2
    args.report_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "device": harness.hardware(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "dry_run": args.dry_run,
        "checks": [],
        "throughput": [],
    }
    if args.dry_run:  # the checks need CUDA: import them, which catches a renamed function or a broken import
        command = [sys.executable, "-c", "import sys; sys.path.insert(0, 'scripts'); import cuda_checks"]
    else:
        command = [sys.executable, "scripts/cuda_checks.py"]
    report["checks"].append(run_command("CUDA checks (scripts/cuda_checks.py)", command, 600))
    report["checks"] += tiny_runs(args.report_dir, args.dry_run)
    check, report["throughput"] = throughput(args.dry_run)
    report["checks"].append(check)
    atomic_write_all(
        {
            args.report_dir / "report.json": json.dumps(report, indent=2) + "\n",
            args.report_dir / "report.md": markdown(report),
        }
    )
    print(markdown(report))
    print(f"report written to {args.report_dir / 'report.md'} and {args.report_dir / 'report.json'}")
    return 0 if all(check["ok"] for check in report["checks"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
