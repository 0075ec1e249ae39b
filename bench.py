"""Benchmarks: LoRA against full fine-tuning, bucketed batches against padding to 128, our layer against
PEFT's, merged inference against the base model, and training throughput with model FLOPs utilisation
(bf16 against fp32, with and without torch.compile, on CUDA), LoRA's variants (DoRA, PiSSA), and the
memory of bigger bases (bf16 base, activation checkpointing, on flan-t5-xl). Prints markdown tables.

    python bench.py                 # flan-t5-base's architecture with random weights (timings don't depend on values)
    python bench.py --quick         # the tiny model, a few repetitions: checks the script works (< 3 min on 2 cores)

Every timing is the median of several repetitions after warm-up runs. Training-step memory is measured
in a fresh process per configuration (CUDA: max allocated; CPU: the process's resident set sampled every
millisecond while the steps run, so that building the model does not count). Sequence
lengths come from the bundled training split tokenised with --tokenizer (default: the tiny model's
tokenizer, since flan-t5's needs the hub; pass a local flan-t5 directory to use its lengths).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from data import IGNORE_INDEX, TRAIN_FILE, LengthBucketSampler, bucket_key, collate, encode_examples, load_examples
from lora import LoRALinear, count_parameters, inject_lora, lora_layers, merge_lora, set_base_dtype
from lora.adapters import add_adapter, mixed_adapters
from support.cli import EXIT_USAGE
from support.fast_modules import use_fast_modules
from support.metrics import peak_memory_mib
from support.models import (
    TINY,
    enable_activation_checkpointing,
    flan_t5_architecture,
    load_model_and_tokenizer,
    resolve_model_path,
)
from support.precision import training_dtype
from train import train_step as train_py_step

# Dense bf16 tensor-core peaks (no sparsity) from NVIDIA's data sheets, by device-name substring, first
# match wins (so the PCIe H100 comes before the SXM one). TF32, used for fp32 matmuls, is half of it.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("RTX 4090", 165e12),
)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__} (CPU)"


def build_model(name: str):
    """A flan-t5 size's architecture with random weights (the real checkpoint's layout), or the tiny model."""
    torch.manual_seed(0)
    return flan_t5_architecture(name.removeprefix("flan-t5-")) if name != TINY else load_model_and_tokenizer(TINY)[0]


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """This process's peak resident memory while the block runs, sampled every millisecond. ru_maxrss
    would include building the model, which can peak above training (a bf16 base is built in fp32)."""

    def __enter__(self):
        self.peak_mib, self._done = rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.001):
            self.peak_mib = max(self.peak_mib, rss_mib())

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, rss_mib())


def model_shapes(name: str):
    """The LoRA model's modules on the meta device: shapes for counting FLOPs, no weights, no memory."""
    from transformers import AutoConfig, T5ForConditionalGeneration

    if name == TINY:
        with torch.device("meta"):
            model = T5ForConditionalGeneration(AutoConfig.from_pretrained(resolve_model_path(TINY)))
    else:
        model = flan_t5_architecture(name.removeprefix("flan-t5-"), device="meta")
    inject_lora(model)
    return model


def encoded_rows(tokenizer_path: str | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or resolve_model_path(TINY))
    encoded, _ = encode_examples(load_examples(TRAIN_FILE), tokenizer)
    return encoded


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prepare_training(model, mode: str):
    """Make `model` trainable as `mode` (lora, dora, full, peft, peft_dora) and return (model, optimizer)."""
    if mode in ("lora", "dora"):  # as train.py builds it
        inject_lora(model, use_dora=mode == "dora")
        use_fast_modules(model)
    elif mode in ("peft", "peft_dora"):
        import peft

        config = peft.LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules=["q", "v"],
            task_type="SEQ_2_SEQ_LM",
            use_dora=mode == "peft_dora",
        )
        model = peft.get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4, fused=torch.cuda.is_available())


def train_step(model, optimizer, batch, dtype=torch.float32):
    """One optimizer step exactly as train.py makes it (loss, clipping, finite check), one micro-batch."""
    scaler = torch.amp.GradScaler(device().type, enabled=False)
    train_py_step(model, optimizer, scaler, [batch], device=device(), dtype=dtype, max_grad_norm=1.0)


