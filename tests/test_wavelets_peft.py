"""Symlets and coiflets in WaveFT equal PEFT's WaveFT (issue 10 D): waveft.inject(wavelet="sym4"/"coif2") gives the
delta_weight of PEFT's get_delta_weight with the same spectrum, on even, odd and rectangular layers.

waveft pads dW by R = filter length - 2 rows and columns before the inverse transform (one more on an odd side, see
waveft._padded); PEFT's WAVELET_REDUCTIONS is (2N - 2, 2N - 2) for symN and (6N - 2, 6N - 2) for coifN, the same R
(checked below for every wavelet we share)."""
import pytest
import torch
import torch.nn as nn

import dwt
import waveft
from conftest import need  # every test here compares with peft (the `peft` fixture, conftest.need)


def test_peft_reductions_are_filter_length_minus_two(peft):
    from peft.tuners.waveft.constants import WAVELET_REDUCTIONS
    shared = [w for w in dwt.WAVELETS if w in WAVELET_REDUCTIONS]
    assert {w for w in dwt.WAVELETS if w.startswith(("sym", "coif"))} <= set(shared)
    for wavelet in shared:
        R = len(dwt.wavelet_filters(wavelet)[0]) - 2
        assert WAVELET_REDUCTIONS[wavelet] == (R, R), wavelet


def delta_weights(wavelet, shape):
    """(ours, PEFT's) dW for one layer after waveft.inject and PEFT's WaveFTConfig, with PEFT's random spectrum."""
    peft = need("peft")
    k = min(20, shape[0] * shape[1])
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(shape[1], shape[0]).double())
    theirs = nn.Sequential(nn.Linear(shape[1], shape[0]).double())
    (spectrum,) = waveft.inject(ours, k=k, wavelet=wavelet, target_modules=["0"])
    config = peft.WaveFTConfig(n_frequency=k, wavelet_family=wavelet, target_modules=["0"], init_weights=False)
    peft_layer = peft.inject_adapter_in_model(config, theirs)[0]
    ((_, layer),) = waveft.adapted_layers(ours)
    with torch.no_grad():
        spectrum.copy_(peft_layer.waveft_spectrum["default"])  # init_weights=False: random, nonzero
        return layer.delta_weight(), peft_layer.get_delta_weight("default")


def assert_equal_to_peft(wavelet, shape):
    ours, expected = delta_weights(wavelet, shape)
    assert expected.abs().max() > 0
    # 1e-10: PEFT's symlet tables, like PyWavelets', hold about 12 digits (sym3: 1e-11 apart); ours are exact
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())


@pytest.mark.parametrize("wavelet", ["sym4", "coif2"])
@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (12, 5)])
def test_delta_weight_equals_peft(wavelet, shape):
    assert_equal_to_peft(wavelet, shape)


@pytest.mark.parametrize("wavelet", ["sym2", "sym3", "sym5", "sym6", "sym7", "sym8", "sym9", "sym10", "coif1", "coif3"])
def test_delta_weight_equals_peft_other_wavelets(wavelet):
    assert_equal_to_peft(wavelet, (7, 9))


def test_peft_coif4_coif5_tables_are_not_coiflets(peft):
    """Why coif4 and coif5 are missing above: PEFT's built-in tables for them (peft 0.21) are not orthonormal
    (coif5 even has 48 taps instead of 30), so its dW differs from the true coiflet's, which we compute (equal to
    PyWavelets, test_dwt.py). If this test fails, PEFT fixed them: add coif4 and coif5 to the test above."""
    from peft.tuners.waveft.wavelet import Wavelet
    for wavelet in ("coif4", "coif5"):
        h = torch.tensor(Wavelet(wavelet).rec_lo, dtype=torch.float64)
        ours = dwt.wavelet_filters(wavelet)[2]
        assert len(h) != len(ours) or (h - ours).abs().max() > 1e-3, wavelet
        assert abs(h @ h - 1) > 1e-3, wavelet  # a coiflet has unit norm
