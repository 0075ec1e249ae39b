"""The CUDA paths, as plain functions: bf16 autocast, fp16 with the gradient scaler, fused AdamW, --compile.

tests/test_cuda.py runs them under pytest (marked `cuda`, skipped without a GPU); scripts/gpu_check.sh
runs them with `python scripts/cuda_checks.py`, which needs no pytest (the GPU machine may lack it).
Each check raises AssertionError when the path is wrong.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import train  # noqa: E402  (check_compiled_run_follows_eager drives its recipe)
from data import EncodedExample, collate  # noqa: E402
from lora import inject_lora, lora_layers  # noqa: E402
from support.architectures import toy_t5  # noqa: E402
from support.step import train_step  # noqa: E402

CUDA = torch.device("cuda")
ROWS = [EncodedExample([5, 6, 7, 8, 1], [9, 8, 1]), EncodedExample([4, 1], [3, 3, 3, 3, 3, 3, 1])]


def cuda_model(fused: bool = True):
    """The tests' tiny T5 with LoRA on q, v and a random B, on CUDA, and its AdamW."""
    model = toy_t5()
    inject_lora(model, ("q", "v"), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # a random B, as if trained: with B = 0 the adapter changes nothing
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    model.to(CUDA).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-3, fused=fused)


def step(model, optimizer, dtype, scaler=None):
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)
    batch = collate(ROWS, 0)
    return train_step(model, optimizer, scaler, [batch], device=CUDA, dtype=dtype, max_grad_norm=1.0)


def check_bf16_autocast_step(tmp: Path) -> None:
    """A bf16 autocast step updates A and B (kept fp32) and nothing else."""
    model, optimizer = cuda_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = step(model, optimizer, torch.bfloat16)
    assert result.skipped is None and result.loss_sum == result.loss_sum, result
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:3]
    assert all(
        p.dtype == torch.float32 for layer in lora_layers(model).values() for p in layer.adapter_params().values()
    )


def check_fp16_overflow_is_skipped(tmp: Path) -> None:
    """fp16 with the scaler: an injected inf gradient skips the step, the scale backs off, the next step goes."""
    model, optimizer = cuda_model()
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    adapter = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    layer = next(iter(lora_layers(model).values()))
    hook = layer.lora_B.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    result = step(model, optimizer, torch.float16, scaler)
    hook.remove()
    assert result.skipped is not None and scaler.get_scale() < 2.0**16, (result, scaler.get_scale())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in adapter.items())
    assert step(model, optimizer, torch.float16, scaler).skipped is None


def check_fused_adamw(tmp: Path) -> None:
    """train.py's fused AdamW takes the steps the plain one takes."""
    (fused, fused_opt), (plain, plain_opt) = cuda_model(fused=True), cuda_model(fused=False)
    assert fused_opt.defaults["fused"]
    for _ in range(3):
        step(fused, fused_opt, torch.float32), step(plain, plain_opt, torch.float32)
    for (name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def check_compiled_run_follows_eager(tmp: Path) -> None:
    """20 steps of the tiny model with --compile give the eager run's losses (within 1e-4), dropout off: a
    compiled graph may draw its masks in another order (on the CPU the losses part at step 2 with dropout on)."""
    losses = {}
    for compiled in (False, True):
        out = tmp / f"compiled_{compiled}"
        argv = ["--model", "tiny", "--val-data", "none", "--max-steps", "20", "--log-every", "1"]
        argv += ["--precision", "fp32", "--output-dir", str(out), *(["--compile"] * compiled)]
        train.train(train.parse_args(argv), prepare_model=without_dropout)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [row["train_loss"] for row in rows if "train_loss" in row]
    assert len(losses[True]) == len(losses[False]) == 20
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=0, atol=1e-4)


def without_dropout(model) -> None:
    """Every dropout of the model off: the modules (T5's and LoRA's) and T5 attention's own rate."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0


CHECKS = [check_bf16_autocast_step, check_fp16_overflow_is_skipped, check_fused_adamw, check_compiled_run_follows_eager]


def main() -> int:
    if not torch.cuda.is_available():
        print("error: no CUDA GPU is visible: these checks need one.", file=sys.stderr)
        return 2
    failed = 0
    for check in CHECKS:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                check(Path(tmp))
                print(f"passed {check.__name__}", flush=True)
            except Exception:  # noqa: BLE001  (every failure is reported, then the next check runs)
                failed += 1
                print(f"FAILED {check.__name__}\n{traceback.format_exc()}", flush=True)
    print(f"{len(CHECKS) - failed} of {len(CHECKS)} CUDA checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
