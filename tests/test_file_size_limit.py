"""A write that the file system refuses (a full disk, `ulimit -f`), for real: every writer ends in one
sentence, exit status 1, and leaves the files it would have replaced as they were, with no debris.

The limit is the process's own soft RLIMIT_FSIZE, lowered just before the write under test and raised
again after it (Python ignores SIGXFSZ, so a write past the limit fails with EFBIG).
"""

import os
import resource
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import randomize_adapter, saved_random_adapter

import infer
import train
from data import TRAIN_FILE
from lora import save_adapter
from lora.files import atomic_write_all
from lora.inspect import main as inspect_main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny", "--log-every", "1", "--val-data", "none"]

if signal.getsignal(signal.SIGXFSZ) != signal.SIG_IGN:
    pytest.skip("SIGXFSZ is not ignored here, so a file-size limit would kill pytest", allow_module_level=True)


@contextmanager
def file_size_limit(nbytes: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def files_in(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def the_error(stderr: str) -> str:
    """stderr's one error sentence, after any progress bar's lines: nothing else may follow or look like it."""
    assert "Traceback" not in stderr and stderr.count("error:") == 1, stderr
    last = stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: "), stderr
    return last


def debris(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob("*") if p.name.startswith(".") and p.name != ".train.lock"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(TRAIN_FILE.read_text().splitlines(keepends=True)[:40]))
    return path


@pytest.mark.parametrize("failing", ["the second checkpoint", "the final adapter"])
def test_training_keeps_what_it_wrote_before_the_refused_write_and_resumes(
    failing, rows, tmp_path, capsys, monkeypatch
):
    """2 steps, a checkpoint after each: the limit (1 MB, under the 2.7 MB adapter) comes just before the
    write under test. Every file written before it is unchanged, and --resume then finishes the run."""
    writer = "save_checkpoint" if failing == "the second checkpoint" else "save_adapter"
    real = getattr(train, writer)
    calls, before = [], {}

    def limited(*args, **kwargs):
        calls.append(1)
        if writer == "save_adapter" or len(calls) == 2:
            before.update(files_in(out))
            with file_size_limit(1 << 20):
                return real(*args, **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, writer, limited)
    out = tmp_path / "run"
    argv = [*FAST, "--data", str(rows), "--max-steps", "2", "--save-every", "1", "--output-dir", str(out)]
    capsys.readouterr()
    assert train.main(argv) == 1
    err = the_error(capsys.readouterr().err)
    assert err.startswith("error: could not write") and "(File too large)" in err
    assert str(out) in err and "--resume" in err
    after = files_in(out)
    assert before and {name: after.get(name) for name in before} == before  # nothing written earlier was touched
    assert debris(out) == []
    monkeypatch.undo()
    assert train.main([*argv, "--resume"]) == 0
    assert (out / "adapter_model.safetensors").is_file()


def test_a_limit_for_the_whole_run_in_a_subprocess_is_one_sentence_and_leaves_no_debris(rows, tmp_path):
    """`ulimit -f` as a shell sets it, for the whole process: torch.save's and safetensors' own writers
    used to turn EFBIG into RuntimeError or SafetensorError tracebacks."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), *FAST, "--data", str(rows)]
    command += ["--max-steps", "2", "--save-every", "1", "--output-dir", str(out)]

    def limit_file_size():  # 1 MB: the tokenizer fits, the first checkpoint's 2.7 MB adapter does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    result = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stderr[-2000:]
    err = the_error(result.stderr)
    assert err.startswith("error: could not write") and "(File too large)" in err and "--resume" in err
    assert debris(out) == []


def test_files_written_together_are_all_old_or_all_new(tmp_path):
    small, large = tmp_path / "small.md", tmp_path / "large.json"
    atomic_write_all({small: "old", large: "old"})
    with pytest.raises(OSError, match="File too large") as raised, file_size_limit(1024):
        atomic_write_all({small: "new", large: "x" * 4096})  # the first fits, the second does not
    assert raised.value.filename == str(large)
    assert (small.read_text(), large.read_text()) == ("old", "old") and debris(tmp_path) == []


def test_an_adapter_saved_over_another_keeps_the_old_one(tmp_path):
    model = saved_random_adapter(tmp_path / "adapter")
    before = files_in(tmp_path / "adapter")
    randomize_adapter(model)
    with pytest.raises(OSError, match="File too large"), file_size_limit(1024):
        save_adapter(model, tmp_path / "adapter")
    assert files_in(tmp_path / "adapter") == before and debris(tmp_path) == []


def test_the_evaluation_report_shows_its_table_and_keeps_the_previous_report(trained_run, tmp_path, capsys):
    argv = [
        "--adapter",
        str(trained_run),
        "--eval",
        "--eval-limit",
        "4",
        "--samples",
        "2",
        "--report-dir",
        str(tmp_path),
    ]
    assert infer.main(argv) == 0
    before = files_in(tmp_path)
    assert sorted(before) == ["eval_report.json", "eval_report.md"]
    capsys.readouterr()
    with file_size_limit(512):  # the report is some kilobytes
        code = infer.main(argv)
    out, err = capsys.readouterr()
    err = the_error(err)
    assert code == 1 and err.startswith(f"error: could not write {tmp_path}") and "File too large" in err
    assert "exact_match" in out  # the figures computed are shown before the write fails
    assert files_in(tmp_path) == before and debris(tmp_path) == []


def test_inspect_figures_keep_the_previous_ones(tmp_path, capsys):
    saved_random_adapter(tmp_path / "adapter")
    figures = tmp_path / "figures"
    assert inspect_main([str(tmp_path / "adapter"), "--out", str(figures)]) == 0
    before = files_in(figures)
    shutil.copytree(figures, tmp_path / "copy")
    capsys.readouterr()
    with file_size_limit(4096):  # each figure is tens of kilobytes
        code = inspect_main([str(tmp_path / "adapter"), "--out", str(figures)])
    err = the_error(capsys.readouterr().err)
    assert code == 1 and "could not write the figures" in err and "File too large" in err
    assert files_in(figures) == before and debris(tmp_path) == []


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MB tmpfs: a real file system that runs out of space (needs root and mount; skipped elsewhere)."""
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    place = tmp_path / "tmpfs"
    place.mkdir()
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(place)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield place
    finally:
        subprocess.run(["umount", str(place)], check=True)


def test_training_onto_a_full_disk_is_one_sentence_and_frees_the_space(full_disk, rows, capsys):
    out = full_disk / "run"
    capsys.readouterr()
    code = train.main([*FAST, "--data", str(rows), "--max-steps", "2", "--save-every", "1", "--output-dir", str(out)])
    err = the_error(capsys.readouterr().err)
    assert code == 1 and "(No space left on device)" in err and "--resume" in err
    assert debris(out) == [] and not (out / "checkpoints" / "step-00000001").exists()
    usage = shutil.disk_usage(full_disk)
    assert usage.used < 512 * 1024, f"{usage.used} bytes still held"  # the tokenizer and config, no half checkpoint
