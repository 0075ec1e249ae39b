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
from helpers import (
    MISSING_TENSOR,
    checkpoint_without,
    descendants,
    kill_tree,
    one_thread,
    run_to_the_end,
    sum_block_input_gradients_as_fsdp,
)
from safetensors.torch import load_file

import train
from data import TRAIN_FILE
from support import distributed
from support.train_args import parse_args

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TWO_PROCESSES = [*TORCHRUN, "--standalone", "--nproc_per_node", "2"]
WORK_DONE = "; adapter in "  # rank 0's summary line: what is left after it is the teardown
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # each rank, and the single process, 1 thread
COMMON = ["--model", "tiny", "--val-data", "none", "--log-every", "1", "--batch-size", "10", "--dropout", "0"]
LR = 3e-3  # the tiny model's default

# Records the full gradients the first optimizer step clips (gathered from the shards under --fsdp); with
# SUM_AS_FSDP set, the single process sums gradients in FSDP's order (helpers.sum_block_input_gradients_as_fsdp).
RECORD_GRADIENTS = """
import os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import pytest
import torch
import train
from data import TRAIN_FILE
from helpers import sum_block_input_gradients_as_fsdp
from support import distributed
from support.fsdp import full

clip, calls = distributed.clip_grad_norm, []
def recording_clip(params, max_norm):
    if calls:
        return clip(params, max_norm)
    calls.append(1)
    gather = lambda: [full(p.grad).detach().clone() for p in params]  # under FSDP a collective: every rank calls
    grads = gather()
    norm = clip(params, max_norm)
    clipped = gather()
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"grads": grads, "norm": norm, "clipped": clipped}, os.environ["GRADIENTS_FILE"])
    return norm
distributed.clip_grad_norm = recording_clip
if os.environ.get("SUM_AS_FSDP"):
    train_with = train.train
    train.train = lambda args: train_with(args, prepare_model=sum_block_input_gradients_as_fsdp)
raise SystemExit(train.main(sys.argv[2:]))
"""


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(directory):
    return load_file(Path(directory) / "adapter_model.safetensors")


def logged(output_dir, name):
    return torch.tensor([row[name] for row in metrics(output_dir) if name in row], dtype=torch.float64)


def assert_same_training(run, reference):
    """Two runs that sum the same gradients in the same order: the adapters within 1e-5 (here: equal)."""
    ours, theirs = adapter_tensors(run), adapter_tensors(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-5)
    for name in ("train_loss", "grad_norm", "val_loss"):  # AdamW and clipping hide a gradient's scale; its norm not
        torch.testing.assert_close(logged(run, name), logged(reference, name), rtol=1e-6, atol=0)


def assert_same_training_but_rounding(run, reference, steps):
    """Two runs whose gradients differ in their last bits. AdamW divides each gradient by its own running
    magnitude, so an entry whose gradient is near zero moves by up to ~lr whatever its last bits were: the
    entries are compared at 1e-5, all but a few in ten thousand, and the rest at the bound of AdamW's step."""
    ours, theirs = adapter_tensors(run), adapter_tensors(reference)
    difference = torch.cat([(ours[k] - theirs[k]).abs().flatten() for k in ours])
    assert (difference > 1e-5).float().mean() < 1e-3, f"{int((difference > 1e-5).sum())} entries differ by > 1e-5"
    assert difference.max() < LR * steps
    torch.testing.assert_close(logged(run, "train_loss"), logged(reference, "train_loss"), rtol=1e-6, atol=0)


