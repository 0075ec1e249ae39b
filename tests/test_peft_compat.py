"""Adapters we save load in PEFT unchanged, and adapters PEFT saves load here (peft is a test dependency)."""

import torch
from conftest import logits, randomize_adapter, toy_t5

from lora import inject_lora, load_adapter, merge_lora, save_adapter

peft = __import__("peft")


def test_peft_loads_our_adapter(tmp_path, t5_batch):
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, dropout=0.0)
    randomize_adapter(model, seed=5)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny-base")
    peft_model = peft.PeftModel.from_pretrained(toy_t5(), tmp_path / "adapter").eval()
    ours = logits(model, t5_batch)
    assert not torch.allclose(ours, logits(toy_t5(), t5_batch), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(logits(peft_model, t5_batch), ours, rtol=1e-5, atol=1e-5)


def test_we_load_peft_adapter(tmp_path, t5_batch):
    config = peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM", use_rslora=True
    )
    peft_model = peft.get_peft_model(toy_t5(), config)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.eval().save_pretrained(tmp_path / "peft_adapter")
    ours = toy_t5()
    loaded = load_adapter(ours, tmp_path / "peft_adapter")
    assert len(loaded) == 12
    expected = logits(peft_model, t5_batch)
    torch.testing.assert_close(logits(ours, t5_batch), expected, rtol=1e-5, atol=1e-5)
    merge_lora(ours)  # and its merge agrees with PEFT's unmerged output
    torch.testing.assert_close(logits(ours, t5_batch), expected, rtol=1e-5, atol=1e-5)
