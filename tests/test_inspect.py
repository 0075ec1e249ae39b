"""lora.inspect on constructed adapters whose answers are known, and its command line."""

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapter, saved_random_adapter, toy_t5

from lora import inject_lora, lora_layers, save_adapter
from lora.inspect import amplification, energy_rank, entropy_effective_rank, inspect_adapter, main, subspace_similarity


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[
        0
    ]


def test_an_update_of_exact_rank_k_has_k_singular_values_and_effective_rank_k(tmp_path):
    """r = 8, but B A = U_3 V_3ᵀ: three equal singular values, the other five zero."""
    model = toy_t5()
    inject_lora(model, ("q",), r=8, alpha=8)  # scaling 1
    with torch.no_grad():
        for i, layer in enumerate(lora_layers(model).values()):
            v = orthonormal(32, 3, seed=i).T  # (3, in)
            u = orthonormal(32, 3, seed=100 + i)  # (out, 3)
            layer.lora_A.zero_()
            layer.lora_B.zero_()
            layer.lora_A[:3] = v.float()
            layer.lora_B[:, :3] = u.float()
    save_adapter(model, tmp_path)
    report = inspect_adapter(tmp_path)
    assert len(report["modules"]) == 6
    for row in report["modules"]:
        sigma = torch.tensor(row["singular_values"])
        assert len(sigma) == 8 and int((sigma > 1e-6).sum()) == 3
        torch.testing.assert_close(sigma[:3], torch.ones(3, dtype=sigma.dtype), rtol=1e-5, atol=1e-5)
        assert row["energy_rank"] == 3 and row["entropy_rank"] == pytest.approx(3.0, rel=1e-4)
        assert row["delta_norm"] == pytest.approx(3**0.5, rel=1e-5)


