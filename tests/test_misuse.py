"""What a careless or hostile user tries: nothing is lost, nothing wrong is shown, every mistake is one
sentence and an exit status, never a traceback."""

import errno
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import logits, randomize_adapter, toy_t5
from helpers import MISSING_TENSOR, checkpoint_without
from safetensors.torch import load_file, save_file

import bench
import infer
import train
from data import TRAIN_FILE
from lora import AdapterError, inject_lora, load_adapter, lora_layers, merge_lora, save_adapter
from support import distributed
from support.run_dir import OutputDirLock

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny", "--log-every", "1"]


def run_train(capsys, *argv):
    code = train.main([*FAST, *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(TRAIN_FILE.read_text().splitlines(keepends=True)[:40]))
    return path


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, small_data):
    """A finished 2-step run with a checkpoint after each step; tests copy it before they touch it."""
    out = tmp_path_factory.mktemp("small") / "run"
    assert (
        train.main(
            [*FAST, "--data", str(small_data), "--max-steps", "2", "--save-every", "1", "--output-dir", str(out)]
        )
        == 0
    )
    return out


@pytest.fixture
def run_copy(small_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    return out


# --- data lost --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--data", "NOTJSON"], 2, "invalid JSON"),
        (["--target-modules", "q", "wi"], 2, "['wi'] match no nn.Linear"),
        (["--model", "/nonexistent/model"], 2, "does not exist"),
        (["--lr", "inf"], 2, "--lr must be positive"),
    ],
)
def test_overwrite_touches_nothing_until_the_new_run_is_ready(
    run_copy, small_data, tmp_path, capsys, extra, code, message
):
    before = snapshot(run_copy)
    (tmp_path / "NOTJSON").write_text("this is not json\n")
    extra = [str(tmp_path / "NOTJSON") if e == "NOTJSON" else e for e in extra]
    argv = ["--data", str(small_data), "--max-steps", "2", "--overwrite", "--output-dir", run_copy, *extra]
    result, _, err = run_train(capsys, *argv)
    assert result == code and message in err and "Traceback" not in err
    assert snapshot(run_copy) == before


def test_overwrite_refuses_files_a_run_did_not_write(run_copy, small_data, capsys):
    (run_copy / "eval").mkdir()
    (run_copy / "eval" / "my_notes.txt").write_text("mine")
    (run_copy / "best" / "photo.jpg").write_bytes(b"\xff\xd8")
    before = snapshot(run_copy)
    code, _, err = run_train(capsys, "--data", small_data, "--overwrite", "--output-dir", run_copy)
    assert code == 2 and "did not write" in err and "photo.jpg" in err
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
@pytest.mark.parametrize(
    "where", ["best", "checkpoints", "checkpoints/step-00000002", "best/adapter_config.json", ".train.lock"]
)
def test_a_symbolic_link_in_the_run_directory_is_refused_never_followed(
    run_copy, small_data, tmp_path, capsys, where, flag
):
    """--overwrite used to delete and write through best/ -> another run's adapter, and --resume to continue
    from another run's checkpoints: a link anywhere a run writes is refused, and nothing on either side moves."""
    elsewhere = tmp_path / "precious"
    shutil.move(run_copy / where, elsewhere)
    if where == ".train.lock":  # another file, which the lock's pid must not replace
        elsewhere.write_text("someone else's file\n")
    (run_copy / where).symlink_to(elsewhere, target_is_directory=elsewhere.is_dir())
    before, precious = snapshot(run_copy), snapshot(elsewhere) if elsewhere.is_dir() else elsewhere.read_bytes()
    argv = ["--data", small_data, "--max-steps", "2", "--save-every", "1", flag, "--output-dir", run_copy]
    code, _, err = run_train(capsys, *argv)
    assert code == 2 and f"{run_copy / where} is a symbolic link (to {elsewhere})" in err, err
    assert snapshot(run_copy) == before
    assert (snapshot(elsewhere) if elsewhere.is_dir() else elsewhere.read_bytes()) == precious


