"""WaveFT: fine-tune a frozen nn.Linear through k sparse coefficients in the 2-D wavelet domain.

For a frozen weight W (out x in) and bias b, WaveFT (Bilican et al., arXiv 2505.12532; PEFT's WaveFTConfig)
trains k scalars `spectrum` at k fixed random `positions` of an otherwise-zero coefficient matrix C:

    dW = scaling * crop(IDWT2(C)),        y = x (W + dW)^T + b

C is read as one level of a 2-D wavelet transform stores an image: four quarters of h x w (h, w: half of C's
height and width), named as PyWavelets and dwt.py name the sub-bands. A coefficient at (i, j) of a quarter paints
dW around row 2i and column 2j; its quarter says which band it is along each axis of dW:

    quarter  place in C               band along the out axis   band along the in axis   Haar: a coefficient c
                                      (dW's row index)          (dW's column index)      paints c/2 times
    cA       C[:h, :w]  top left      low                       low                      + +   constant
                                                                                         + +
    cH       C[:h, w:]  top right     high                      low                      + +   top minus bottom
                                                                                         - -
    cV       C[h:, :w]  bottom left   low                       high                     + -   left minus right
                                                                                         + -
    cD       C[h:, w:]  bottom right  high                      high                     + -   checkerboard
                                                                                         - +

So the band along the out axis is read from C's column half (right: high), the band along the in axis from C's row
half (bottom: high); longer filters (db2, db4, ...: length L) paint overlapping L x L patches of the same kinds. For
them, and for odd sides, C is padded, the positions centred and the IDWT cropped to out x in, exactly as PEFT does
(`_padded`, `coefficients`; docs/waveft.md, "Padding and centring"). The positions are PEFT's too (`draw_positions`),
so spectra move between the two.

Two halves. The method, as defined (read this first): positions, `WaveFTLinear.delta_weight` (the formula above),
the same dW as scaling * A S B^T with explicit matrices (`delta_weight_separable`), and the forward, which with
inject(..., fast=False) is literally F.linear(x, W + delta_weight(), b); LoRA and FourierFT (a global Fourier
basis: dW = scaling * Re(IFFT2(C))) for baselines; inject, merge/unmerge/remove, save/load. Then "How training
stays as cheap as LoRA": the default forward gives the same y and gradients without ever building an out x in tensor.
"""
import json
import os
import re
import warnings
from collections import Counter
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as save_bytes

import dwt

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # SDXL UNet attention projections
DEFAULT_SCALING = {"waveft": 25.0, "fourierft": 64.0, "lora": 1.0}  # the authors' SDXL values (LoRA: alpha = rank)
_POSITIONS = {}  # (out, in, k, seed) -> (2, k) positions


