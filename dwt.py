"""A differentiable 1-D/2-D discrete wavelet transform in plain PyTorch: Haar, Daubechies db1..db10, symlets
sym2..sym10 and coiflets coif1..coif5 (the wavelets PEFT's WaveFT accepts).

Reference: WaveFT (Bilican et al., arXiv 2505.12532) builds its weight update as idwt2 of a sparse
coefficient matrix; this file is that transform, checked against PyWavelets to float64 precision.
Not here: biorthogonal wavelets, CWT, packets, or any WaveFT-specific padding/cropping.

Filters. A Daubechies low-pass filter h of length L = 2N has N vanishing moments and satisfies
|H(w)|^2 = 2 cos^{2N}(w/2) P(sin^2(w/2)) with P(y) = sum_{k<N} C(N-1+k, k) y^k. Spectral factorisation:
each root y of P gives a pair z, 1/z solving z + 1/z = 2 - 4y; the roots inside the unit circle plus N
zeros at z = -1 give the minimum-phase filter, scaled to sum sqrt(2). That is PyWavelets' `rec_lo`, and
  dec_lo = rec_lo reversed,  rec_hi[n] = (-1)^n dec_lo[n],  dec_hi = rec_hi reversed.
Analysis filters (dec_*) split a signal into coefficients, synthesis filters (rec_*) rebuild it; for an
orthogonal wavelet each is the other time-reversed, so the inverse transform is the adjoint.
Symlets (symN, L = 2N) have the same |H|^2, so the same roots; only the choice differs: for each real root
or conjugate pair take z or 1/z so that the phase of H is closest to linear (least mean square deviation;
Daubechies' "least asymmetric" wavelets). That fixes h up to time reversal; PyWavelets' orientation is a
convention (_SYMLETS_FRONT_HEAVY). Coiflets (coifN, L = 6N) are defined by equations: 2N vanishing moments
for the wavelet, sum_n (-1)^n n^m h[n] = 0 (m < 2N), and for the scaling function about n = 2N,
sum_n (n - 2N)^m h[n] = 0 (0 < m < 2N), with h orthonormal to its even shifts, sum_n h[n] h[n+2k] = [k = 0].
Newton's method solves them from the interpolating (Deslauriers-Dubuc) filter, which has the moments
already; of the several solutions, that start finds the one PyWavelets tabulates. All filters are designed
once, at import, in float64: they meet their defining equations to 3e-14 and PyWavelets' tables to 1e-12,
except sym3/5/6/7, whose tables hold only ~12 digits (up to 3.6e-12 apart).

Forward, one level along an axis of length n: PyWavelets extends x at both ends (modes below), convolves
with dec and keeps the odd samples, cA[i] = sum_j dec_lo[j] x[2i + 1 - j]. torch's conv computes
*correlation*, sum_m w[m] x[i + m], so we pass the flipped filter g = dec[::-1] and get
cA[i] = sum_m g[m] x[2i + m - (L - 2)]: pad L - 2 samples on the left and enough on the right for
out = floor((n + L - 1) / 2) outputs (padded length 2*out + L - 2), then conv with stride 2.
"periodization" wraps around instead: out = ceil(n/2) (odd n first repeats its last sample), left pad
L/2 - 1, and the transform is orthonormal.

Inverse: upsample by 2 and *convolve* with rec, which is exactly conv_transpose, so rec is NOT flipped.
Of the full 2n + L - 2 samples PyWavelets keeps the central 2n - L + 2: conv_transpose's padding=L-2
crops L - 2 at each end. For periodization the coefficients are wrapped by L//4 first and 2n are kept.
In 2-D the 4 sub-band kernels are outer products (rows x cols) of the 1-D filters, so one stride-2
conv2d does a whole analysis level and one conv_transpose2d a whole synthesis level. The sub-bands are cA (low-pass
along the row index and the column index), cH (high along the row index, low along the column index: a horizontal
edge), cV (low, high: a vertical edge) and cD (high, high), as in waveft.py's quarter table.

Boundary modes: PyWavelets names vs torch.nn.functional.pad names (for a signal  a b c d):
  PyWavelets      extension                       torch F.pad
  zero            ... 0 0 | a b c d | 0 0 ...      "constant" (value 0)
  constant        ... a a | a b c d | d d ...      "replicate"
  symmetric       ... b a | a b c d | d c ...      none: half-sample symmetric, the edge sample repeats
  reflect         ... c b | a b c d | c b ...      "reflect": whole-sample, the edge is not repeated
  periodic        ... c d | a b c d | a b ...      "circular"
  periodization   periodic, ceil(n/2) outputs      "circular" plus the shorter output
So torch's "reflect" is PyWavelets' "reflect", NOT PyWavelets' default "symmetric". We gather padding
samples by index, which also works when the pad is longer than the signal (db10 on short axes), where
torch's reflect/circular padding refuses.

dtypes: output dtype and device follow the input, so float16 stays float16 (PyWavelets returns float32
for float16 input); float16/bfloat16 are computed in float32 (CPU half convolutions are slow or missing,
and fp32 accumulation is more accurate) and cast back.
Edge cases as PyWavelets: a level above the maximum warns and is computed; numpy integer levels work;
leading (batch) dimensions may have size 0; a dim that does not exist is a ValueError; so is mode 'reflect' on a
transformed axis of length 1 (dwt, dwt2, wavedec, wavedec2), and a dict where waverec/waverec2 expect a coefficient
array. One difference: PyWavelets reads None there as a band of zeros, we refuse it (pass torch.zeros_like).
"""
import functools
import itertools
import math
import numbers
import warnings
from fractions import Fraction

