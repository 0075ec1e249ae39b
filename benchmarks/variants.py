"""LoRA's variants (DoRA, PiSSA, LoRA+): the cost of a training step and of PiSSA's SVD."""

from __future__ import annotations

import statistics
import time

from data import collate
from lora import count_parameters, inject_lora

from .harness import build_model, device, peft_installed, prepare_training, run_worker, sync, time_steps, train_step


def bench_variants(args, rows, batch_indices) -> list[dict]:
    """6: LoRA's variants on one batch: step time interleaved in one process (ours LoRA, ours DoRA and, if
    installed, PEFT's DoRA), peak memory each in a fresh process, and PiSSA's one-off SVD at injection
    (its steps are LoRA's). LoRA+ changes only learning rates, so it costs nothing per step."""
    import copy

    dev = device()
    modes = ["lora", "dora"] + (["peft_dora"] if peft_installed() else [])
    base = build_model(args.model)
    batch = {k: v.to(dev) for k, v in collate([rows[i] for i in batch_indices], 0).items()}
    models = {mode: prepare_training(copy.deepcopy(base).to(dev).train(), mode) for mode in modes}
    for _ in range(args.warmup):
        for model, optimizer in models.values():
            train_step(model, optimizer, batch)
    times = {mode: [] for mode in modes}
    for _ in range(args.reps):
        for mode, (model, optimizer) in models.items():
            times[mode] += time_steps(model, optimizer, [batch], 0)
    del models
    lora_median = statistics.median(times["lora"])
    results = []
    for mode in modes:
        memory = run_worker(
            {
                "model": args.model,
                "mode": mode,
                "tokenizer": args.tokenizer,
                "warmup": 1,
                "batches": [batch_indices] * 2,
            },
            in_process=args.quick,
        )
        median = statistics.median(times[mode])
        results.append(
            {
                "variant": {"lora": "LoRA (ours)", "dora": "DoRA (ours)", "peft_dora": "DoRA (PEFT)"}[mode],
                "trainable": memory["trainable"],
                "median_step_s": median,
                "vs_lora": median / lora_median - 1,
                "peak_mib": memory["step_peak_mib"],
                "init_s": None,
            }
        )
    return results + [pissa_init_row(base, init, args.reps) for init in ("pissa", "pissa_niter_4")]


def pissa_init_row(base, init: str, reps: int) -> dict:
    """PiSSA's one-off cost: injecting with `init` (its SVD) into a copy of `base`, median of up to 3 runs."""
    import copy

    times = []
    for _ in range(max(1, min(reps, 3))):
        model = copy.deepcopy(base).to(device())
        sync()
        start = time.perf_counter()
        inject_lora(model, init=init)
        sync()
        times.append(time.perf_counter() - start)
    return {
        "variant": f"LoRA, init={init}",
        "trainable": count_parameters(model)[0],
        "median_step_s": None,
        "vs_lora": None,
        "peak_mib": None,
        "init_s": statistics.median(times),
    }
