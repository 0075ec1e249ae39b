"""docs/lora-from-scratch.md: every python block runs, in order, in one namespace (it cannot rot)."""

import re
from pathlib import Path

WALKTHROUGH = Path(__file__).resolve().parents[1] / "docs" / "lora-from-scratch.md"


def test_every_code_block_of_the_walkthrough_runs(capsys):
    blocks = re.findall(r"^```python\n(.*?)^```", WALKTHROUGH.read_text(encoding="utf-8"), re.S | re.M)
    assert len(blocks) >= 9
    namespace: dict = {}
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"{WALKTHROUGH.name} block {number}", "exec"), namespace)
    assert "1,769,472 of" in capsys.readouterr().out


def test_the_experiments_figures_are_drawn_by_their_script(tmp_path, capsys):
    """python -m lora.experiments (its main) draws the walkthrough's two experiment figures; docs/figures/ holds
    copies."""
    from lora.experiments import main

    assert main(["--out", str(tmp_path)]) == 0, capsys.readouterr().err
    for name in ("intrinsic_rank.png", "rank_scaling.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
        assert (WALKTHROUGH.parent / "figures" / name).is_file() and f"figures/{name}" in WALKTHROUGH.read_text()