def time_steps(model, optimizer, batches, warmup: int, dtype=torch.float32) -> list[float]:
    """Seconds per training step over `batches`, after `warmup` untimed steps on the first batch."""
    for _ in range(warmup):
        train_step(model, optimizer, batches[0], dtype)
    times = []
    for batch in batches:
        sync()
        start = time.perf_counter()
        train_step(model, optimizer, batch, dtype)
        sync()
        times.append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------------------------------------
# Workers: each measurement that reports memory runs in a fresh process.


def worker(spec: dict) -> dict:
    from transformers import T5ForConditionalGeneration  # noqa: F401  (imported before the runtime is measured)

    runtime_mib = rss_mib()  # the interpreter, torch and transformers, before any model
    torch.manual_seed(0)
    dev = device()
    dtype = training_dtype(spec.get("precision", "fp32"), dev)  # as train.py: fp32 matmuls run as TF32 on CUDA
    model = build_model(spec["model"]).to(dev).train()
    model, optimizer = prepare_training(model, spec["mode"])
    if spec.get("base_dtype") == "bf16":
        set_base_dtype(model, torch.bfloat16)  # A and B stay fp32, as train.py --base-dtype bf16
    if spec.get("checkpointing"):
        enable_activation_checkpointing(model)
    trainable, total = count_parameters(model)
    if spec.get("shape"):  # (batch, source, target): random tokens of fixed lengths
        rows = random_rows(*spec["shape"], vocab_size=model.config.vocab_size)
        spec["batches"] = [list(range(spec["shape"][0]))] * spec["reps"]
    else:
        rows = encoded_rows(spec["tokenizer"])
    batches = [
        {k: v.to(dev) for k, v in collate([rows[i] for i in idx], 0, spec.get("pad_multiple")).items()}
        for idx in spec["batches"]
    ]
    if spec.get("pad_to"):
        batches = [pad_batch(b, spec["pad_to"]) for b in batches]
    if spec.get("compile"):
        model = torch.compile(model)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        sync()
        start = time.perf_counter()
        train_step(model, optimizer, batches[0], dtype)  # the first step: compilation, if compiled
        sync()
        first_step_s = time.perf_counter() - start
        times = time_steps(model, optimizer, batches, max(spec["warmup"] - 1, 0), dtype)
    source_tokens = [int(b["attention_mask"].sum()) for b in batches]
    target_tokens = [int((b["labels"] != IGNORE_INDEX).sum()) for b in batches]
    passes = 3 if spec["mode"] == "full" else 2  # see bench_throughput
    return {
        "times": times,
        "first_step_s": first_step_s,
        "real_tokens": [s + t for s, t in zip(source_tokens, target_tokens)],
        "model_flops": [passes * forward_matmul_flops(model, s, t) for s, t in zip(source_tokens, target_tokens)],
        "peak_mib": peak_memory_mib(dev),  # CUDA: max allocated; CPU: the process's peak RSS
        "step_peak_mib": peak_memory_mib(dev) if dev.type == "cuda" else rss.peak_mib,  # while steps ran
        "runtime_mib": 0.0 if dev.type == "cuda" else runtime_mib,
        "trainable": trainable,
        "total": total,
    }


def random_rows(batch_size: int, source_len: int, target_len: int, vocab_size: int):
    from data.dataset import EncodedExample

    generator = torch.Generator().manual_seed(0)
    return [
        EncodedExample(
            torch.randint(2, vocab_size, (source_len,), generator=generator).tolist(),
            torch.randint(2, vocab_size, (target_len,), generator=generator).tolist(),
        )
        for _ in range(batch_size)
    ]


def pad_batch(batch: dict, length: int) -> dict:
    """Pad (never truncate: the bundled rows fit) every tensor of a collated batch to `length` columns."""

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    return {
        "input_ids": pad(batch["input_ids"], 0),
        "attention_mask": pad(batch["attention_mask"], 0),
        "labels": pad(batch["labels"], IGNORE_INDEX),
        "decoder_input_ids": pad(batch["decoder_input_ids"], 0),
    }


