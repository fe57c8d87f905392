"""One adapted linear layer at SDXL's attention shapes: forward+backward time and memory vs a frozen nn.Linear.

    python benchmarks/bench_layer.py [--threads 2]     (CPU, about 1-2 minutes)
    python benchmarks/bench_layer.py --compile         (then compiled: the compile's seconds, the compiled step)

Cases: 640 x 640 with 4096 tokens, 1280 x 1280 with 1024 tokens, 2048 -> 1280 with 77 tokens (cross-attention
to_k). Variants, all on the same random weight, float32: the frozen nn.Linear (baseline), our LoRA r=1,
PEFT LoRA r=1, PEFT WaveFT (k=2592, db1) and our WaveFT (k=2592, db1). One step is y = layer(x) followed by
torch.autograd.grad(y, [x, adapter params], g): the input gradient plus every adapter gradient.

Time: median of 15 steps (45 for the short 77-token case) after warm-up; the variants are interleaved step by step so that load from
other processes on the machine hits all of them alike.

Memory, two honest CPU measures (torch has no CPU allocator statistics):
  peak MB  - the peak, over one step, of bytes allocated by torch minus bytes freed, read from
             torch.profiler(profile_memory=True) allocation events in time order. It counts y, the
             gradients, tensors saved for backward and every transient (e.g. a dense dW or W + dW);
             x, g and the weights exist before the step and are not counted.
  saved MB - bytes of tensors saved for backward that are new storages (not x, not a parameter),
             recorded with torch.autograd.graph.saved_tensors_hooks: what a deep network keeps per layer.
Before timing, the script checks that our WaveFT and PEFT's give the same y and spectrum gradient.
"""
import argparse
import copy
import os
import sys
import time

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import waveft  # noqa: E402
from benchmarks.common import print_table, without_kineto_start_stop_lines  # noqa: E402

CASES = [(640, 640, 4096, 15), (1280, 1280, 1024, 15), (1280, 2048, 77, 45)]  # (out, in, tokens, timed steps)
K, WARMUP = 2592, 3


def variants(out_f, in_f):
    import peft  # here, not at the top: --help answers without its seconds of import
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f).requires_grad_(False)
    made = {"frozen nn.Linear": nn.Sequential(copy.deepcopy(base))}
    made["our LoRA r=1"] = nn.Sequential(copy.deepcopy(base))
    waveft.inject(made["our LoRA r=1"], method="lora", rank=1, target_modules=["0"])
    made["PEFT LoRA r=1"] = peft.inject_adapter_in_model(
        peft.LoraConfig(r=1, lora_alpha=1, target_modules=["0"]), nn.Sequential(copy.deepcopy(base)))
    made["PEFT WaveFT k=2592"] = peft.inject_adapter_in_model(
        peft.WaveFTConfig(n_frequency=K, target_modules=["0"]), nn.Sequential(copy.deepcopy(base)))
    made["ours WaveFT k=2592"] = nn.Sequential(copy.deepcopy(base))
    waveft.inject(made["ours WaveFT k=2592"], k=K, target_modules=["0"])
    spectrum = torch.randn(K) * 1e-3  # nonzero adapters, the same spectrum in PEFT's and ours
    with torch.no_grad():
        made["PEFT WaveFT k=2592"][0].waveft_spectrum["default"].copy_(spectrum)
        made["ours WaveFT k=2592"][0].waveft_spectrum.copy_(spectrum)
        for name in ("our LoRA r=1", "PEFT LoRA r=1"):
            for p in made[name].parameters():
                if p.requires_grad:
                    p.normal_(std=1e-2)
    return made


def step(model, x, g):
    y = model(x)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return y, torch.autograd.grad(y, [x] + trainable, g)


def peak_mb(model, x, g):
    with without_kineto_start_stop_lines(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, x, g)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def saved_mb(model, x, g):
    known = {x.data_ptr()} | {p.data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in known:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    del y
    return sum(storages.values()) / 2**20


def check_against_peft(made, x, g):
    (y_ours, (_, gs_ours)), (y_peft, (_, gs_peft)) = (step(made[n], x, g) for n in ("ours WaveFT k=2592", "PEFT WaveFT k=2592"))
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gs_ours, gs_peft, rtol=1e-3, atol=1e-3 * gs_peft.abs().max().item())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the project machines have 2 cores)")
    parser.add_argument("--compile", action="store_true", help="then our two adapters under torch.compile (inductor, "
                        "fullgraph): the compile's seconds (a fresh process: no cached kernels) and the compiled step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows, compiled_rows = [], []
    for out_f, in_f, tokens, runs in CASES:
        made = variants(out_f, in_f)
        x = torch.randn(tokens, in_f, requires_grad=True)
        g = torch.randn(tokens, out_f)
        check_against_peft(made, x, g)
        times = {name: [] for name in made}
        for run in range(WARMUP + runs):
            for name, model in made.items():
                start = time.perf_counter()
                step(model, x, g)
                if run >= WARMUP:
                    times[name].append((time.perf_counter() - start) * 1e3)
        med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
        mem = {name: (peak_mb(model, x, g), saved_mb(model, x, g)) for name, model in made.items()}
        base_ms, base_mb = med["frozen nn.Linear"], mem["frozen nn.Linear"][0]
        for name in made:
            rows.append([f"{in_f}->{out_f} x{tokens}", name, med[name], f"{med[name] / base_ms:.2f}x",
                         f"{med[name] / med['our LoRA r=1']:.2f}x", mem[name][0], f"{mem[name][0] / base_mb:.2f}x",
                         mem[name][1]])
        for name in ("our LoRA r=1", "ours WaveFT k=2592") if args.compile else ():
            compiled_rows.append([f"{in_f}->{out_f} x{tokens}", name, *compiled_step(made[name], x, g, runs), med[name]])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, median of 15 (45 for 77 tokens) "
          "fwd+bwd steps; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (trust the ratios only near 0-1: "
          "with other processes on the cores, every parallel op waits for a descheduled thread)")
    print_table(["layer x tokens", "variant", "fwd+bwd ms", "vs frozen", "vs our LoRA", "peak MB", "peak vs frozen",
                 "saved MB"], rows)
    print(f"spectrum of one layer: {K * 4 / 2**20:.3f} MB (k={K} float32)")
    if compiled_rows:
        print_table(["layer x tokens", "variant", "compile s", "compiled fwd+bwd ms", "eager ms"], compiled_rows)


def compiled_step(model, x, g, runs):
    """(seconds of the first compiled step, which compiles forward and backward; median ms of the next `runs`)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    start = time.perf_counter()
    step(compiled, x, g)
    compile_s, times = time.perf_counter() - start, []
    for _ in range(runs):
        start = time.perf_counter()
        step(compiled, x, g)
        times.append((time.perf_counter() - start) * 1e3)
    return compile_s, sorted(times)[len(times) // 2]


if __name__ == "__main__":
    main()