def test_effective_ranks_on_hand_made_spectra():
    assert energy_rank(torch.tensor([3.0, 1.0, 0.0])) == 1  # 9 of 10 units of energy in the first
    assert energy_rank(torch.tensor([3.0, 1.0, 1.0])) == 2  # 9 + 1 of 11 units
    assert entropy_effective_rank(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert entropy_effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == pytest.approx(4.0)
    assert energy_rank(torch.zeros(4)) == 0 and entropy_effective_rank(torch.zeros(4)) == 0.0


def test_subspace_similarity_of_an_adapter_with_itself_and_with_a_random_one():
    a = torch.randn(8, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    itself = subspace_similarity(a, a)
    torch.testing.assert_close(torch.diagonal(itself), torch.ones(8, dtype=itself.dtype))
    # Two independent random subspaces of dimension i and j in R^d: E‖V_iᵀ V_j‖_F² = i·j/d, so E φ = max(i, j)/d.
    d, trials = 512, 40
    mean = (
        sum(
            subspace_similarity(
                a, torch.randn(8, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            )
            for seed in range(1, trials + 1)
        )
        / trials
    )
    expected = torch.maximum(torch.arange(1, 9)[:, None], torch.arange(1, 9)[None, :]).double() / d
    torch.testing.assert_close(mean, expected, rtol=0.25, atol=0)


def test_an_update_in_w0s_top_directions_is_amplified_less_than_one_in_random_directions():
    """Section 7.3: ΔW amplifies directions W0 does not emphasise; one inside W0's top directions is not."""
    u0, v0 = orthonormal(64, 48, 1), orthonormal(48, 48, 2)
    w0 = u0 @ torch.diag(torch.logspace(1, -2, 48, dtype=torch.float64)) @ v0.T  # (64, 48), decaying spectrum
    r = 4
    inside = u0[:, :r] @ v0[:, :r].T * 0.1
    random = orthonormal(64, r, 3) @ orthonormal(48, r, 4).T * 0.1
    amp_inside, _ = amplification(inside, w0, r)
    amp_random, amp_random_directions = amplification(random, w0, r)
    assert amp_inside < 0.1 < amp_random  # W0 is large along its top directions, small elsewhere
    assert amp_random_directions > 0  # the baseline is computed too


def test_the_command_line_on_a_peft_adapter_with_base_and_compare(tmp_path, capsys):
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    for seed, name in ((1, "one"), (2, "two")):
        model = peft.get_peft_model(toy_t5(), config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_" in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        model.save_pretrained(tmp_path / name)
    base = toy_t5()
    base.save_pretrained(tmp_path / "base")
    argv = [str(tmp_path / "one"), "--base", str(tmp_path / "base"), "--compare", str(tmp_path / "two")]
    assert main([*argv, "--json", "--out", str(tmp_path / "figures")]) == 0
    report = json.loads(capsys.readouterr().out)
    row = report["modules"][0]
    assert {"relative_norm", "amplification", "amplification_random", "phi", "energy_rank"} <= row.keys()
    assert len(report["modules"]) == 12 and len(row["phi"]) == 4
    for name in ("delta_norms.png", "spectra.png", "subspace_similarity.png"):
        assert (tmp_path / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    assert main([str(tmp_path / "one")]) == 0
    assert capsys.readouterr().out.startswith("| module | ‖dW‖_F | σ_1 | energy rank (90%) | entropy rank |")


def test_errors_are_one_sentence(tmp_path, capsys):
    saved_random_adapter(tmp_path / "qv")
    other = toy_t5()
    inject_lora(other, ("q",), r=4, alpha=8)
    save_adapter(other, tmp_path / "q")
    wide = toy_t5(d_model=48)
    wide.save_pretrained(tmp_path / "wide")
    zero = toy_t5()
    inject_lora(zero, ("q", "v"), r=4, alpha=8)  # B = 0, as at initialisation
    save_adapter(zero, tmp_path / "zero")
    dora = toy_t5()
    inject_lora(dora, ("q", "v"), r=4, alpha=8, use_dora=True)
    save_adapter(dora, tmp_path / "dora")
    capsys.readouterr()
    for argv, status, message in [  # 2: refused before any work; 1: met while loading or analysing
        ([str(tmp_path)], 2, "adapter_config.json is missing"),
        ([str(tmp_path / "qv"), "--compare", str(tmp_path)], 2, "adapter_config.json is missing"),
        ([str(tmp_path / "qv"), "--phi-module", "q"], 2, "needs --compare OTHER_DIR"),
        ([str(tmp_path / "qv"), "--compare", str(tmp_path / "q")], 1, "adapt different modules"),
        ([str(tmp_path / "qv"), "--base", str(tmp_path / "wide")], 1, "but the adapter's update is"),
        ([str(tmp_path / "qv"), "--compare", str(tmp_path / "qv"), "--phi-module", "nosuch.module"], 1, "not a module"),
        ([str(tmp_path / "qv"), "--compare", str(tmp_path / "zero")], 1, "is zero (B = 0: untrained?)"),
        ([str(tmp_path / "dora")], 1, "is a DoRA adapter, whose update"),
        ([str(tmp_path / "qv"), "--base", str(tmp_path / "nosuch")], 2, "does not exist"),
    ]:
        assert main(argv) == status, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_dora_adapter_s_update_is_its_merged_weight_minus_the_base(tmp_path, capsys):
    """‖s·B A‖ is not DoRA's update: it rescales W0's rows too. The report's norm is ‖W_merged − W0‖."""
    from lora import DoRALinear, lora_layers, merged_state_dict

    model = toy_t5()
    inject_lora(model, ("k",), r=4, alpha=8, use_dora=True)
    randomize_adapter(model, scale=0.5)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            assert isinstance(layer, DoRALinear)
            layer.lora_magnitude.mul_(torch.linspace(0.5, 1.5, layer.lora_magnitude.numel()))
    save_adapter(model, tmp_path / "dora")
    base = toy_t5()
    base.save_pretrained(tmp_path / "base")
    assert main([str(tmp_path / "dora"), "--base", str(tmp_path / "base"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    merged, w0 = merged_state_dict(model), base.state_dict()
    for row in report["modules"]:
        key = f"{row['module']}.weight"
        expected = torch.linalg.matrix_norm(merged[key].double() - w0[key].double()).item()
        assert row["delta_norm"] == pytest.approx(expected, rel=1e-5)
        a, b = (lora_layers(model)[row["module"]].lora_A, lora_layers(model)[row["module"]].lora_B)
        assert abs(row["delta_norm"] - torch.linalg.matrix_norm(2 * b @ a).item()) > 1e-3  # not s·B A's


def test_a_figure_that_is_a_symbolic_link_is_refused_before_any_work(tmp_path, capsys):
    """--out holding spectra.png -> a file elsewhere: refused in one sentence; the link and the file it
    points to stay as they were, and no figure is written."""
    saved_random_adapter(tmp_path / "qv")
    figures, elsewhere = tmp_path / "figures", tmp_path / "mine.png"
    figures.mkdir()
    elsewhere.write_bytes(b"my own picture")
    (figures / "spectra.png").symlink_to(elsewhere)
    assert main([str(tmp_path / "qv"), "--out", str(figures)]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"error: {figures / 'spectra.png'} is a symbolic link (to {elsewhere}); lora.inspect never "
        "writes in a link's place: remove it, or pass another --out.\n"
    )
    assert (figures / "spectra.png").is_symlink() and elsewhere.read_bytes() == b"my own picture"
    assert sorted(p.name for p in figures.iterdir()) == ["spectra.png"]


def test_figures_that_cannot_be_written_are_one_sentence_and_keep_the_previous_ones(tmp_path, capsys, monkeypatch):
    import errno

    from matplotlib.figure import Figure

    saved_random_adapter(tmp_path / "qv")
    figures = tmp_path / "figures"
    assert main([str(tmp_path / "qv"), "--out", str(figures)]) == 0
    before = {p.name: p.read_bytes() for p in figures.iterdir()}

    def fill_the_disk(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Figure, "savefig", fill_the_disk)
    capsys.readouterr()
    assert main([str(tmp_path / "qv"), "--out", str(figures)]) == 1
    err = capsys.readouterr().err
    assert f"could not write the figures in {figures} (No space left on device)" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in figures.iterdir()} == before  # no half figure, no temporary file
    (tmp_path / "a_file").write_text("")
    assert main([str(tmp_path / "qv"), "--out", str(tmp_path / "a_file" / "figures")]) == 1
    assert "could not write the figures" in capsys.readouterr().err