WORKER_DEFAULTS = {
    "precision": "fp32",
    "compile": False,
    "pad_multiple": None,
    "pad_to": None,
    "base_dtype": "fp32",
    "checkpointing": False,
}
_worker_results: dict[str, dict] = {}


def run_worker(spec: dict) -> dict:
    """Measure `spec` in a fresh process. A configuration measured before in this run is not measured
    again: on the CPU the throughput section's runs are the training-step section's."""
    key = json.dumps({**WORKER_DEFAULTS, **spec}, sort_keys=True)
    if key not in _worker_results:
        env = os.environ.copy()
        if spec.get("return_freed_memory"):  # every large block mmapped, so freeing it returns it to the OS
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # (else glibc may keep the fp32 copies a bf16 base freed)
        result = subprocess.run([sys.executable, __file__, "--worker", key], capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"benchmark worker {spec['mode']} failed:\n{result.stderr[-2000:]}")
        _worker_results[key] = json.loads(result.stdout.strip().splitlines()[-1])
    return _worker_results[key]


# ---------------------------------------------------------------------------------------------------------


def peft_installed() -> bool:
    try:
        import peft  # noqa: F401  (not a dependency: measured only when installed)

        return True
    except ImportError:
        return False


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
        out = run_worker(spec)
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
            }
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
    for init in ("pissa", "pissa_niter_4"):
        inits = []
        for _ in range(max(1, min(args.reps, 3))):
            model = copy.deepcopy(base).to(dev)
            sync()
            start = time.perf_counter()
            inject_lora(model, init=init)
            sync()
            inits.append(time.perf_counter() - start)
        results.append(
            {
                "variant": f"LoRA, init={init}",
                "trainable": count_parameters(model)[0],
                "median_step_s": None,
                "vs_lora": None,
                "peak_mib": None,
                "init_s": statistics.median(inits),
            }
        )
    return results


MEMORY_CONFIGS = (  # label, mode, base dtype, activation checkpointing
    ("(a) PEFT LoRA, fp32 base", "peft", "fp32", False),
    ("(b) ours, fp32 base", "lora", "fp32", False),
    ("(c) ours, bf16 base", "lora", "bf16", False),
    ("(d) ours, bf16 base + checkpointing", "lora", "bf16", True),
)


def bench_memory(args, rows, batch_indices) -> list[dict]:
    """7: what a bigger base needs. One LoRA step (r=16 on q, v; AdamW) per configuration, each in a fresh
    process: peak memory while the step ran (CPU: resident set sampled every ms; CUDA: max allocated),
    beside train.py's memory plan for the same configuration, and the step time. flan-t5-xl's architecture
    (that of bigscience/T0_3B) at batch 8, 32 source / 64 target tokens, then flan-t5-base's at the bundled
    data's lengths (CUDA: flan-t5-large and xl, both 8 x 32/64). On a CPU, xl gets one timed step (after
    the first): a step takes minutes there, and memory is the point."""
    on_cuda = torch.cuda.is_available()
    fixed = (args.batch_size, 32, 64)
    if args.quick:
        plans = [(TINY, (2, 8, 16))]
    elif on_cuda:
        plans = [("flan-t5-large", fixed), ("flan-t5-xl", fixed)]
    else:
        plans = [("flan-t5-xl", fixed), ("flan-t5-base", None)]
    real = [rows[i] for i in batch_indices]
    results = []
    for model_name, shape in plans:
        baseline = None
        xl_on_cpu = not on_cuda and model_name == "flan-t5-xl"
        batch, source_len, target_len = shape or (
            len(real),
            max(len(r.input_ids) for r in real),
            max(len(r.labels) for r in real),
        )
        for label, mode, base_dtype, checkpointing in MEMORY_CONFIGS:
            if (mode == "peft" and not peft_installed()) or (args.quick and label[:3] in ("(a)", "(c)")):
                continue  # --quick checks the code paths: (b) and (d) between them take every one
            plan = memory_plan(model_name, base_dtype, checkpointing, batch, source_len, target_len)
            spec = {
                "model": model_name,
                "mode": mode,
                "tokenizer": args.tokenizer,
                "warmup": 0 if xl_on_cpu else args.warmup,
                "reps": 1 if xl_on_cpu else args.reps,
                "base_dtype": base_dtype,
                "checkpointing": checkpointing,
                "return_freed_memory": True,
            }
            spec.update({"shape": list(shape)} if shape else {"batches": [batch_indices] * spec["reps"]})
            out = run_worker(spec)
            baseline = baseline or out["step_peak_mib"]
            results.append(
                {
                    "model": model_name,
                    "tokens": f"{batch} x {source_len}/{target_len}",
                    "config": label,
                    "step_peak_mib": out["step_peak_mib"],
                    "runtime_mib": out["runtime_mib"],
                    "plan_mib": plan / 2**20,
                    "vs_a": out["step_peak_mib"] / baseline,
                    "median_step_s": statistics.median(out["times"]),
                    "steps": len(out["times"]),
                }
            )
    return results


