"""Toy T5 models built from a config (random weights, no tokenizer, no download) and adapters given random
values, for the tests and for scripts/cuda_checks.py, which runs where pytest may be missing."""

import torch

from lora import lora_layers


def tiny_t5(seed: int = 0, **overrides):
    """A small T5 built from a config: two layers, d_model 32, random weights."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = dict(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(**config)).eval()


def randomize_adapter(model, seed=3, scale=0.1):
    """Give every B random values, as if trained: with B = 0 an adapter changes nothing and A gets no gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * scale)


def saved_random_adapter(directory, target_modules=("q", "v"), r: int = 4, alpha: float = 8):
    """tiny_t5 with a LoRA adapter whose B is random (as if trained), saved to `directory`; returns the model."""
    from lora import inject_lora, save_adapter

    model = tiny_t5()
    inject_lora(model, target_modules, r=r, alpha=alpha)
    randomize_adapter(model)
    save_adapter(model, directory)
    return model
