"""The training step: LoRA against full fine-tuning, ours against PEFT's, and throughput with MFU."""

from __future__ import annotations

import statistics
import time

import torch

from data import LengthBucketSampler, bucket_key, collate

from .harness import (
    PEAK_BF16_FLOPS,
    build_model,
    device,
    peft_installed,
    prepare_training,
    run_worker,
    sync,
    train_step,
)


def bench_train_step(args, rows, batch_indices) -> list[dict]:
    """1: one fixed batch, LoRA vs full fine-tuning (and PEFT's LoRA), each in a fresh process for its memory."""
    modes = ["lora", "full"] + (["peft"] if peft_installed() else [])
    results = []
    for mode in modes:
        spec = {
            "model": args.model,
            "mode": mode,
            "tokenizer": args.tokenizer,
            "warmup": args.warmup,
            "batches": [batch_indices] * args.reps,
        }
        out = run_worker(spec, in_process=args.quick)
        results.append(
            {
                "mode": mode,
                "median_step_s": statistics.median(out["times"]),
                "peak_mib": out["step_peak_mib"],
                "trainable": out["trainable"],
                "total": out["total"],
            }
        )
    return results


def peft_hf_step(model, optimizer, batch) -> None:
    """One step of PEFT's LoRA as the HF Trainer makes it: T5's own loss (`labels=`, full logits), clipping
    to 1.0, AdamW."""
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_ours_vs_peft(args, rows, batch_indices) -> list[dict]:
    """3: train.py's train_step (our LoRA layer, loss on labelled positions, fast dropout and GELU) against
    PEFT's LoRA with T5's own loss, on the same batches (the first `reps` of an epoch's length-bucketed
    plan), steps alternated in one process (which goes first alternates too), so drift in machine speed
    hits both alike; the ratio is the median of the per-batch ratios."""
    import copy

    dev = device()
    base = build_model(args.model)
    plan = LengthBucketSampler([bucket_key(r) for r in rows], args.batch_size, seed=0).all_batches(0)
    batches = [{k: v.to(dev) for k, v in collate([rows[i] for i in b], 0).items()} for b in plan[: args.reps]]
    torch.manual_seed(0)
    ours, ours_opt = prepare_training(copy.deepcopy(base).to(dev).train(), "lora")
    theirs, theirs_opt = prepare_training(copy.deepcopy(base).to(dev).train(), "peft")
    del base
    steps = {"ours": lambda b: train_step(ours, ours_opt, b), "peft": lambda b: peft_hf_step(theirs, theirs_opt, b)}
    for _ in range(args.warmup):
        for step in steps.values():
            step(batches[0])
    times = {name: [] for name in steps}
    for i, batch in enumerate(batches):
        for name in list(steps)[:: 1 if i % 2 == 0 else -1]:
            sync()
            start = time.perf_counter()
            steps[name](batch)
            sync()
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(o / t for o, t in zip(times["ours"], times["peft"]))
    return [
        {
            "implementation": "ours (train.py's train_step)" if name == "ours" else "PEFT LoRA, T5's own loss",
            "median_step_s": statistics.median(t),
            "ours_over_peft": ratio if name == "ours" else 1.0,
        }
        for name, t in times.items()
    ]


def bench_throughput(args, rows, batch_indices) -> list[dict]:
    """5: training tokens/s and model FLOPs utilisation. On CUDA bf16 vs fp32 (TF32 matmuls), with and
    without torch.compile, against the GPU's data-sheet peak; on the CPU fp32 eager only, without MFU.

    Model FLOPs of a step: LoRA 2 x forward (the forward and the backward's input gradients; "4N" per
    token), full fine-tuning 3 x forward (plus the weight gradients; "6N"), counting real tokens only.
    """
    on_cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if on_cuda else "CPU"
    peak = next((v for k, v in PEAK_BF16_FLOPS if k in name), None) if on_cuda else None
    variants = [(p, c) for p in ("bf16", "fp32") for c in (False, True)] if on_cuda else [("fp32", False)]
    results = []
    for mode in ("lora", "full"):
        for precision, compiled in variants:
            spec = {
                "model": args.model,
                "mode": mode,
                "tokenizer": args.tokenizer,
                "warmup": args.warmup + 2 * compiled,  # compilation happens in the first warm-up steps
                "batches": [batch_indices] * args.reps,
                "precision": precision,
                "compile": compiled,
                "pad_multiple": 8 if on_cuda else None,
            }
            out = run_worker(spec, in_process=args.quick)
            step = statistics.median(out["times"])
            peak_used = peak and (peak if precision == "bf16" else peak / 2)
            results.append(
                {
                    "mode": mode,
                    "precision": precision,
                    "compile": compiled,
                    "median_step_s": step,
                    "tokens_per_s": out["real_tokens"][0] / step,
                    "tflops": out["model_flops"][0] / step / 1e12,
                    "mfu": out["model_flops"][0] / step / peak_used if peak_used else None,
                    "peak_flops": peak_used,
                }
            )
    return results
