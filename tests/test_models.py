"""The one model builder: the tiny model's cache survives damage and concurrent builders."""

import os
import subprocess
import sys

import torch

from support.models import BUILT_MARKER, flan_t5_base_architecture, load_model_and_tokenizer, tiny_model_dir


def test_a_damaged_tiny_model_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_T5_CACHE", str(tmp_path))
    directory = tiny_model_dir()
    reference = load_model_and_tokenizer("tiny")[0].state_dict()
    (directory / "model.safetensors").unlink()  # a file deleted by hand
    model = load_model_and_tokenizer("tiny")[0]
    assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items())
    for name in [p.name for p in directory.iterdir() if not p.name.startswith("tokenizer")]:
        (directory / name).unlink()  # a build cut short: only the tokenizer files are left
    assert not (directory / BUILT_MARKER).exists()
    model, tokenizer, path = load_model_and_tokenizer("tiny")
    assert path == str(directory)
    assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items())
    assert tokenizer.decode(tokenizer("What is my savings balance?").input_ids, skip_special_tokens=True) == (
        "What is my savings balance?"
    )


def test_concurrent_builders_share_one_build(tmp_path):
    code = "from support.models import tiny_model_dir; print(tiny_model_dir())"
    env = {**os.environ, "LORA_T5_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-2000:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [
        os.path.basename(outputs[0][0].strip())
    ]


def test_flan_t5_base_architecture_has_the_real_checkpoints_layout():
    model = flan_t5_base_architecture(device="meta")
    assert model.lm_head.weight is not model.shared.weight
    assert sum(p.numel() for p in model.parameters()) == 247_577_856
