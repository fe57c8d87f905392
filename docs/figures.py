"""The pictures in README.md, computed with waveft's own `delta_weight` and drawn with pillow only.

    python docs/figures.py [--out docs] [--adapter outputs/<run>/adapter.safetensors]

makes, in about twenty seconds on 2 CPU cores (most of it rank.png's 1280 x 1280 singular values):
  basis.png    the dW painted by ONE coefficient in each quarter (cA, cH, cV, cD) of C, for db1, db2 and db4:
               with Haar a signed 2 x 2 block, with longer filters a wider, smoother patch; below, where one
               coefficient acts for each sparse method of the paper: on a point of W (weight domain, no IDWT), on
               a patch (WaveFT) or on all of W at once (FourierFT, a global Fourier basis);
  domains.png  the same k random coefficients as dW with the IDWT (WaveFT) and without it (use_idwt=False, the
               weight-domain sparse baseline), and a trained layer: by default one small layer fitted to a smooth
               target here in 150 Adam steps, or with --adapter the first layer of a trained adapter;
  rank.png     the singular values of dW on a 1280 x 1280 layer (SDXL's most common attention projection): WaveFT,
               FourierFT and the weight-domain sparse method with k = 2592 values against LoRA rank 1 with
               1280 + 1280 = 2560, nearly the same budget (2592 is LoRA r=1's in + out averaged over SDXL's 560
               layers): a rank-1 update against ones of rank about 1000 and more.

Each picture is a data function (tested in tests/test_docs.py) and a drawing function. Only waveft's public API is
used: inject, read_metadata, a layer's delta_weight(), its spectrum and positions (waveft_ or fourierft_) and
adapter_names (and dwt.wavelet_filters for the filter length).
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: waveft, dwt, sdxl beside docs/
import dwt  # noqa: E402
import pictures  # noqa: E402  (line_chart and the font: the same pictures code as every run's loss.png)
import waveft  # noqa: E402

QUARTERS = ("cA", "cH", "cV", "cD")  # C = (cA | cH) over (cV | cD): waveft.py's quarter table


def one_layer(out_features, in_features, dtype=torch.float32, **inject_options):
    """A single nn.Linear (zero weight) with a WaveFT, LoRA or FourierFT adapter injected, as in any model."""
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=False, dtype=dtype))
    nn.init.zeros_(model[0].weight)
    waveft.inject(model, target_modules=["0"], **inject_options)
    return model[0]


# ----------------------------------------------------------------------------------------------------------------
# 1. The WaveFT basis: what one coefficient paints

def basis_delta(wavelet, quarter, n=16):
    """dW (n x n) of a layer whose only coefficient is 1, at the centre of `quarter` of C, with scaling 1.

    C is (n + R) x (n + R), R = filter length - 2 (n is even here: an odd n pads one more), and a position p lands
    at p + R // 2 in C (waveft.py's "centring"). The centre of a quarter is coefficient h // 2 of its half-length
    h; a coefficient i of a band paints dW rows (and columns) 2i - R .. 2i + 1, so every quarter's centre paints
    near the middle of dW (Daubechies filters are not symmetric: low-pass ones weigh their start, high-pass ones
    their end)."""
    R = len(dwt.wavelet_filters(wavelet)[2]) - 2
    R += R % 2
    h = (n + R) // 2  # half of C's side: each quarter is h x h
    row_half, col_half = {"cA": (0, 0), "cH": (0, 1), "cV": (1, 0), "cD": (1, 1)}[quarter]  # its place in C
    layer = one_layer(n, n, torch.float64, k=1, scaling=1.0, wavelet=wavelet)
    layer.waveft_positions = torch.tensor([[row_half * h + h // 2 - R // 2], [col_half * h + h // 2 - R // 2]])
    with torch.no_grad():
        layer.waveft_spectrum.fill_(1.0)
        return layer.delta_weight()


def where_one_coefficient_acts(n=16, position=(1, 2)):
    """{label: dW} of ONE coefficient 1 (scaling 1) at `position` of an n x n layer for each sparse method: without
    the IDWT it is one entry of W (a point); WaveFT (db1) paints a 2 x 2 patch (coefficient (i, j) of cA: rows
    2i, 2i + 1, columns 2j, 2j + 1); FourierFT's coefficient at frequency (u, v) paints cos(2 pi (u r + v c) / n) / n^2
    on every W[r, c] (Re IFFT2 of a unit impulse): a wave over all of W."""
    deltas = {}
    for label, options in (("weight domain:\na point", dict(use_idwt=False)),
                           ("WaveFT (db1):\na 2 x 2 patch", dict(wavelet="db1")),
                           ("FourierFT:\nall of W at once", dict(method="fourierft"))):
        layer = one_layer(n, n, torch.float64, k=1, scaling=1.0, **options)
        spectrum = layer.adapter_names[0]  # waveft_spectrum or fourierft_spectrum; its positions beside it
        setattr(layer, spectrum.replace("spectrum", "positions"), torch.tensor([[position[0]], [position[1]]]))
        with torch.no_grad():
            getattr(layer, spectrum).fill_(1.0)
            deltas[label] = layer.delta_weight()
    return deltas


# ----------------------------------------------------------------------------------------------------------------
# 2. Sparse in which domain; and a trained layer

def smooth_target(n):
    """A smooth n x n "update" to fit: tilted stripes plus a round bump (values within about +-0.6)."""
    i = torch.arange(n, dtype=torch.float64)[:, None] / n  # rows
    j = torch.arange(n, dtype=torch.float64)[None, :] / n  # cols
    return torch.sin(2 * math.pi * (i + 0.5 * j)) * 0.6 + torch.exp(-((i - 0.3) ** 2 + (j - 0.7) ** 2) / 0.02)


def fit(layer, target, steps=200, lr=0.05, adam=True):
    """Train the layer's adapter from where it starts towards min 1/2 ||dW - target||^2, with Adam (or plain
    gradient descent). Fitting dW directly is what training through the layer on isotropic random inputs x would
    do (E ||x dW^T - x T^T||^2 is proportional to ||dW - T||^2), without the inputs."""
    params = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr) if adam else torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        loss = 0.5 * (layer.delta_weight() - target.to(params[0].dtype)).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return layer


def domain_deltas(n=64, k=128, seed=0):
    """{name: dW} for the SAME k positions and random values: without the IDWT (sparse in W itself), with db1
    and with db4. Positions depend only on (shape, k, position seed), not on the wavelet, so all three share them."""
    values = torch.randn(k, generator=torch.Generator().manual_seed(seed))
    deltas = {}
    for name, options in (("no IDWT (use_idwt=False)", dict(use_idwt=False)), ("WaveFT, db1", dict(wavelet="db1")),
                          ("WaveFT, db4", dict(wavelet="db4"))):
        layer = one_layer(n, n, k=k, scaling=1.0, **options)
        with torch.no_grad():
            layer.waveft_spectrum.copy_(values)
            deltas[name] = layer.delta_weight()
    return deltas


def trained_delta(adapter=None, n=64, k=512, wavelet="db4"):
    """(dW, caption) of a trained layer: the first WaveFT layer of an adapter file (its top-left 64 x 64), or,
    without a file, an n x n layer with k coefficients fitted to smooth_target(n) (about a second)."""
    if adapter is None:
        layer = fit(one_layer(n, n, k=k, scaling=1.0, wavelet=wavelet), smooth_target(n), steps=150, lr=0.05)
        return layer.delta_weight().detach(), f"trained: {wavelet}, k={k},\n150 Adam steps towards\nthe smooth target"
    from safetensors import safe_open
    meta = waveft.read_metadata(adapter)
    if meta["method"] != "waveft":
        raise ValueError(f"--adapter {adapter}: a {meta['method']} adapter; pass a WaveFT adapter file")
    name, (out_features, in_features) = next(iter(meta["layers"].items()))
    layer = one_layer(out_features, in_features, k=meta["k"], scaling=meta["scaling"], wavelet=meta["wavelet"],
                      use_idwt=meta["use_idwt"])
    with safe_open(str(adapter), framework="pt") as f, torch.no_grad():
        layer.waveft_positions = f.get_tensor(f"{name}.waveft_positions").long()
        layer.waveft_spectrum.copy_(f.get_tensor(f"{name}.waveft_spectrum"))
        delta = layer.delta_weight()[:64, :64]
    return delta, f"trained: {name}\nof {Path(adapter).parent.name}\n(top-left 64 x 64)"


# ----------------------------------------------------------------------------------------------------------------
# 3. Rank at equal budget

def rank_spectra(n=1280, k=2592, seed=0):
    """{label: singular values of dW, largest first} on an n x n layer: WaveFT (db1), FourierFT and the weight-domain
    sparse method with k random coefficients, WaveFT and LoRA r=1 both trained towards the same random full-rank
    target T. (FourierFT's coefficient at (u, v) is rank 2 in W, cos = two complex exponentials, so k of them can
    reach full rank; the weight domain's k entries, about 2 per row, leave rows and columns empty.)

    WaveFT's fit takes ONE gradient step of size 1: with Haar, distinct positions and an even n (nothing cropped)
    the k basis matrices are orthonormal, so the first step lands on the least-squares optimum (the test checks
    that the gradient is then zero). LoRA's fit is 50 Adam steps towards T's best rank-1 approximation."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(n, n, generator=generator) / n ** 0.5
    random_layer = one_layer(n, n, k=k, scaling=1.0)
    with torch.no_grad():
        random_layer.waveft_spectrum.copy_(torch.randn(k, generator=generator))
    sparse_layer = one_layer(n, n, k=k, scaling=1.0, use_idwt=False)
    with torch.no_grad():
        sparse_layer.waveft_spectrum.copy_(torch.randn(k, generator=generator))
    layers = {f"WaveFT k={k}, random spectrum": random_layer,
              f"FourierFT k={k}, random spectrum": one_layer(n, n, method="fourierft", k=k, scaling=1.0,
                                                              init_seed=seed),  # its init: standard normal
              f"weight domain k={k}, random values": sparse_layer,
              f"WaveFT k={k}, trained towards T": fit(one_layer(n, n, k=k, scaling=1.0), target, 1, 1.0, adam=False),
              f"LoRA r=1 ({2 * n} values), trained towards T":
                  fit(one_layer(n, n, method="lora", rank=1, init_seed=seed), target, 50, lr=0.01)}
    with torch.no_grad():
        return {label: singular_values(layer.delta_weight()) for label, layer in layers.items()}


def singular_values(matrix):
    """Largest first, as sqrt(eigenvalues of M^T M) in float64: a third of an SVD's time, and accurate to about
    1e-8 * s_1, far below the float32 round-off that numerical_rank counts from."""
    m = matrix.double()
    return torch.linalg.eigvalsh(m.T @ m).clamp(min=0).sqrt().flip(0)


def numerical_rank(singular_values, eps=torch.finfo(torch.float32).eps):
    """How many singular values stand above the float32 round-off of the matrix (numpy's matrix_rank rule)."""
    tol = singular_values[0] * max(singular_values.shape[0], 1) * eps
    return int((singular_values > tol).sum())


# ----------------------------------------------------------------------------------------------------------------
# Drawing: signed matrices on a diverging colour map (blue negative, white zero, red positive)

NEGATIVE, POSITIVE = (33, 102, 172), (178, 24, 43)


def colour_map(matrix, scale):
    """(rows, cols) values -> RGB image: -scale blue, 0 white, +scale red, linear in between (clipped)."""
    t = (matrix.detach().double() / scale).clamp(-1, 1)[..., None]  # (rows, cols, 1)
    white = torch.tensor([255.0, 255.0, 255.0], dtype=torch.float64)
    ends = torch.where(t < 0, torch.tensor(NEGATIVE, dtype=torch.float64), torch.tensor(POSITIVE, dtype=torch.float64))
    rgb = white + t.abs() * (ends - white)  # (rows, cols, 3)
    return Image.fromarray(rgb.round().to(torch.uint8).numpy(), "RGB")


def matrix_panel(matrix, scale, cell):
    """The matrix as cell x cell squares, with a thin grid between entries when they are big enough to see."""
    rows, cols = matrix.shape
    image = colour_map(matrix, scale).resize((cols * cell, rows * cell), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    if cell >= 6:
        for r in range(1, rows):
            draw.line([(0, r * cell), (cols * cell, r * cell)], fill=(228, 228, 228))
        for c in range(1, cols):
            draw.line([(c * cell, 0), (c * cell, rows * cell)], fill=(228, 228, 228))
    draw.rectangle([0, 0, cols * cell - 1, rows * cell - 1], outline=(120, 120, 120))
    return image


def colour_bar(width, low_label, high_label):
    """The legend: the colour map from -1 to +1 with its end and middle values written under it."""
    bar = colour_map(torch.linspace(-1, 1, width)[None, :].repeat(12, 1), 1.0)
    image = Image.new("RGB", (width, 32), "white")
    image.paste(bar, (0, 0))
    draw, font = ImageDraw.Draw(image), pictures.chart_font(12)
    draw.text((0, 15), low_label, fill="black", font=font)
    draw.text((width // 2, 15), "0", fill="black", font=font, anchor="ma")
    draw.text((width, 15), high_label, fill="black", font=font, anchor="ra")
    return image


def figure(title, panels, columns, legend, panel_labels=None, row_labels=()):
    """A white sheet: the title, panels (PIL images of one size) in a grid with a label above each and one to the
    left of each row, and the legend at the bottom."""
    font = pictures.chart_font(13)
    pw, ph = panels[0].size
    label_lines = max((label.count("\n") + 1 for label in panel_labels or [""]), default=1)
    left, gap, above = (44 if row_labels else 12), 14, 16 * label_lines + 4
    rows = (len(panels) + columns - 1) // columns
    width = max(left + columns * (pw + gap), legend.width + 2 * left)
    sheet = Image.new("RGB", (width, 30 + rows * (ph + above + gap) + legend.height + 8), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((12, 8), title, fill="black", font=font)
    for i, panel in enumerate(panels):
        x, y = left + (i % columns) * (pw + gap), 30 + (i // columns) * (ph + above + gap)
        sheet.paste(panel, (x, y + above))
        if panel_labels:
            draw.multiline_text((x + pw // 2, y), panel_labels[i], fill="black", font=font, anchor="ma", spacing=3,
                                align="center")
    for r, label in enumerate(row_labels):
        draw.text((6, 30 + r * (ph + above + gap) + above + ph // 2), label, fill="black", font=font, anchor="lm")
    sheet.paste(legend, ((width - legend.width) // 2, sheet.height - legend.height - 6))
    return sheet


def draw_basis(out_dir, wavelets=("db1", "db2", "db4"), n=16):
    deltas = [basis_delta(w, q, n) for w in wavelets for q in QUARTERS]
    scale = max(float(d.abs().max()) for d in deltas)
    labels = [q if r == 0 else "" for r in range(len(wavelets)) for q in QUARTERS]
    sheet = figure(f"dW of one coefficient 1 at the centre of each quarter of C ({n} x {n} layer, scaling 1)",
                   [matrix_panel(d, scale, 8) for d in deltas], len(QUARTERS),
                   colour_bar(300, f"-{scale:.2f}", f"+{scale:.2f}"), labels, wavelets)
    where = where_one_coefficient_acts(n)
    labels = [f"{label}\nmax |dW| = {float(d.abs().max()):.3g}" for label, d in where.items()]
    below = figure("where one coefficient 1 at (1, 2) acts (each on its own colour scale)",
                   [matrix_panel(d, float(d.abs().max()), 10) for d in where.values()], len(where),
                   colour_bar(300, "-max |dW|", "+max |dW|"), labels)
    both = Image.new("RGB", (max(sheet.width, below.width), sheet.height + below.height), "white")
    both.paste(sheet, (0, 0))
    both.paste(below, ((both.width - below.width) // 2, sheet.height))
    both.save(out_dir / "basis.png", optimize=True)


def draw_domains(out_dir, adapter=None):
    deltas = domain_deltas()
    n, k = next(iter(deltas.values())).shape[0], 128
    trained, caption = trained_delta(adapter)
    if adapter is None:
        deltas["the smooth target"] = smooth_target(n)
    deltas[caption] = trained
    labels = [f"{name}\nmax |{'T' if name == 'the smooth target' else 'dW'}| = {float(d.abs().max()):.2f}"
              for name, d in deltas.items()]
    sheet = figure(f"a {n} x {n} layer: the same k={k} random coefficients as dW without and with the IDWT; "
                   "a trained layer", [matrix_panel(d, float(d.abs().max()), 3) for d in deltas.values()],
                   len(deltas), colour_bar(300, "-max |dW|", "+max |dW|"), labels)
    sheet.save(out_dir / "domains.png", optimize=True)


def draw_rank(out_dir, n=1280):
    spectra = rank_spectra(n)
    series = []
    for label, s in spectra.items():
        r = numerical_rank(s)
        s = (s[:r] / s[0]).tolist()  # normalised, only the nonzero ones: LoRA's is a single dot
        series.append((f"{label}: rank {r}", list(range(1, r + 1)), s))
    chart = pictures.line_chart(series, title=f"singular values of dW on a {n} x {n} layer; T: a random full-rank "
                                "target", x_label="index i", y_label="s_i / s_1", size=(720, 380))
    chart.save(out_dir / "rank.png", optimize=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder for the PNGs (docs/)")
    parser.add_argument("--adapter", default=None, help="a trained WaveFT adapter.safetensors for the trained panel "
                        "of domains.png (default: a layer fitted here)")
    parser.add_argument("--rank-size", type=int, default=1280, help="n of rank.png's n x n layer (its three SVDs "
                        "take most of the time: the tests use a small n)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    draw_basis(out_dir)
    draw_domains(out_dir, args.adapter)
    draw_rank(out_dir, args.rank_size)
    print(f"wrote basis.png, domains.png and rank.png to {out_dir} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
