"""What every benchmark shares: the machine's description, models by name, timing with warm-ups and
medians, peak memory, and the worker that measures a configuration in a fresh process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from data import IGNORE_INDEX, TRAIN_FILE, collate, encode_examples, load_examples
from lora import LoRALinear, count_parameters, inject_lora, set_base_dtype
from support.architectures import flan_t5_architecture
from support.fast_modules import use_fast_modules
from support.fsdp import VIEW_WARNING, local, shard_model
from support.memory import enable_activation_checkpointing
from support.metrics import peak_memory_mib
from support.models import RANDOM, load_base_shards, load_model_and_tokenizer, load_with_lora, resolve_model_path
from support.precision import allow_tf32, training_dtype
from support.step import train_step as train_py_step
from support.tiny_model import TINY

BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "bench.py"  # a worker is `bench.py --worker SPEC`

# Dense bf16 tensor-core peaks (no sparsity) from NVIDIA's data sheets, by device-name substring, first
# match wins (so the PCIe H100 comes before the SXM one). TF32, used for fp32 matmuls, is half of it.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
                   ("L40S", 362e12), ("RTX 4090", 165e12))  # fmt: skip


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


def model_name(name: str) -> str:
    """bench.py's --model as support.models names it: `tiny`, or a flan-t5 size with random weights."""
    return name if name == TINY else f"{RANDOM}{name}"


def build_model(name: str):
    """The base model, through the one build path (support/models.py); random weights for a flan-t5 size."""
    return load_model_and_tokenizer(model_name(name))[0]


def build_nf4_lora_model(name: str, dev: torch.device):
    """train.py --base-dtype nf4's model: LoRA (r=16 on q, v) injected on the meta device, then each frozen
    weight read (or, for a flan-t5 size, drawn) and quantised in turn, so the full-precision model is never in
    memory."""
    model = load_with_lora(model_name(name), "nf4", dev, inject_lora)[0]
    use_fast_modules(model)
    return model


def build_fsdp_lora_model(name: str, dev: torch.device):
    """train.py --fsdp's model: LoRA (r=16 on q, v) injected on the meta device, sharded, then this rank's
    shards of each frozen weight cut from it as it is read (or drawn), one at a time; (model, AdamW over the
    sharded A and B). Joins the process group."""
    import torch.distributed as dist

    dist.init_process_group("gloo" if dev.type == "cpu" else "nccl")
    model = load_with_lora(model_name(name), "fp32", dev, inject_lora, on_meta=True)[0]
    use_fast_modules(model)
    shard_model(model, dev, dist.get_world_size())
    load_base_shards(model, model_name(name), dev)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


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


def build_for(spec: dict, dev: torch.device):
    """(the T5, what the steps call, its optimizer) for a configuration, built as train.py builds it."""
    if spec.get("base_dtype") == "nf4":  # QLoRA, as train.py --base-dtype nf4 builds it
        model = build_nf4_lora_model(spec["model"], dev).to(dev).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    elif spec.get("parallel") == "fsdp":  # no rank builds the whole base
        warnings.filterwarnings("ignore", message=VIEW_WARNING)  # this worker's process: see view_warnings_silenced
        model, optimizer = build_fsdp_lora_model(spec["model"], dev)
        model.train()
    else:
        model = build_model(spec["model"]).to(dev).train()
        model, optimizer = prepare_training(model, spec["mode"])
    if spec.get("base_dtype") == "bf16":
        set_base_dtype(model, torch.bfloat16)  # A and B stay fp32, as train.py --base-dtype bf16
    if spec.get("parallel") == "ddp":  # under torchrun
        return (model, *data_parallel(model, dev))
    return model, model, optimizer


def worker(spec: dict) -> dict:
    from transformers import T5ForConditionalGeneration  # noqa: F401  (imported before the runtime is measured)

    runtime_mib = rss_mib()  # the interpreter, torch and transformers, before any model
    torch.manual_seed(0)
    dev = device()
    dtype = training_dtype(spec.get("precision", "fp32"), dev)
    allow_tf32(dev)  # as train.py: fp32 matmuls run as TF32 on CUDA
    with PeakRSS() as load_rss:  # building the model (and quantising it), apart from the steps
        model, step_model, optimizer = build_for(spec, dev)
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
        model = step_model = torch.compile(model)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        sync()
        start = time.perf_counter()
        train_step(step_model, optimizer, batches[0], dtype)  # the first step: compilation, if compiled
        sync()
        first_step_s = time.perf_counter() - start
        times = time_steps(step_model, optimizer, batches, max(spec["warmup"] - 1, 0), dtype)
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
        "load_peak_mib": 0.0 if dev.type == "cuda" else load_rss.peak_mib,
        "trainable": trainable,
        "total": total,
        "rank": int(os.environ.get("RANK", "0")),
        "frozen_held_mib": sum(local(p).numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        / 2**20,
    }


def data_parallel(model, dev: torch.device):
    """The model in DDP, and an AdamW over what it trains. Joins the process group."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo" if dev.type == "cpu" else "nccl")
    model = DistributedDataParallel(model)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


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


def run_worker(spec: dict, in_process: bool = False) -> dict:
    """Measure `spec` in a fresh process (or, `in_process`, in this one: bench.py --quick, whose figures mean
    nothing, skips a process start per configuration; distributed ones still run under torchrun). A
    configuration measured before in this run is not measured again: on the CPU the throughput section's
    runs are the training-step section's."""
    key = json.dumps({**WORKER_DEFAULTS, **spec}, sort_keys=True)
    if key not in _worker_results and in_process and not spec.get("parallel"):
        _worker_results[key] = worker(json.loads(key))
    if key not in _worker_results:
        env = os.environ.copy()
        if spec.get("return_freed_memory"):  # every large block mmapped, so freeing it returns it to the OS
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # (else glibc may keep the fp32 copies a bf16 base freed)
        command = [sys.executable, str(BENCH_SCRIPT), "--worker", key]
        if spec.get("parallel"):  # 2 processes of 1 thread each, every one reporting
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       *command[1:]]  # fmt: skip
            env["OMP_NUM_THREADS"] = "1"
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"benchmark worker {spec['mode']} failed:\n{result.stderr[-2000:]}")
        reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        _worker_results[key] = {"ranks": reports} if spec.get("parallel") else reports[-1]
    return _worker_results[key]


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


def peft_installed() -> bool:
    try:
        import peft  # noqa: F401  (not a dependency: measured only when installed)

        return True
    except ImportError:
        return False
