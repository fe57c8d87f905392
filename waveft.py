"""WaveFT: fine-tune a frozen nn.Linear through k sparse coefficients in the 2-D wavelet domain.

For a frozen weight W (out x in) and bias b, WaveFT (Bilican et al., arXiv 2505.12532; PEFT's WaveFTConfig)
trains k scalars `spectrum` at k fixed random `positions` of an otherwise-zero coefficient matrix C:

    dW = scaling * crop(IDWT2(C)),        y = x W^T + b + x dW^T

C is (out+R) x (in+R) with R = filter length - 2, each side rounded up to even; the k values sit at
positions + R//2 (centred), C's quarters are (cA | cH) over (cV | cD), one level of dwt.idwt2 inverts it
and the centred out x in block is kept. Positions are PEFT's: randperm(out*in, Generator seed)[:k]
-> (idx // in, idx % in), so spectra are interchangeable with PEFT. `WaveFTLinear.delta_weight` is this.

Training never builds an out x in gradient. IDWT2 is separable: dW = scaling * A S B^T, with A (out x H)
and B (in x W) 1-D synthesis-and-crop operators (stride-2 transposed convolutions with the low/high-pass
filters) and S (H x W) = C with its off-diagonal quarters swapped into "band order", still k-sparse. So:
  1. coefficient gradient: dL/ds_(a,b) = scaling * sum_tokens (A^T g)_a (B^T x)_b: two 1-D analyses
     (L multiply-adds per value) and k sampled dot products (sampled_addmm), O(tokens * (out + in + k))
     instead of the dense g^T x (tokens * out * in);
  2. forward and input gradient, whichever has the smaller transient. Many tokens: one matmul with W + dW
     (scattered from the coefficients' L x L footprints; a copy of W, never saved, a quarter of it at a
     time for grad_x). Few tokens
     (tokens * (out + in) < out * in, e.g. cross-attention to_k/to_v on 77 text tokens): the sparse
     products y += scaling * (A S)(B^T x) and grad_x += scaling * (B S^T)(A^T g), where A S and B S^T
     have k * L nonzeros. A bf16/fp16 W always takes this second form, with the adapter in the
     spectrum's float32, so updates far below W's precision still change y.
method="lora" gives plain LoRA (y = x W^T + b + scaling * x A^T B^T, B zero) for side-by-side baselines.
"""
import json
import os
import re
import warnings
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as save_bytes

import dwt

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # SDXL UNet attention projections
_POSITIONS = {}  # (out, in, k, seed) -> (2, k) positions
_PLANS = {}  # (positions' bytes, shape, wavelet, use_idwt, device, dtype) -> _plan(...): one per shape in a UNet


