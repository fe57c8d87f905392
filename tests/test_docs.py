"""Tests for the pictures: docs/figures.py (README's figures) runs and its data say what the README says.
(pictures.plot_loss, which draws a run's loss.csv: tests/test_pictures.py)"""
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "docs"))
import figures  # noqa: E402


def test_figures_script_writes_three_small_pngs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # in-process (the script's main), from another folder than the repository
    figures.main(["--out", str(tmp_path), "--rank-size", "128"])
    for name in ("basis.png", "domains.png", "rank.png"):
        path = tmp_path / name
        assert 2_000 < path.stat().st_size < 200_000, name
        with Image.open(path) as image:
            assert image.format == "PNG" and 300 <= image.width <= 1400 and 200 <= image.height <= 900, name
            image.verify()


HAAR = {"cA": [[1, 1], [1, 1]], "cH": [[1, 1], [-1, -1]], "cV": [[1, -1], [1, -1]], "cD": [[1, -1], [-1, 1]]}


@pytest.mark.parametrize("quarter", figures.QUARTERS)
def test_haar_coefficient_paints_one_signed_2x2_block(quarter):
    """README's worked example: a Haar coefficient in cA/cH/cV/cD paints +-1/2 in a 2 x 2 block of dW, with the
    signs of a constant, a top-minus-bottom, a left-minus-right and a checkerboard pattern."""
    delta = figures.basis_delta("db1", quarter, n=16)
    rows, cols = delta.nonzero(as_tuple=True)
    assert len(rows) == 4
    block = delta[rows.min():rows.min() + 2, cols.min():cols.min() + 2]
    assert torch.allclose(block, 0.5 * torch.tensor(HAAR[quarter], dtype=delta.dtype), rtol=0, atol=1e-12)
    assert rows.min() % 2 == 0 and cols.min() % 2 == 0  # blocks tile dW: one coefficient, one 2 x 2 cell


@pytest.mark.parametrize("wavelet", ["db1", "db2", "db4"])
def test_every_basis_image_has_unit_energy_and_the_right_sum(wavelet):
    """Orthonormal wavelets: one coefficient 1 paints a patch of Frobenius norm 1 (none of it cropped on 16 x 16);
    the approximation patch sums to 2 (the low-pass filter sums to sqrt 2 each way), a detail patch to 0."""
    for quarter in figures.QUARTERS:
        delta = figures.basis_delta(wavelet, quarter, n=16)
        assert delta.norm().item() == pytest.approx(1.0, abs=1e-12), quarter
        assert delta.sum().item() == pytest.approx(2.0 if quarter == "cA" else 0.0, abs=1e-12), quarter
        assert (delta != 0).sum() == len(figures.dwt.wavelet_filters(wavelet)[2]) ** 2, quarter


def test_one_coefficient_acts_on_a_point_a_patch_or_all_of_w():
    """basis.png's lower row: one coefficient 1 at (1, 2) is one entry of W without the IDWT, a Haar 2 x 2 block of
    +-1/2 with it (cA: rows 2-3, columns 4-5), and for FourierFT the wave cos(2 pi (r + 2 c) / n) / n^2 on all of W."""
    point, patch, wave = figures.where_one_coefficient_acts(n=16, position=(1, 2)).values()
    assert (point != 0).sum() == 1 and point[1, 2] == 1
    assert (patch != 0).sum() == 4 and torch.allclose(patch[2:4, 4:6], torch.full((2, 2), 0.5, dtype=patch.dtype),
                                                             rtol=0, atol=1e-12)
    r, c = torch.meshgrid(*[torch.arange(16, dtype=torch.float64)] * 2, indexing="ij")
    assert torch.allclose(wave, torch.cos(2 * math.pi * (r + 2 * c) / 16) / 256, rtol=0, atol=1e-15)
    assert (wave.abs() > 1e-12).any(0).all() and (wave.abs() > 1e-12).any(1).all()  # every row and column


def test_domains_share_positions_and_values():
    """Same positions and values: without the IDWT dW holds the k values themselves; Haar's IDWT is orthonormal,
    so the WaveFT dW has the same energy, spread over 2 x 2 blocks."""
    deltas = figures.domain_deltas(n=64, k=128, seed=0)
    plain, haar = deltas["no IDWT (use_idwt=False)"], deltas["WaveFT, db1"]
    values = torch.randn(128, generator=torch.Generator().manual_seed(0))
    assert (plain != 0).sum() == 128
    assert torch.equal(plain[plain != 0].sort().values, values.sort().values)
    assert haar.norm().item() == pytest.approx(plain.norm().item(), rel=1e-5)


def test_trained_panel_from_an_adapter_file_is_that_layers_delta_weight(tmp_path):
    import torch.nn as nn
    import waveft
    model = nn.Sequential(nn.Linear(96, 80))
    waveft.inject(model, k=300, target_modules=["0"], wavelet="db2", seed=5)
    with torch.no_grad():
        model[0].waveft_spectrum.normal_()
    waveft.save(model, tmp_path / "adapter.safetensors")
    delta, caption = figures.trained_delta(tmp_path / "adapter.safetensors")
    assert torch.allclose(delta, model[0].delta_weight()[:64, :64]) and caption.startswith("trained: 0")
    waveft.remove(model)
    waveft.inject(model, method="lora", target_modules=["0"])
    waveft.save(model, tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match="lora adapter"):
        figures.trained_delta(tmp_path / "lora.safetensors")


def test_rank_at_equal_budget_and_one_step_fit():
    spectra = figures.rank_spectra(n=128, k=512)
    ranks = {label.split(",")[0].split(" (")[0] + (" random" if "random" in label else ""): figures.numerical_rank(s)
             for label, s in spectra.items()}
    assert ranks["LoRA r=1"] == 1
    assert ranks["WaveFT k=512"] > 64 and ranks["WaveFT k=512 random"] > 64  # nearly full rank with 512 values
    assert ranks["weight domain k=512 random"] > 64  # about as high: k entries, ~4 per row of 128
    assert ranks["FourierFT k=512 random"] > max(ranks["WaveFT k=512 random"], ranks["weight domain k=512 random"])
    # the claim in rank_spectra: with Haar and distinct positions one gradient step of size 1 reaches the optimum
    target = torch.randn(128, 128, generator=torch.Generator().manual_seed(1))
    layer = figures.fit(figures.one_layer(128, 128, torch.float64, k=512, scaling=1.0), target.double(), 1, 1.0,
                        adam=False)
    layer.waveft_spectrum.grad = None
    (0.5 * (layer.delta_weight() - target.double()).pow(2).sum()).backward()
    assert layer.waveft_spectrum.grad.abs().max() < 1e-12


def test_singular_values_match_svd():
    m = torch.randn(40, 40, generator=torch.Generator().manual_seed(0)) @ torch.diag(torch.logspace(0, -3, 40))
    assert torch.allclose(figures.singular_values(m), torch.linalg.svdvals(m.double()), atol=1e-7)