def memory_plan(model_name: str, base_dtype: str, checkpointing: bool, batch: int, source: int, target: int) -> int:
    """train.py's memory plan (support/memory.py) for a configuration, in bytes, from the model's shapes."""
    from support.memory import plan_memory

    model = model_shapes(model_name)
    if base_dtype == "bf16":
        set_base_dtype(model, torch.bfloat16)
    return plan_memory(model, batch, source, target, torch.float32, checkpointing).total_bytes


def bench_epoch(args, rows) -> list[dict]:
    """2: an epoch of LoRA training with length-bucketed dynamic padding vs every row padded to 128.

    Beside the times, the matmul FLOPs each plan computes (padding included; 2 x forward for a LoRA step)
    and those of an epoch with no padding at all: the compute ratio bounds what batching can gain.
    """
    shapes = model_shapes(args.model)

    def epoch_tflop(plan, pad_to=None):
        flops = 0
        for batch in plan:
            source = pad_to or max(len(rows[i].input_ids) for i in batch)
            target = pad_to or max(len(rows[i].labels) for i in batch)
            flops += 2 * forward_matmul_flops(shapes, source * len(batch), target * len(batch))
        return flops / 1e12

    lengths = [len(r.input_ids) + len(r.labels) for r in rows]
    bucketed = LengthBucketSampler([bucket_key(r) for r in rows], args.batch_size, seed=0).all_batches(0)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    padded = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    results = []
    for name, plan, pad_to in (("bucketed, dynamic padding", bucketed, None), ("every row padded to 128", padded, 128)):
        sample = plan if args.full_epoch else random.Random(1).sample(plan, min(args.epoch_sample, len(plan)))
        spec = {
            "model": args.model,
            "mode": "lora",
            "tokenizer": args.tokenizer,
            "warmup": args.warmup,
            "batches": sample,
            "pad_to": pad_to,
        }
        out = run_worker(spec)
        # Real (non-padding) tokens of the whole epoch are the same for both plans.
        epoch_s = statistics.mean(out["times"]) * len(plan)
        results.append(
            {
                "plan": name,
                "batches": len(plan),
                "measured_batches": len(sample),
                "epoch_s": epoch_s,
                "real_tokens_per_s": sum(lengths) / epoch_s,
                "matmul_tflop": epoch_tflop(plan, pad_to),
            }
        )
    results.append(
        {
            "plan": "no padding at all (computed only)",
            "batches": "-",
            "measured_batches": "-",
            "epoch_s": None,
            "real_tokens_per_s": None,
            "matmul_tflop": epoch_tflop([[i] for i in range(len(rows))]),
        }
    )
    return results