def draw_positions(out_features, in_features, k, seed):
    """PEFT's positions: (2, k) int64 rows and cols. Cached: randperm of 2.6M elements costs ~30 ms."""
    key = (out_features, in_features, k, seed)
    if key not in _POSITIONS:
        flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:k]  # (k,)
        _POSITIONS[key] = torch.stack([flat // in_features, flat % in_features])  # (2, k)
    return _POSITIONS[key]


def _padded(n, wavelet, use_idwt):
    """Length of C along an axis whose output has length n: n + L - 2, rounded up to even (without IDWT, C is dW).
    One level of IDWT turns two bands of m coefficients into 2m - L + 2 samples (PyWavelets drops the L - 2 where
    the filters hang over the border), so n outputs need 2m >= n + L - 2 coefficients, in two equal bands."""
    if not use_idwt:
        return n
    n = n + len(dwt.wavelet_filters(wavelet)[2]) - 2
    return n + n % 2


class WaveFTLinear(nn.Module):
    """A frozen nn.Linear plus k trainable wavelet coefficients (`waveft_spectrum`)."""
    adapter_names = ("waveft_spectrum",)  # the trainable parameters, as named in files

    def __init__(self, base, k, scaling, wavelet, seed, use_idwt, fast=True):
        super().__init__()
        self.base, self.k, self.scaling, self.wavelet, self.seed = base, k, scaling, wavelet, seed
        self.use_idwt = use_idwt
        self.fast = fast  # a runtime choice of how forward computes (second half), never saved in adapter files
        self.merged = False  # True while dW is folded into base.weight (merge, for inference)
        dtype = base.weight.dtype if base.weight.dtype == torch.float64 else torch.float32  # never train in bf16
        self.waveft_spectrum = nn.Parameter(torch.zeros(k, dtype=dtype, device=base.weight.device))  # zero: dW = 0
        self.register_buffer("waveft_positions", draw_positions(base.out_features, base.in_features, k, seed)
                             .to(base.weight.device, copy=True))  # (2, k) rows, cols; own copy (the cache is shared)
        self._plan_memo = None  # the fast path's index plan for the current positions (second half: _plan_for)
        self.register_load_state_dict_post_hook(_refresh_plan)  # new positions, new plan
        _refresh_plan(self)  # made now, outside any torch.compile trace

    def coefficients(self):
        """C (C_rows x C_cols): zeros, with the k values at their positions + (L - 2) // 2 (centred)."""
        spectrum, (rows, cols), (out_f, in_f) = self.waveft_spectrum, self.waveft_positions, self.base.weight.shape
        C_rows, C_cols = _padded(out_f, self.wavelet, self.use_idwt), _padded(in_f, self.wavelet, self.use_idwt)
        C = torch.zeros(C_rows, C_cols, dtype=spectrum.dtype, device=spectrum.device)
        return C.index_put((rows + (C_rows - out_f) // 2, cols + (C_cols - in_f) // 2), spectrum)

    def delta_weight(self):
        """The definition, exactly as PEFT: scaling * crop(IDWT2(C)) (or the scattered C without IDWT)."""
        C, (out_f, in_f) = self.coefficients(), self.base.weight.shape
        if not self.use_idwt:
            return self.scaling * C
        h, w = C.shape[0] // 2, C.shape[1] // 2  # C's quarters (the table above): (cA | cH) over (cV | cD)
        full = dwt.idwt2((C[:h, :w], (C[:h, w:], C[h:, :w], C[h:, w:])), self.wavelet)  # out or out + 1 rows, ...
        return self.scaling * full[:out_f, :in_f]  # the first out x in block

    def delta_weight_separable(self):
        """The same dW written separably, with explicit dense matrices: scaling * A S B^T. It shows why dW is sparse
        (each coefficient of S paints an L x L patch: A's column times B's column), which the fast path (second
        half) builds directly. A reference to read and test against delta_weight (out x C_rows, in x C_cols).

        IDWT2 is separable: A (out x C_rows) is the 1-D synthesis along the out axis (its column j: what a unit
        coefficient j paints there, _synthesis_matrix), B (in x C_cols) the one along the in axis. S is C in band
        order, [low | high] along each axis: by the quarter table, C with its off-diagonal quarters swapped."""
        C, (out_f, in_f) = self.coefficients(), self.base.weight.shape
        if not self.use_idwt:
            return self.scaling * C  # A and B are identities, S = C
        (C_rows, C_cols), h, w = C.shape, C.shape[0] // 2, C.shape[1] // 2
        S = torch.cat([torch.cat([C[:h, :w], C[h:, :w]], 1), torch.cat([C[:h, w:], C[h:, w:]], 1)])  # cA cV / cH cD
        A = _synthesis_matrix(out_f, C_rows, self.wavelet, C.dtype, C.device)  # (out, C_rows)
        B = _synthesis_matrix(in_f, C_cols, self.wavelet, C.dtype, C.device)  # (in, C_cols)
        return self.scaling * A @ S @ B.T  # (out, in)

    def forward(self, x):
        if self.merged:  # dW is already inside base.weight
            return self.base(x)
        if not _use_fast_path(self.fast, x.device):
            return _definition(self, x, self.waveft_spectrum.dtype)
        # The same y and the same gradients, computed cheaply: see the second half.
        return _fast_forward(self, x)

    def _apply(self, fn, recurse=True):  # behind .to(dtype), .half(), .cuda(): adapters stay float32
        _apply_keeping_adapters_float32(self, fn, recurse)
        _refresh_plan(self)  # on the new device
        return self


def _definition(layer, x, dtype):
    """y = F.linear(x, W + dW, b) in the adapter's dtype (float32; float64 for a float64 model) with autocast off:
    rounding W + dW to a bf16 W, or to bf16 under autocast, would erase updates far below W's precision (bf16 keeps
    ~3 digits). For a float32 model and input every cast below is a no-op."""
    bias = None if layer.base.bias is None else layer.base.bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(dtype), layer.base.weight.to(dtype) + layer.delta_weight(), bias).to(x.dtype)


def _synthesis_matrix(n, n_coef, wavelet, dtype, device):
    """One level of 1-D synthesis-and-crop as an (n x n_coef) matrix: coefficient j is coefficient i = j mod h of
    band j // h (h = n_coef / 2: low-pass, then high-pass); it paints the band's synthesis filter t at outputs
    2i + p - (L - 2), p < L (the L - 2 outputs before 0 are the border PyWavelets drops), kept where in [0, n)."""
    taps = dwt.wavelet_filters(wavelet, dtype, device)[2:]  # rec_lo, rec_hi
    L, h = len(taps[0]), n_coef // 2
    A = torch.zeros(n, n_coef, dtype=dtype, device=device)
    for j in range(n_coef):
        for p in range(L):
            if 0 <= 2 * (j % h) + p - (L - 2) < n:
                A[2 * (j % h) + p - (L - 2), j] = taps[j // h][p]
    return A


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

    def _apply(self, fn, recurse=True):  # behind .to(dtype), .half(), .cuda(): adapters stay float32
        return _apply_keeping_adapters_float32(self, fn, recurse)

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        h = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)  # (..., out), float32
        if y.dtype == h.dtype:  # in place: no out-sized temporaries (linear's backward does not need y)
            return y.add_(h, alpha=self.scaling)
        return (y.to(h.dtype) + self.scaling * h).to(x.dtype)


class FourierFTLinear(nn.Module):
    """FourierFT (Gao et al., arXiv 2405.03003; PEFT's FourierFTConfig), the paper's global-basis baseline: k trainable
    values `fourierft_spectrum` at WaveFT's positions (draw_positions: PEFT draws both alike from random_loc_seed) in
    an otherwise-zero out x in C, and dW = scaling * Re(IFFT2(C)). IFFT2 divides by out * in, and one coefficient
    c at (u, v) paints scaling c cos(2 pi (u m / out + v n / in)) / (out in) on every W[m, n]: a wave over all of
    W, where WaveFT's paints an L x L patch. As PEFT: the FFT in float32 (the adapter's dtype: torch's FFT has no
    bf16), and the initial spectrum of its default init_weights=False, standard normal (dW != 0 from the start,
    ~scaling sqrt(k) / (out in) per entry), which PEFT draws from the global RNG; here from init_seed + the layer's
    index, as LoRA's A. Only the definition runs (autograd through the FFT; docs/benchmarks.md: what a fast path
    would need)."""
    adapter_names = ("fourierft_spectrum",)

    def __init__(self, base, k, scaling, seed, init_seed=None):
        super().__init__()
        self.base, self.k, self.scaling, self.seed, self.merged = base, k, scaling, seed, False
        dtype = base.weight.dtype if base.weight.dtype == torch.float64 else torch.float32
        generator = None if init_seed is None else torch.Generator().manual_seed(init_seed)
        self.fourierft_spectrum = nn.Parameter(torch.randn(k, generator=generator, dtype=dtype).to(base.weight.device))
        self.register_buffer("fourierft_positions", draw_positions(base.out_features, base.in_features, k, seed)
                             .to(base.weight.device, copy=True))  # (2, k) rows, cols

    def delta_weight(self):
        spectrum, positions = self.fourierft_spectrum, tuple(self.fourierft_positions)
        C = torch.zeros(self.base.weight.shape, dtype=spectrum.dtype, device=spectrum.device)
        return self.scaling * torch.fft.ifft2(C.index_put(positions, spectrum)).real

    def forward(self, x):
        return self.base(x) if self.merged else _definition(self, x, self.fourierft_spectrum.dtype)

    def _apply(self, fn, recurse=True):  # behind .to(dtype), .half(), .cuda(): adapters stay float32
        return _apply_keeping_adapters_float32(self, fn, recurse)


LAYER_TYPES = (WaveFTLinear, LoRALinear, FourierFTLinear)  # this file's adapted layers


def _apply_keeping_adapters_float32(layer, fn, recurse):
    """nn.Module._apply (behind .to, .half, .bfloat16, .cuda), except that adapter values (and grads) that a bf16/fp16
    cast would round keep their float32 values, in the same Parameter objects: pipe.to(torch.bfloat16) after inject
    must neither round trained values to ~3 digits nor break an optimizer made before. .double() gives float64."""
    kept = [(name, p.detach().clone(), None if p.grad is None else p.grad.clone())
            for name, p in zip(layer.adapter_names, _adapter_params(layer))]  # k (or r (in + out)) values: cheap
    nn.Module._apply(layer, fn, recurse)
    for name, value, grad in kept:
        p = getattr(layer, name)
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = value.to(p.device, torch.float32)
            if grad is not None:
                p.grad = grad.to(p.device, torch.float32)
    return layer


def adapted_layers(model):
    """[(dotted name, layer)] of every WaveFT/LoRA/FourierFT layer in the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]


def count_parameters(model):
    """Number of trainable adapter values (k per WaveFT or FourierFT layer, r * (in + out) per LoRA layer)."""
    return sum(p.numel() for _, m in adapted_layers(model) for p in _adapter_params(m))


def _adapter_params(layer):
    return [getattr(layer, name) for name in layer.adapter_names]


def _matches(name, patterns):
    """PEFT's rule: a str is a regex full-match on the dotted path, a list/tuple an exact name or dot-suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def inject(model, method="waveft", k=2592, scaling=None, wavelet="db1", seed=777, use_idwt=True, rank=1,
           target_modules=DEFAULT_TARGETS, exclude_modules=(), verbose=False, init_seed=None, fast=True):
    """Replace every matching nn.Linear (PEFT's rule: _matches) by a WaveFT (LoRA, FourierFT) layer, freeze the rest,
    return the trainables. scaling=None: the authors' SDXL values, 25.0 for WaveFT, 64.0 for FourierFT, 1.0 for LoRA
    (alpha = rank). init_seed seeds LoRA's random A and FourierFT's spectrum (layer i: init_seed + i; None: torch's
    global RNG); WaveFT starts at zero (`seed` places its coefficients, and FourierFT's). fast (WaveFT): the second
    half of this file, or (False) the definition, autograd through dW (slower, out x in memory per layer); the same
    results, a runtime choice that files do not keep (`layer.fast`). See docs/waveft.md, "The API"."""
    if method not in ("waveft", "lora", "fourierft"):
        raise ValueError(f"unknown method {method!r}; use 'waveft', 'lora' or 'fourierft'")
    if method == "waveft" and wavelet not in dwt.WAVELETS:
        raise ValueError(f"unknown wavelet {wavelet!r}; supported: {', '.join(dwt.WAVELETS)}")
    if method == "lora" and (not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if adapted_layers(model):
        raise ValueError("model already has adapters; inject into a fresh model (or load into this one)")
    scaling = float(DEFAULT_SCALING[method] if scaling is None else scaling)
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
        if method != "lora" and not 0 < k <= mod.out_features * mod.in_features:
            raise ValueError(f"k={k} is invalid for layer {name!r} of shape {mod.out_features} x "
                             f"{mod.in_features}: need 1 <= k <= {mod.out_features * mod.in_features}")
    model.requires_grad_(False)
    for i, name in enumerate(targets):
        parent, _, child = name.rpartition(".")
        base, layer_seed = modules[name], None if init_seed is None else init_seed + i
        layer = (WaveFTLinear(base, k, scaling, wavelet, seed, use_idwt, fast) if method == "waveft" else
                 FourierFTLinear(base, k, scaling, seed, layer_seed) if method == "fourierft" else
                 LoRALinear(base, rank, scaling, layer_seed))
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
        per_layer = config["rank"] * (o + i) if method == "lora" else config["k"]
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
    """Undo inject: put every adapted layer's original nn.Linear back, unmerged first (W exactly as before inject if
    never merged), so that the model can take another inject or load; the rest stays frozen, as inject left it."""
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
        if not isinstance(m, LoRALinear):  # WaveFT's (FourierFT's) waveft_positions (fourierft_positions)
            positions = m.adapter_names[0].replace("spectrum", "positions")
            tensors[f"{name}.{positions}"] = getattr(m, positions).to(torch.int32).cpu()  # (2, k)
    meta = dict(model._waveft_config, layers={n: [m.base.out_features, m.base.in_features] for n, m in layers},
                **(extra_metadata or {}))
    write_atomically(path, save_bytes(tensors, metadata={key: json.dumps(value) for key, value in meta.items()}))


def write_all(fd, data):
    """os.write until every byte is written: one call may write fewer bytes (above 2 GB, or a disk filling up)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomically(path, data):
    """Write bytes through <path>.<pid>.tmp and one rename: never a half-written file, nor (full disk) a temporary
    one. Plain os.write: a full disk is an OSError there, and the file gets the umask's mode (safetensors' save_file
    makes it 0600). The one safe-write helper: files.write_file writes every other file of a run through it."""
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: torchrun ranks may write the same file
    try:
        with open(tmp, "wb", buffering=0) as f:
            write_all(f.fileno(), data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
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
def load(model, path, fast=True):
    """Load an adapter file into the model (injecting its adapters if the model has none). Returns the metadata.

    All or nothing: every check (layer names and shapes, config, merged layers, each tensor's shape, positions inside
    the weight) comes before the model changes, inject included, so a refused load leaves the model as it was. Saved
    positions are used as they are; fast: as in inject. A PEFT adapter folder is read by interop.load_peft."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; waveft.load reads this project's adapter files (.safetensors). For a "
                         f"PEFT adapter folder use interop.load_peft(model, folder), or interop.load_adapter(model, "
                         f"path), which takes either")
    meta = read_metadata(path)
    want = {name: tuple(shape) for name, shape in meta["layers"].items()}  # {layer: (out, in)}
    values = _read_adapter_tensors(path, meta, want)  # the file checked against its own config and shapes
    layers = dict(adapted_layers(model))
    if layers:  # into the adapters the model has: the same layers and config, none merged
        check_same_layers(path, want, {n: (m.base.out_features, m.base.in_features) for n, m in layers.items()})
        keys = ("method", "scaling") + {"waveft": ("k", "wavelet", "use_idwt"), "fourierft": ("k",)}.get(
            meta["method"], ("rank",))
        differ = [f"{key}: file {meta[key]!r}, model {model._waveft_config[key]!r}" for key in keys
                  if meta[key] != model._waveft_config[key]]
        if differ:
            raise ValueError(f"{path} was saved with another adapter config than this model's: {'; '.join(differ)}")
        for name, m in layers.items():
            if m.merged:
                raise ValueError(f"layer {name!r} is merged; call waveft.unmerge(model) before loading")
    else:  # inject, once the file's layers are known to be nn.Linear layers of its shapes
        check_same_layers(path, want, {n: (m.out_features, m.in_features) for n, m in model.named_modules()
                                       if n in want and isinstance(m, nn.Linear)})
        inject(model, method=meta["method"], k=meta["k"], scaling=meta["scaling"], wavelet=meta["wavelet"],
               seed=meta["seed"], use_idwt=meta["use_idwt"], rank=meta["rank"],
               target_modules="|".join(re.escape(n) for n in want), fast=fast, init_seed=0)  # RNG left alone
        model._waveft_config.update(target_modules=meta["target_modules"], exclude_modules=meta["exclude_modules"])
        layers = dict(adapted_layers(model))
    for (name, attr), value in values.items():
        getattr(layers[name], attr).copy_(value)
    for layer in layers.values():
        _refresh_plan(layer)  # new positions: the fast path's index plan follows
    return meta


def _read_adapter_tensors(path, meta, want):
    """{(layer, attribute): tensor} of every layer the file names, each shape checked against the file's own config
    and layer shapes (what inject builds from them; load then checks those against the model), and the positions
    inside the weight."""
    values, k, rank, method = {}, meta["k"], meta["rank"], meta["method"]
    with safe_open(str(path), framework="pt") as f:
        for name, (out_f, in_f) in want.items():
            shapes = ({"lora_A": (rank, in_f), "lora_B": (out_f, rank)} if method == "lora"
                      else {f"{method}_spectrum": (k,), f"{method}_positions": (2, k)})  # WaveFT, FourierFT
            for attr, shape in shapes.items():
                if not attr.endswith("_positions") or f"{name}.{attr}" in f.keys():  # without: seed's positions
                    values[name, attr] = read_tensor(f, path, f"{name}.{attr}", shape)
            positions = values.get((name, f"{method}_positions"))
            if positions is not None and not (positions.ge(0).all() and positions[0].lt(out_f).all()
                                              and positions[1].lt(in_f).all()):
                raise ValueError(f"{path}: positions of layer {name!r} fall outside its {(out_f, in_f)} weight")
    return values


def read_tensor(f, path, key, shape):
    if key not in f.keys():
        raise ValueError(f"{path} has no tensor {key!r}")
    value = f.get_tensor(key)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{path}: {key!r} has shape {tuple(value.shape)}, the model expects {tuple(shape)}")
    return value


def check_same_layers(path, want, have):
    """Raise a ValueError listing missing/unexpected layer names and differing (out, in) shapes."""
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shapes = [f"{n}: file {want[n]}, model {have[n]}" for n in sorted(set(want) & set(have)) if want[n] != have[n]]
    if missing or unexpected or shapes:
        raise ValueError(f"adapter file {path} does not fit this model (was it saved for another model?)\n"
                         f"  layers in the file but not adapted Linear layers in the model ({len(missing)}): "
                         f"{missing[:5]}\n"
                         f"  adapted layers in the model but not in the file ({len(unexpected)}): {unexpected[:5]}\n"
                         f"  shape mismatches (out, in) ({len(shapes)}): {shapes[:5]}")


# ======================================================================================================================
# How training stays as cheap as LoRA
# ======================================================================================================================
# The definition builds dW (out x in) from k numbers, and autograd through it builds the dense gradient g^T x
# (N out in multiply-adds) only to read k entries of its wavelet analysis. But each coefficient paints an L x L patch
# (delta_weight_separable: A S B^T), so dW has at most k L^2 nonzeros (Haar: 4k). The fast path keeps dW sparse: the
# same y and gradients (tests: float64, 1e-6) at about LoRA r=1's cost, in fewer operations (each a kernel launch
# on a GPU: benchmarks/bench_ops.py counts them). With x (N tokens x in) and g = dL/dy:
# 1. The plan (_plan), made once per layer shape: dW / scaling and its transpose as sparse matrices whose nonzeros
#    are M @ spectrum (M a fixed sparse map: each nonzero's taps times coefficients), and S's k entries.
# 2. Forward: y = x W^T + b + scaling (dW x^T)^T, one sparse matmul in the spectrum's float32 (updates far below a
#    bf16 W's precision still change y). With many float32 tokens (N (out + in) >= out in), one matmul with W + dW.
# 3. Backward: grad_x = g W + scaling (dW^T g^T)^T. The coefficients' gradient dL/dS = scaling (A^T g^T)(B^T x^T)^T
#    is needed only at S's k entries: two 1-D wavelet analyses (_analyze), then one sampled matmul
#    (torch.sparse.sampled_addmm). Nothing of size out x in is made or saved.
# 4. torch.compile cannot trace sparse tensors: there, forward and backward are one custom op each, and the plan is
#    made outside the traced graph (_plan_for).

SPARSE_CSR_DEVICES = ("cpu", "cuda")  # device types with the sparse CSR kernels the fast path uses (mps has none)
_WARNED_DEVICES = set()  # device types whose fallback to the definition was announced
with warnings.catch_warnings():  # torch warns once per process that sparse CSR is beta (it is stable for the ops
    warnings.simplefilter("ignore")  # used here, since torch 2.0): said here, to no one, instead of in a user's run
    torch.sparse_csr_tensor(torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0),
                            (0, 0), check_invariants=False)


