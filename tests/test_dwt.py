"""Tests for dwt.py: filters, coefficients and reconstructions against PyWavelets for every wavelet x mode x
level, perfect reconstruction, gradcheck, orthonormality, half-precision inputs, PyWavelets' edge-case behaviour
and error messages."""
import warnings

import numpy as np
import pytest
import torch

import dwt
from conftest import need  # PyWavelets is the reference: tests that use it take the `pywt` fixture (conftest.need)

SHAPES_2D = [(7, 5), (31, 31), (64, 40)]
# Symlets and coiflets share every code path with db (only the filters differ), so to keep the suite quick they
# are checked on one 2-D shape, at levels 1 and max, in float64 (the float32 path is the same code).
NEW_WAVELETS = [w for w in dwt.WAVELETS if w.startswith(("sym", "coif"))]
SHAPES_2D_NEW = [(36, 33)]  # odd and even; multi-level for the shorter filters (all levels in 1-D)


def levels_and_dtypes(length, wavelet):
    top = max_level(length, wavelet)
    if wavelet in NEW_WAVELETS:
        return sorted({1, top} if top else set()), (torch.float64,)
    return range(1, top + 1), (torch.float64, torch.float32)
LENGTH_1D = 2048
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: see conftest.single_thread


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def assert_matches(ours, reference, dtype, what):
    """ours: tensor (or nested tuples/lists of them) in `dtype`; reference: PyWavelets' float64 result."""
    if isinstance(reference, (list, tuple)):
        assert len(ours) == len(reference), f"{what}: {len(ours)} parts vs PyWavelets' {len(reference)}"
        for i, (o, r) in enumerate(zip(ours, reference)):
            assert_matches(o, r, dtype, f"{what}[{i}]")
        return
    assert ours.dtype == dtype, f"{what}: dtype {ours.dtype}, expected {dtype}"
    expected = torch.from_numpy(reference)
    assert ours.shape == expected.shape, f"{what}: shape {tuple(ours.shape)} vs PyWavelets' {expected.shape}"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(ours.double(), expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def max_level(length, wavelet):
    pywt = need("pywt")
    return pywt.dwt_max_level(length, pywt.Wavelet(wavelet).dec_len)


# PyWavelets' tables for these symlets hold only about 12 digits (its sym3 misses orthonormality by 5e-12, see
# test_filters_are_exact); ours are exact to float64, so they differ from the table by up to 3.6e-12.
TABLE_TOLERANCE = {"sym3": 5e-12, "sym5": 2e-12, "sym6": 2e-12, "sym7": 2e-12}


@pytest.mark.parametrize("wavelet", dwt.WAVELETS)
def test_filters_match_pywavelets(wavelet, pywt):
    ours = dwt.wavelet_filters(wavelet)
    for name, f, ref in zip(("dec_lo", "dec_hi", "rec_lo", "rec_hi"), ours, pywt.Wavelet(wavelet).filter_bank):
        assert f.dtype == torch.float64 and f.shape == (len(ref),), name
        error = (f - torch.tensor(ref, dtype=torch.float64)).abs().max()
        assert error < TABLE_TOLERANCE.get(wavelet, 1e-12), f"{wavelet} {name}: {error:.1e}"


def design_errors(rec_lo, wavelet):
    """Largest violation of the conditions that define the filter: orthonormality sum_n h[n] h[n + 2k] = delta_k,
    sum sqrt(2), the wavelet's vanishing moments and, for coiflets, the scaling function's moments about 2N."""
    h = torch.as_tensor(rec_lo, dtype=torch.float64)
    L, order = len(h), (1 if wavelet == "haar" else int(wavelet.lstrip("dbsymcoif")))
    n = torch.arange(L, dtype=torch.float64)
    orthonormality = max(abs(float(h[2 * k:] @ h[:L - 2 * k]) - (k == 0)) for k in range(L // 2))
    vanishing = 2 * order if wavelet.startswith("coif") else order
    moments = [float(((-1) ** n * (n / L) ** m) @ h) for m in range(vanishing)]
    if wavelet.startswith("coif"):
        moments += [float(((n - 2 * order) / L) ** m @ h) for m in range(1, 2 * order)]
    return max(orthonormality, abs(float(h.sum()) - 2 ** 0.5), *map(abs, moments))


@pytest.mark.parametrize("wavelet", dwt.WAVELETS)
def test_filters_are_exact(wavelet):
    assert design_errors(dwt.wavelet_filters(wavelet)[2], wavelet) < 3e-14  # db10, sym10: 1e-14 (root finding)


def test_pywavelets_symlet_tables_are_less_exact(pywt):
    """Why TABLE_TOLERANCE exists: the table misses its own defining conditions by more than we differ from it."""
    assert design_errors(pywt.Wavelet("sym3").rec_lo, "sym3") > 3e-12


def test_filters_are_cached_per_dtype_and_device():
    assert dwt.wavelet_filters("db3", torch.float32) is dwt.wavelet_filters("db3", torch.float32, "cpu")
    assert dwt.wavelet_filters("coif5") is dwt.wavelet_filters("coif5")
    assert dwt.wavelet_filters("db3", torch.float32)[0].dtype == torch.float32
    assert dwt.wavelet_filters("db3")[0].dtype == torch.float64


@pytest.mark.parametrize("mode", dwt.MODES)
@pytest.mark.parametrize("wavelet", dwt.WAVELETS)
def test_2d_matches_pywavelets(wavelet, mode, pywt):
    """dwt2/idwt2 on every shape, and wavedec2/waverec2 for every level 1..max, in float64 and float32 (fewer for
    NEW_WAVELETS)."""
    generator = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyWavelets warns about boundary effects at high levels
        for shape in SHAPES_2D_NEW if wavelet in NEW_WAVELETS else SHAPES_2D:
            x64 = torch.randn(2, *shape, generator=generator, dtype=torch.float64)
            ref_single = pywt.dwt2(x64.numpy(), wavelet, mode)
            ref_inverse = pywt.idwt2(ref_single, wavelet, mode)
            levels, dtypes = levels_and_dtypes(min(shape), wavelet)
            refs = {lev: pywt.wavedec2(x64.numpy(), wavelet, mode, lev) for lev in levels}
            for dtype in dtypes:
                x = x64.to(dtype)
                what = f"{wavelet} {mode} {shape} {dtype}"
                single = dwt.dwt2(x, wavelet, mode)
                assert_matches(single, ref_single, dtype, f"dwt2 {what}")
                assert_matches(dwt.idwt2(single, wavelet, mode), ref_inverse, dtype, f"idwt2 {what}")
                for lev, ref in refs.items():
                    coeffs = dwt.wavedec2(x, wavelet, mode, lev)
                    assert_matches(coeffs, ref, dtype, f"wavedec2 level {lev} {what}")
                    reconstruction = pywt.waverec2(ref, wavelet, mode)
                    assert_matches(dwt.waverec2(coeffs, wavelet, mode), reconstruction, dtype, f"waverec2 {lev} {what}")
            assert len(dwt.wavedec2(x64, wavelet, mode)) == max_level(min(shape), wavelet) + 1  # level=None


@pytest.mark.parametrize("mode", dwt.MODES)
@pytest.mark.parametrize("wavelet", dwt.WAVELETS)
def test_1d_matches_pywavelets(wavelet, mode, pywt):
    """wavedec/waverec of a length-2048 signal for every level, and dwt/idwt along a middle dimension."""
    generator = torch.Generator().manual_seed(1)
    x64 = torch.randn(LENGTH_1D, generator=generator, dtype=torch.float64)
    cube64 = torch.randn(3, 11, 4, generator=generator, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        levels, dtypes = levels_and_dtypes(LENGTH_1D, wavelet)
        refs = {lev: pywt.wavedec(x64.numpy(), wavelet, mode, lev) for lev in levels}
        ref_axis = pywt.dwt(cube64.numpy(), wavelet, mode, axis=1)
        ref_axis_inverse = pywt.idwt(*ref_axis, wavelet, mode, axis=1)
    for dtype in dtypes:
        for lev, ref in refs.items():
            coeffs = dwt.wavedec(x64.to(dtype), wavelet, mode, lev)
            assert_matches(coeffs, ref, dtype, f"wavedec {wavelet} {mode} level {lev}")
            assert_matches(dwt.waverec(coeffs, wavelet, mode), pywt.waverec(ref, wavelet, mode), dtype, "waverec")
        along_axis = dwt.dwt(cube64.to(dtype), wavelet, mode, dim=1)
        assert_matches(along_axis, ref_axis, dtype, f"dwt dim=1 {wavelet} {mode}")
        assert_matches(dwt.idwt(*along_axis, wavelet, mode, dim=1), ref_axis_inverse, dtype, "idwt dim=1")


@pytest.mark.parametrize("mode", dwt.MODES)
@pytest.mark.parametrize("wavelet", ["haar", "db2", "db5", "db10", "sym7", "coif3"])
def test_perfect_reconstruction(wavelet, mode):
    """waverec2(wavedec2(x)) == x, cropped where PyWavelets also returns one extra row/column (odd sizes)."""
    for shape in SHAPES_2D + [(2, 3, 64, 64)]:
        x = torch.randn(*shape, dtype=torch.float64)
        top = max_level(min(shape[-2:]), wavelet)
        for level in sorted({1, top} if top else set()):
            y = dwt.waverec2(dwt.wavedec2(x, wavelet, mode, level), wavelet, mode)
            assert y.shape[:-2] == x.shape[:-2] and all(0 <= a - b <= 1 for a, b in zip(y.shape[-2:], x.shape[-2:]))
            torch.testing.assert_close(y[..., : shape[-2], : shape[-1]], x, rtol=1e-10, atol=1e-10)
    x = torch.randn(5, 301, dtype=torch.float64)
    y = dwt.waverec(dwt.wavedec(x, wavelet, mode), wavelet, mode)
    torch.testing.assert_close(y[..., :301], x, rtol=1e-10, atol=1e-10)


def test_batch_dimensions_pass_through():
    x = torch.randn(2, 3, 31, 20, dtype=torch.float64)
    coeffs = dwt.wavedec2(x, "db3", "symmetric", 2)
    for i in range(2):
        for j in range(3):
            single = dwt.wavedec2(x[i, j], "db3", "symmetric", 2)
            torch.testing.assert_close(coeffs[0][i, j], single[0])
            torch.testing.assert_close(coeffs[1][2][i, j], single[1][2])


@pytest.mark.parametrize("wavelet, mode", [("haar", "zero"), ("db2", "symmetric"), ("db3", "periodization"),
                                           ("db2", "reflect"), ("sym2", "periodic"), ("coif1", "symmetric")])
def test_gradcheck(wavelet, mode):
    x = torch.randn(2, 8, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: torch.cat([c.flatten() for c in flat(dwt.dwt2(x, wavelet, mode))]), (x,))
    bands = [torch.randn(6, 5, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda a, h, v, d: dwt.idwt2((a, (h, v, d)), wavelet, mode), tuple(bands))


def flat(coeffs):
    return [coeffs[0]] + [band for bands in coeffs[1:] for band in bands]


@pytest.mark.parametrize("wavelet", ["haar", "db4", "sym5", "coif2"])
def test_periodization_is_orthonormal(wavelet):
    """With periodization on sizes divisible by 2^level the transform is orthonormal: energy is preserved."""
    x = torch.randn(3, 64, 128, dtype=torch.float64)
    coeffs = dwt.wavedec2(x, wavelet, "periodization", level={"haar": None, "db4": 3}.get(wavelet, 2))
    energy = sum(c.square().sum() for c in flat(coeffs))
    assert sum(c.numel() for c in flat(coeffs)) == x.numel()
    torch.testing.assert_close(energy, x.square().sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_inputs(dtype, tol):
    x = torch.randn(2, 64, 40)
    for wavelet, mode in [("haar", "symmetric"), ("db4", "periodization"), ("db3", "zero")]:
        coeffs = dwt.wavedec2(x.to(dtype), wavelet, mode)
        reference = dwt.wavedec2(x.to(dtype).double(), wavelet, mode)
        for ours, ref in zip(flat(coeffs), flat(reference)):
            assert ours.dtype == dtype
            assert (ours.double() - ref).abs().max() <= tol * ref.abs().max()
        y = dwt.waverec2(coeffs, wavelet, mode)
        assert y.dtype == dtype and (y.double()[..., :64, :40] - x).abs().max() <= 4 * tol * x.abs().max()


@pytest.mark.parametrize("wavelet", dwt.WAVELETS)
def test_idwt2_of_quarter_blocks_is_pywavelets_waverec2(wavelet, pywt):
    """The WaveFT use: four equal (n, m) quarters -> (2n - L + 2, 2m - L + 2), as pywt.waverec2 'symmetric'."""
    n, m, L = 24, 40, pywt.Wavelet(wavelet).dec_len
    spectrum = torch.zeros(2 * n, 2 * m, dtype=torch.float64)
    spectrum.view(-1)[torch.randperm(4 * n * m)[:50]] = torch.randn(50, dtype=torch.float64)
    cA, cH, cV, cD = spectrum[:n, :m], spectrum[n:, :m], spectrum[:n, m:], spectrum[n:, m:]
    ours = dwt.idwt2((cA, (cH, cV, cD)), wavelet, mode="symmetric")
    assert ours.shape == (2 * n - L + 2, 2 * m - L + 2)
    reference = pywt.waverec2([cA.numpy(), (cH.numpy(), cV.numpy(), cD.numpy())], wavelet, mode="symmetric")
    assert_matches(ours, reference, torch.float64, f"idwt2 quarters {wavelet}")


def test_level_above_maximum_warns_and_computes_like_pywavelets(pywt):
    """PyWavelets warns ("all coefficients will experience boundary effects") and computes; so do we."""
    x = torch.randn(2, 20, dtype=torch.float64)  # db2: maximum level 2
    image = torch.randn(20, 17, dtype=torch.float64)  # db2: maximum level 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = pywt.wavedec(x.numpy(), "db2", level=5)
        reference2 = pywt.wavedec2(image.numpy(), "db2", level=4)
    with pytest.warns(UserWarning, match="all coefficients will experience boundary effects"):
        coeffs = dwt.wavedec(x, "db2", level=5)
    assert_matches(coeffs, reference, torch.float64, "wavedec level 5")
    assert_matches(dwt.waverec(coeffs, "db2"), pywt.waverec(reference, "db2"), torch.float64, "waverec level 5")
    with pytest.warns(UserWarning, match="level 4 is above the maximum 2 .*boundary effects"):
        coeffs2 = dwt.wavedec2(image, "db2", level=4)
    assert_matches(coeffs2, reference2, torch.float64, "wavedec2 level 4")
    assert_matches(dwt.waverec2(coeffs2, "db2"), pywt.waverec2(reference2, "db2"), torch.float64, "waverec2 level 4")


def test_numpy_integer_levels(pywt):
    x = torch.randn(3, 64, 40, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the maximum: no warning
        for level in (np.int64(2), np.int32(3), np.uint8(1)):
            assert_matches(dwt.wavedec2(x, "db2", level=level), pywt.wavedec2(x.numpy(), "db2", level=level),
                           torch.float64, f"wavedec2 level {level!r}")
            assert_matches(dwt.wavedec(x, "sym3", level=level, dim=1),
                           pywt.wavedec(x.numpy(), "sym3", level=level, axis=1), torch.float64, "wavedec")


def test_empty_batch_dimensions_like_pywavelets(pywt):
    """Leading (batch) dimensions of size 0 give empty coefficients of PyWavelets' shapes; the transformed ones
    must still be >= 1 (see BAD_INPUTS)."""
    x = torch.empty(0, 3, 16, 10, dtype=torch.float64)
    for mode in ("symmetric", "periodization"):
        cA, cD = dwt.dwt(x, "db2", mode, dim=2)
        ref = pywt.dwt(x.numpy(), "db2", mode, axis=2)
        assert_matches((cA, cD), ref, torch.float64, f"dwt {mode}")
        assert_matches(dwt.idwt(cA, cD, "db2", mode, dim=2), pywt.idwt(*ref, "db2", mode, axis=2), torch.float64,
                       "idwt")
        bands = dwt.dwt2(x, "coif1", mode)
        ref2 = pywt.dwt2(x.numpy(), "coif1", mode)
        assert_matches(bands, ref2, torch.float64, f"dwt2 {mode}")
        assert_matches(dwt.idwt2(bands, "coif1", mode), pywt.idwt2(ref2, "coif1", mode), torch.float64, "idwt2")
        for dtype in (torch.float32, torch.float16):
            assert dwt.idwt2(dwt.dwt2(x.to(dtype), "db1", mode), "db1", mode).shape == (0, 3, 16, 10)
    coeffs = dwt.wavedec2(x, "db1", level=2)
    assert_matches(coeffs, pywt.wavedec2(x.numpy(), "db1", level=2), torch.float64, "wavedec2")
    assert dwt.waverec2(coeffs, "db1").shape == (0, 3, 16, 10)
    coeffs = dwt.wavedec(x, "db1", level=2)
    assert_matches(coeffs, pywt.wavedec(x.numpy(), "db1", level=2), torch.float64, "wavedec")
    assert dwt.waverec(coeffs, "db1").shape == (0, 3, 16, 10)


X2 = torch.randn(64, 40)
BAD_INPUTS = [  # (call, the bad value, the allowed values) that must both appear in the message
    (lambda: dwt.dwt2(X2, "db42"), "'db42'", "haar, db1, db2"),
    (lambda: dwt.wavelet_filters("sym11"), "'sym11'", "sym10, coif1"),
    (lambda: dwt.wavelet_filters("coif6"), "'coif6'", "coif5"),
    (lambda: dwt.wavedec(X2, "db4", level=-1), "level -1", "integer >= 0"),
    (lambda: dwt.wavedec2(X2, "db4", level=2.0), "level 2.0", "integer >= 0"),
    (lambda: dwt.wavedec2(X2, "db4", level="2"), "level '2'", "or None"),
    (lambda: dwt.dwt2(X2, "db2", mode="smooth"), "'smooth'", "zero, constant, symmetric"),
    (lambda: dwt.idwt2((X2, (X2, X2, X2)), "db2", mode="antisymmetric"), "'antisymmetric'", "periodization"),
    (lambda: dwt.dwt(torch.empty(0), "db2"), "shape (0,)", ">= 1"),
    (lambda: dwt.dwt(torch.empty(3, 0, 4), "db2", dim=1), "shape (3, 0, 4)", ">= 1"),
    (lambda: dwt.wavedec2(torch.empty(3, 0, 4), "db2"), "shape (3, 0, 4)", ">= 1"),
    (lambda: dwt.dwt2(torch.randn(16), "haar"), "shape (16,)", "(..., height, width)"),
    (lambda: dwt.wavedec2(torch.randn(16), "haar"), "shape (16,)", "(..., height, width)"),
    (lambda: dwt.dwt2(torch.ones(8, 8, dtype=torch.int64), "haar"), "torch.int64", "float32"),
    (lambda: dwt.idwt2((X2, (X2, X2, X2[:-1])), "haar"), "(63, 40)", "equal shape"),
    (lambda: dwt.idwt2((X2[:3, :3],) * 1 + ((X2[:3, :3],) * 3,), "db4"), "(3, 3)", "at least 4"),
    # A dim that does not exist: ValueError, as PyWavelets (whose AxisError is a ValueError), not IndexError.
    (lambda: dwt.dwt(X2, "db2", dim=2), "dim=2", "-2..1"),
    (lambda: dwt.idwt(X2, X2, "db2", dim=-3), "dim=-3", "-2..1"),
    (lambda: dwt.wavedec(X2, "db2", dim=5), "dim=5", "-2..1"),
    (lambda: dwt.waverec([X2, X2], "db2", dim=2), "dim=2", "-2..1"),
    # Coefficients that are not a list/tuple (a tensor would be iterated along its first dim): ValueError.
    (lambda: dwt.waverec(torch.randn(3, 8), "db2"), "Tensor", "list or tuple"),
    (lambda: dwt.waverec2(torch.randn(4, 8, 8), "db2"), "Tensor", "list or tuple"),
    (lambda: dwt.idwt2(torch.randn(2, 3, 8, 8), "db2"), "Tensor", "(cA, (cH, cV, cD))"),
    (lambda: dwt.idwt2((X2, X2), "db2"), "Tensor", "(cA, (cH, cV, cD))"),
    (lambda: dwt.waverec2([X2, X2], "db2"), "Tensor", "(cH, cV, cD)"),
    (lambda: dwt.waverec([], "db2"), "[]", "at least"),
]


@pytest.mark.parametrize("call, bad, allowed", BAD_INPUTS)
def test_bad_input_raises_clear_value_error(call, bad, allowed):
    with pytest.raises(ValueError) as error:
        call()
    assert bad in str(error.value) and allowed in str(error.value), str(error.value)


# Mode 'reflect' mirrors about the edge sample without repeating it, so a length-1 axis has nothing to mirror:
# PyWavelets raises ValueError at every analysis entry point. (ours, PyWavelets') pairs, each given dwt or pywt.
LENGTH_1 = torch.randn(1, dtype=torch.float64)
REFLECT_ON_LENGTH_1 = [
    (lambda: dwt.dwt(LENGTH_1, "db2", "reflect"), lambda p: p.dwt(LENGTH_1.numpy(), "db2", "reflect")),
    (lambda: dwt.dwt(X2[:1].double(), "haar", "reflect", dim=0),
     lambda p: p.dwt(X2[:1].double().numpy(), "haar", "reflect", axis=0)),
    (lambda: dwt.dwt2(X2[:1].double(), "db2", "reflect"), lambda p: p.dwt2(X2[:1].double().numpy(), "db2", "reflect")),
    (lambda: dwt.dwt2(X2[:, :1].double(), "haar", "reflect"),
     lambda p: p.dwt2(X2[:, :1].double().numpy(), "haar", "reflect")),
    (lambda: dwt.wavedec(LENGTH_1, "db2", "reflect", level=1),
     lambda p: p.wavedec(LENGTH_1.numpy(), "db2", "reflect", level=1)),
    (lambda: dwt.wavedec(X2[0, :2].double(), "haar", "reflect", level=2),  # level 2 gets 1 sample from level 1
     lambda p: p.wavedec(X2[0, :2].double().numpy(), "haar", "reflect", level=2)),
    (lambda: dwt.wavedec2(X2[:1].double(), "db2", "reflect", level=1),
     lambda p: p.wavedec2(X2[:1].double().numpy(), "db2", "reflect", level=1)),
]


@pytest.mark.parametrize("ours, theirs", REFLECT_ON_LENGTH_1, ids=["dwt", "dwt-dim0", "dwt2-1-row", "dwt2-1-column",
                                                               "wavedec", "wavedec-level2", "wavedec2"])
def test_reflect_on_a_length_1_axis_is_a_value_error_like_pywavelets(ours, theirs, pywt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # level 1 on 1 sample is above the maximum level: both warn first
        with pytest.raises(ValueError, match="greater than 1 for \\[anti\\]reflect mode"):
            theirs(pywt)
        with pytest.raises(ValueError, match=r"mode 'reflect' needs at least 2 samples .*shape \((1,|\d+, 1|1, \d+)\)"):
            ours()


def test_reflect_on_a_length_1_axis_computes_where_pywavelets_does(pywt):
    """No analysis, no extension: level 0 (the maximum for 1 sample) and the synthesis side compute as PyWavelets."""
    assert_matches(dwt.wavedec(LENGTH_1, "db2", "reflect"), pywt.wavedec(LENGTH_1.numpy(), "db2", "reflect"),
                   torch.float64, "wavedec level None")
    assert_matches(dwt.idwt(LENGTH_1, 2 * LENGTH_1, "haar", "reflect"),
                   pywt.idwt(LENGTH_1.numpy(), 2 * LENGTH_1.numpy(), "haar", "reflect"), torch.float64, "idwt")


def numpy_coeffs(coeffs):
    """The same nested coefficients for PyWavelets: tensors as numpy arrays, anything else (dict, None) as it is."""
    if isinstance(coeffs, (list, tuple)):
        return type(coeffs)(numpy_coeffs(c) for c in coeffs)
    return coeffs.numpy() if isinstance(coeffs, torch.Tensor) else coeffs


def zeros_for_none(coeffs, like):
    if isinstance(coeffs, (list, tuple)):
        return type(coeffs)(zeros_for_none(c, like) for c in coeffs)
    return torch.zeros_like(like) if coeffs is None else coeffs


A1, A2 = torch.randn(8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
# A dict or None where a coefficient array belongs, in each place: (function, coefficients, what PyWavelets does).
NOT_AN_ARRAY = [
    ("waverec", [{}, A1], AttributeError),  # PyWavelets 1.9 reads .shape of the approximation: ours says more
    ("waverec", [A1, {}], ValueError), ("waverec", [A1, A1, {}], ValueError),
    ("waverec2", [{}, (A2, A2, A2)], ValueError), ("waverec2", [A2, ({}, A2, A2)], ValueError),
    ("waverec2", [A2, (A2, A2, {})], ValueError), ("waverec2", [A2, {}], ValueError),
    ("waverec2", [A2, None], ValueError),
    # PyWavelets reads None as a band of zeros; ours refuses it and says to pass zeros (checked to give its result)
    ("waverec", [None, A1], "zeros"), ("waverec", [A1, None], "zeros"), ("waverec2", [None, (A2, A2, A2)], "zeros"),
    ("waverec2", [A2, (None, A2, A2)], "zeros"), ("waverec2", [A2, (A2, None, None)], "zeros"),
]


def shape_of(coeffs):
    """[a, (dict, a, a)] and the like: the test ids of NOT_AN_ARRAY."""
    if isinstance(coeffs, (list, tuple)):
        inner = ", ".join(map(shape_of, coeffs))
        return f"[{inner}]" if isinstance(coeffs, list) else f"({inner})"
    return "a" if isinstance(coeffs, torch.Tensor) else type(coeffs).__name__.replace("NoneType", "None")


@pytest.mark.parametrize("fn, coeffs, pywavelets", NOT_AN_ARRAY, ids=[fn + shape_of(c) for fn, c, _ in NOT_AN_ARRAY])
def test_waverec_refuses_a_dict_or_none_for_a_coefficient_array(fn, coeffs, pywavelets, pywt):
    with pytest.raises(ValueError, match=rf"^{fn}: coefficient \d( \(c[HVD]\))? must be a (torch.Tensor|\(cH, cV, cD\) "
                                         r"tuple), got (dict|NoneType)") as error:
        getattr(dwt, fn)(coeffs, "db2")
    if pywavelets == "zeros":
        assert "torch.zeros_like" in str(error.value)
        assert_matches(getattr(dwt, fn)(zeros_for_none(coeffs, A2 if fn == "waverec2" else A1), "db2"),
                       getattr(pywt, fn)(numpy_coeffs(coeffs), "db2"), torch.float64, f"{fn} with zeros for None")
    else:
        with pytest.raises(pywavelets):
            getattr(pywt, fn)(numpy_coeffs(coeffs), "db2")
