"""The commands `pip install` puts on PATH run, and so does `python -m lora.inspect`, without a warning."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

SCRIPTS = Path(sysconfig.get_path("scripts"))  # where pip put this environment's console scripts


@pytest.mark.parametrize(
    "command, says",
    [
        ("lora-t5-train", "Fine-tune a T5 with LoRA"),
        ("lora-t5-infer", "Answer banking questions"),
        ("lora-t5-inspect", "What an adapter learned"),
        ("lora-t5-serve", "Serve the assistant over HTTP"),
    ],
)
def test_the_installed_commands_answer_help(command, says):
    path = SCRIPTS / command
    assert path.is_file(), f"{path} is missing: install the project with pip install -e ."
    result = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"usage: {command} ") and says in result.stdout
    assert result.stderr == ""


def test_python_m_lora_inspect_runs_without_runpy_s_warning():
    result = subprocess.run(
        [sys.executable, "-m", "lora.inspect", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m lora.inspect ")
    assert result.stderr == ""  # runpy: "'lora.inspect' found in sys.modules after import of package 'lora'"
