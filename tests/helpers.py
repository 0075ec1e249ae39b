"""What the tests share: a toy T5 (support/architectures.py) and adapters given random values, a guard for
commands that must end, one thread."""

import contextlib

import torch

from lora import inject_lora, lora_layers, save_adapter
from support.architectures import toy_t5  # noqa: F401  (re-exported for the tests)


def randomize_adapter(model, seed=3, scale=0.1):
    """Give every B random values, as if trained: with B = 0 an adapter changes nothing and A gets no gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * scale)


def saved_random_adapter(directory, target_modules=("q", "v"), r: int = 4, alpha: float = 8):
    """toy_t5 with a LoRA adapter whose B is random (as if trained), saved to `directory`; returns the model."""
    model = toy_t5()
    inject_lora(model, target_modules, r=r, alpha=alpha)
    randomize_adapter(model)
    save_adapter(model, directory)
    return model


def descendants(pid: int) -> list[int]:
    """Every living process below `pid`, from /proc: torchrun starts its workers in sessions of their own,
    so they are not in its process group, and killing that group alone leaves them running."""
    from pathlib import Path

    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid`'s process group and every process below it, all at once, as a crash of the machine
    would end them (the caller reaps `pid`)."""
    import contextlib
    import os
    import signal

    below = descendants(pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for child in below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def run_to_the_end(command, *, work_done: str, env=None, timeout: float = 300, linger_s: float = 20):
    """Run `command` in its own process group and return (exit status, stdout, stderr). Fails when it runs
    past `timeout`, or lingers more than `linger_s` after printing `work_done` on either stream (its work is
    over: what is left is the teardown); either way it and every process below it are killed, torchrun's
    workers with it."""
    import os
    import signal
    import subprocess
    import tempfile
    import time

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env, start_new_session=True)
        start, done_at, verdict = time.monotonic(), None, None
        while process.poll() is None:
            now = time.monotonic()
            if done_at is None:
                out.seek(0), err.seek(0)
                done_at = now if work_done in out.read() + err.read() else None
            if now - start > timeout:
                verdict = f"still running after {timeout:.0f} s"
            elif done_at is not None and now - done_at > linger_s:
                verdict = f"its work ended, yet it was still running {linger_s:.0f} s later (a hang in teardown?)"
            if verdict:
                kill_tree(process.pid)
                process.wait()
                break
            time.sleep(0.1)
        try:  # whatever it left behind in its group (a worker whose parent ended) goes too
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    assert verdict is None, f"{' '.join(map(str, command))}: {verdict}\n{stderr[-3000:]}"
    return process.returncode, stdout, stderr


def sum_block_input_gradients_as_fsdp(model) -> None:
    """Pass the inputs of each T5 block that need a gradient through an identity autograd node, as FSDP2's
    pre-forward hook does (RegisterPostBackwardFunction). Values do not change; only where gradients are
    summed does: the encoder's output, which every decoder block reads, gets each block's gradient summed
    inside the block first, then the blocks' sums. With it, one process sums in FSDP's order."""
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *tensors):
            return tuple(t.view_as(t) for t in tensors)

        @staticmethod
        def backward(ctx, *grads):
            return grads

    def pass_through_identity(module, args, kwargs):
        flat, spec = tree_flatten((args, kwargs))
        needing = [i for i, value in enumerate(flat) if torch.is_tensor(value) and value.requires_grad]
        if not needing or not torch.is_grad_enabled():
            return None
        for i, value in zip(needing, Identity.apply(*(flat[i] for i in needing))):
            flat[i] = value
        return tree_unflatten(flat, spec)

    for block in [*model.encoder.block, *model.decoder.block]:
        block.register_forward_pre_hook(pass_through_identity, with_kwargs=True)


MISSING_TENSOR = "decoder.block.0.layer.2.DenseReluDense.wo.weight"  # a tensor of the tiny model


def checkpoint_without(directory, key: str, model_directory):
    """A copy of a saved model's directory with the tensor `key` left out of its weights."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    directory = Path(shutil.copytree(model_directory, directory))
    tensors = load_file(directory / "model.safetensors")
    del tensors[key]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@contextlib.contextmanager
def one_thread():
    """This process computing as each rank does: on some CPUs (AMX ones) a product's rounding depends on the
    number of threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
