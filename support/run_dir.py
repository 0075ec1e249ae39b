"""The output directory of a training run: what it holds, and when a run may use it.

    <output-dir>/adapter_config.json, adapter_model.safetensors   the final adapter (PEFT's layout)
                 tokenizer files, training_config.json             what infer.py needs to rebuild the model
                 metrics.jsonl, training_loss.png                  the run's log
                 best/                                             the adapter of lowest validation loss
                 checkpoints/step-N/                               for --resume
                 eval/                                             infer.py --eval's report

A directory holding another run is refused unless --resume (same settings) or --overwrite.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from lora.adapter_io import CONFIG_NAME, WEIGHTS_NAME

from .checkpoints import CHECKPOINTS, latest_checkpoint
from .cli import UsageError
from .files import atomic_write_text
from .metrics import METRICS_FILE, PLOT_FILE

RUN_CONFIG = "training_config.json"
BEST = "best"
EVAL = "eval"
# What must match for --resume to continue a run exactly.
RESUME_KEYS = (
    "model",
    "data",
    "r",
    "alpha",
    "dropout",
    "target_modules",
    "use_rslora",
    "lr",
    "epochs",
    "max_steps",
    "batch_size",
    "grad_accum",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "precision",
    "seed",
    "max_source_len",
    "max_target_len",
    "world_size",
)


def prepare_output_dir(args: argparse.Namespace, config: dict) -> Path | None:
    """Refuse to overwrite another run; return the checkpoint to resume from, if any."""
    out = args.output_dir
    previous = out / RUN_CONFIG
    if args.resume:
        if not previous.is_file():
            raise UsageError(
                f"--resume: {out} holds no run to resume ({RUN_CONFIG} is missing); drop --resume to start one."
            )
        saved = json.loads(previous.read_text())
        differing = [k for k in RESUME_KEYS if saved.get(k) != config.get(k)]
        if differing:
            k = differing[0]
            raise UsageError(
                f"--resume: the run in {out} used {k}={saved.get(k)!r}, this command asks {k}={config.get(k)!r}; "
                "resume with the same settings, or pass --overwrite to start afresh."
            )
        return latest_checkpoint(out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise UsageError(
                f"{out} already holds files (a previous run?); pass --resume to continue it, --overwrite "
                "to replace it, or choose another --output-dir."
            )
        for stale in (CHECKPOINTS, BEST, EVAL):  # nothing of the old run may pass for the new one's
            shutil.rmtree(out / stale, ignore_errors=True)
        for name in (METRICS_FILE, RUN_CONFIG, PLOT_FILE, CONFIG_NAME, WEIGHTS_NAME):
            (out / name).unlink(missing_ok=True)
    return None


def start_run(output_dir: Path, config: dict, tokenizer) -> None:
    """Record the run's settings and tokenizer before the first step (resume checks the settings)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / RUN_CONFIG, json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(output_dir)


def training_config_for(adapter_dir: Path) -> dict | None:
    """The training_config.json of the run that wrote `adapter_dir` (the run itself, its best/, or one of
    its checkpoints), or None when the adapter did not come from train.py."""
    adapter_dir = Path(adapter_dir)
    candidates = [adapter_dir]
    if adapter_dir.name == BEST:
        candidates.append(adapter_dir.parent)
    if adapter_dir.parent.name == CHECKPOINTS:
        candidates.append(adapter_dir.parent.parent)
    for directory in candidates:
        path = directory / RUN_CONFIG
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
            return config if isinstance(config, dict) else None
    return None
