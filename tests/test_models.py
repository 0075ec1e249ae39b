"""The model builders: the tiny model's cache survives damage and concurrent builders."""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_to_the_end

from support.architectures import flan_t5_architecture, flan_t5_base_architecture
from support.models import load_model_and_tokenizer
from support.tiny_model import BUILT_MARKER, _is_built, tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]


def test_a_damaged_tiny_model_cache_is_rebuilt(tmp_path, monkeypatch, tiny_model_path):
    monkeypatch.setenv("LORA_T5_CACHE", str(tmp_path))
    shutil.copytree(tiny_model_path, tmp_path / Path(tiny_model_path).name)  # the session's build, to damage
    directory = tiny_model_dir()
    assert directory == tmp_path / Path(tiny_model_path).name
    reference = load_model_and_tokenizer("tiny")[0].state_dict()
    (directory / "model.safetensors").unlink()  # a file deleted by hand
    assert not _is_built(directory)
    for name in [p.name for p in directory.iterdir() if not p.name.startswith("tokenizer")]:
        (directory / name).unlink()  # a build cut short: only the tokenizer files are left
    assert not (directory / BUILT_MARKER).exists()
    previous = os.umask(0o022)
    try:
        model, tokenizer, path = load_model_and_tokenizer("tiny")
    finally:
        os.umask(previous)
    assert path == str(directory) and directory.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items())
    assert tokenizer.decode(tokenizer("What is my savings balance?").input_ids, skip_special_tokens=True) == (
        "What is my savings balance?"
    )


RANKS_LOAD_TINY = """
import sys, time
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from support.models import load_model_and_tokenizer
dist.init_process_group("gloo")
if dist.get_rank() == 0:
    time.sleep(3)  # rank 1 takes the lock and builds: transformers' save_pretrained writes only on rank 0
print(load_model_and_tokenizer("tiny")[2])
"""


def test_torchrun_ranks_share_one_build_whichever_rank_builds(tmp_path):
    script = tmp_path / "load_tiny.py"
    script.write_text(RANKS_LOAD_TINY)
    env = {**os.environ, "LORA_T5_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # A hang fails the test and ends the whole process group, workers included.
    code, stdout, stderr = run_to_the_end([*command, str(script), str(ROOT)], work_done=str(tmp_path), env=env)
    assert code == 0, stderr[-3000:]
    paths = set(stdout.split())
    assert len(paths) == 1 and BUILT_MARKER in os.listdir(paths.pop())


def test_flan_t5_base_architecture_has_the_real_checkpoints_layout():
    model = flan_t5_base_architecture(device="meta")
    assert model.lm_head.weight is not model.shared.weight
    assert sum(p.numel() for p in model.parameters()) == 247_577_856


@pytest.mark.parametrize(
    "size, trainable, total",
    [  # r=16 on q and v; totals are the real checkpoints' (separate lm_head), without LoRA
        ("small", 688_128, 76_961_152),
        ("base", 1_769_472, 247_577_856),
        ("large", 4_718_592, 783_150_080),
        ("xl", 9_437_184, 2_849_757_184),
        ("xxl", 18_874_368, 11_135_332_352),
    ],
)
def test_every_flan_t5_size_by_its_architecture(size, trainable, total):
    from lora import count_parameters, inject_lora

    model = flan_t5_architecture(size, device="meta")
    base_total = count_parameters(model)[1]
    inject_lora(model, ("q", "v"), r=16, alpha=32)
    assert (count_parameters(model)[0], base_total) == (trainable, total)


def test_a_base_of_pickled_weights_only_is_refused_and_never_unpickled(tmp_path, monkeypatch, tiny_model_path):
    from safetensors.torch import load_file

    from support.models import ModelLoadError, load_model_and_tokenizer

    base = tmp_path / "pickled"
    shutil.copytree(tiny_model_path, base)
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a user's pickle was unpickled"))
    with pytest.raises(ModelLoadError, match="holds no .safetensors weights \\(a pytorch_model.bin is a pickle"):
        load_model_and_tokenizer(str(base))