def fast_path_supported(device_type):
    """Whether the fast path can run on this device type ("cpu", "cuda", "mps", ...: torch.device(...).type)."""
    return device_type in SPARSE_CSR_DEVICES


def _use_fast_path(fast, device):
    """fast=True asks for the fast path; where it cannot run, layers use the definition and say so once."""
    if not fast:
        return False
    if fast_path_supported(device.type):
        return True
    if device.type not in _WARNED_DEVICES:
        _WARNED_DEVICES.add(device.type)
        warnings.warn(f"waveft: torch has no sparse CSR kernels on {device.type!r}, so WaveFT layers compute the "
                      "definition F.linear(x, W + delta_weight(), b) there (same result, more time and memory)")
    return False


_PLANS = {}  # (positions' bytes, shape, wavelet, use_idwt, device, dtype) -> Plan: one per layer shape in a UNet
_PLAN_BY_NUMBER = []  # a compiled graph names a plan by its number (a custom op takes tensors and numbers only)


class Plan(NamedTuple):
    """Step 1, for one layer shape and one set of positions: shared by all layers that have both. Sparse matrices are
    CSR tensors with int32 indices (as the sparse kernels read them: int64 ones would be converted at every call)."""
    number: int  # its index in _PLAN_BY_NUMBER
    dW: tuple  # (pattern, M): dW / scaling's nonzeros are M @ spectrum (M: nonzeros x k, sparse)
    dWt: tuple  # the same for (dW / scaling)^T
    index: torch.Tensor  # dW's nonzeros' positions in W.view(-1), sorted; those of rows r0:r1 are
    row_start: list  # [row_start[r0], row_start[r1])
    taps: list  # [[low-pass], [high-pass]] synthesis taps, for _analyze (None without IDWT: A = B = I)
    S: torch.Tensor  # S (C_rows x C_cols), zeros: where sampled_addmm samples (delta_weight_separable's S)
    order: torch.Tensor  # (k,): the coefficient of each of S's entries, in their CSR order
    first_taps: torch.Tensor  # (k,) in that order: t0 (out band) * t0 (in band), what _analyze divided by

    def __deepcopy__(self, memo):  # made once, never changed: a copied layer shares it
        return self


