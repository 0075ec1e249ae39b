"""Checkpoints for exact resume: the adapter as safetensors; the optimizer, scheduler, scaler, RNG states
and the step count as plain tensors and values that torch.load(weights_only=True) reads back. The position
in the data is not stored: the step count decides it (data.StepPlan), so it cannot disagree with it.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora import load_adapter, save_adapter
from lora.save import CONFIG_NAME, WEIGHTS_NAME

from .files import file_sha256

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"
CHECKSUMS_FILE = "checksums.json"  # the SHA-256 of every other file of the checkpoint, written last
CHECKPOINT_NAME = re.compile(r"step-\d{8}")  # save_checkpoint's names: nothing else in checkpoints/ is ours


class CheckpointError(RuntimeError):
    """A checkpoint that --resume cannot continue from."""


@dataclass
class Progress:
    """Where a run is, and what it has seen: everything but tensors that resuming needs."""

    step: int = 0  # optimizer steps done; with data.StepPlan, also where in which epoch the run is
    skipped_steps: int = 0
    consecutive_skips: int = 0
    best_val_loss: float = math.inf
    first_train_loss: float | None = None
    history: list = field(default_factory=list)  # the rows of metrics.jsonl
    interval_loss_sum: float = 0.0  # the log interval's steps so far: so a resumed interval logs the whole one's
    interval_tokens: float = 0.0

    def count_step(self, loss_sum: float, supervised_tokens: float, skipped: bool) -> None:
        """A step's loss joins the log interval's if it updated the adapter (a skipped step's tokens were read
        but taught nothing). A non-finite step counts towards --max-skipped-steps; one with no supervised
        token does not."""
        if not skipped:
            self.consecutive_skips = 0
            self.interval_loss_sum += loss_sum
            self.interval_tokens += supervised_tokens
            return
        self.skipped_steps += 1
        self.consecutive_skips += int(supervised_tokens > 0)

    def interval_train_loss(self) -> float | None:
        """The per-token training loss of the log interval (None when no step of it updated the adapter);
        the next interval starts."""
        loss = self.interval_loss_sum / self.interval_tokens if self.interval_tokens else None
        self.interval_loss_sum, self.interval_tokens = 0.0, 0.0
        return loss


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first: the directories named as save_checkpoint names them. Anything
    else in checkpoints/ (a copy a user made, step-final, step-00000002.bak) is never taken or rotated."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def latest_checkpoint(output_dir: Path) -> Path | None:
    steps = checkpoint_dirs(output_dir)
    return steps[-1] if steps else None


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(
    output_dir: Path,
    model,
    optimizer_state: dict,
    scheduler,
    scaler,
    progress: Progress,
    rng_states: list,
    base_model: str,
    keep: int,
) -> Path:
    """Write checkpoints/step-N atomically (built in a temporary directory, then renamed); keep the last `keep`.
    The adapter and `optimizer_state` are full tensors (support/fsdp.py gathers them under --fsdp), and the
    step count places the run in the data on any number of processes, so any number of them resumes it."""
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{progress.step:08d}"
    staging = root / f".tmp-step-{progress.step:08d}"
    shutil.rmtree(staging, ignore_errors=True)
    state = {
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_states,  # one per rank
        "progress": {**progress.__dict__, "history": json.dumps(progress.history)},
    }
    # Serialised in memory, written by Python: torch.save's own writer turns a full disk or a file-size limit
    # into "RuntimeError: unexpected pos", where Python's write raises the OSError that names it.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        save_adapter(model, staging, base_model)
        (staging / STATE_FILE).write_bytes(buffer.getbuffer())
        checksums = {path.name: file_sha256(path) for path in sorted(staging.iterdir())}
        (staging / CHECKSUMS_FILE).write_text(json.dumps(checksums, indent=2) + "\n")
    except BaseException as err:  # a failed checkpoint leaves no half-written directory holding the space
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and (err.filename is None or str(err.filename).startswith(str(staging))):
            err.filename = str(final)  # the checkpoint the user knows, not the staging directory
        raise
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_checksums(path: Path) -> None:
    """Every file of the checkpoint as it was written: a byte changed on disk since (a bad sector, a copy cut
    short, an edit), a file added, lost or left unlisted, is refused before anything is read. Only a checkpoint
    of an older train.py, which recorded its epoch in the progress and wrote no checksums, goes unchecked."""
    if not (path / CHECKSUMS_FILE).exists():
        if not _predates_checksums(path):
            raise damaged(path, f"{CHECKSUMS_FILE} is missing, so its files cannot be checked")
        return
    with readable(path):
        checksums = json.loads((path / CHECKSUMS_FILE).read_text(encoding="utf-8"))
        if not isinstance(checksums, dict):
            raise ValueError(f"{CHECKSUMS_FILE} holds no object of file names")
        unlisted = sorted({CONFIG_NAME, WEIGHTS_NAME, STATE_FILE} - checksums.keys())  # what a resume reads
        if unlisted:
            raise damaged(path, f"{unlisted[0]} is not listed in {CHECKSUMS_FILE}")
        lost = sorted(name for name in checksums if not (path / name).is_file())
        if lost:
            raise damaged(path, f"{lost[0]}, listed in {CHECKSUMS_FILE}, is gone")
        changed = [name for name, digest in checksums.items() if file_sha256(path / name) != digest]
    if changed:
        raise damaged(path, f"{changed[0]} is not the file it was written as (its SHA-256 differs from the one "
                            f"recorded in {CHECKSUMS_FILE})")  # fmt: skip


def damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is damaged: {what}; delete that directory to resume from the one before it, or pass "
        "--overwrite to start afresh."
    )


def _predates_checksums(path: Path) -> bool:
    """Whether the checkpoint is an older train.py's: its progress records the epoch (see check_position)."""
    with readable(path):
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return "epoch" in state.get("progress", {})