def run_recording(runs: dict, root: Path) -> None:
    """Each {name: (command, extra environment)} to the end, its output in root/name and its first step's
    gradients in root/name.pt."""
    for name, (command, extra_env) in runs.items():
        env = {**ENV, **extra_env, "GRADIENTS_FILE": str(root / f"{name}.pt")}
        code, _, stderr = run_to_the_end([*command, "--output-dir", str(root / name)], work_done=WORK_DONE, env=env)
        assert code == 0, stderr[-3000:]


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """3 steps of the tiny model as 2 FSDP ranks, and as 1 process with --grad-accum 2 that sums gradients in
    FSDP's order and in its own; each records the full gradients of its first step. All with gradient
    checkpointing, which under FSDP recomputes each block from weights gathered again in the backward."""
    root = tmp_path_factory.mktemp("three_steps")
    script = root / "record_gradients.py"
    script.write_text(RECORD_GRADIENTS)
    # Validation too: the bundled split's 15 batches fall 8 and 7 to the ranks, and under FSDP every forward
    # is a collective (a rank with fewer batches runs empty ones).
    argv = [*COMMON, "--max-steps", "3", "--gradient-checkpointing", "--val-data", "auto", "--eval-every", "3"]
    one_process = [sys.executable, str(script), str(ROOT), *argv, "--grad-accum", "2"]
    runs = {
        "fsdp": ([*TWO_PROCESSES, str(script), str(ROOT), *argv, "--fsdp"], {}),
        "one_in_fsdp_order": (one_process, {"SUM_AS_FSDP": "1"}),
        "one": (one_process, {}),
    }
    run_recording(runs, root)
    return root


def test_fsdp_on_two_processes_trains_as_one_process_accumulating_two_batches(three_steps):
    """FSDP2 passes each block's inputs through an autograd node of its own, so the gradient of the encoder's
    output, which every decoder block reads, is summed block by block: summed in that order, one process
    trains FSDP's adapter; in its own order, the same up to rounding. (DDP against the single process:
    tests/test_train.py, equal to the last bit.)"""
    fsdp, in_fsdp_order, one = (torch.load(three_steps / f"{name}.pt", weights_only=True)["grads"]
                                for name in ("fsdp", "one_in_fsdp_order", "one"))  # fmt: skip
    assert len(fsdp) == 72 and all(ours.shape == reference.shape for ours, reference in zip(fsdp, one))
    largest = max(g.abs().max() for g in one)
    for reference in (in_fsdp_order, one):  # the first step's full gradients: what the sharding must not change
        for ours, theirs in zip(fsdp, reference):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6 * largest)
    assert_same_training(three_steps / "fsdp", three_steps / "one_in_fsdp_order")
    assert_same_training_but_rounding(three_steps / "fsdp", three_steps / "one", steps=3)
    assert len(logged(three_steps / "fsdp", "val_loss")) == 1 and (three_steps / "fsdp" / "best").is_dir()


def test_fsdp_clips_its_gradient_shards_as_one_process_clips_the_whole_gradients(three_steps):
    """The first step's clipping on 2 FSDP ranks, each holding half of each gradient, against the same
    gradients whole in one process: the same scale, to the last bit (the norm is 2.54, clipped to 1)."""
    recorded = torch.load(three_steps / "fsdp.pt", weights_only=True)
    params = [torch.nn.Parameter(torch.zeros_like(grad)) for grad in recorded["grads"]]
    for param, grad in zip(params, recorded["grads"]):
        param.grad = grad.clone()
    norm = distributed.clip_grad_norm(params, max_norm=1.0)
    assert norm > 1.0 and norm == pytest.approx(recorded["norm"], rel=1e-12)
    for param, clipped in zip(params, recorded["clipped"]):
        assert torch.equal(param.grad, clipped)


def test_dora_under_fsdp_trains_as_one_process(tmp_path):
    """DoRA's magnitude is initialised from W0 (torchtune's distributed DoRA once left it on the meta
    device, #2129): under --fsdp its base is loaded whole on every rank, then sharded, and 2 ranks train
    what one process summing in FSDP's order trains."""
    script = tmp_path / "record_gradients.py"
    script.write_text(RECORD_GRADIENTS)
    argv = [str(script), str(ROOT), *COMMON, "--max-steps", "2", "--use-dora"]
    runs = {
        "fsdp": ([*TWO_PROCESSES, *argv, "--fsdp"], {}),
        "one": ([sys.executable, *argv, "--grad-accum", "2"], {"SUM_AS_FSDP": "1"}),
    }
    run_recording(runs, tmp_path)
    assert any("lora_magnitude" in key for key in adapter_tensors(tmp_path / "fsdp"))
    assert_same_training(tmp_path / "fsdp", tmp_path / "one")


