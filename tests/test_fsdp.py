"""train.py --fsdp (FSDP2) on 2 gloo processes: the same training as one process, checkpoints that any number
of processes resumes, a lost rank that ends the others, two "nodes" meeting at one rendezvous."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import run_to_the_end
from safetensors.torch import load_file

import train

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TWO_PROCESSES = [*TORCHRUN, "--standalone", "--nproc_per_node", "2"]
WORK_DONE = "; adapter in "  # rank 0's summary line: what is left after it is the teardown
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # each rank, and the single process, 1 thread
COMMON = ["--model", "tiny", "--val-data", "none", "--log-every", "1", "--batch-size", "10", "--dropout", "0"]
LR = 3e-3  # the tiny model's default

# Records the full gradients the first optimizer step clips (gathered from the shards under --fsdp).
RECORD_GRADIENTS = """
import os, sys
sys.path.insert(0, sys.argv[1])
import torch
import train
from support.fsdp import full

clip, calls = torch.nn.utils.clip_grad_norm_, []
def recording_clip(params, max_norm, *args, **kwargs):
    params = list(params)
    if not calls:
        grads = [full(p.grad).detach().clone() for p in params]
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(grads, os.environ["GRADIENTS_FILE"])
    calls.append(1)
    return clip(params, max_norm, *args, **kwargs)
torch.nn.utils.clip_grad_norm_ = recording_clip
raise SystemExit(train.main(sys.argv[2:]))
"""


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(directory):
    return load_file(Path(directory) / "adapter_model.safetensors")


def logged(output_dir, name):
    return torch.tensor([row[name] for row in metrics(output_dir) if name in row], dtype=torch.float64)


def assert_same_training(run, reference, steps):
    """The adapters of two runs that differ only in rounding. AdamW divides each gradient by its own running
    magnitude, so an entry whose gradient is near zero moves by up to ~lr whatever its last bits were: the
    entries are compared at 1e-5, all but a few in ten thousand, and the rest at the bound of AdamW's step."""
    ours, theirs = adapter_tensors(run), adapter_tensors(reference)
    assert ours.keys() == theirs.keys()
    difference = torch.cat([(ours[k] - theirs[k]).abs().flatten() for k in ours])
    assert (difference > 1e-5).float().mean() < 1e-3, f"{int((difference > 1e-5).sum())} entries differ by > 1e-5"
    assert difference.max() < LR * steps
    for name in ("train_loss", "grad_norm"):  # AdamW and clipping hide a gradient's scale; its norm does not
        torch.testing.assert_close(logged(run, name), logged(reference, name), rtol=1e-6, atol=0)


def test_fsdp_on_two_processes_trains_as_one_process_accumulating_two_batches(tmp_path):
    script = tmp_path / "record_gradients.py"
    script.write_text(RECORD_GRADIENTS)
    argv = [*COMMON, "--max-steps", "3"]
    runs = {
        "fsdp": [*TWO_PROCESSES, str(script), str(ROOT), *argv, "--fsdp"],
        "ddp": [*TWO_PROCESSES, str(script), str(ROOT), *argv],
        "one": [sys.executable, str(script), str(ROOT), *argv, "--grad-accum", "2"],
    }
    for name, command in runs.items():
        env = {**ENV, "GRADIENTS_FILE": str(tmp_path / f"{name}.pt")}
        code, stdout, stderr = run_to_the_end([*command, "--output-dir", str(tmp_path / name)], work_done=WORK_DONE, env=env)
        assert code == 0, stderr[-3000:]
    gradients = {name: torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in runs}
    assert len(gradients["fsdp"]) == 72 and all(g.shape == r.shape for g, r in zip(gradients["fsdp"], gradients["one"]))
    largest = max(g.abs().max() for g in gradients["one"])
    for name in ("fsdp", "ddp"):  # the first step's gradients, full: what the sharding must not change
        for ours, reference in zip(gradients[name], gradients["one"]):
            torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6 * largest)
    assert_same_training(tmp_path / "fsdp", tmp_path / "one", steps=3)
    assert_same_training(tmp_path / "fsdp", tmp_path / "ddp", steps=3)
