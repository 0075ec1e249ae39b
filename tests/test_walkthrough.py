"""docs/lora-from-scratch.md: every python block runs, in order, in one namespace (it cannot rot)."""

import re
from pathlib import Path

import pytest

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


EXERCISES = WALKTHROUGH.parent / "exercises" / "lora_exercises.py"


@pytest.mark.parametrize(
    "number, stub, method, solution",
    [
        (1, "Exercise1Forward", "lora_update", "LoRALinear"),
        (2, "Exercise2Init", "reset_lora_parameters", "LoRALinear"),
        (3, "Exercise3Merge", "merge", "LoRALinear"),
        (4, "Exercise4DoRANorm", "weight_norm", "DoRALinear"),
    ],
)
def test_each_exercise_stub_fails_the_kit_with_its_hint_and_its_solution_passes(capsys, number, stub, method, solution):
    """docs/exercises: the kit, run as the exercise says, stops on the stub with the exercise's hint; the
    stub with the project's own method in its place (the solution) passes every check."""
    import importlib.util

    import lora
    from lora.testing import assert_lora_layer, main

    spec = importlib.util.spec_from_file_location("lora_exercises", EXERCISES)
    exercises = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exercises)
    factory = next(name for name in vars(exercises) if name.startswith(f"exercise_{number}_"))
    assert f"lora_exercises.py:{factory}" in EXERCISES.read_text()  # the command the docstring gives
    dora = number == 4
    assert main([f"{EXERCISES}:{factory}", *(["--dora"] if dora else [])]) == 1
    out, err = capsys.readouterr()
    assert f"Exercise {number}, " in out + err and "Traceback" not in err
    solved = type("Solved", (getattr(exercises, stub),), {method: vars(getattr(lora, solution))[method]})
    assert_lora_layer(lambda base, r, alpha: solved.from_linear(base, r, alpha, dropout=0.1), dora=dora)


def test_the_experiments_refuse_an_out_that_is_a_file_or_holds_a_figure_link(tmp_path, capsys):
    """--out a file ended in FileExistsError's traceback, and a figure's link was replaced: both are refused
    before any work, in one sentence, as lora.inspect refuses them; the link and its file stay as they were."""
    from lora.experiments import main

    (tmp_path / "a_file").write_text("")
    assert main(["--out", str(tmp_path / "a_file")]) == 2
    refusal = f"error: --out {tmp_path / 'a_file'} is a file: pass a directory for the figures.\n"
    assert capsys.readouterr().err == refusal
    figures, mine = tmp_path / "figures", tmp_path / "mine.png"
    figures.mkdir()
    mine.write_bytes(b"my own picture")
    (figures / "rank_scaling.png").symlink_to(mine)
    assert main(["--out", str(figures)]) == 2
    assert "rank_scaling.png is a symbolic link" in capsys.readouterr().err
    assert sorted(p.name for p in figures.iterdir()) == ["rank_scaling.png"] and mine.read_bytes() == b"my own picture"