def draw_positions(out_features, in_features, k, seed):
    """PEFT's positions: (2, k) int64 rows and cols. Cached: randperm of 2.6M elements costs ~30 ms."""
    key = (out_features, in_features, k, seed)
    if key not in _POSITIONS:
        flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:k]  # (k,)
        _POSITIONS[key] = torch.stack([flat // in_features, flat % in_features])  # (2, k)
    return _POSITIONS[key]


def _padded(n, wavelet, use_idwt):
    """Coefficient length for an output of length n: n + R, rounded up to even (no padding without IDWT)."""
    if not use_idwt:
        return n
    n = n + len(dwt.wavelet_filters(wavelet)[2]) - 2
    return n + n % 2


class WaveFTLinear(nn.Module):
    """A frozen nn.Linear plus k trainable wavelet coefficients (`waveft_spectrum`)."""
    adapter_names = ("waveft_spectrum",)  # the trainable parameters, as named in files

    def __init__(self, base, k, scaling, wavelet, seed, use_idwt):
        super().__init__()
        self.base, self.k, self.scaling, self.wavelet, self.seed = base, k, scaling, wavelet, seed
        self.use_idwt, self.merged = use_idwt, False
        dtype = base.weight.dtype if base.weight.dtype == torch.float64 else torch.float32  # never train in bf16
        self.waveft_spectrum = nn.Parameter(torch.zeros(k, dtype=dtype, device=base.weight.device))  # zero: dW = 0
        self.register_buffer("waveft_positions", draw_positions(base.out_features, base.in_features, k, seed)
                             .to(base.weight.device, copy=True))  # (2, k) rows, cols; own copy (the cache is shared)
        self._plan_for = None  # (positions, device, dtype, plan) of the last forward; replace positions, don't edit

    def delta_weight(self):
        """The definition, exactly as PEFT: scaling * crop(IDWT2(C)) (or the scattered C without IDWT)."""
        spectrum, (rows, cols), (out_f, in_f) = self.waveft_spectrum, self.waveft_positions, self.base.weight.shape
        H, W = _padded(out_f, self.wavelet, self.use_idwt), _padded(in_f, self.wavelet, self.use_idwt)
        C = torch.zeros(H, W, dtype=spectrum.dtype, device=spectrum.device)
        C = C.index_put((rows + (H - out_f) // 2, cols + (W - in_f) // 2), spectrum)  # (H, W), values centred
        if not self.use_idwt:
            return self.scaling * C
        h, w = H // 2, W // 2
        full = dwt.idwt2((C[:h, :w], (C[:h, w:], C[h:, :w], C[h:, w:])), self.wavelet)  # (H - R, W - R)
        r0, c0 = (full.shape[0] - out_f) // 2, (full.shape[1] - in_f) // 2
        return self.scaling * full[r0:r0 + out_f, c0:c0 + in_f]  # (out, in)

    def forward(self, x):
        if self.merged:
            return self.base(x)
        positions, dtype, memo = self.waveft_positions, self.waveft_spectrum.dtype, self._plan_for
        if memo is None or memo[0] is not positions or memo[1:3] != (x.device, dtype):  # moved, loaded or replaced
            plan = _plan(positions, self.base.weight.shape, self.wavelet, self.use_idwt, x.device, dtype)
            self._plan_for = (positions, x.device, dtype, plan)
        # Under autocast the frozen matmul runs in the autocast dtype, as nn.Linear's would; the adapter stays in
        # the spectrum's dtype. Every cast is explicit inside, so autocast is switched off there.
        amp = torch.is_autocast_enabled(x.device.type)
        base_dtype = torch.get_autocast_dtype(x.device.type) if amp else self.base.weight.dtype
        with torch.autocast(x.device.type, enabled=False):
            return _WaveFTFunction.apply(x, self.base.weight, self.base.bias, self.waveft_spectrum,
                                         self._plan_for[3], self.scaling, base_dtype)


class _WaveFTFunction(torch.autograd.Function):
    """y = x (W + dW)^T + b with the two cost tricks; saves only x, W and the spectrum (nothing out x in)."""

    @staticmethod
    def forward(ctx, x, weight, bias, spectrum, plan, scaling, base_dtype):
        x2, cdt = x.reshape(-1, x.shape[-1]), spectrum.dtype  # (N, in); cdt: the adapter's compute dtype
        n, (out_f, in_f) = x2.shape[0], weight.shape
        w = weight.to(base_dtype)  # the cast (if any) is transient, never saved
        bias = None if bias is None else bias.to(base_dtype)
        ctx.merged = x.dtype == w.dtype == cdt and n * (out_f + in_f) >= out_f * in_f
        if ctx.merged:  # many tokens: one matmul, dW costs O(out*in) once
            y = F.linear(x2, _merged_weight(w, spectrum, plan, scaling), bias)  # (N, out)
        else:  # few tokens or low-precision W: the adapter (A S)(B^T x) in the spectrum's dtype
            z = _sparse_times(plan["AS"], spectrum, _analyze(x2.to(cdt), plan["taps"], plan["W"]))  # (out, N)
            y = F.linear(x2.to(w.dtype), w, bias).to(cdt).add_(z.T, alpha=scaling)  # (N, out)
        ctx.save_for_backward(x, weight, spectrum)  # x and W exist anyway: nothing new is kept alive
        ctx.plan, ctx.scaling, ctx.base_dtype = plan, scaling, base_dtype
        return y.to(x.dtype).reshape(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, g):
        x, weight, spectrum = ctx.saved_tensors
        plan, scaling, cdt, w = ctx.plan, ctx.scaling, spectrum.dtype, weight.to(ctx.base_dtype)
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])  # (N, in), (N, out)
        grad_x = grad_w = grad_b = grad_s = None
        ga = None  # (H, N): (A^T g^T) with each band divided by its first tap
        if ctx.needs_input_grad[3] or not ctx.merged:
            ga = _analyze(g2.to(cdt), plan["taps"], plan["H"])
        if ctx.needs_input_grad[3]:  # trick 1: only the k sampled entries of (A^T g^T)(B^T x^T)^T
            xa = _analyze(x2.to(cdt), plan["taps"], plan["W"])  # (W, N)
            sampled = torch.sparse.sampled_addmm(plan["pattern"], ga, xa.T, beta=0.0, alpha=scaling).values()  # (k,)
            del xa  # every free before the next allocation lowers the peak memory
            S = plan["S"]  # S's k entries sorted by index, i.e. in the CSR order of `sampled`
            grad_s = torch.empty_like(spectrum).index_put_((S["coef"],), sampled.mul_(S["tap"]))  # (k,)
            del sampled
        if ctx.needs_input_grad[0]:
            if ctx.merged:  # trick 2: g (W + dW), summed over 4 blocks of rows: the transient is a quarter of W
                ga, bounds = None, [w.shape[0] * i // 4 for i in range(5)]
                for r0, r1 in zip(bounds, bounds[1:]):
                    block = _merged_weight(w, spectrum, plan, scaling, r0, r1)  # (r1 - r0, in)
                    grad_x = g2[:, r0:r1] @ block if grad_x is None else grad_x.addmm_(g2[:, r0:r1], block)
            else:  # g W + scaling * (B S^T)(A^T g)
                z = _sparse_times(plan["BSt"], spectrum, ga)  # (in, N)
                ga = None
                grad_x = (g2.to(w.dtype) @ w).to(cdt).add_(z.T, alpha=scaling)  # (N, in)
            grad_x = grad_x.to(x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:  # only if someone unfroze W
            grad_w = (g2.T @ x2.to(g2.dtype)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, grad_s, None, None, None


def _analyze(v, taps, n_coef):
    """v (M, n) -> (n_coef, M) = (v A)^T / band's first tap: the adjoint of synthesis-and-crop, [low | high].

    Coefficient-major, as sampled_addmm and the sparse matmul want it. The division by each band's first tap
    (the plan folds it back into the k values) makes a Haar band one add or subtract: one pass over v."""
    if taps is None:  # no IDWT: A is the identity
        return v.T.contiguous()
    L, half = len(taps[0]), n_coef // 2
    vp = F.pad(v, (L - 2, n_coef - v.shape[1])) if n_coef + L - 2 != v.shape[1] else v  # (M, n_coef + L - 2)
    out = torch.empty(n_coef, v.shape[0], dtype=v.dtype, device=v.device)  # (n_coef, M)
    for t, dst in zip(taps, out.view(2, half, -1)):  # dst: (half, M), one band
        dst = dst.T  # (M, half)
        torch.add(vp[:, 0:n_coef:2], vp[:, 1:n_coef + 1:2], alpha=t[1] / t[0], out=dst)
        for p in range(2, L):
            dst.add_(vp[:, p:p + n_coef:2], alpha=t[p] / t[0])
    return out


def _sparse_times(m, spectrum, dense):
    """(A S) @ dense, (out x W) @ (W, N) -> (out, N) (or B S^T): one sparse matmul, no synthesis pass."""
    nonzeros = spectrum.new_zeros(len(m["col"])).index_add_(0, m["index"], spectrum[m["coef"]] * m["tap"])
    out = dense.new_zeros(m["size"][0], dense.shape[1])
    return torch.addmm(out, _csr(m["ptr"], m["col"], nonzeros, m["size"]), dense, out=out)  # (not @: slower)


def _csr(ptr, idx, values, size):
    with warnings.catch_warnings():  # "sparse CSR is beta": stable for the ops used here since torch 2.0
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(ptr, idx, values, size=size, check_invariants=False)


def _merged_weight(weight, spectrum, plan, scaling, r0=0, r1=None):
    """Rows r0:r1 of W + dW (all by default), scattering the coefficients' L x L footprints: O(k L^2) work."""
    e, r1 = plan["footprint"], weight.shape[0] if r1 is None else r1
    lo, hi = e["row_start"][r0], e["row_start"][r1]  # the entries that fall into these rows
    dw = scaling * spectrum[e["coef"][lo:hi]] * e["tap"][lo:hi]  # (entries,)
    block = weight[r0:r1]  # (r1 - r0, in)
    return block.reshape(-1).index_add(0, e["index"][lo:hi] - r0 * weight.shape[1], dw).view_as(block)


def _plan(positions, shape, wavelet, use_idwt, device, dtype=torch.float32):
    """Index tables of dW = A S B^T for these positions, built once and shared by all layers that have them."""
    key = (positions.cpu().numpy().tobytes(), tuple(shape), wavelet, use_idwt, str(device), dtype)
    if key in _PLANS:
        return _PLANS[key]
    (out_f, in_f), k = shape, positions.shape[1]
    H, W = _padded(out_f, wavelet, use_idwt), _padded(in_f, wavelet, use_idwt)
    rows, cols = positions.to(device)  # (k,) each
    if use_idwt:
        h, w = H // 2, W // 2
        r, c = rows + (H - out_f) // 2, cols + (W - in_f) // 2  # (k,) each: positions in the padded C
        # C's right half (cH, cD) is high-pass along rows, its bottom half (cV, cD) high-pass along columns.
        row_band, col_band = (c >= w).long(), (r >= h).long()  # (k,) each: 0 low, 1 high
        a, b = row_band * h + r % h, col_band * w + c % w  # (k,) each: row and column in S = [lo | hi] x [lo | hi]
        taps = torch.stack(dwt.wavelet_filters(wavelet, torch.float64, device)[2:])  # (2, L): lo, hi
        L = taps.shape[1]
        # Coefficient (a, b) touches dW rows 2 * (r % h) + p - (L-2) with tap taps[row_band, p], p < L; cols alike.
        out_r = 2 * (r % h)[:, None] + torch.arange(L, device=device) - (L - 2)  # (k, L)
        out_c = 2 * (c % w)[:, None] + torch.arange(L, device=device) - (L - 2)  # (k, L)
        wr, wc = taps[row_band], taps[col_band]  # (k, L) each
    else:  # no IDWT: A = B = identity, S = C
        a, b, taps, out_r, out_c = rows, cols, None, rows[:, None], cols[:, None]  # out_r, out_c: (k, 1)
        wr = wc = torch.ones(k, 1, dtype=torch.float64, device=device)
    in_r, in_c = (out_r >= 0) & (out_r < out_f), (out_c >= 0) & (out_c < in_f)  # (k, L): inside the crop
    row_scale, col_scale = wr[:, :1], wc[:, :1]  # (k, 1): the first taps _analyze divides its bands by
    # S (H x W) for sampled_addmm; its taps undo _analyze's band scaling in the coefficient gradient
    S = _sparse(torch.ones(k, 1, dtype=torch.bool, device=device), (a * W + b)[:, None], row_scale * col_scale,
                (H, W), dtype)
    # W + dW: each coefficient's L x L footprint, (k, L, L), as flat indices into W (out * in)
    footprint = _entries(in_r[:, :, None] & in_c[:, None, :], out_r[:, :, None] * in_f + out_c[:, None, :],
                         wr[:, :, None] * wc[:, None, :], dtype)
    rows_at = torch.arange(out_f + 1, device=device) * in_f  # (out + 1,) where each row of W starts
    footprint["row_start"] = torch.searchsorted(footprint["index"], rows_at).tolist()  # row r: [r]:[r + 1]
    plan = dict(H=H, W=W, taps=None if taps is None else taps.tolist(),  # taps: for _analyze
                S=S, pattern=_csr(S["ptr"], S["col"], torch.zeros(k, dtype=dtype, device=device), S["size"]),
                AS=_sparse(in_r, out_r * W + b[:, None], wr * col_scale, (out_f, W), dtype),  # A S: (out x W)
                BSt=_sparse(in_c, out_c * H + a[:, None], wc * row_scale, (in_f, H), dtype),  # B S^T: (in x H)
                footprint=footprint)
    _PLANS[key] = plan
    return plan


def _entries(inside, index, tap, dtype):
    """A matrix built from the k values, as a list of entries: value[coef] * tap adds to flat `index`.

    inside, index, tap: (k, ...) alike; entries outside the crop are dropped, the rest sorted by index
    (row-major, so that the entries of a block of rows are one slice)."""
    index, order = index[inside].sort()
    return dict(coef=inside.nonzero()[:, 0][order], index=index, tap=tap[inside][order].to(dtype))


def _sparse(inside, index, tap, size, dtype):
    """A matrix of `size` built from the k values (S, A S or B S^T) in CSR: entries at one place summed."""
    entries = _entries(inside, index, tap, dtype)
    where, entries["index"] = torch.unique(entries["index"], return_inverse=True)  # (nonzeros,), (entries,)
    rows = torch.bincount(where // size[1], minlength=size[0])  # (size[0],) nonzeros per row
    return dict(entries, ptr=torch.cat([rows.new_zeros(1), rows.cumsum(0)]), col=where % size[1], size=size)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a rank-r update scaling * B A (`lora_A` r x in, `lora_B` out x r, B = 0)."""
    adapter_names = ("lora_A", "lora_B")

    def __init__(self, base, rank, scaling, init_seed=None):
        super().__init__()
        self.base, self.rank, self.scaling, self.merged = base, rank, scaling, False
        dtype = base.weight.dtype if base.weight.dtype == torch.float64 else torch.float32
        # PEFT's default init of A: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), drawn on the CPU from
        # init_seed when given (reproducible runs: the authors seed everything before building the model)
        bound = 1 / base.in_features ** 0.5
        generator = None if init_seed is None else torch.Generator().manual_seed(init_seed)
        A = torch.rand(rank, base.in_features, generator=generator, dtype=dtype) * (2 * bound) - bound
        self.lora_A = nn.Parameter(A.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=base.weight.device))

    def delta_weight(self):
        return self.scaling * self.lora_B @ self.lora_A

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        h = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)  # (..., out), float32
        if y.dtype == h.dtype:  # in place: no out-sized temporaries (linear's backward does not need y)
            return y.add_(h, alpha=self.scaling)
        return (y.to(h.dtype) + self.scaling * h).to(x.dtype)


def adapted_layers(model):
    """[(dotted name, layer)] of every WaveFT/LoRA layer in the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (WaveFTLinear, LoRALinear))]


def count_parameters(model):
    """Number of trainable adapter values (k per WaveFT layer, r * (in + out) per LoRA layer)."""
    return sum(p.numel() for _, m in adapted_layers(model) for p in _adapter_params(m))


def _adapter_params(layer):
    return [getattr(layer, name) for name in layer.adapter_names]


def _matches(name, patterns):
    """PEFT's rule: a str is a regex full-match on the dotted path, a list/tuple an exact name or dot-suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def inject(model, method="waveft", k=2592, scaling=None, wavelet="db1", seed=777, use_idwt=True, rank=1,
           target_modules=DEFAULT_TARGETS, exclude_modules=(), verbose=False, init_seed=None):
    """Replace every matching nn.Linear by a WaveFT (or LoRA) layer, freeze the rest, return the trainables.

    scaling=None means 25.0 for WaveFT (the authors' SDXL value) and 1.0 for LoRA (alpha = rank, as in
    the paper's LoRA baseline). init_seed seeds LoRA's random A (layer i uses init_seed + i); None draws it
    from torch's global RNG. WaveFT starts at zero and needs no init seed (`seed` places its coefficients)."""
    if method not in ("waveft", "lora"):
        raise ValueError(f"unknown method {method!r}; use 'waveft' or 'lora'")
    if method == "waveft" and wavelet not in dwt.WAVELETS:
        raise ValueError(f"unknown wavelet {wavelet!r}; supported: {', '.join(dwt.WAVELETS)}")
    if method == "lora" and (not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if adapted_layers(model):
        raise ValueError("model already has adapters; inject into a fresh model (or load into this one)")
    scaling = float((25.0 if method == "waveft" else 1.0) if scaling is None else scaling)
    modules = dict(model.named_modules())  # {dotted name: module}, the model itself as ""
    targets = [n for n in modules if n and _matches(n, target_modules) and not _matches(n, exclude_modules or ())]
    if not targets:
        linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        raise ValueError(f"no module matched target_modules={target_modules!r} (exclude_modules={exclude_modules!r});"
                         f" {len(linear)} nn.Linear modules in this model, e.g. {linear[:4] or list(modules)[1:5]}")
    for name in targets:
        mod = modules[name]
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"module {name!r} matched target_modules but is a {type(mod).__name__}, "
                             "not an nn.Linear; narrow target_modules or add it to exclude_modules")
        if method == "waveft" and not 0 < k <= mod.out_features * mod.in_features:
            raise ValueError(f"k={k} is invalid for layer {name!r} of shape {mod.out_features} x "
                             f"{mod.in_features}: need 1 <= k <= {mod.out_features * mod.in_features}")
    model.requires_grad_(False)
    for i, name in enumerate(targets):
        parent, _, child = name.rpartition(".")
        layer = (WaveFTLinear(modules[name], k, scaling, wavelet, seed, use_idwt) if method == "waveft"
                 else LoRALinear(modules[name], rank, scaling, None if init_seed is None else init_seed + i))
        setattr(model.get_submodule(parent), child, layer)
    model._waveft_config = dict(method=method, k=k, scaling=scaling, wavelet=wavelet, seed=seed,
                                use_idwt=use_idwt, rank=rank, target_modules=_jsonable(target_modules),
                                exclude_modules=_jsonable(exclude_modules))
    params = [p for _, m in adapted_layers(model) for p in _adapter_params(m)]
    if verbose:
        _print_summary(model, method, params)
    return params


def _jsonable(patterns):
    return patterns if isinstance(patterns, str) else list(patterns or ())


def _print_summary(model, method, params):
    config = model._waveft_config
    by_shape = Counter((m.base.out_features, m.base.in_features) for _, m in adapted_layers(model))
    print(f"{method}: {sum(by_shape.values())} adapted layers, {config}")
    print(f"  {'out x in':>13}  {'layers':>6}  {'trainable':>11}")
    for (o, i), count in sorted(by_shape.items()):
        per_layer = config["k"] if method == "waveft" else config["rank"] * (o + i)
        print(f"  {f'{o} x {i}':>13}  {count:>6}  {count * per_layer:>11,}")
    print(f"  total trainable parameters: {sum(p.numel() for p in params):,}")


@torch.no_grad()
def merge(model):
    """Fold each layer's dW into its frozen W (for inference); refuses to write NaN/inf into W."""
    for name, layer in adapted_layers(model):
        if not layer.merged:
            merged = layer.base.weight + layer.delta_weight().to(layer.base.weight.dtype)
            if not torch.isfinite(merged).all():
                raise ValueError(f"merging layer {name!r} would put NaN/inf into its weight; adapter is broken")
            layer.base.weight.copy_(merged)
            layer.merged = True


@torch.no_grad()
def unmerge(model):
    """Subtract each merged layer's dW from W again (exact up to rounding in W's dtype)."""
    for name, layer in adapted_layers(model):
        if layer.merged:
            layer.base.weight.sub_(layer.delta_weight().to(layer.base.weight.dtype))
            layer.merged = False


@torch.no_grad()
def remove(model):
    """Undo inject: put every adapted layer's original nn.Linear back, unmerged (W exactly as before inject when the
    layer was never merged; merged layers are unmerged first). The model can then take another inject or load;
    the rest of the model stays frozen, as inject left it."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("model has no adapters to remove")
    unmerge(model)
    for name, layer in layers:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    if hasattr(model, "_waveft_config"):
        del model._waveft_config
    return model


def save(model, path, extra_metadata=None):
    """Write the adapter (spectra + positions, or LoRA A/B) and its config to a safetensors file."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("model has no adapters to save; call waveft.inject first")
    tensors = {}
    for name, m in layers:
        for attr in m.adapter_names:
            tensors[f"{name}.{attr}"] = getattr(m, attr).detach().float().cpu().contiguous()
        if isinstance(m, WaveFTLinear):
            tensors[f"{name}.waveft_positions"] = m.waveft_positions.to(torch.int32).cpu()  # (2, k)
    meta = dict(model._waveft_config, layers={n: [m.base.out_features, m.base.in_features] for n, m in layers},
                **(extra_metadata or {}))
    data = save_bytes(tensors, metadata={key: json.dumps(value) for key, value in meta.items()})
    tmp = f"{path}.tmp"
    try:  # open() gives the file the umask's mode (safetensors' save_file makes it 0600)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: an interrupted save never leaves a half-written adapter
    finally:
        if os.path.exists(tmp):  # a failed write (full disk) leaves no temporary file behind
            os.remove(tmp)


def read_metadata(path):
    """The adapter file's metadata as plain python values (method, k, scaling, ..., layers)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as err:  # missing file, pickle, truncated file...
        raise ValueError(f"cannot read {path} as a safetensors adapter file: {err}") from None
    if "method" not in raw or "layers" not in raw:
        raise ValueError(f"{path} is a safetensors file but not a waveft adapter (no 'method'/'layers' metadata)")
    return {key: json.loads(value) for key, value in raw.items()}


@torch.no_grad()
def load(model, path):
    """Load an adapter file into the model, injecting the adapters first if it has none. Returns the metadata.

    Saved positions are trusted (they define the adapter); index plans are cached by the positions' values,
    so layers loaded with equal positions still share one."""
    meta = read_metadata(path)
    want = {name: tuple(shape) for name, shape in meta["layers"].items()}
    if not adapted_layers(model):
        modules = dict(model.named_modules())
        have = {n: (m.out_features, m.in_features) for n, m in modules.items()
                if n in want and isinstance(m, nn.Linear)}
        _check_same_layers(path, want, have)
        inject(model, method=meta["method"], k=meta["k"], scaling=meta["scaling"], wavelet=meta["wavelet"],
               seed=meta["seed"], use_idwt=meta["use_idwt"], rank=meta["rank"],
               target_modules="|".join(re.escape(n) for n in want))
        model._waveft_config.update(target_modules=meta["target_modules"], exclude_modules=meta["exclude_modules"])
    layers = dict(adapted_layers(model))
    _check_same_layers(path, want, {n: (m.base.out_features, m.base.in_features) for n, m in layers.items()})
    keys = ("method", "scaling") + (("k", "wavelet", "use_idwt") if meta["method"] == "waveft" else ("rank",))
    differ = [f"{key}: file {meta[key]!r}, model {model._waveft_config[key]!r}" for key in keys
              if meta[key] != model._waveft_config[key]]
    if differ:
        raise ValueError(f"{path} was saved with another adapter config than this model's: {'; '.join(differ)}")
    with safe_open(str(path), framework="pt") as f:
        for name, m in layers.items():
            if m.merged:
                raise ValueError(f"layer {name!r} is merged; call waveft.unmerge(model) before loading")
            for attr in m.adapter_names:
                value = _get(f, path, f"{name}.{attr}", getattr(m, attr).shape)
                getattr(m, attr).copy_(value)
            if isinstance(m, WaveFTLinear) and f"{name}.waveft_positions" in f.keys():
                positions = _get(f, path, f"{name}.waveft_positions", m.waveft_positions.shape).long()
                rows_ok = positions[0].lt(m.base.out_features).all() and positions[1].lt(m.base.in_features).all()
                if not (rows_ok and positions.ge(0).all()):
                    raise ValueError(f"{path}: positions of layer {name!r} fall outside its {tuple(want[name])} weight")
                if not torch.equal(positions, m.waveft_positions.cpu()):
                    m.waveft_positions = positions.to(m.waveft_positions.device)
    return meta


def _get(f, path, key, shape):
    if key not in f.keys():
        raise ValueError(f"{path} has no tensor {key!r}")
    value = f.get_tensor(key)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{path}: {key!r} has shape {tuple(value.shape)}, the model expects {tuple(shape)}")
    return value


def _check_same_layers(path, want, have):
    """Raise a ValueError listing missing/unexpected layer names and differing (out, in) shapes."""
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shapes = [f"{n}: file {want[n]}, model {have[n]}" for n in sorted(set(want) & set(have)) if want[n] != have[n]]
    if missing or unexpected or shapes:
        raise ValueError(f"adapter file {path} does not fit this model (was it saved for another model?)\n"
                         f"  layers in the file but not adapted Linear layers in the model ({len(missing)}): "
                         f"{missing[:5]}\n"
                         f"  adapted layers in the model but not in the file ({len(unexpected)}): {unexpected[:5]}\n"
                         f"  shape mismatches (out, in) ({len(shapes)}): {shapes[:5]}")