@torch.inference_mode()
def bench_inference(args, rows) -> list[dict]:
    """4: greedy generation of exactly `max_new_tokens` tokens: base, unmerged adapter, merged adapter and,
    at batch 16, two adapters in one mixed batch (8 rows each, lora/adapters.py), all interleaved."""
    import copy

    dev = device()
    base = build_model(args.model).to(dev).eval()
    unmerged = copy.deepcopy(base)
    inject_lora(unmerged)
    for layer in lora_layers(unmerged).values():
        torch.nn.init.normal_(layer.lora_B, std=0.01)  # a trained-looking adapter, so merging changes the weights
    merged = copy.deepcopy(unmerged)
    merge_lora(merged)
    two = copy.deepcopy(unmerged)
    add_adapter(two, "second")
    for layer in lora_layers(two).values():
        torch.nn.init.normal_(layer.adapters["second"].lora_B, std=0.01)
    results = []
    for batch_size in (1, 16):
        half = ["default"] * (batch_size // 2) + ["second"] * (batch_size - batch_size // 2)
        runs = {  # name: (model, the context it generates in)
            "base": (base, nullcontext),
            "unmerged adapter": (unmerged, nullcontext),
            "merged adapter": (merged, nullcontext),
            **(
                {"2 adapters, mixed batch": (two, lambda names=half: mixed_adapters(two, names))}
                if batch_size > 1
                else {}
            ),
        }
        batch = collate(rows[:batch_size], 0)
        inputs = {"input_ids": batch["input_ids"].to(dev), "attention_mask": batch["attention_mask"].to(dev)}
        gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False, "num_beams": 1}
        for model, context in runs.values():
            for _ in range(args.warmup):
                with context():
                    model.generate(**inputs, **gen)
        times = {name: [] for name in runs}
        for _ in range(args.reps):  # interleaved, so drift in machine speed hits every model alike
            for name, (model, context) in runs.items():
                with context():
                    sync()
                    start = time.perf_counter()
                    model.generate(**inputs, **gen)
                    sync()
                times[name].append(time.perf_counter() - start)
        base_median = statistics.median(times["base"])
        unmerged_median = statistics.median(times["unmerged adapter"])
        for name in runs:
            median = statistics.median(times[name])
            results.append(
                {
                    "batch": batch_size,
                    "model": name,
                    "median_s": median,
                    "per_query_s": median / batch_size,
                    "vs_base": median / base_median - 1,
                    "vs_unmerged": median / unmerged_median,
                }
            )
    return results


# Operator families of a training step's profile, by the name of the aten operator.
PROFILE_FAMILIES = {
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"),
    "dropout masks": ("aten::bernoulli_", "aten::uniform_", "aten::random_"),
    "cross-entropy": (
        "aten::_log_softmax",
        "aten::_log_softmax_backward_data",
        "aten::nll_loss_forward",
        "aten::nll_loss_backward",
    ),
    "elementwise": (
        "aten::mul",
        "aten::mul_",
        "aten::add",
        "aten::add_",
        "aten::pow",
        "aten::tanh",
        "aten::copy_",
        "aten::fill_",
        "aten::div",
        "aten::div_",
        "aten::mean",
        "aten::rsqrt",
        "aten::sub",
        "aten::sub_",
        "aten::masked_fill",
        "aten::where",
        "aten::zero_",
        "aten::sum",
        "aten::index_put_",
        "aten::masked_fill_",
        "aten::lt",
        "aten::ge",
        "aten::gt",
    ),
}


