"""T5s built from a config with random weights, nothing read from disk: the flan-t5 sizes (for parameter
counts, memory plans and timings, which do not depend on weight values) and a toy T5 of a few thousand
parameters (for the tests and scripts/cuda_checks.py). The offline `tiny` model with its tokenizer is
support/tiny_model.py's."""

from __future__ import annotations

import torch

# The flan-t5 family's architectures, from their published configs (vocabulary 32128, gated-GELU, heads of 64).
FLAN_T5_SIZES = {
    "small": dict(d_model=512, num_heads=6, d_ff=1024, num_layers=8, num_decoder_layers=8),
    "base": dict(d_model=768, num_heads=12, d_ff=2048, num_layers=12, num_decoder_layers=12),
    "large": dict(d_model=1024, num_heads=16, d_ff=2816, num_layers=24, num_decoder_layers=24),
    "xl": dict(d_model=2048, num_heads=32, d_ff=5120, num_layers=24, num_decoder_layers=24),
    "xxl": dict(d_model=4096, num_heads=64, d_ff=10240, num_layers=24, num_decoder_layers=24),
}
FLAN_T5_COMMON = dict(
    d_kv=64, vocab_size=32128, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1
)
FLAN_T5_BASE_CONFIG = {**FLAN_T5_COMMON, **FLAN_T5_SIZES["base"]}


def flan_t5_architecture(size: str = "base", device: torch.device | str | None = None):
    """A flan-t5 size built from its config with random weights and the real checkpoints' layout.

    transformers 5 ties lm_head to the input embeddings when building from a config (222.9M parameters
    for base); the real checkpoints have their own lm_head (base: 247,577,856). Timings don't depend on
    weight values. device="meta" gives shapes only, for counting parameters and FLOPs without memory.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    with torch.device(device or "cpu"):
        model = T5ForConditionalGeneration(T5Config(**FLAN_T5_COMMON, **FLAN_T5_SIZES[size]))
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


def flan_t5_base_architecture(device: torch.device | str | None = None):
    return flan_t5_architecture("base", device)


def toy_t5(seed: int = 0, **overrides):
    """A toy T5 from a config: two layers, d_model 32, random weights from `seed`, in eval mode."""
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