def _fast_forward(layer, x):
    # Under autocast the frozen matmul runs in the autocast dtype, as nn.Linear's would; the adapter stays in
    # the spectrum's dtype. Every cast is explicit inside, so autocast is switched off there.
    amp = torch.is_autocast_enabled(x.device.type)
    base_dtype = torch.get_autocast_dtype(x.device.type) if amp else layer.base.weight.dtype
    args = (x, layer.base.weight, layer.base.bias, layer.waveft_spectrum, _plan_for(layer, x.device).number,
            layer.scaling, base_dtype)
    with torch.autocast(x.device.type, enabled=False):
        return _forward_op(*args) if torch.compiler.is_compiling() else _WaveFTFunction.apply(*args)  # step 4


def _plan_for(layer, device):
    """The layer's plan, remembered between steps and remade when the positions change: replaced (e.g. by load_peft
    or .to(device)), edited in place (load, load_state_dict: the version counter moves) or given new storage
    (.data = ...). A compiled graph can read no version or data pointer: it takes the plan made eagerly, when the
    layer was made, moved or loaded (_refresh_plan) or last called uncompiled."""
    positions, dtype, memo = layer.waveft_positions, layer.waveft_spectrum.dtype, layer._plan_memo
    if torch.compiler.is_compiling():
        if memo is None or memo[0] is not positions or memo[1][2] != device:
            raise RuntimeError("waveft: a layer's positions or device changed after its plan was made: call the "
                               "model once uncompiled first")
        return memo[2]
    key = (positions._version, positions.data_ptr(), device, dtype)
    if memo is None or memo[0] is not positions or memo[1] != key:  # holding positions keeps `is` meaningful
        plan = _plan(positions, layer.base.weight.shape, layer.wavelet, layer.use_idwt, device, dtype)
        layer._plan_memo = memo = (positions, key, plan)
    return memo[2]


