"""The memory plan against what autograd really keeps, and the refusal it leads to on CUDA."""

import dataclasses

import pytest
import torch
from conftest import toy_t5

from lora import inject_lora, set_base_dtype
from support.fast_modules import use_fast_modules
from support.memory import MemoryPlan, RunShape, activation_bytes, plan_memory, refusal

TOLERANCE = {torch.float32: 0.03, torch.bfloat16: 0.08}  # measured on these shapes: within 2.1%; 2.2-5.5% under


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the tensors autograd saves for the backward pass (each storage once, parameters excluded):
    what the activations hold at the end of the forward pass, independent of the allocator."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch).loss.backward()
    return sum(saved.values())


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape, batch_size, source_len, target_len",
    [
        ({}, 4, 16, 16),
        ({}, 2, 40, 8),
        ({"d_model": 64, "d_ff": 256, "num_heads": 8, "num_layers": 3, "num_decoder_layers": 1}, 3, 24, 40),
        ({"d_model": 64, "d_ff": 512, "d_kv": 16, "num_layers": 2, "num_decoder_layers": 3}, 2, 12, 20),
    ],
)
def test_activation_estimate_is_within_tolerance_of_what_autograd_saves(
    shape, batch_size, source_len, target_len, base_dtype
):
    model = toy_t5(dropout_rate=0.1, **shape).train()
    inject_lora(model, ("q", "v"), r=4, alpha=8, dropout=0.05)
    use_fast_modules(model)  # as train.py builds it
    set_base_dtype(model, base_dtype)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(2, 64, (batch_size, source_len), generator=generator),
        "attention_mask": torch.ones(batch_size, source_len, dtype=torch.long),
        "labels": torch.randint(2, 64, (batch_size, target_len), generator=generator),
    }
    measured = saved_activation_bytes(model, batch)
    value_bytes = torch.finfo(base_dtype).bits // 8
    estimate = activation_bytes(model.config, batch_size, source_len, target_len, value_bytes, checkpointing=False)
    assert abs(estimate - measured) <= TOLERANCE[base_dtype] * measured, (estimate, measured)


def test_plan_counts_weights_and_adapter_state_exactly():
    model = toy_t5()
    inject_lora(model, r=4, alpha=8)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = plan_memory(model, 8, 32, 64, torch.float32, checkpointing=False)
    assert (plan.frozen_bytes, plan.adapter_bytes) == (4 * frozen, 16 * trainable)
    set_base_dtype(model, torch.bfloat16)
    halved = plan_memory(model, 8, 32, 64, torch.bfloat16, checkpointing=True)
    assert (halved.frozen_bytes, halved.adapter_bytes) == (2 * frozen, 16 * trainable)
    assert halved.activation_bytes < plan.activation_bytes / 2  # bf16 values, and checkpointing


def test_refusal_names_the_options_that_are_not_in_use_yet():
    plan = MemoryPlan(frozen_bytes=10 * 2**30, adapter_bytes=2**30, activation_bytes=9 * 2**30)
    args = RunShape(batch_size=8, grad_accum=1, gradient_checkpointing=False, base_dtype="fp32")
    message = refusal(plan, 16 * 2**30, args)
    assert message.startswith("this run needs about 20.0 GiB of GPU memory but 16.0 GiB is free; try ")
    assert "--gradient-checkpointing, --base-dtype bf16 (or nf4), a smaller --batch-size" in message
    assert "--skip-memory-check" in message
    args = dataclasses.replace(args, gradient_checkpointing=True, base_dtype="bf16")
    on_bf16 = refusal(plan, 16 * 2**30, args)
    assert "--gradient-checkpointing" not in on_bf16 and "try --base-dtype nf4, a smaller" in on_bf16
    args = dataclasses.replace(args, base_dtype="nf4")
    assert "--base-dtype" not in refusal(plan, 16 * 2**30, args)
    assert refusal(plan, 21 * 2**30, args) is None


def test_check_plan_refuses_on_cuda_when_the_free_memory_is_short(monkeypatch):
    from support.memory import MemoryPlanError, check_plan

    class Row:  # an encoded example: only its lengths count
        input_ids, labels = [1] * 30, [1] * 60

    model = toy_t5()
    inject_lora(model, r=4, alpha=8)
    args = RunShape(batch_size=8, grad_accum=1, gradient_checkpointing=False, base_dtype="auto")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 2**30))  # 1 MiB free
    with pytest.raises(MemoryPlanError, match="this run needs about .* but 0.0 GiB is free"):
        check_plan(model, [Row()], torch.bfloat16, torch.device("cuda"), args)
    args = dataclasses.replace(args, skip_memory_check=True)
    assert check_plan(model, [Row()], torch.bfloat16, torch.device("cuda"), args).total_bytes > 2**20
    args = dataclasses.replace(args, skip_memory_check=False)  # on the CPU there is nothing to refuse
    assert check_plan(model, [Row()], torch.float32, torch.device("cpu"), args).total_bytes > 2**20


def test_the_plan_is_for_the_largest_real_batch_not_a_batch_size_past_the_data():
    """--batch-size 100000 on 3 rows trains batches of 3: planning 100000 rows would refuse a run that fits."""
    from support.memory import check_plan

    class Row:
        input_ids, labels = [1] * 30, [1] * 60

    model = toy_t5()
    inject_lora(model, r=4, alpha=8)

    def plan(batch_size):
        args = RunShape(batch_size=batch_size)
        return check_plan(model, [Row()] * 3, torch.float32, torch.device("cpu"), args).total_bytes

    assert plan(2) < plan(3) == plan(100_000)


def test_the_table_of_plans_in_the_docs_is_what_scripts_memory_plans_prints(capsys):
    """docs/training.md's table of which flan-t5 size fits which GPU is the script's output, as it stands."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "scripts"))
    try:
        import memory_plans
    finally:
        sys.path.remove(str(root / "scripts"))
    assert memory_plans.main([]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 5 and table[-1].startswith("| flan-t5-xxl")
    page = (root / "docs" / "training.md").read_text()
    assert "\n".join(table) in page