def load_checkpoint_adapter(path: Path, model) -> None:
    """The checkpoint's adapter into the model (before --fsdp shards it), once its files are checked."""
    check_checksums(path)
    with readable(path):
        load_adapter(model, path)


def load_checkpoint(
    path: Path, optimizer, scheduler, scaler, device: torch.device, rank: int, world_size: int, plan, shard_state=None
) -> tuple[Progress, str | None]:
    """Restore the optimizer, schedule, scaler, RNG and progress save_checkpoint wrote; return the progress,
    and a note when the checkpoint came from another number of processes. `plan` (data.StepPlan) places the
    step in the data; `shard_state` turns the full optimizer state into this rank's shards (support/fsdp.py,
    under --fsdp)."""
    with readable(path):
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        progress = {**state["progress"], "history": json.loads(state["progress"]["history"])}
    check_position(path, progress, plan)
    with readable(path):
        optimizer.load_state_dict(shard_state(state["optimizer"]) if shard_state else state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        saved_world_size = len(state["rng"])
        note = None
        if saved_world_size == world_size:
            set_rng_state(state["rng"][rank], device)
        else:  # dropout's masks cannot continue as they were: each rank keeps the seed it started with
            note = (
                f"the checkpoint was written by {saved_world_size} process(es), this run has {world_size}: the "
                "same global batches follow, but dropout draws new masks"
            )
        return Progress(**progress), note


def check_position(path: Path, progress: dict, plan) -> None:
    """A checkpoint of an older train.py also records its epoch and the batches of it done (over all ranks).
    That train.py ended an epoch early once a run resumed in the middle of it, so its later checkpoints sit
    elsewhere in the data than their step count says: those are refused; the others continue exactly, and
    lose the two fields (the step count places them)."""
    recorded = progress.pop("epoch", None), progress.pop("batch_in_epoch", None)
    if recorded == (None, None):
        return
    expected = plan.position(progress["step"])
    if recorded != expected:
        raise CheckpointError(
            f"checkpoint {path} is at epoch {recorded[0]}, batch {recorded[1]}, where its step {progress['step']} "
            f"belongs at epoch {expected[0]}, batch {expected[1]}: an older train.py ended an epoch early after "
            "a resume, so this run trained on other batches than an uninterrupted one; start afresh with "
            "--overwrite, or delete the checkpoints written after the run was first resumed."
        )


@contextmanager
def readable(path: Path):
    """A checkpoint is written atomically, so damage came from outside: say which, in one sentence."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({reason}); delete that directory to resume from the one "
            "before it, or pass --overwrite to start afresh."
        ) from None
