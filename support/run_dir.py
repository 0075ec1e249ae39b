"""The output directory of a training run: what it holds, and when a run may use it.

    <output-dir>/adapter_config.json, adapter_model.safetensors   the final adapter (PEFT's layout)
                 tokenizer files, training_config.json             what infer.py needs to rebuild the model
                 metrics.jsonl, training_loss.png                  the run's log
                 best/                                             the adapter of lowest validation loss
                 checkpoints/step-N/                               for --resume
                 eval/                                             infer.py --eval's report
                 .train.lock                                       held by the run writing here

The policy: a run holds its directory (a second run at the same time is refused); a directory holding
another run is refused unless --resume (same settings, same data) or --overwrite; --overwrite replaces
only what a run of ours wrote, refuses a directory holding anything else, and deletes nothing until
the new run has checked its arguments, read its data and built its model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import ExitStack
from pathlib import Path

from lora.files import loads_json
from lora.save import CONFIG_NAME, WEIGHTS_NAME

from .checkpoints import CHECKPOINT_NAME, CHECKPOINTS, CHECKSUMS_FILE, STATE_FILE, latest_checkpoint
from .cli import UsageError
from .files import atomic_write_text, file_lock
from .metrics import METRICS_FILE, PLOT_FILE

RUN_CONFIG = "training_config.json"
BEST = "best"
EVAL = "eval"
LOCK_FILE = ".train.lock"
ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"}
RUN_FILES = ADAPTER_FILES | TOKENIZER_FILES | {METRICS_FILE, PLOT_FILE, RUN_CONFIG, LOCK_FILE}
EVAL_REPORT = re.compile(r"eval_report(\.[A-Za-z_][\w+]*)?\.(json|md)")  # infer.py's report_paths
# What must match for --resume to continue a run exactly.
RESUME_KEYS = (
    "model",
    "data",
    "data_sha256",
    "val_data",
    "r",
    "alpha",
    "dropout",
    "target_modules",
    "use_rslora",
    "use_dora",
    "init",
    "lr",
    "loraplus_lr_ratio",
    "epochs",
    "max_steps",
    "batch_size",
    "batches_per_step",  # world_size x grad_accum: a run resumes on another number of processes
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "precision",
    "base_dtype",
    "seed",
    "max_source_len",
    "max_target_len",
)


class OutputDirLock:
    """The lock a run holds on its output directory (rank 0 only), released on exit however it exits."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self._held = ExitStack()  # holds the file lock while the run lasts
        self._created = False

    def acquire(self) -> None:
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise UsageError(f"--output-dir {out} is a file, not a directory: choose another --output-dir.")
        link = next(iter(symbolic_links(out)), None)
        if link is not None:  # checked before the lock file, the first thing written, is written
            raise UsageError(
                f"{link} is a symbolic link (to {os.readlink(link)}); a run never writes or deletes through one, "
                "so remove the link or choose another --output-dir."
            )
        try:
            self._created = not out.exists()
            out.mkdir(parents=True, exist_ok=True)
            taken = self._held.enter_context(file_lock(out / LOCK_FILE, blocking=False))
        except OSError as err:
            raise UsageError(
                f"cannot write to --output-dir {out} ({err.strerror or err}): choose a directory you can write to."
            ) from None
        if not taken:
            self._held.close()
            holder = (out / LOCK_FILE).read_text().strip() or "unknown"
            raise UsageError(
                f"another train.py (pid {holder}) is writing to {out}; wait for it to finish, or choose another "
                "--output-dir."
            )
        (out / LOCK_FILE).write_text(f"{os.getpid()}\n")

    def release(self) -> None:
        self._held.close()  # nothing to do when the lock was never taken
        if self._created and self.output_dir.is_dir() and [p.name for p in self.output_dir.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(self.output_dir, ignore_errors=True)  # refused before any work: leave no trace


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, config: dict) -> Path | None:
    """Check the directory `out` against the policy (--resume, --overwrite), touching nothing; return the
    checkpoint to resume from. (Symbolic links were refused by OutputDirLock.acquire, which runs first.)"""
    if resume:
        return resume_checkpoint(out, config)
    entries = [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []
    if entries and not overwrite:
        raise UsageError(
            f"{out} already holds files (a previous run?); pass --resume to continue it, --overwrite "
            "to replace it, or choose another --output-dir."
        )
    if entries:
        if not (out / RUN_CONFIG).is_file():
            raise UsageError(
                f"--overwrite: {out} holds no training run ({RUN_CONFIG} is missing), so nothing in it is ours "
                "to replace; choose another --output-dir."
            )
        foreign = foreign_entries(out)
        if foreign:
            raise UsageError(
                f"--overwrite: {out} holds {len(foreign)} file(s) a training run did not write, e.g. "
                f"{foreign[0]}; move them away or choose another --output-dir."
            )
    return None


def resume_checkpoint(out: Path, config: dict) -> Path:
    previous = out / RUN_CONFIG
    if not previous.is_file():
        raise UsageError(
            f"--resume: {out} holds no run to resume ({RUN_CONFIG} is missing); drop --resume to start one."
        )
    try:
        saved = loads_json(previous.read_text(encoding="utf-8"))
        assert isinstance(saved, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
        raise UsageError(
            f"--resume: {previous} is damaged (not a JSON object); pass --overwrite to start afresh."
        ) from None
    differing = [k for k in RESUME_KEYS if saved.get(k) != config.get(k)]
    if differing:
        k = differing[0]
        what = "the data file's contents changed since" if k == "data_sha256" else f"{k}={config.get(k)!r} differs from"
        if k == "batches_per_step":  # the number of processes may change, the global batch may not
            what = f"processes x --grad-accum = {config.get(k)} differs from"
        raise UsageError(
            f"--resume: {what} the run in {out} ({k}={saved.get(k)!r}); resume with the same settings and data "
            "(on another number of processes, keep processes x --grad-accum), or pass --overwrite to start afresh."
        )
    if (out / CHECKPOINTS).exists() and not (out / CHECKPOINTS).is_dir():
        raise UsageError(f"--resume: {out / CHECKPOINTS} is a file, not the checkpoints directory; move it away.")
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        raise UsageError(
            f"--resume: {out} holds no checkpoint (the run stopped before its first); pass --overwrite to start afresh."
        )
    return checkpoint


def symbolic_links(out: Path) -> list[Path]:
    """The symbolic links among what a run writes or deletes in `out`: its entries, those of best/, eval/,
    checkpoints/ and of each checkpoint (the directory itself may be a link: the user chose it)."""
    if not out.is_dir():
        return []
    links, directories = [], [out]
    while directories:
        directory = directories.pop()
        for entry in sorted(directory.iterdir()):
            if entry.is_symlink():
                links.append(entry)
            elif entry.is_dir() and (directory != out or entry.name in (BEST, EVAL, CHECKPOINTS)):
                directories.append(entry)
    return links


def foreign_entries(out: Path) -> list[str]:
    """What in `out` (a previous run's directory) a run of ours did not write."""

    def ours(path: Path, allowed: set[str]) -> bool:
        return path.is_file() and (path.name in allowed or _atomic_leftover(path))

    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name == BEST and entry.is_dir():
            foreign += [str(p) for p in sorted(entry.iterdir()) if not ours(p, ADAPTER_FILES)]
        elif entry.name == EVAL and entry.is_dir():
            foreign += [str(p) for p in sorted(entry.iterdir()) if not (p.is_file() and EVAL_REPORT.fullmatch(p.name))]
        elif entry.name == CHECKPOINTS and entry.is_dir():
            for step in sorted(entry.iterdir()):
                if not (step.is_dir() and CHECKPOINT_NAME.fullmatch(step.name.removeprefix(".tmp-"))):
                    foreign.append(str(step))
                    continue
                checkpoint_files = ADAPTER_FILES | {STATE_FILE, CHECKSUMS_FILE}
                foreign += [str(p) for p in sorted(step.iterdir()) if not ours(p, checkpoint_files)]
        elif not ours(entry, RUN_FILES):
            foreign.append(str(entry))
    return foreign


def _atomic_leftover(path: Path) -> bool:
    """A temporary file of an atomic write cut short (support.files.atomic_write and lora.files.atomic_write_all
    name them .NAME.*.tmp)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def start_run(output_dir: Path, config: dict, tokenizer, replace: bool) -> None:
    """Replace the previous run's files if asked (checked by prepare_output_dir), then record the run's
    settings and tokenizer before the first step."""
    if replace:  # links and anything not ours were refused before: what is here is the old run's
        for name in (CHECKPOINTS, BEST, EVAL):  # nothing of the old run may pass for the new one's
            if (output_dir / name).is_dir():
                shutil.rmtree(output_dir / name)
        for entry in output_dir.iterdir():
            if entry.is_file() and entry.name != LOCK_FILE:
                entry.unlink()
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
                config = loads_json(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
            return config if isinstance(config, dict) else None
    return None