def test_overwrite_refuses_a_directory_that_holds_no_run(tmp_path, small_data, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_train(capsys, "--data", small_data, "--overwrite", "--output-dir", tmp_path)
    assert code == 2 and "holds no training run" in err and (tmp_path / "notes.txt").read_text() == "mine"


def test_a_second_run_on_the_same_directory_is_refused_and_a_dead_holder_is_no_obstacle(tmp_path, small_data, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = OutputDirLock(out)
    holder.acquire()  # another run is writing here
    code, _, err = run_train(capsys, "--data", small_data, "--max-steps", "1", "--output-dir", out)
    assert code == 2 and f"another train.py (pid {os.getpid()}) is writing to" in err
    holder.release()
    (out / ".train.lock").write_text("999999\n")  # a holder that died: the kernel released its lock
    code, _, err = run_train(
        capsys, "--data", small_data, "--max-steps", "1", "--val-data", "none", "--output-dir", out
    )
    assert code == 0, err


# --- resume -----------------------------------------------------------------------------------------------


def test_resume_refuses_changed_data(tmp_path, small_data, capsys):
    data = tmp_path / "rows.jsonl"
    shutil.copy(small_data, data)
    out = tmp_path / "run"
    common = ["--data", data, "--max-steps", "2", "--save-every", "1", "--output-dir", out]
    assert run_train(capsys, *common)[0] == 0
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:30]))
    code, _, err = run_train(capsys, *common, "--max-steps", "3", "--resume")
    assert code == 2 and "contents changed" in err


def test_resume_without_a_checkpoint_is_refused(tmp_path, small_data, capsys):
    out = tmp_path / "run"
    common = ["--data", small_data, "--max-steps", "1", "--val-data", "none", "--output-dir", out]
    assert run_train(capsys, *common)[0] == 0
    code, _, err = run_train(capsys, *common, "--resume")
    assert code == 2 and "holds no checkpoint" in err


@pytest.mark.parametrize("damage", ["corrupt config", "missing state", "truncated state", "checkpoints is a file"])
def test_a_damaged_run_directory_is_one_sentence_on_resume(run_copy, small_data, capsys, damage):
    step = sorted((run_copy / "checkpoints").iterdir())[-1]
    if damage == "corrupt config":
        (run_copy / "training_config.json").write_text('{"model": "tiny", ')
    elif damage == "missing state":
        (step / "training_state.pt").unlink()
    elif damage == "truncated state":
        state = step / "training_state.pt"
        state.write_bytes(state.read_bytes()[:100])
    else:
        shutil.rmtree(run_copy / "checkpoints")
        (run_copy / "checkpoints").write_text("")
    code, _, err = run_train(
        capsys, "--data", small_data, "--max-steps", "2", "--save-every", "1", "--output-dir", run_copy, "--resume"
    )
    assert code in (1, 2) and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "training_state.pt"])
def test_a_checkpoint_whose_bytes_changed_is_refused_before_it_is_read(run_copy, small_data, capsys, damaged):
    """64 bytes zeroed inside a file of the last checkpoint, its size unchanged: the SHA-256 recorded when it
    was written no longer matches, and the resume stops before it trains on damaged tensors."""
    step = run_copy / "checkpoints" / "step-00000002"
    original = (step / damaged).read_bytes()
    middle = len(original) // 2  # among the tensors, past the header
    damaged_bytes = original[:middle] + bytes(64) + original[middle + 64 :]
    assert damaged_bytes != original and len(damaged_bytes) == len(original)
    (step / damaged).write_bytes(damaged_bytes)
    code, _, err = run_train(
        capsys, "--data", small_data, "--max-steps", "2", "--save-every", "1", "--output-dir", run_copy, "--resume"
    )
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"checkpoint {step} is damaged: {damaged} is not the file it was written as" in err


@pytest.mark.parametrize(
    "damage, says",
    [
        ("checksums.json deleted", "checksums.json is missing, so its files cannot be checked"),
        ("checksums.json emptied", "adapter_config.json is not listed in checksums.json"),
        ("a listed file deleted", "adapter_model.safetensors, listed in checksums.json, is gone"),
        ("checksums.json a list", "cannot be read (checksums.json holds no object of file names)"),
    ],
)
def test_a_checkpoint_that_cannot_be_checked_is_refused(run_copy, small_data, capsys, damage, says):
    """Deleting checksums.json (or emptying it) resumed without checking a byte: only a checkpoint of the older
    train.py, which predates the checksums (test_train's), goes unchecked."""
    step = run_copy / "checkpoints" / "step-00000002"
    if damage == "checksums.json deleted":
        (step / "checksums.json").unlink()
    elif damage == "checksums.json emptied":
        (step / "checksums.json").write_text("{}")
    elif damage == "a listed file deleted":
        (step / "adapter_model.safetensors").unlink()
    else:
        (step / "checksums.json").write_text("[]")
    code, _, err = run_train(
        capsys, "--data", small_data, "--max-steps", "2", "--save-every", "1", "--output-dir", run_copy, "--resume"
    )
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: checkpoint {step} ") and says in err


