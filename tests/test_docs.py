"""The README and docs/ stay true: the figures CI can compute match the text, every link leads somewhere,
and nothing narrates the code's history (no commit hashes: git keeps those)."""

import re
from pathlib import Path

import pytest

from lora import count_parameters, inject_lora
from support.architectures import flan_t5_architecture

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
SIZE_ROW = re.compile(r"^\| flan-t5-(\w+) \| (\d+) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+)% \|$", re.M)


def test_the_parameter_table_is_what_count_parameters_gives():
    rows = SIZE_ROW.findall((ROOT / "docs" / "training.md").read_text(encoding="utf-8"))
    assert [row[0] for row in rows] == ["small", "base", "large", "xl", "xxl"]
    for size, layers, trainable, total, share in rows:
        model = flan_t5_architecture(size, device="meta")
        base_total = count_parameters(model)[1]
        adapted = inject_lora(model, ("q", "v"), r=16, alpha=32)
        counted = count_parameters(model)[0]
        assert (len(adapted), counted, base_total) == (int(layers), int(trainable.replace(",", "")),
                                                       int(total.replace(",", ""))), size  # fmt: skip
        assert f"{counted / base_total:.2%}" == f"{share}%", size
    assert "1,769,472" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_image_exists(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_page_names_a_commit(page):
    hashes = re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", page.read_text(encoding="utf-8"))
    assert hashes == [], f"{page.name} names commits {hashes}: say what was measured, where, with which command"


def test_the_readmes_own_lora_layer_passes_the_kit(tmp_path):
    from lora.testing import check_lora_layer, load_factory

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Test your own LoRA layer") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "my_lora.py").write_text(code)
    report = check_lora_layer(load_factory(f"{tmp_path / 'my_lora.py'}:MyLoRA"))
    assert report.passed, str(report)
