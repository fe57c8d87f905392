"""Benchmark: 2-D wavelet forward + inverse (wavedec2 then waverec2) of dwt.py vs PyWavelets and ptwt, CPU float32.

Reference: WaveFT (arXiv 2505.12532) runs one idwt2 per adapted layer per step; this times the transform alone.
    python benchmarks/bench_dwt.py            # the full table (about 1-2 minutes on 2 cores)
    python benchmarks/bench_dwt.py --quick    # 640x640 only, 5 runs
    python benchmarks/bench_dwt.py --quick --wavelets sym4 coif2   # any of dwt.WAVELETS (default: db1 db4)
On a machine shared with other jobs, 2-thread timings of torch code (ours and ptwt alike) are hit by
parallel regions waiting for a descheduled thread; `--threads 1` then gives stable, comparable numbers.
Not here: GPU timings, backward passes, or memory use.
"""
import argparse
import os
import sys

import numpy as np
import pywt
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dwt  # noqa: E402
from common import median_ms_interleaved, print_table  # noqa: E402

MODE = "symmetric"  # PyWavelets' default, and the mode WaveFT's inverse uses


def contenders(x, wavelet, level):
    """name -> callable doing forward + inverse, each on its own library's native input."""
    import ptwt  # here, not at the top: --help answers without its seconds of import
    x_numpy = x.numpy()
    return {
        "ours": lambda: dwt.waverec2(dwt.wavedec2(x, wavelet, MODE, level), wavelet, MODE),
        "pywt": lambda: pywt.waverec2(pywt.wavedec2(x_numpy, wavelet, MODE, level=level), wavelet, MODE),
        "ptwt": lambda: ptwt.waverec2(ptwt.wavedec2(x, wavelet, mode=MODE, level=level), wavelet),
    }


def check_same_result(x, wavelet, level):
    """A benchmark of a wrong transform is meaningless: coefficients and reconstruction must match PyWavelets."""
    ours = dwt.wavedec2(x, wavelet, MODE, level)
    reference = pywt.wavedec2(x.numpy(), wavelet, MODE, level=level)
    for a, b in zip([ours[0]] + [c for bands in ours[1:] for c in bands],
                    [reference[0]] + [c for bands in reference[1:] for c in bands]):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dwt.waverec2(ours, wavelet, MODE).numpy(), pywt.waverec2(reference, wavelet, MODE),
                               rtol=1e-4, atol=1e-4)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="640x640 only, 5 runs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the project machines have 2 cores)")
    parser.add_argument("--wavelets", nargs="+", default=["db1", "db4"], choices=dwt.WAVELETS, metavar="WAVELET",
                        help="wavelets to time (default: db1 db4); any of dwt.WAVELETS")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [(640, 640)] if args.quick else [(640, 640), (1280, 1280), (1280, 2048)]
    runs = 5 if args.quick else 10
    rows = []
    for height, width in shapes:
        x = torch.randn(height, width, generator=torch.Generator().manual_seed(0))
        for wavelet in args.wavelets:
            max_level = pywt.dwt_max_level(min(height, width), pywt.Wavelet(wavelet).dec_len)
            for level in (1, max_level):
                check_same_result(x, wavelet, level)
                ms = median_ms_interleaved(contenders(x, wavelet, level), warmup=3, runs=runs)
                rows.append([f"{height}x{width}", wavelet, level, ms["ours"], ms["pywt"], ms["ptwt"],
                             ms["ours"] / ms["pywt"], ms["ours"] / ms["ptwt"]])
    print(f"wavedec2 + waverec2, float32, mode={MODE}, torch threads={args.threads}, median of {runs} runs (ms)")
    print_table(["matrix", "wavelet", "levels", "ours", "pywt", "ptwt", "ours/pywt", "ours/ptwt"], rows)


if __name__ == "__main__":
    main()