def _refresh_plan(layer, *_):
    """Make a WaveFT layer's plan now, outside any compiled graph (the layer is new, moved, cast or loaded)."""
    if isinstance(layer, WaveFTLinear) and layer.fast and fast_path_supported(layer.waveft_positions.device.type):
        _plan_for(layer, layer.waveft_positions.device)


class _WaveFTFunction(torch.autograd.Function):
    """y = x (W + dW)^T + b by steps 2 and 3 above; saves only x, W and the spectrum (nothing out x in)."""

    @staticmethod
    def forward(ctx, x, weight, bias, spectrum, plan, scaling, base_dtype):  # plan: its number
        ctx.save_for_backward(x, weight, spectrum)  # x and W exist anyway: nothing new is kept alive
        ctx.args = (_PLAN_BY_NUMBER[plan], scaling, base_dtype)
        y, ctx.dense_matmul = _forward(x, weight, bias, spectrum, *ctx.args)
        return y

    @staticmethod
    def backward(ctx, g):
        with torch.autocast(g.device.type, enabled=False):  # (even when called under autocast) as in forward
            return *_backward(g, *ctx.saved_tensors, *ctx.args, ctx.needs_input_grad[:4]), None, None, None


def _forward(x, weight, bias, spectrum, plan, scaling, base_dtype):
    """(y, whether it took one matmul with W + dW): step 2."""
    x2, out_f = x.reshape(-1, x.shape[-1]), weight.shape[0]  # x2: (N, in)
    frozen = weight.to(base_dtype)  # W in the base matmul's dtype; the cast (if any) is transient, never saved
    bias = None if bias is None else bias.to(base_dtype)
    dense_matmul = _dense_matmul(x2, frozen, spectrum)  # not to be confused with a layer's `merged` (merge())
    if dense_matmul:
        y = F.linear(x2, _weight_plus_delta(frozen, spectrum, plan, scaling), bias)
    else:  # x W^T + b + scaling (dW x^T)^T
        adapter = _times(plan.dW, spectrum, _transposed(x2, spectrum.dtype))  # (out, N)
        y = _add(F.linear(x2.to(frozen.dtype), frozen, bias), adapter.T, scaling, x.dtype)  # (N, out)
    return y.reshape(*x.shape[:-1], out_f), dense_matmul