import torch
import torch.nn.functional as F

WAVELETS = (("haar",) + tuple(f"db{n}" for n in range(1, 11)) + tuple(f"sym{n}" for n in range(2, 11))
            + tuple(f"coif{n}" for n in range(1, 6)))
MODES = ("zero", "constant", "symmetric", "reflect", "periodic", "periodization")


def _family_and_order(wavelet):
    """'db4' -> ('db', 4), 'haar' -> ('db', 1); anything not in WAVELETS is a ValueError."""
    if wavelet not in WAVELETS:
        raise ValueError(f"unknown wavelet {wavelet!r}; supported wavelets: {', '.join(WAVELETS)}")
    if wavelet == "haar":
        return "db", 1
    family = wavelet.rstrip("0123456789")
    return family, int(wavelet[len(family):])


def _eager_cache(maxsize=None):
    """functools.lru_cache for eager calls. torch.compile cannot use such a cache (dynamo warns and traces the
    wrapped function anyway), so while compiling the function is traced: its small tensor ops become constants."""
    def decorate(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        return functools.wraps(fn)(lambda *args: fn(*args) if torch.compiler.is_compiling() else cached(*args))
    return decorate


# ----------------------------------------------------------------------------------------------------------------
# Filter design, float64, run once per wavelet at import and never traced (see _FILTER_BANKS).

def _daubechies_roots(N):
    """The N - 1 roots z (|z| < 1) that the zeros of P contribute to the minimum-phase Daubechies filter."""
    p_coeffs = torch.tensor([math.comb(N - 1 + k, k) for k in range(N)], dtype=torch.float64)
    # Roots of P(y) = eigenvalues of its companion matrix (monic: divide by the leading coefficient).
    y = torch.zeros(0, dtype=torch.complex128)  # db1 (Haar): P = 1 has no roots
    if N > 1:
        companion = torch.diag(torch.ones(N - 2, dtype=torch.float64), -1)  # (N-1, N-1)
        companion[:, -1] = -p_coeffs[:-1] / p_coeffs[-1]
        y = torch.linalg.eigvals(companion)  # complex128, N - 1 roots
    # Accuracy, measured against PyWavelets' tables: 4e-15 for db10 (tests ask 1e-12), so no polishing.
    # It degrades with N (db20 2e-12, db30 5e-10, db38 3e-7) and Newton steps on P barely help: longer
    # filters would need a better-conditioned factorisation, one reason this file stops at db10.
    # y = (2 - z - 1/z) / 4  <=>  z^2 - 2 b z + 1 = 0 with b = 1 - 2y; the two roots are z and 1/z.
    b = 1 - 2 * y
    z = b - torch.sqrt(b * b - 1)
    return torch.where(z.abs() > 1, 1 / z, z)  # the root inside the unit circle


def _filter_from_roots(roots):
    """Real filter prod_r (1 - r z^-1) (its coefficients in powers of z^-1), scaled to sum sqrt(2)."""
    poly = torch.ones(1, dtype=torch.complex128)
    for r in roots:
        poly = torch.cat([poly, poly.new_zeros(1)]) - r * torch.cat([poly.new_zeros(1), poly])
    h = poly.real  # complex roots come in conjugate pairs, so the imaginary part is rounding noise
    return h * (math.sqrt(2) / h.sum())


def _daubechies_rec_lo(N):
    """Minimum-phase: N zeros at z = -1 plus every root inside the unit circle."""
    return _filter_from_roots(torch.cat([torch.full((N,), -1.0, dtype=torch.complex128), _daubechies_roots(N)]))


# PyWavelets stores sym2, sym3 and sym7 with their energy before the middle of rec_lo and every other symlet
# after it; the two orientations are equally good, so this is a convention, not a design choice.
_SYMLETS_FRONT_HEAVY = (2, 3, 7)


def _symlet_rec_lo(N):
    """Least-asymmetric: per real root or conjugate pair u, take u or 1/u so that the phase is closest to linear."""
    inside = _daubechies_roots(N)
    groups = [[u] for u in inside if u.imag == 0] + [[u, u.conj()] for u in inside if u.imag > 0]
    # Phase of the factor (1 - u e^{-iw}) for |u| < 1 is periodic in w (no wrapping, Re > 0); taking 1/u instead
    # adds a linear phase and negates the periodic part. So the non-linear phase of a choice is sum_g s_g c_g(w)
    # with signs s_g = +-1, and we minimise its mean square on a uniform grid (the integrand is smooth, periodic).
    w = torch.arange(512, dtype=torch.float64) * (2 * math.pi / 512)
    e = torch.exp(-1j * w)
    c = torch.stack([sum(torch.angle(1 - u * e) - torch.angle(1 - u) for u in g) for g in groups])  # (G, 512)
    signs = torch.tensor(list(itertools.product([1.0, -1.0], repeat=len(groups))), dtype=torch.float64)
    best = signs[(signs @ c).square().mean(1).argmin()]  # s and -s tie: they give the same filter reversed
    roots = [r if s > 0 else 1 / r for g, s in zip(groups, best) for r in g]
    h = _filter_from_roots(torch.stack([torch.tensor(-1.0, dtype=torch.complex128)] * N + roots))
    n = torch.arange(len(h), dtype=torch.float64)
    front_heavy = bool((n * h.square()).sum() < (len(h) - 1) / 2)
    return h if front_heavy == (N in _SYMLETS_FRONT_HEAVY) else h.flip(0)


def _coiflet_rec_lo(N):
    """Length 6N; 2N vanishing moments for the wavelet, sum_n (n - 2N)^m h[n] = 0 (m = 1..2N-1) for the scaling
    function, orthonormal: solved by Newton's method from the interpolating (Deslauriers-Dubuc) filter."""
    L, centre, K = 6 * N, 2 * N, 2 * N
    # Start: the filter that interpolates the odd samples from the 2N nearest even ones with a degree-(2N-1)
    # polynomial. It already has both sets of moments; Newton then only has to make it orthonormal.
    nodes = range(1 - K, K, 2)
    start = [0.0] * L
    start[centre] = 1.0
    for t in nodes:
        start[centre + t] = math.prod(-s / (t - s) for s in nodes if s != t)
    h = torch.tensor(start, dtype=torch.float64) / math.sqrt(2)  # sums to 2 before: now sqrt(2)
    # Moment conditions sum_n sign(n) (n - centre)^m h[n] = 0 as integer rows, divided by L^m in the Jacobian so
    # that Newton's linear systems are well conditioned. Scaling function: sign 1, m = 1..2N-1; wavelet: (-1)^n.
    rows = ([[(n - centre) ** m for n in range(L)] for m in range(1, K)]
            + [[(-1) ** n * (n - centre) ** m for n in range(L)] for m in range(K)])
    scales = [L ** m for m in range(1, K)] + [L ** m for m in range(K)]
    moments = torch.tensor(rows, dtype=torch.float64) / torch.tensor(scales, dtype=torch.float64).unsqueeze(1)

    def exact_residual(h):
        """The solution is ill-conditioned (Jacobian condition ~3e9 for coif5): a float64 residual would leave
        errors ~1e-8 in h. float64 numbers are exact fractions, so Fraction gives the residual exactly, and Newton
        steps solved in float64 from it converge to the correctly rounded solution (iterative refinement)."""
        q = [Fraction(v) for v in h.tolist()]
        r = [sum(q[i] * q[i + 2 * k] for i in range(L - 2 * k)) - (k == 0) for k in range(3 * N)]
        r += [sum(w * v for w, v in zip(row, q)) / scale for row, scale in zip(rows, scales)]
        return torch.tensor([float(v) for v in r], dtype=torch.float64)

    for _ in range(20):
        padded = F.pad(h, (L, L))  # zero outside 0..L-1; d/dh[j] of sum_i h[i] h[i + 2k] is h[j + 2k] + h[j - 2k]
        shifted = torch.stack([padded[L + 2 * k:2 * L + 2 * k] + padded[L - 2 * k:2 * L - 2 * k] for k in range(3 * N)])
        jacobian = torch.cat([shifted, moments])
        step = torch.linalg.lstsq(jacobian, -exact_residual(h).unsqueeze(1), driver="gelsd").solution[:, 0]
        h, previous = h + step, h
        if torch.equal(h, previous):  # converged: the remaining step is below half an ulp (about 6 steps)
            break
    return h


def _design_filter_bank(wavelet):
    """(dec_lo, dec_hi, rec_lo, rec_hi) as tuples of python floats (float64), in PyWavelets' order and signs."""
    family, order = _family_and_order(wavelet)
    rec_lo = tuple({"db": _daubechies_rec_lo, "sym": _symlet_rec_lo, "coif": _coiflet_rec_lo}[family](order).tolist())
    dec_lo = rec_lo[::-1]
    rec_hi = tuple(c if n % 2 == 0 else -c for n, c in enumerate(dec_lo))  # rec_hi[n] = (-1)^n dec_lo[n]
    return dec_lo, rec_hi[::-1], rec_lo, rec_hi


# Every filter bank is designed once, here at import (all of them: tens of milliseconds), as python floats:
# a tracer (torch.compile, torch.jit.trace, torch.export) sees them as constants and cannot get them wrong. (It
# once did: torch 2.13's dynamo traced the signs (-1.0) ** torch.arange(L) as -(1.0 ** arange).)
_FILTER_BANKS = {wavelet: _design_filter_bank(wavelet) for wavelet in WAVELETS}


@_eager_cache()
def _cached_filters(wavelet, dtype, device):
    return tuple(torch.tensor(f, dtype=dtype, device=device) for f in _FILTER_BANKS[wavelet])


def wavelet_filters(wavelet, dtype=torch.float64, device=None):
    """(dec_lo, dec_hi, rec_lo, rec_hi) as 1-D tensors, in PyWavelets' `filter_bank` order and signs.

    Cached per (wavelet, dtype, device): the tensors are shared, do not modify them in place."""
    _family_and_order(wavelet)  # validate before caching
    return _cached_filters(wavelet, dtype, torch.device("cpu" if device is None else device))


@_eager_cache()
def _kernels(wavelet, dtype, device):
    """Conv weights: analysis (flipped, for correlation) and synthesis (as is, for conv_transpose)."""
    dec_lo, dec_hi, rec_lo, rec_hi = wavelet_filters(wavelet, dtype, device)
    analysis = torch.stack([dec_lo, dec_hi]).flip(-1)
    synthesis = torch.stack([rec_lo, rec_hi])
    # 2-D sub-bands in PyWavelets' order cA, cH, cV, cD: the filter along the row index (dim -2) and along the
    # column index (dim -1) is (low, low), (high, low), (low, high), (high, high), waveft.py's quarter table.
    pairs = [(0, 0), (1, 0), (0, 1), (1, 1)]
    outer = lambda f: torch.stack([torch.outer(f[r], f[c]) for r, c in pairs]).unsqueeze(1)
    return analysis.unsqueeze(1), synthesis.unsqueeze(1), outer(analysis), outer(synthesis)


@_eager_cache(maxsize=4096)
def _extension_index(n, left, right, mode, device):
    """Indices into a length-n signal of the `left` samples before it and the `right` samples after it."""
    j = torch.cat([torch.arange(-left, 0, device=device), torch.arange(n, n + right, device=device)])
    if mode == "symmetric":
        r = j % (2 * n)
        return torch.where(r < n, r, 2 * n - 1 - r)
    if mode == "reflect":
        period = max(2 * n - 2, 1)
        r = j % period
        return torch.where(r < n, r, period - r)
    if mode == "constant":
        return j.clamp(0, n - 1)
    if mode == "periodization":  # odd n: period n + 1, the extra sample repeats the last one
        return (j % (n + n % 2)).clamp(max=n - 1)
    return j % n  # periodic


def _pad(x, left, right, mode, dim):
    """Extend x along the (negative) dimension `dim`. Only the few padding samples are gathered (a
    full-size index_select along the last dim is slow); torch.cat then copies x once."""
    if left == 0 and right == 0:
        return x
    if mode == "zero":
        return F.pad(x, (0, 0) * (-dim - 1) + (left, right))
    index = _extension_index(x.shape[dim], left, right, mode, x.device)
    return torch.cat([x.index_select(dim, index[:left]), x, x.index_select(dim, index[left:])], dim)


def _forward_pads(n, filter_len, mode):
    """(left, right) padding so that a stride-2 correlation gives PyWavelets' coefficients."""
    if mode == "periodization":
        out, left = (n + 1) // 2, filter_len // 2 - 1
    else:
        out, left = (n + filter_len - 1) // 2, filter_len - 2
    return left, 2 * out + filter_len - 2 - n - left


def _check(fn, tensors, ndim, mode, dim=None):
    """Clear errors for bad input, instead of a torch error deep inside conv (or a silent wrong answer).
    ndim: 1 transforms `dim`, 2 the last two dims; the other (batch) dims may have any size, even 0."""
    if mode not in MODES:
        raise ValueError(f"{fn}: unsupported mode {mode!r}; supported modes: {', '.join(MODES)}")
    for x in tensors:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{fn} expects torch.Tensor inputs, got {type(x).__name__}")
        if x.dim() < ndim:
            axes = "(..., n)" if ndim == 1 else "(..., height, width)"
            raise ValueError(f"{fn} needs tensors of shape {axes}, got shape {tuple(x.shape)} ({x.dim()}-D)")
        if dim is not None and not -x.dim() <= dim < x.dim():  # PyWavelets raises AxisError, a ValueError
            raise ValueError(f"{fn}: dim={dim} does not exist for a tensor of shape {tuple(x.shape)}; "
                             f"use a dim in -{x.dim()}..{x.dim() - 1}")
        if any(x.shape[d] == 0 for d in ([dim] if ndim == 1 else [-2, -1])):
            raise ValueError(f"{fn} got a tensor of shape {tuple(x.shape)}; every transformed dimension must be >= 1")
        if not x.is_floating_point():
            raise ValueError(f"{fn} expects a floating-point tensor (float16, bfloat16, float32, float64), "
                             f"got {x.dtype}")
        if x.shape != tensors[0].shape:
            raise ValueError(f"{fn} needs coefficients of equal shape, got {[tuple(t.shape) for t in tensors]}")


def _check_reflect(fn, x, mode, dims):
    """PyWavelets' rule: 'reflect' mirrors about the edge sample without repeating it, so an axis needs a second
    sample to mirror. On a length-1 axis the extension index would quietly repeat the sample ('constant')."""
    if mode == "reflect" and any(x.shape[d] == 1 for d in dims):
        raise ValueError(f"{fn}: mode 'reflect' needs at least 2 samples along each transformed dimension (as in "
                         f"PyWavelets), got shape {tuple(x.shape)}; 'symmetric' or 'constant' extend a single sample")


def _describe(obj):
    if isinstance(obj, (list, tuple)):
        return f"{type(obj).__name__} of ({', '.join(type(o).__name__ for o in obj)})"
    return type(obj).__name__


def _check_sequence(fn, coeffs, expected):
    """Coefficients must be a list or tuple (PyWavelets: "Expected sequence of coefficient arrays"): a tensor
    would otherwise be taken apart along its first dim and give a wrong answer or a confusing error."""
    if not isinstance(coeffs, (list, tuple)):
        raise ValueError(f"{fn} expects coefficients as a list or tuple {expected}, got {_describe(coeffs)}")
    if not coeffs:
        raise ValueError(f"{fn} got [] as coefficients; it needs at least the approximation cA_n: {expected}")


def _check_tensors(fn, coeffs):
    """Each coefficient of waverec/waverec2 must be a tensor (a (cH, cV, cD) tuple of them for a waverec2 detail).
    PyWavelets also refuses a dict there (ValueError) but reads None as a band of zeros; here None is refused too,
    saying how to pass zeros, rather than failing later on None.shape."""
    for i, c in enumerate(coeffs):
        bands = zip((" (cH)", " (cV)", " (cD)"), c) if fn == "waverec2" and i > 0 else [("", c)]  # 2-D details: 3
        for band, value in bands:
            if not isinstance(value, torch.Tensor):
                zeros = "; for a band of zeros (what PyWavelets reads None as) pass torch.zeros_like(...)"
                raise ValueError(f"{fn}: coefficient {i}{band} must be a torch.Tensor, got {_describe(value)}"
                                 + (zeros if value is None else ""))


def _work_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _prepare_synthesis(coeffs, filter_len, mode, dims, fn):
    """(coeffs, crop) for a stride-2 conv_transpose that keeps PyWavelets' part of the output."""
    if mode == "periodization":  # wrap L//4 coefficients around each end; the crop then keeps 2n samples
        wrap = filter_len // 4
        for dim in dims:
            coeffs = _pad(coeffs, wrap, wrap, "periodic", dim)
        return coeffs, 2 * wrap + filter_len // 2 - 1
    if min(coeffs.shape[d] for d in dims) < filter_len // 2:
        raise ValueError(f"{fn}: coefficients of shape {tuple(coeffs.shape[-len(dims):])} are too short for filter "
                         f"length {filter_len}; need at least {filter_len // 2} per axis (or mode='periodization')")
    return coeffs, filter_len - 2  # full output 2n + L - 2 -> central 2n - L + 2


def dwt(x, wavelet, mode="symmetric", dim=-1):
    """One analysis level along `dim`: returns (cA, cD), like pywt.dwt(x, wavelet, mode, axis=dim)."""
    _check("dwt", [x], 1, mode, dim)
    _check_reflect("dwt", x, mode, [dim])
    analysis = _kernels(wavelet, _work_dtype(x.dtype), x.device)[0]
    xt = x.movedim(dim, -1)
    batch, n = xt.shape[:-1], xt.shape[-1]
    left, right = _forward_pads(n, analysis.shape[-1], mode)
    xp = _pad(xt.reshape(math.prod(batch), 1, n).to(analysis.dtype), left, right, mode, -1)  # prod: batch may be 0
    y = F.conv1d(xp, analysis, stride=2).to(x.dtype)  # (B, 2, out): low and high band
    return tuple(band.reshape(*batch, y.shape[-1]).movedim(-1, dim) for band in y.unbind(1))


def idwt(cA, cD, wavelet, mode="symmetric", dim=-1):
    """One synthesis level along `dim`, like pywt.idwt(cA, cD, wavelet, mode, axis=dim)."""
    _check("idwt", [cA, cD], 1, mode, dim)
    synthesis = _kernels(wavelet, _work_dtype(cA.dtype), cA.device)[1]
    cA, cD = cA.movedim(dim, -1), cD.movedim(dim, -1)
    batch, n = cA.shape[:-1], cA.shape[-1]
    coeffs = torch.stack([cA, cD], -2).reshape(math.prod(batch), 2, n).to(synthesis.dtype)  # (B, 2, n)
    coeffs, crop = _prepare_synthesis(coeffs, synthesis.shape[-1], mode, [-1], "idwt")
    y = F.conv_transpose1d(coeffs, synthesis, stride=2, padding=crop)  # (B, 1, length)
    return y.reshape(*batch, y.shape[-1]).movedim(-1, dim).to(cA.dtype)


def dwt2(x, wavelet, mode="symmetric"):
    """One 2-D analysis level over the last two dims: (cA, (cH, cV, cD)), like pywt.dwt2."""
    _check("dwt2", [x], 2, mode)
    _check_reflect("dwt2", x, mode, [-2, -1])
    analysis = _kernels(wavelet, _work_dtype(x.dtype), x.device)[2]
    filter_len = analysis.shape[-1]
    batch, (height, width) = x.shape[:-2], x.shape[-2:]
    xp = x.reshape(math.prod(batch), 1, height, width).to(analysis.dtype)
    xp = _pad(xp, *_forward_pads(height, filter_len, mode), mode, -2)
    xp = _pad(xp, *_forward_pads(width, filter_len, mode), mode, -1)
    y = F.conv2d(xp, analysis, stride=2).to(x.dtype)  # (B, 4, out_h, out_w)
    cA, cH, cV, cD = (band.reshape(*batch, *y.shape[-2:]) for band in y.unbind(1))
    return cA, (cH, cV, cD)


def idwt2(coeffs, wavelet, mode="symmetric"):
    """One 2-D synthesis level from (cA, (cH, cV, cD)) of equal shape (..., n, m), like pywt.idwt2.

    One stride-2 conv_transpose2d with the 4 outer-product kernels; output (..., 2n-L+2, 2m-L+2)
    (or (..., 2n, 2m) in periodization mode)."""
    if not (isinstance(coeffs, (list, tuple)) and len(coeffs) == 2 and isinstance(coeffs[1], (list, tuple))
            and len(coeffs[1]) == 3):
        raise ValueError(f"idwt2 expects coefficients as (cA, (cH, cV, cD)), got {_describe(coeffs)}")
    cA, (cH, cV, cD) = coeffs
    _check("idwt2", [cA, cH, cV, cD], 2, mode)
    synthesis = _kernels(wavelet, _work_dtype(cA.dtype), cA.device)[3]
    batch, (n, m) = cA.shape[:-2], cA.shape[-2:]
    if synthesis.dtype == torch.float32:  # oneDNN's float32 path is 10-60% faster on channels-last input
        stacked = torch.stack([cA, cH, cV, cD], -1).reshape(math.prod(batch), n, m, 4).permute(0, 3, 1, 2)
    else:  # float64 takes torch's native path, which prefers contiguous channels
        stacked = torch.stack([cA, cH, cV, cD], -3).reshape(math.prod(batch), 4, n, m)
    stacked = stacked.to(synthesis.dtype)  # (B, 4, n, m)
    stacked, crop = _prepare_synthesis(stacked, synthesis.shape[-1], mode, [-2, -1], "idwt2")
    y = F.conv_transpose2d(stacked, synthesis, stride=2, padding=crop)  # (B, 1, H, W)
    return y.reshape(*batch, *y.shape[-2:]).to(cA.dtype)


def _check_level(level, length, wavelet):
    """PyWavelets' rules. None means dwt_max_level: the largest J with (L - 1) * 2^J <= length. A higher level
    is computed, with PyWavelets' warning: from there on every coefficient depends on the boundary extension."""
    _family_and_order(wavelet)
    filter_len = len(_FILTER_BANKS[wavelet][0])
    max_level = max((length // (filter_len - 1)).bit_length() - 1, 0)
    if level is None:
        return max_level
    if isinstance(level, bool) or not isinstance(level, numbers.Integral) or level < 0:  # numpy ints are Integral
        raise ValueError(f"level {level!r} is not allowed: use an integer >= 0 (the maximum for length {length} and "
                         f"{wavelet}, filter length {filter_len}, is {max_level}), or None for {max_level}")
    if level > max_level:
        warnings.warn(f"level {level} is above the maximum {max_level} for length {length} and {wavelet} (filter "
                      f"length {filter_len}): all coefficients will experience boundary effects", stacklevel=3)
    return int(level)


def _trim_to(a, d, dims):
    """PyWavelets' rule in waverec: an approximation one sample longer than the details loses its last sample."""
    for dim in dims:
        if a.shape[dim] - d.shape[dim] not in (0, 1):
            raise ValueError(f"coefficient shapes do not fit together: approximation {tuple(a.shape)} "
                             f"vs details {tuple(d.shape)}")
        a = a.narrow(dim, 0, d.shape[dim])
    return a


def wavedec(x, wavelet, mode="symmetric", level=None, dim=-1):
    """Multi-level 1-D transform: [cA_n, cD_n, ..., cD_1], like pywt.wavedec(..., axis=dim)."""
    _check("wavedec", [x], 1, mode, dim)
    level = _check_level(level, x.shape[dim], wavelet)
    details = []
    for _ in range(level):
        x, cD = dwt(x, wavelet, mode, dim)
        details.append(cD)
    return [x] + details[::-1]


def waverec(coeffs, wavelet, mode="symmetric", dim=-1):
    """Inverse of wavedec, like pywt.waverec(..., axis=dim)."""
    _check_sequence("waverec", coeffs, "[cA_n, cD_n, ..., cD_1]")
    _check_tensors("waverec", coeffs)
    _check("waverec", [coeffs[0]], 1, mode, dim)
    a = coeffs[0]
    for d in coeffs[1:]:
        a = idwt(_trim_to(a, d, [dim]), d, wavelet, mode, dim)
    return a


def wavedec2(x, wavelet, mode="symmetric", level=None):
    """Multi-level 2-D transform: [cA_n, (cH_n, cV_n, cD_n), ..., (cH_1, cV_1, cD_1)], like pywt.wavedec2."""
    _check("wavedec2", [x], 2, mode)
    level = _check_level(level, min(x.shape[-2:]), wavelet)
    details = []
    for _ in range(level):
        x, bands = dwt2(x, wavelet, mode)
        details.append(bands)
    return [x] + details[::-1]


def waverec2(coeffs, wavelet, mode="symmetric"):
    """Inverse of wavedec2, like pywt.waverec2."""
    _check_sequence("waverec2", coeffs, "[cA_n, (cH_n, cV_n, cD_n), ..., (cH_1, cV_1, cD_1)]")
    for i, bands in enumerate(coeffs[1:], 1):
        if not (isinstance(bands, (list, tuple)) and len(bands) == 3):
            raise ValueError(f"waverec2: coefficient {i} must be a (cH, cV, cD) tuple, got {_describe(bands)}")
    _check_tensors("waverec2", coeffs)
    a = coeffs[0]
    for bands in coeffs[1:]:
        a = idwt2((_trim_to(a, bands[0], [-2, -1]), bands), wavelet, mode)
    return a