def test_rotation_and_resume_leave_the_users_own_directories_in_checkpoints_alone(run_copy, small_data, capsys):
    """A backup the user made beside the checkpoints (step-00000001.bak) and a directory called step-final
    are neither taken for the newest checkpoint nor rotated away, and --overwrite refuses to delete them:
    only the step-NNNNNNNN directories save_checkpoint writes are the run's."""
    checkpoints = run_copy / "checkpoints"
    shutil.rmtree(checkpoints / "step-00000002")  # stopped after its first step
    shutil.copytree(checkpoints / "step-00000001", checkpoints / "step-00000001.bak")
    (checkpoints / "step-final").mkdir()
    (checkpoints / "step-final" / "notes.txt").write_text("mine")
    argv = ["--data", small_data, "--max-steps", "2", "--save-every", "1", "--output-dir", run_copy]
    code, out, err = run_train(capsys, *argv, "--keep-checkpoints", "1", "--resume")
    assert code == 0, err
    assert f"resumed from {checkpoints / 'step-00000001'} at step 1" in out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000001.bak", "step-00000002", "step-final"]
    code, _, err = run_train(capsys, *argv, "--overwrite")
    assert code == 2 and "a training run did not write" in err and str(checkpoints / "step-00000001.bak") in err
    assert (checkpoints / "step-00000001.bak" / "training_state.pt").is_file()


# --- validation data --------------------------------------------------------------------------------------


def test_own_data_without_val_data_holds_out_a_seeded_tenth(tmp_path, small_data, capsys):
    code, out, _ = run_train(capsys, "--data", small_data, "--max-steps", "1", "--output-dir", tmp_path / "run")
    assert code == 0 and f"validation: 4 of the 40 rows of {small_data} held out (seed 42)" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in row for row in rows)


# --- numerics and hyperparameters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weight-decay", "inf"], "--weight-decay must be in [0, 10]"),
        (["--lr", "1e30"], "--lr must be positive and at most 1"),
        (["--alpha", "inf"], "alpha must be a positive number"),
        (["--alpha", "nan"], "alpha must be a positive number"),
        (["--max-grad-norm", "inf"], "--max-grad-norm must be positive and finite"),
        (["--seed", "100000000000000000000"], "--seed must be in [0, 2**31)"),
        (["--r", "100000"], "rank r must be a positive integer up to"),
        (["--save-every", "0"], "--eval-every and --save-every must be positive"),
        (["--eval-every", "0"], "--eval-every and --save-every must be positive"),
    ],
)
def test_absurd_hyperparameters_are_refused(tmp_path, capsys, extra, message):
    code, _, err = run_train(capsys, "--output-dir", tmp_path / "run", *extra)
    assert code == 2 and message in err and not (tmp_path / "run").exists()


