"""FSDP2 for train.py --fsdp: the frozen base sharded across ranks, and the full tensors a checkpoint needs.

`fully_shard` (torch.distributed.fsdp) turns each T5 block's parameters, then the rest of the model's, into
DTensors holding 1/world_size of each tensor; a block's full weights exist only while it computes. LoRA is
injected before sharding, so a block's frozen W0 and its trainable A and B shard together, and the
optimizer is built after, over the sharded A and B. The base is sharded while still on the meta device,
and `materialize` then fills each rank's shards from the checkpoint, so no rank holds the whole base (with plain
LoRA: DoRA and PiSSA initialise from W0, which train.py then loads whole before sharding). The
adapter and its AdamW state are small: checkpoints hold them as full tensors, gathered from every rank, so
that a run resumes on any number of processes.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .checkpoint_streaming import missing_tensors_error

VIEW_WARNING = "FSDP2-wrapped module .* returned a view tensor"


@contextmanager
def view_warnings_silenced():
    """Inside the block, FSDP2's warning that a block returning a view could lose its pre-backward hook to an
    in-place op on it is not shown. T5's stack never writes into a block's output in place (the FSDP
    gradients equal one process's, with and without checkpointing: tests/test_fsdp.py), and the warning
    would be printed every step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=VIEW_WARNING)
        yield


def shard_model(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """fully_shard every encoder and decoder block, then the root (embeddings, final norms, lm_head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for block in [*model.encoder.block, *model.decoder.block]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@torch.no_grad()
def materialize(model: nn.Module, named_tensors, device: torch.device) -> None:
    """Allocate this rank's shards of a model shard_model sharded on the meta device, and fill them: each
    frozen parameter from the (name, full tensor) pairs, cut to this rank's part as it comes (so a rank never
    holds more of the base than its shards and one tensor), the trainable ones (real before sharding: A and
    B) with the values they had. A name the model lacks (a tied weight's other name) is passed over; a
    frozen parameter the pairs never give is refused."""
    kept = {name: local(param).clone() for name, param in model.named_parameters() if not param.is_meta}
    model.to_empty(device=device)
    params = dict(model.named_parameters())  # a tied weight once, under its first name
    for name, values in kept.items():
        local(params[name]).copy_(values)
    filled = set(kept)
    for name, tensor in named_tensors:
        param = params.get(name)
        if param is None or name in filled:
            continue
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"{name} is {tuple(tensor.shape)} in the checkpoint, {tuple(param.shape)} in the model")
        whole = tensor.to(param.dtype)  # src_data_rank=None: each rank cuts its own part, nothing is sent
        part = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local()
        local(param).copy_(part)
        filled.add(name)
    missing = [name for name in params if name not in filled]
    if missing:
        raise missing_tensors_error(missing)


def local(tensor):
    """What this rank holds of a tensor: its shard of a DTensor; anything else as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def held_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds: its local shards under FSDP, the whole tensors otherwise."""
    return sum(local(p).numel() * p.element_size() for p in model.parameters())


def full(tensor):
    """A DTensor gathered to the full tensor (a collective: every rank calls it); anything else as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextmanager
def full_adapter(model: nn.Module):
    """Within it, the model's trainable parameters are full tensors on every rank, so that the adapter can be
    saved as a single process saves it; outside it, the sharded parameters FSDP manages. Every rank enters."""
    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.requires_grad and isinstance(param, DTensor):
                module._parameters[name] = nn.Parameter(param.full_tensor().detach(), requires_grad=True)
                swapped.append((module, name, param))
    try:
        yield model
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every DTensor gathered to its full tensor. Every rank calls it."""
    state = optimizer.state_dict()
    state["state"] = {index: {k: full(v) for k, v in values.items()} for index, values in state["state"].items()}
    return state


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A checkpoint's full optimizer state, each tensor sharded as the parameter it belongs to (a state
    saved with or without FSDP loads either way)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for index, values in state["state"].items():
        param = params[int(index)]
        sharded[index] = {
            k: distribute_tensor(v.to(param.dtype), param.device_mesh, param.placements)
            if isinstance(param, DTensor) and torch.is_tensor(v) and v.shape == param.shape
            else v
            for k, v in values.items()
        }
    return {**state, "state": sharded}