def killable_argv(rows: Path) -> list[str]:
    """6 steps over 65 rows in batches of 10: 7 batches an epoch, 4 steps of 2 ranks; a checkpoint every 2
    steps, so one killed at step 2 resumes with two steps of its epoch left, and crosses its end."""
    rows.write_text("".join(Path(TRAIN_FILE).read_text().splitlines(keepends=True)[:65]))
    return [*COMMON, "--data", str(rows), "--max-steps", "6", "--save-every", "2"]


def test_a_killed_fsdp_job_resumes_exactly_on_two_processes_and_on_one_accumulating_two_batches(tmp_path, capsys):
    straight, killed, elsewhere = tmp_path / "straight", tmp_path / "killed", tmp_path / "on_one_process"
    argv = killable_argv(tmp_path / "rows.jsonl")

    def fsdp_command(output_dir, *extra):
        return [*TWO_PROCESSES, str(ROOT / "train.py"), *argv, "--fsdp", "--output-dir", str(output_dir), *extra]

    code, _, stderr = run_to_the_end(fsdp_command(straight), work_done=WORK_DONE, env=ENV)
    assert code == 0, stderr[-3000:]
    assert [row["epoch"] for row in metrics(straight)] == [0.286, 0.571, 0.857, 1.0, 1.286, 1.571]

    process = subprocess.Popen(fsdp_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                               start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while not list((killed / "checkpoints").glob("step-*")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    kill_tree(process.pid)  # torchrun and both ranks at once
    process.wait()
    time.sleep(0.5)  # were any rank left alive, it would write on (checked below)
    checkpoints = sorted((killed / "checkpoints").glob("step-*"))
    assert checkpoints and not (killed / "adapter_model.safetensors").exists(), "the run was not interrupted"
    assert int(checkpoints[-1].name.split("-")[1]) < 6, "killed after its last step: nothing left to resume"
    assert sorted((killed / "checkpoints").glob("step-*")) == checkpoints, "a rank outlived the kill"
    shutil.copytree(killed, elsewhere)

    code, stdout, stderr = run_to_the_end(fsdp_command(killed, "--resume"), work_done=WORK_DONE, env=ENV)
    assert code == 0 and "resumed from" in stdout, stderr[-3000:]
    expected, resumed = adapter_tensors(straight), adapter_tensors(killed)
    for key in expected:  # the same sharded computation, continued: equal
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(logged(killed, "train_loss"), logged(straight, "train_loss"), rtol=1e-6, atol=0)

    # The checkpoint of 2 FSDP ranks, on 1 process without FSDP: the same global batches, 2 micro-batches a step.
    # Without --grad-accum 2 the global batch would halve: refused.
    alone = [*argv, "--output-dir", str(elsewhere), "--resume"]
    assert train.main(alone) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "processes x --grad-accum = 1 differs from the run in" in err
    argv = [*argv, "--grad-accum", "2", "--output-dir", str(elsewhere)]
    with one_thread():  # as each rank
        train.train(parse_args([*argv, "--resume"]), prepare_model=sum_block_input_gradients_as_fsdp)
    out = capsys.readouterr().out
    assert "the checkpoint was written by 2 process(es), this run has 1" in out
    assert_same_training(elsewhere, straight)


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    for pid in descendants(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"".join(environ):
            return pid
    return None


def test_a_killed_rank_ends_the_other_with_a_sentence_naming_it_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    command = [*TWO_PROCESSES, str(ROOT / "train.py"), *COMMON, "--max-steps", "12", "--save-every", "4", "--fsdp",
               "--dist-timeout", "10", "--output-dir", str(out)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                               start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not list((out / "checkpoints").glob("step-*")) and time.time() < deadline and process.poll() is None:
            time.sleep(0.02)
        victim = rank_pid(process.pid, 1)
        assert victim is not None and process.poll() is None, "the run ended before rank 1 could be killed"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        _, stderr = process.communicate(timeout=10 + 30)  # --dist-timeout + 30 s
    finally:
        kill_tree(process.pid)
    assert process.returncode != 0 and time.time() - killed_at < 40
    sentences = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(sentences) == 1, stderr[-3000:]
    assert sentences[0].startswith("error: rank 0: rank 1 stopped answering (")
    assert "the last checkpoint is " + str(out / "checkpoints" / "step-") in sentences[0]
    ours = stderr.split("failed (exitcode")[0]  # what follows is torchrun's own report, naming rank 1 too
    assert "continue with --resume" in sentences[0] and "Traceback" not in ours
    assert not list((out / "checkpoints").glob(".tmp-*"))  # nothing half-written

    code, stdout, stderr = run_to_the_end([*command, "--resume"], work_done=WORK_DONE, env=ENV)
    assert code == 0 and "resumed from" in stdout, stderr[-3000:]
    assert len(metrics(out)) == 12


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_refusals_are_one_sentence(tmp_path, capsys, monkeypatch):
    run = [*COMMON, "--fsdp", "--output-dir", str(tmp_path / "run")]
    assert train.main(run) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--fsdp shards the model across processes, and this is one" in err, err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: refused before the process group is joined
    for extra, message in [
        (["--base-dtype", "nf4"], "an NF4 base keeps its 4-bit weights as buffers"),
        (["--compile"], "--fsdp and --compile cannot be combined yet"),
    ]:
        assert train.main([*run, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "run").exists()


def test_under_fsdp_a_checkpoint_missing_a_tensor_is_refused(tmp_path, tiny_model_path):
    broken = checkpoint_without(tmp_path / "broken", MISSING_TENSOR, tiny_model_path)
    command = [*TWO_PROCESSES, str(ROOT / "train.py"), *COMMON, "--model", str(broken), "--max-steps", "1", "--fsdp",
               "--output-dir", str(tmp_path / "run")]  # fmt: skip
    code, _, stderr = run_to_the_end(command, work_done="never", env=ENV, timeout=120)
    sentences = {line for line in stderr.splitlines() if line.startswith("error: ")}  # each rank says it
    assert code != 0 and len(sentences) == 1, stderr[-3000:]
    assert f"(the checkpoint has no tensor for {MISSING_TENSOR});" in sentences.pop()


HELD_PER_RANK = """
import sys
sys.path.insert(0, sys.argv[1])
import pytest
import torch
import torch.distributed as dist
from lora import inject_lora
from support.fsdp import held_bytes, shard_model
from support.architectures import flan_t5_architecture

dist.init_process_group("gloo")
model = flan_t5_architecture("base", device="meta")  # shapes only: nothing is allocated
inject_lora(model, ("q", "v"), r=16, alpha=32)
frozen = lambda: sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
whole = frozen()
shard_model(model, torch.device("cpu"), dist.get_world_size())
local = sum(p.to_local().numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
print(f"rank {dist.get_rank()} holds {local} of {whole} frozen bytes; all parameters: {held_bytes(model)}")
dist.destroy_process_group()
"""


def test_on_flan_t5_base_each_of_two_fsdp_ranks_holds_half_the_frozen_weights(tmp_path):
    script = tmp_path / "held.py"
    script.write_text(HELD_PER_RANK)
    code, stdout, stderr = run_to_the_end([*TWO_PROCESSES, str(script), str(ROOT)], work_done="never", env=ENV,
                                          timeout=120)  # fmt: skip
    assert code == 0, stderr[-3000:]
    held = sorted(line.split() for line in stdout.splitlines() if " holds " in line)
    assert [row[1] for row in held] == ["0", "1"]
    for row in held:
        local, whole = int(row[3]), int(row[5])
        assert whole == 247_577_856 * 4  # flan-t5-base's 247.6M parameters in fp32: what DDP holds on each rank
        assert abs(local - whole / 2) <= 0.001 * whole, (local, whole)  # half, up to each tensor's padding


def test_the_slurm_script_runs_two_nodes_that_train_what_one_node_of_two_processes_trains(tmp_path, three_steps):
    """scripts/train.sbatch under stand-ins for Slurm's commands: scontrol names this machine as the head
    node, srun starts the script's torchrun once per "node" (here twice, side by side, one process each), and
    the two torchruns meet at one c10d rendezvous on localhost, as two machines would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text(
        '#!/bin/bash\nfor i in $(seq "$SLURM_JOB_NUM_NODES"); do "$@" & done\nstatus=0\n'
        "for job in $(jobs -p); do wait $job || status=1; done\nexit $status\n"
    )
    (bin_dir / "torchrun").write_text(f'#!/bin/bash\nexec {sys.executable} -m torch.distributed.run "$@"\n')
    for stand_in in bin_dir.iterdir():
        stand_in.chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "1", "SLURM_SUBMIT_DIR": str(ROOT),
           "RDZV_PORT": str(free_port())}  # fmt: skip
    out = tmp_path / "run"
    command = ["bash", str(ROOT / "scripts" / "train.sbatch"), *COMMON, "--max-steps", "3", "--fsdp",
               "--gradient-checkpointing", "--output-dir", str(out)]  # fmt: skip
    code, stdout, stderr = run_to_the_end(command, work_done=WORK_DONE, env=env, timeout=240)
    assert code == 0, stderr[-3000:]
    assert stdout.count("trainable parameters") == 1 and "3 steps on 2 x cpu" in stdout  # global rank 0 alone logs
    assert json.loads((out / "training_config.json").read_text())["world_size"] == 2
    two_nodes, one_node = adapter_tensors(out), adapter_tensors(three_steps / "fsdp")
    for key in one_node:
        torch.testing.assert_close(two_nodes[key], one_node[key], rtol=0, atol=1e-6)


def test_a_node_that_never_joins_ends_the_slurm_job_after_the_join_timeout_with_one_sentence(tmp_path):
    """A job of 2 nodes where only one torchrun starts: it waits RDZV_JOIN_TIMEOUT seconds (the script passes
    it as torchrun's join_timeout; unset, torchrun's default 600 s), torchrun ends with its
    RendezvousTimeoutError, and the script's last line says what that means and what to do."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text('#!/bin/bash\n"$@"\n')  # one node of the two starts
    (bin_dir / "torchrun").write_text(f'#!/bin/bash\nexec {sys.executable} -m torch.distributed.run "$@"\n')
    for stand_in in bin_dir.iterdir():
        stand_in.chmod(0o755)
    port = free_port()
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "8",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "1", "SLURM_SUBMIT_DIR": str(ROOT),
           "RDZV_PORT": str(port), "RDZV_JOIN_TIMEOUT": "3"}  # fmt: skip
    command = ["bash", str(ROOT / "scripts" / "train.sbatch"), *COMMON, "--output-dir", str(tmp_path / "run")]
    code, _, stderr = run_to_the_end(command, work_done="never", env=env, timeout=120)
    assert code == 1 and "RendezvousTimeoutError" in stderr
    assert stderr.rstrip().splitlines()[-1] == (
        f"error: the job's torchrun ended with status 1; if it says RendezvousTimeoutError above, not all 2 nodes "
        f"reached 127.0.0.1:{port} within 3 s (RDZV_JOIN_TIMEOUT): open that port between the nodes and resubmit "
        "(with --resume if a checkpoint was written)."
    )
    assert not (tmp_path / "run").exists()  # train.py never started