def test_an_update_that_makes_the_adapter_non_finite_is_undone():
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, dropout=0.0)
    randomize_adapter(model)
    from data import EncodedExample, collate

    batch = collate([EncodedExample([5, 6, 1], [7, 8, 1])], 0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    result = train.train_step(
        model.train(), optimizer, torch.amp.GradScaler("cpu", enabled=False), [batch],
        device=torch.device("cpu"), dtype=torch.float32, max_grad_norm=1.0,
    )  # fmt: skip
    assert result.skipped == "the update made the adapter non-finite"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_non_finite_adapter_is_never_saved_nor_loaded(tmp_path, capsys, tiny_model_path):
    model = toy_t5()
    inject_lora(model, r=4, alpha=8)
    with torch.no_grad():
        next(iter(lora_layers(model).values())).lora_B[0, 0] = float("nan")
    with pytest.raises(AdapterError, match="NaN or infinite"):
        save_adapter(model, tmp_path / "never")
    assert not (tmp_path / "never" / "adapter_model.safetensors").exists()

    from support.models import load_model_and_tokenizer

    base, _, path = load_model_and_tokenizer("tiny")
    inject_lora(base, r=4, alpha=8)
    save_adapter(base, tmp_path / "damaged", base_model_name_or_path=path)
    weights = tmp_path / "damaged" / "adapter_model.safetensors"
    tensors = load_file(weights)
    next(t for k, t in tensors.items() if "lora_A" in k)[0, 0] = float("inf")
    save_file(tensors, weights, metadata={"format": "pt"})
    for extra in ([], ["--no-merge"]):
        code = infer.main(["--adapter", str(tmp_path / "damaged"), *extra, "hello"])
        err = capsys.readouterr().err
        assert code == 2 and "NaN or infinite values: the adapter is damaged" in err and "Traceback" not in err


# --- the LoRA library -------------------------------------------------------------------------------------


def test_a_tied_lm_head_is_refused_and_an_untied_one_merges_without_touching_the_embeddings(t5_batch):
    tied = toy_t5(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.shared.weight
    with pytest.raises(ValueError, match="lm_head shares its weight"):
        inject_lora(tied, ("q", "lm_head"), r=4, alpha=8)
    assert not lora_layers(tied) and all(p.requires_grad for p in tied.parameters())  # refused before any change

    untied = toy_t5(tie_word_embeddings=True)
    untied.lm_head.weight = torch.nn.Parameter(untied.shared.weight.detach().clone())
    inject_lora(untied, ("q", "lm_head"), r=4, alpha=8, dropout=0.0)
    randomize_adapter(untied)
    embeddings, unmerged = untied.shared.weight.clone(), logits(untied, t5_batch)
    merge_lora(untied)
    assert torch.equal(untied.shared.weight, embeddings)
    torch.testing.assert_close(logits(untied, t5_batch), unmerged, rtol=1e-5, atol=1e-5)


def test_new_lora_layers_take_the_mode_of_the_model_they_join(tmp_path, t5_batch):
    model = toy_t5().eval()
    inject_lora(model, r=4, alpha=8, dropout=0.5)
    randomize_adapter(model)
    assert not any(module.training for module in model.modules())
    assert torch.equal(logits(model, t5_batch), logits(model, t5_batch))
    save_adapter(model, tmp_path)
    loaded = toy_t5().eval()
    load_adapter(loaded, tmp_path)
    assert not any(module.training for module in loaded.modules())
    assert torch.equal(logits(loaded, t5_batch), logits(loaded, t5_batch))


# --- one sentence, never a traceback ----------------------------------------------------------------------


@pytest.mark.parametrize("base_dtype", ["fp32", "nf4"])
def test_a_checkpoint_missing_a_tensor_is_refused_not_filled_with_random_values(
    tmp_path, capsys, tiny_model_path, base_dtype
):
    """transformers fills a tensor the checkpoint lacks with random values and only warns; a base with a random
    layer would train and answer as if whole. (Under --fsdp: tests/test_fsdp.py.)"""
    broken = checkpoint_without(tmp_path / "broken", MISSING_TENSOR, tiny_model_path)
    code = train.main(["--model", str(broken), "--base-dtype", base_dtype, "--max-steps", "1", "--val-data", "none",
                       "--output-dir", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert f"could not load model '{broken}' (the checkpoint has no tensor for {MISSING_TENSOR});" in err


def test_train_refusals_that_used_to_be_tracebacks(tmp_path, small_data, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("")
    code, _, err = run_train(capsys, "--data", small_data, "--output-dir", tmp_path / "a-file")
    assert code == 2 and "is a file, not a directory" in err
    code, _, err = run_train(capsys, "--data", small_data, "--output-dir", tmp_path / "a-file" / "run")
    assert code == 2 and "cannot write to --output-dir" in err  # a place no directory can be made in
    code, _, err = run_train(capsys, "--data", tmp_path, "--output-dir", tmp_path / "out")
    assert code == 2 and "is a directory" in err

    one_row = tmp_path / "one.jsonl"
    one_row.write_text(TRAIN_FILE.read_text().splitlines()[0] + "\n")
    monkeypatch.setattr(train.dist, "setup_distributed", lambda _: distributed.Distributed(0, 2, torch.device("cpu")))
    monkeypatch.setattr(train, "load_with_lora", lambda *a, **k: pytest.fail("model loaded"))
    code, _, err = run_train(capsys, "--data", one_row, "--val-data", "none", "--output-dir", tmp_path / "two")
    assert code == 2 and "fewer than the 2 processes to share them" in err


def test_a_full_disk_while_saving_is_one_sentence_and_keeps_the_last_checkpoint(
    tmp_path, small_data, capsys, monkeypatch
):
    calls = {"n": 0}
    real_save = torch.save

    def save_then_fill_the_disk(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr("support.checkpoints.torch.save", save_then_fill_the_disk)
    out = tmp_path / "run"
    code, _, err = run_train(capsys, "--data", small_data, "--max-steps", "3", "--save-every", "1", "--output-dir", out)
    assert code == 1 and "No space left on device" in err and "--resume" in err and "Traceback" not in err
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000001"]


def test_infer_refusals_that_used_to_be_tracebacks(trained_run, tmp_path, capsys, monkeypatch):
    (tmp_path / "report").write_text("")
    monkeypatch.setattr(infer, "Assistant", lambda *a, **k: pytest.fail("the model loaded"))
    for argv, message in [
        (["--eval", "--report-dir", str(tmp_path / "report")], "is a file"),
        (["--samples", "-1", "--eval"], "--samples must be 0 or more"),
        (["--file", str(tmp_path)], "is a directory"),
    ]:
        assert infer.main(["--adapter", str(trained_run), *argv]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.undo()
    assert infer.main(["--adapter", str(trained_run), "--model", str(trained_run / "best"), "hi"]) == 2
    assert "is an adapter directory, not a base model" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--batch-size", "0"], ["--reps", "0"]])
def test_bench_refuses_nonsense_counts(argv, capsys):
    assert bench.main(argv) == 2 and "must be positive" in capsys.readouterr().err


# --- smaller ----------------------------------------------------------------------------------------------


def test_a_directory_where_a_file_belongs_is_named_as_one(tmp_path):
    model = toy_t5()
    inject_lora(model, r=4, alpha=8)
    save_adapter(model, tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter" / "adapter_model.safetensors").mkdir()
    with pytest.raises(AdapterError, match="is a directory, not a safetensors file"):
        load_adapter(toy_t5(), tmp_path / "adapter")
    from data import load_examples

    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + TRAIN_FILE.read_bytes()[:2000].rsplit(b"\n", 1)[0] + b"\n")
    assert load_examples(bom)[0] == load_examples(TRAIN_FILE)[0]  # a byte-order mark is no error


def test_files_are_written_with_the_users_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        model = toy_t5()
        inject_lora(model, r=4, alpha=8)
        save_adapter(model, tmp_path)
    finally:
        os.umask(previous)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o644}


def test_metrics_are_strict_json_and_a_skipped_first_step_warns_nothing(tmp_path, small_data):
    def infinite_first_forward(model):
        calls = {"n": 0}

        def hook(module, inputs, output):  # steps 1 and 3 fail, step 2 is good
            calls["n"] += 1
            return output + float("inf") if calls["n"] in (1, 3) else output

        model.lm_head.register_forward_hook(hook)

    args = train.parse_args([*FAST, "--data", str(small_data), "--max-steps", "3", "--log-every", "3"])
    args.output_dir, args.save_every = tmp_path / "run", 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.train(args, prepare_model=infinite_first_forward)
    assert not caught, [str(w.message) for w in caught]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl")) for line in lines]
    logged = [r for r in rows if "train_loss" in r][0]
    assert logged["grad_norm"] is None and "non-finite" in logged["last_step_skipped"]
    assert math.isfinite(logged["train_loss"])


DEEP = "[" * 100_000
BIG = "9" * 5001  # past Python's 4,300-digit limit for int()


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"instruction": "hi \\ud800", "response": "ok"}\n', "holds \\ud800, which is not a character"),
        ('{"instruction": "hi", "response": "ok", "n": ' + BIG + "}\n", "Exceeds the limit (4300 digits)"),
        (DEEP + "\n", "it nests too deeply to parse"),
    ],
    ids=["lone-surrogate", "5001-digits", "deep-nesting"],
)
def test_data_no_one_expects_is_one_sentence(tmp_path, capsys, text, message):
    data = tmp_path / "rows.jsonl"
    data.write_text(text)
    code, _, err = run_train(capsys, "--data", data, "--val-data", "none", "--output-dir", tmp_path / "run")
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "where, text, message",
    [
        ("query-file", '{"query": "hi \\ud800"}\n', "holds \\ud800, which is not a character"),
        ("query-file", '{"query": "hi", "n": ' + BIG + "}\n", "Exceeds the limit (4300 digits)"),
        ("query", "hi \udcff", "holds \\udcff, which is not a character"),  # argv bytes that are not UTF-8
        ("accounts", '{"customer": ' + BIG + "}", "Exceeds the limit (4300 digits)"),
        ("accounts", DEEP, "it nests too deeply to parse"),
        ("adapter", '{"r": ' + BIG + "}", "Exceeds the limit (4300 digits)"),
    ],
)
def test_inputs_no_one_expects_are_refused_by_infer_in_one_sentence(tmp_path, capsys, where, text, message):
    import infer

    path = tmp_path / "input"
    argv = ["--adapter", str(tmp_path / "missing"), "hello"]
    if where == "query-file":
        path.write_text(text)
        argv = ["--adapter", str(tmp_path / "missing"), "--file", str(path)]
    elif where == "query":
        argv = ["--adapter", str(tmp_path / "missing"), text]
    elif where == "accounts":
        path.write_text(text)
        argv += ["--accounts", str(path)]
    else:
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / "adapter_config.json").write_text(text)
        argv = ["--adapter", str(tmp_path / "adapter"), "hello"]
    code = infer.main(argv)
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and "Traceback" not in err and err.count("\n") == 1, err