def _dense_matmul(x2, frozen, spectrum):
    """Many tokens (N (out + in) >= out in), all in one dtype: one matmul with W + dW costs less (step 2)."""
    return x2.dtype == frozen.dtype == spectrum.dtype and len(x2) * sum(frozen.shape) >= frozen.numel()


def _backward(g, x, weight, spectrum, plan, scaling, base_dtype, needs):
    """[grad_x, grad_w, grad_b, grad_s], each None unless its flag in needs is set: step 3."""
    x2, g2, cdt = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), spectrum.dtype  # (N, in), (N, out)
    frozen, grads = weight.to(base_dtype), [None] * 4
    if needs[3]:  # dL/dS = scaling (A^T g^T)(B^T x^T)^T, needed only at S's k entries (in CSR order)
        Atg = _analyze(g2.to(cdt), plan.taps, plan.S.shape[0])  # (C_rows, N), each band / its first tap
        Btx = _analyze(x2.to(cdt), plan.taps, plan.S.shape[1])  # (C_cols, N)
        sampled = torch.sparse.sampled_addmm(plan.S, Atg, Btx.T, beta=0.0, alpha=scaling).values()
        del Atg, Btx  # every tensor freed before the next is made lowers the peak memory
        grads[3] = torch.empty_like(spectrum).index_put_((plan.order,), sampled.mul_(plan.first_taps))  # (k,)
    if needs[0] and _dense_matmul(x2, frozen, spectrum):  # g (W + dW), a quarter of W at a time (the transient)
        bounds, grad_x = [len(frozen) * i // 4 for i in range(5)], g2.new_zeros(x2.shape)
        for r0, r1 in zip(bounds, bounds[1:]):
            grad_x.addmm_(g2[:, r0:r1], _weight_plus_delta(frozen, spectrum, plan, scaling, r0, r1))
        grads[0] = grad_x.reshape(x.shape)
    elif needs[0]:  # g W + scaling (dW^T g^T)^T
        adapter = _times(plan.dWt, spectrum, _transposed(g2, cdt))  # (in, N)
        grads[0] = _add(g2.to(frozen.dtype) @ frozen, adapter.T, scaling, x.dtype).reshape(x.shape)
    if needs[1]:  # only if someone unfroze W
        grads[1] = (g2.T @ x2.to(g2.dtype)).to(weight.dtype)
    if needs[2]:
        grads[2] = g2.sum(0).to(weight.dtype)
    return grads


def _transposed(v, dtype):
    """v^T in dtype, contiguous (one copy): the sparse kernels read their dense operand's rows."""
    return v.new_empty(v.shape[::-1], dtype=dtype).copy_(v.T)


def _add(y, adapter, scaling, dtype):
    """y + scaling adapter, computed in the adapter's dtype (or y's, if wider) and rounded once to dtype."""
    return y.add_(adapter, alpha=scaling) if y.dtype == dtype else torch.add(y, adapter, alpha=scaling).to(dtype)


def _times(m, spectrum, dense):
    """(dW / scaling or its transpose: m's pattern, its nonzeros M @ spectrum) @ dense: one sparse matmul, into one
    new tensor (torch's @ would make a second, zeroed one: a higher peak)."""
    (pattern, M), out = m, dense.new_empty(m[0].shape[0], dense.shape[1])  # beta=0: out is never read
    csr = torch.sparse_csr_tensor(pattern.crow_indices(), pattern.col_indices(), M @ spectrum, pattern.shape,
                                  check_invariants=False)
    return torch.addmm(out, csr, dense, beta=0.0, out=out)


def _analyze(v, taps, n_coef):
    """v (N, n) -> (n_coef, N): B^T v^T, one level of 1-D analysis, bands [low | high], coefficient-major (as
    sampled_addmm reads it fastest). Band coefficient i is sum_p t[p] v[2i + p - (L - 2)] (hence L - 2 zeros in front),
    computed divided by t[0]: one torch.add(.., alpha=t1/t0) straight into the output (Haar: one add per band);
    the plan's first_taps multiply t[0] back."""
    if taps is None:  # no IDWT: B = I
        return v.T.contiguous()
    L, half = len(taps[0]), n_coef // 2
    vp = F.pad(v, (L - 2, n_coef - v.shape[1])) if n_coef + L - 2 != v.shape[1] else v  # (N, n_coef + L - 2)
    out = v.new_empty(n_coef, len(v))
    for t, dst in zip(taps, out.view(2, half, -1)):  # t: one band's L taps; dst: (half, N), its coefficients
        torch.add(vp[:, 0:n_coef:2], vp[:, 1:n_coef + 1:2], alpha=t[1] / t[0], out=dst.T)
        for p in range(2, L):
            dst.T.add_(vp[:, p:p + n_coef:2], alpha=t[p] / t[0])
    return out


def _weight_plus_delta(weight, spectrum, plan, scaling, r0=0, r1=None):
    """Rows r0:r1 of W + dW (all by default): a copy of W with dW's nonzeros there added, O(k L^2)."""
    r1 = len(weight) if r1 is None else r1
    lo, hi = plan.row_start[r0], plan.row_start[r1]
    block, delta = weight[r0:r1], (plan.dW[1] @ spectrum)[lo:hi]
    return block.flatten().index_add(0, plan.index[lo:hi] - r0 * weight.shape[1], delta, alpha=scaling).view_as(block)


# Step 4: what torch.compile calls instead of _WaveFTFunction, the same two functions as opaque custom ops (the
# compiler sees only the shapes of their results, register_fake). A custom op takes tensors and numbers only: the
# plan goes by its number, a gradient not asked for comes back as an empty tensor.
@torch.library.custom_op("waveft::forward", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spectrum: torch.Tensor, plan: int,
                scaling: float, base_dtype: torch.dtype) -> torch.Tensor:
    return _forward(x, weight, bias, spectrum, _PLAN_BY_NUMBER[plan], scaling, base_dtype)[0]


@torch.library.custom_op("waveft::backward", mutates_args=())
def _backward_op(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, spectrum: torch.Tensor, plan: int,
                 scaling: float, base_dtype: torch.dtype, needs: list[bool]) -> list[torch.Tensor]:
    with torch.autocast(g.device.type, enabled=False):
        grads = _backward(g, x, weight, spectrum, _PLAN_BY_NUMBER[plan], scaling, base_dtype, needs)
    return [like.new_empty(0) if grad is None else grad for grad, like in zip(grads, (x, weight, weight, spectrum))]


def _save_for_backward_op(ctx, inputs, output):
    x, weight, _, spectrum, *ctx.args = inputs
    ctx.save_for_backward(x, weight, spectrum)


def _gradients_by_op(ctx, g):
    needs = list(ctx.needs_input_grad[:4])
    grads = _backward_op(g, *ctx.saved_tensors, *ctx.args, needs)
    return *[grad if need else None for grad, need in zip(grads, needs)], None, None, None


_forward_op.register_autograd(_gradients_by_op, setup_context=_save_for_backward_op)
_forward_op.register_fake(lambda x, weight, *_: x.new_empty(*x.shape[:-1], len(weight)))
_backward_op.register_fake(lambda g, x, weight, spectrum, *args: [
    like.new_empty(like.shape if need else 0) for like, need in zip((x, weight, weight[:, 0], spectrum), args[-1])])


def _plan(positions, shape, wavelet, use_idwt, device, dtype=torch.float32):
    """The Plan for these positions (step 1), made once and shared by all layers."""
    key = (positions.cpu().numpy().tobytes(), tuple(shape), wavelet, use_idwt, str(device), dtype)
    if key in _PLANS:
        return _PLANS[key]
    (out_f, in_f), k = shape, positions.shape[1]
    rows, cols = positions.to(device)  # (k,) each
    C_rows, C_cols = _padded(out_f, wavelet, use_idwt), _padded(in_f, wavelet, use_idwt)
    if use_idwt:
        h, w = C_rows // 2, C_cols // 2  # C's quarters are h x w
        r, c = rows + (C_rows - out_f) // 2, cols + (C_cols - in_f) // 2  # (k,) each: positions in the padded C
        # The band of each value along dW's out and in axes, read from C's halves (the quarter table): C's right
        # half (cH, cD) is high-pass along the out axis, its bottom half (cV, cD) along the in axis.
        out_band, in_band = (c >= w).long(), (r >= h).long()  # (k,) each: 0 low, 1 high
        s_row, s_col = out_band * h + r % h, in_band * w + c % w  # (k,) each: where the value sits in S
        taps = torch.stack(dwt.wavelet_filters(wavelet, torch.float64, device)[2:])  # (2, L): rec_lo, rec_hi
        p = torch.arange(taps.shape[1], device=device) - (taps.shape[1] - 2)  # (L,)
        # A value paints dW rows 2 (r % h) + p - (L - 2), p < L, with its out band's taps; columns alike.
        dw_rows, dw_cols = 2 * (r % h)[:, None] + p, 2 * (c % w)[:, None] + p  # (k, L) each
        row_taps, col_taps = taps[out_band], taps[in_band]  # (k, L) each
    else:  # no IDWT: dW = scaling C = scaling S, one entry per coefficient
        s_row, s_col, dw_rows, dw_cols = rows, cols, rows[:, None], cols[:, None]  # (k, 1) each
        row_taps = col_taps = torch.ones(k, 1, dtype=torch.float64, device=device)
    inside = ((dw_rows >= 0) & (dw_rows < out_f))[:, :, None] & ((dw_cols >= 0) & (dw_cols < in_f))[:, None, :]
    tap = (row_taps[:, :, None] * col_taps[:, None, :]).to(dtype)  # (k, L, L): each coefficient's patch of dW
    dW, index = _patches(dw_rows[:, :, None] * in_f + dw_cols[:, None, :], tap, inside, (out_f, in_f))
    dWt, _ = _patches(dw_cols[:, None, :] * out_f + dw_rows[:, :, None], tap, inside, (in_f, out_f))
    order = torch.argsort(s_row * C_cols + s_col)  # S's entries row-major, as CSR keeps them
    plan = Plan(number=len(_PLAN_BY_NUMBER), dW=dW, dWt=dWt, index=index,
                row_start=torch.searchsorted(index, torch.arange(out_f + 1, device=device) * in_f).tolist(),
                taps=taps.tolist() if use_idwt else None, order=order, first_taps=(row_taps[:, 0] * col_taps[:, 0])[
                    order].to(dtype), S=_csr_of(s_row, s_col, torch.zeros(k, dtype=dtype, device=device),
                                                (C_rows, C_cols)))
    _PLANS[key] = plan
    _PLAN_BY_NUMBER.append(plan)
    return plan


def _patches(flat, tap, inside, size):
    """dW / scaling (or its transpose) from the coefficients' patches: flat[i, ...] where coefficient i puts
    tap[i, ...] (where inside; overlaps add up). ((its pattern, M), its nonzeros' flat positions, sorted)."""
    where, nonzero = torch.unique(flat[inside], return_inverse=True)
    coef = torch.arange(len(flat), device=flat.device)[:, None, None].expand_as(flat)[inside]
    pattern = _csr_of(where // size[1], where % size[1], torch.zeros_like(where, dtype=tap.dtype), size)
    return (pattern, _csr_of(nonzero, coef, tap[inside], (len(where), len(flat)))), where


def _csr_of(rows, cols, values, size):
    """The sparse matrix with values[e] at (rows[e], cols[e]) (repeats add up) as a CSR tensor, int32 indices."""
    csr = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, size, check_invariants=False).to_sparse_csr()
    return torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), size,
                                   check_invariants=False)