def bench_profile(args, rows, batch_indices) -> list[dict]:
    """8: where the time of one LoRA step goes (train.py's train_step, our LoRA on q, v, T5's dropout on),
    by operator family: self CPU time from torch.profiler over `reps` steps after `warmup`, on one thread."""
    from torch.profiler import ProfilerActivity, profile

    dev = device()
    model, optimizer = prepare_training(build_model(args.model).to(dev).train(), "lora")
    batch = {k: v.to(dev) for k, v in collate([rows[i] for i in batch_indices], 0).items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: each operator's time is its own, not its share of a pool
    try:
        for _ in range(args.warmup):
            train_step(model, optimizer, batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(args.reps):
                train_step(model, optimizer, batch)
            wall_us = (time.perf_counter() - start) * 1e6
    finally:
        torch.set_num_threads(threads)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = max(wall_us, sum(e.self_cpu_time_total for e in events))
    family_of = {op: family for family, ops in PROFILE_FAMILIES.items() for op in ops}
    share, calls, top = {}, {}, {}
    for e in events:
        family = family_of.get(e.key, "other")
        share[family] = share.get(family, 0) + e.self_cpu_time_total
        calls[family] = calls.get(family, 0) + e.count
        top.setdefault(family, []).append((e.self_cpu_time_total, e.key))
    return [
        {
            "family": family if family != "other" else "other aten operators",
            "share": share.get(family, 0) / total,
            "ms_per_step": share.get(family, 0) / 1000 / args.reps,
            "calls_per_step": calls.get(family, 0) // args.reps,
            "largest": ", ".join(f"{key} {t / total:.1%}" for t, key in sorted(top.get(family, []))[::-1][:3]),
        }
        for family in [*PROFILE_FAMILIES, "other"]
    ] + [
        {
            "family": "outside aten operators (Python, NumPy's dropout masks, the profiler)",
            "share": 1 - sum(share.values()) / total,
            "ms_per_step": (total - sum(share.values())) / 1000 / args.reps,
            "calls_per_step": "",
            "largest": "",
        }
    ]


def forward_matmul_flops(model, source_tokens: int, target_tokens: int) -> int:
    """FLOPs of the matmuls in one forward pass: 2 x each weight matrix x the tokens it multiplies.

    In an encoder-decoder a token meets only part of the weights: encoder layers see source tokens;
    decoder layers and lm_head see target tokens, except cross-attention k and v, which project the
    encoder's output (source tokens). LoRA branches add 2·r·(in + out) per token. Embedding lookups
    are no matmuls, and attention scores (QKᵀ, AV) are left out, as in the usual 6·N rule.
    """
    flops = 0
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            per_token = module.in_features * module.out_features + module.r * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Linear):
            per_token = module.in_features * module.out_features
        else:
            continue
        parts = name.split(".")
        cross = parts.index("EncDecAttention") if "EncDecAttention" in parts else None
        on_source = "encoder" in parts or (cross is not None and parts[cross + 1] in ("k", "v"))
        flops += 2 * per_token * (source_tokens if on_source else target_tokens)
    return flops


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
            out = run_worker(spec)
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


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(
                ("n/a" if row[key] is None else format(row[key], fmt)) if fmt else str(row[key])
                for _, key, fmt in columns
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny model and few repetitions: a smoke check, not figures")
    p.add_argument("--model", default="flan-t5-base", choices=["flan-t5-base", TINY], help="architecture to time")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for sequence lengths (default: tiny's)")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size (default: 8)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (default: 3)")
    p.add_argument("--epoch-sample", type=int, default=20, help="batches timed per epoch plan (default: 20)")
    p.add_argument("--full-epoch", action="store_true", help="time every batch of both epochs instead of a sample")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per query (default: 64)")
    p.add_argument(
        "--only",
        nargs="+",
        choices=["train", "peft", "variants", "memory", "epoch", "inference", "throughput", "profile"],
        help="run only these sections",
    )
    p.add_argument("--output", type=Path, help="also write the results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch_size", "reps", "epoch_sample", "new_tokens"):
        if getattr(args, name) <= 0:
            print(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}.", file=sys.stderr)
            return EXIT_USAGE
    if args.warmup < 0:
        print(f"error: --warmup must be 0 or more, got {args.warmup}.", file=sys.stderr)
        return EXIT_USAGE
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.model, args.reps, args.warmup, args.epoch_sample, args.new_tokens = TINY, 2, 1, 2, 8

    rows = encoded_rows(args.tokenizer)
    batch_indices = LengthBucketSampler([bucket_key(r) for r in rows], args.batch_size, seed=0).all_batches(0)[0]
    sections = set(args.only or ["train", "peft", "variants", "memory", "epoch", "inference", "throughput", "profile"])
    results = {
        "hardware": hardware(),
        "model": args.model,
        "batch_size": args.batch_size,
        "reps": args.reps,
        "warmup": args.warmup,
    }
    print(
        f"# Benchmarks\n\n{hardware()}; model {args.model} (random weights), batch {args.batch_size}, "
        f"median of {args.reps} after {args.warmup} warm-up runs.\n",
        flush=True,
    )

    def report(key: str, heading: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
        results[key] = rows
        print(f"## {heading}\n\n{table(rows, columns)}\n", flush=True)

    if "train" in sections:
        report(
            "train_step",
            "Training step: LoRA (r=16 on q, v) vs full fine-tuning, AdamW, one batch",
            bench_train_step(args, rows, batch_indices),
            [
                ("mode", "mode", ""),
                ("trainable params", "trainable", ","),
                ("median step (s)", "median_step_s", ".3f"),
                ("peak memory (MiB)", "peak_mib", ",.0f"),
            ],
        )
    if "peft" in sections and peft_installed():
        report(
            "ours_vs_peft",
            "Training step: ours vs PEFT's LoRA with T5's own loss, alternated in one process",
            bench_ours_vs_peft(args, rows, batch_indices),
            [
                ("implementation", "implementation", ""),
                ("median step (s)", "median_step_s", ".3f"),
                ("ours / PEFT (median of pairs)", "ours_over_peft", ".3f"),
            ],
        )
    if "variants" in sections:
        report(
            "variants",
            "LoRA's variants: training step (interleaved in one process), peak memory (fresh process each), "
            "PiSSA's SVD at injection",
            bench_variants(args, rows, batch_indices),
            [
                ("variant", "variant", ""),
                ("trainable params", "trainable", ","),
                ("median step (s)", "median_step_s", ".3f"),
                ("vs LoRA", "vs_lora", "+.1%"),
                ("peak memory (MiB)", "peak_mib", ",.0f"),
                ("injection (s)", "init_s", ".2f"),
            ],
        )
    if "memory" in sections:
        report(
            "memory",
            "Bigger bases: peak memory of a LoRA step with a bf16 base and activation checkpointing",
            bench_memory(args, rows, batch_indices),
            [
                ("model", "model", ""),
                ("batch x source/target tokens", "tokens", ""),
                ("configuration", "config", ""),
                ("peak memory while training (MiB)", "step_peak_mib", ",.0f"),
                ("of which runtime (MiB)", "runtime_mib", ",.0f"),
                ("memory plan (MiB)", "plan_mib", ",.0f"),
                ("vs (a)", "vs_a", ".2f"),
                ("median step (s)", "median_step_s", ".2f"),
                ("timed steps", "steps", ""),
            ],
        )
    if "epoch" in sections:
        report(
            "epoch",
            "One epoch of LoRA training: bucketed dynamic padding vs padding to 128",
            bench_epoch(args, rows),
            [
                ("batches", "plan", ""),
                ("steps", "batches", ""),
                ("timed steps", "measured_batches", ""),
                ("epoch (s)", "epoch_s", ".1f"),
                ("real tokens/s", "real_tokens_per_s", ",.0f"),
                ("matmul TFLOP", "matmul_tflop", ".4g"),
            ],
        )
    if "inference" in sections:
        report(
            "inference",
            f"Inference: greedy, exactly {args.new_tokens} new tokens",
            bench_inference(args, rows),
            [
                ("batch", "batch", ""),
                ("model", "model", ""),
                ("median (s)", "median_s", ".4f"),
                ("per query (s)", "per_query_s", ".4f"),
                ("vs base", "vs_base", "+.1%"),
                ("x unmerged", "vs_unmerged", ".2f"),
            ],
        )
    if "throughput" in sections:
        report(
            "throughput",
            "Training throughput and model FLOPs utilisation (LoRA 2x, full 3x the forward matmul FLOPs of the "
            "real tokens; fp32 matmuls as TF32 on CUDA)",
            bench_throughput(args, rows, batch_indices),
            [
                ("mode", "mode", ""),
                ("precision", "precision", ""),
                ("compile", "compile", ""),
                ("median step (s)", "median_step_s", ".4f"),
                ("real tokens/s", "tokens_per_s", ",.0f"),
                ("model TFLOP/s", "tflops", ".3g"),
                ("MFU", "mfu", ".1%"),
                ("peak FLOP/s", "peak_flops", ".3g"),
            ],
        )
    if "profile" in sections:
        report(
            "profile",
            "Where a LoRA step's time goes (torch.profiler, self CPU time, one thread)",
            bench_profile(args, rows, batch_indices),
            [
                ("operators", "family", ""),
                ("share", "share", ".1%"),
                ("ms per step", "ms_per_step", ",.0f"),
                ("calls per step", "calls_per_step", ""),
                ("largest", "largest", ""),
            ],
        )
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
