"""Training steps of SDXL base 1.0's real UNet (2.6 B parameters, 560 adapted layers), the way a GPU run trains:
bf16 frozen UNet, bf16 autocast, gradient checkpointing. Ours WaveFT (k = 2592) vs ours LoRA r = 1 vs PEFT's WaveFT
(n_frequency = 2592): the same 1,451,520 trainable parameters each (PEFT's WaveFT counts the same as ours).

One step is train_dreambooth.py's micro-batch (batch 1): noise a latent to a random timestep with SDXL's DDPM
schedule, UNet forward under autocast with encoder_hidden_states (1, 77, 2048), text_embeds (1, 1280) and time_ids
(1, 6), float32 MSE to the noise, backward, gradient clipping, AdamW, zero_grad. Step i gets the same inputs in
every variant. The UNet (sdxl.build_sdxl_unet: random weights, allocated once in bf16, 5.1 GB) is built once and
the variants take turns on it, interleaved: in round r each variant is injected, takes step r (a fresh AdamW) and
is removed again, so memory never holds two UNets and load from other processes hits every variant alike. The
table gives each variant's median step, its run-to-run spread ((slowest - fastest) / median) and the range of
its per-round ratio to ours LoRA r=1. On a busy CPU, multi-threaded ops wait for descheduled threads (a 64 px
forward took 16 s with 2 threads at load 7, 1.8 s with 1): there, compare runs with --threads 1.

--compile then times each variant with the UNet under torch.compile(fullgraph=True), one variant at a time (a
compiled graph belongs to one set of adapters): the first step compiles (its time is reported), then --warmup and
--steps steps. With inductor on the CPU the compile of the full UNet takes many minutes: a GPU measurement.

Peak memory per variant: the largest over its steps, each measured from just before the step (after injection,
so injection transients do not count; AdamW's state is made in the step and counts):
- CUDA: torch.cuda.max_memory_allocated (weights + adapter + optimizer + activations), reset per step;
- CPU: the process's peak resident set size (VmHWM), reset per step through /proc/self/clear_refs after freed
  heap is handed back to the OS (malloc_trim). It includes the UNet and the Python process, the same for every
  variant; "step transient" is the peak minus the resident size just before the step.

    python benchmarks/bench_sdxl.py                                    # CPU, 256 px, ~3 min on 2 idle cores, ~8 GB
    python benchmarks/bench_sdxl.py --device cuda --resolution 1024    # the GPU table
    python benchmarks/bench_sdxl.py --device cuda --resolution 1024 --compile   # and compiled
    python benchmarks/bench_sdxl.py --steps 1 --warmup 0 --resolution 128 --variants ours-lora  # does it run?
"""
import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sdxl  # noqa: E402
import waveft  # noqa: E402
from common import print_table, status_kb  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
VARIANTS = {"ours-lora": "ours LoRA r=1", "ours-waveft": "ours WaveFT", "peft-waveft": "PEFT WaveFT"}
REFERENCE = "ours-lora"  # ratios are against it


# ----------------------------------------------------------------------------------------------------------------
# Adapters on and off the one UNet

def inject(unet, variant, k):
    """Put the variant's adapters on the UNet; returns its trainable parameters."""
    if variant == "ours-waveft":
        return waveft.inject(unet, method="waveft", k=k, scaling=25.0, wavelet="db1", seed=777)
    if variant == "ours-lora":
        return waveft.inject(unet, method="lora", rank=1, scaling=1.0, init_seed=0)
    from peft import WaveFTConfig, inject_adapter_in_model
    inject_adapter_in_model(WaveFTConfig(n_frequency=k, scaling=25.0, wavelet_family="db1", random_loc_seed=777,
                                         target_modules=TARGETS), unet)
    return [p for p in unet.parameters() if p.requires_grad]


def remove(unet, variant):
    """Take the variant's adapters off again: the original nn.Linear modules go back in place."""
    if variant.startswith("ours"):
        waveft.remove(unet)
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent), child, module.get_base_layer())
    if hasattr(unet, "peft_config"):  # inject_adapter_in_model's note of its config: gone with the adapter
        del unet.peft_config


# ----------------------------------------------------------------------------------------------------------------
# One training step, as train_dreambooth.py takes it

def make_inputs(index, resolution, device):
    """Step `index`'s batch (the same in every variant): clean latent, noise, timestep, text conditioning."""
    g = torch.Generator().manual_seed(index)
    side = resolution // 8  # the VAE's downsampling
    inputs = dict(latents=torch.randn(1, 4, side, side, generator=g), noise=torch.randn(1, 4, side, side, generator=g),
                  timesteps=torch.randint(1000, (1,), generator=g), text=torch.randn(1, 77, 2048, generator=g),
                  pooled=torch.randn(1, 1280, generator=g),
                  time_ids=torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32))
    return {key: value.to(device) for key, value in inputs.items()}


def train_step(unet, scheduler, optimizer, params, batch, device, keep_gradients=False):
    """One step; returns the loss and, if asked, the adapter's gradients {parameter name: float32 CPU tensor}."""
    noisy = scheduler.add_noise(batch["latents"], batch["noise"], batch["timesteps"])
    with torch.autocast(device.type, dtype=torch.bfloat16):
        prediction = unet(noisy, batch["timesteps"], encoder_hidden_states=batch["text"],
                          added_cond_kwargs={"text_embeds": batch["pooled"], "time_ids": batch["time_ids"]}).sample
    loss = F.mse_loss(prediction.float(), batch["noise"].float())
    loss.backward()
    gradients = None
    if keep_gradients:  # PEFT names its parameters <layer>.waveft_spectrum.default, ours <layer>.waveft_spectrum
        gradients = {name.replace(".default", ""): p.grad.float().cpu()
                     for name, p in unet.named_parameters() if p.requires_grad and p.grad is not None}
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), gradients  # .item() waits for the device, so the step's wall time is complete


# ----------------------------------------------------------------------------------------------------------------
# Peak memory per variant

def reset_peak_memory(device):
    """Start a new peak; returns the bytes in use now (allocated on CUDA, resident on the CPU), or nan."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that RSS counts live memory only
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM (peak RSS) to the current RSS
        return status_kb("VmRSS") * 1024
    except (OSError, RuntimeError):
        return float("nan")


def peak_memory(device):
    """Peak bytes since reset_peak_memory (nan where the OS cannot tell)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return status_kb("VmHWM") * 1024
    except (OSError, RuntimeError):
        return float("nan")


def rss_gb():
    try:
        return status_kb("VmRSS") / 2**20
    except (OSError, RuntimeError):
        return float("nan")


# ----------------------------------------------------------------------------------------------------------------

def timed_step(unet, scheduler, variant, args, device, index):
    """Inject the variant, take training step `index` (timed), remove it again. Returns (step s, inject s, peak
    memory, transient memory, the adapter's gradients {name: grad} for step 0 else None, trainable count)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    params = inject(unet, variant, args.k)
    sync()
    inject_s = time.perf_counter() - start
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    batch = make_inputs(index, args.resolution, device)
    before = reset_peak_memory(device)
    sync()
    start = time.perf_counter()
    loss, grads = train_step(unet, scheduler, optimizer, params, batch, device, keep_gradients=index == 0)
    elapsed = time.perf_counter() - start  # (step 0 also copies 1.5 M gradient values out: about a millisecond)
    peak = peak_memory(device)
    if index == 0 and len(grads) != len(params):  # e.g. checkpointing that silently drops the adapter's gradients
        raise RuntimeError(f"{VARIANTS[variant]}: only {len(grads)} of {len(params)} adapter tensors got a gradient")
    if not torch.isfinite(torch.tensor(loss)):
        raise FloatingPointError(f"{VARIANTS[variant]}: loss {loss} at step {index}")
    trainable = sum(p.numel() for p in params)
    del optimizer, params
    remove(unet, variant)
    return elapsed, inject_s, peak, peak - before, grads, trainable, loss


def run_interleaved(unet, scheduler, variants, args, device):
    """Round r: every variant in turn takes step r on the one UNet (inject, step, remove), so that load from other
    processes hits all of them alike. Returns {variant: row numbers} and the first step's gradients per variant."""
    times, rows, grads = {v: [] for v in variants}, {}, {}
    for r in range(args.warmup + args.steps):
        for variant in variants:
            step_s, inject_s, peak, transient, first_grads, trainable, loss = timed_step(
                unet, scheduler, variant, args, device, r)
            grads[variant] = first_grads if r == 0 else grads[variant]
            row = rows.setdefault(variant, dict(trainable=trainable, inject_s=[], peak=0, transient=0))
            row["inject_s"].append(inject_s)
            row["peak"], row["transient"] = max(row["peak"], peak), max(row["transient"], transient)
            if r >= args.warmup:
                times[variant].append(step_s)
            print(f"  round {r + 1}/{args.warmup + args.steps}{' (warm-up)' if r < args.warmup else ''}, "
                  f"{VARIANTS[variant]}: {step_s:.2f} s, loss {loss:.4f}", flush=True)
    for variant, row in rows.items():
        row.update(step_ms=1e3 * statistics.median(times[variant]), inject_s=statistics.median(row["inject_s"]),
                   times=times[variant])
    return rows, grads


def run_compiled(unet, scheduler, variant, args, device):
    """--compile: the variant injected once, the UNet compiled (fullgraph), warm-up steps (the first compiles), timed
    steps. Not interleaved: a compiled graph belongs to one set of adapters."""
    params = inject(unet, variant, args.k)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    model, times = torch.compile(unet, fullgraph=True), []
    for i in range(1 + args.warmup + args.steps):
        batch = make_inputs(i, args.resolution, device)
        start = time.perf_counter()
        loss, _ = train_step(model, scheduler, optimizer, params, batch, device)
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        print(f"  compiled {VARIANTS[variant]} step {i + 1}: {elapsed:.2f} s{' (compiles)' if i == 0 else ''}, "
              f"loss {loss:.4f}", flush=True)
    del optimizer, params
    remove(unet, variant)
    torch._dynamo.reset()
    return dict(compile_s=times[0], step_ms=1e3 * statistics.median(times[1 + args.warmup:]))


def spread(times):
    """Run-to-run spread of a variant's step times: (slowest - fastest) / median, in percent."""
    return 100 * (max(times) - min(times)) / statistics.median(times)


def compare_gradients(ours, peft):
    """Relative L2 difference of the two WaveFTs' first-step spectrum gradients (same layers, positions and inputs):
    a sanity check that both train the same coefficients (other positions or layers would give about 1.4), not an
    exactness test (that is bench_train.py's, in float32). Not zero: PEFT forms g^T x and its IDWT under bf16
    autocast, ours computes the k sampled values in float32, and bf16 roundings grow through 70 random-weight blocks."""
    if ours.keys() != peft.keys():
        raise RuntimeError("our WaveFT and PEFT's adapt different layers")
    a = torch.cat([ours[n] for n in ours])
    b = torch.cat([peft[n] for n in ours])
    return ((a - b).norm() / b.norm()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--resolution", type=int, default=256, help="image side in px; latents are 1/8 (default 256)")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per variant; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before timing")
    parser.add_argument("--k", type=int, default=2592, help="WaveFT coefficients per layer (default 2592)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's own choice)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)} (default all, in this order)")
    parser.add_argument("--compile", action="store_true",
                        help="then time each variant with the UNet torch.compile'd (fullgraph) too, after its compile")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown or args.variants!r}; choose from {', '.join(VARIANTS)}")
    if args.resolution <= 0 or args.resolution % 8 or args.steps < 1 or args.warmup < 0:
        parser.error("--resolution must be a positive multiple of 8, --steps >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch.cuda.is_available() is False")
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {what}, resolution {args.resolution} ({args.resolution // 8}^2 latents), "
          f"k {args.k}, steps {args.steps} + {args.warmup} warm-up, load average {os.getloadavg()[0]:.1f}", flush=True)

    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)  # SDXL's training schedule
    start = time.perf_counter()
    unet = sdxl.build_sdxl_unet(device=device, dtype=torch.bfloat16)
    unet.requires_grad_(False)
    unet.enable_gradient_checkpointing()
    unet.train()  # diffusers checkpoints only in training mode
    print(f"built SDXL's UNet: {sum(p.numel() for p in unet.parameters()):,} parameters in bf16 on {device} in "
          f"{time.perf_counter() - start:.1f} s; resident memory {rss_gb():.1f} GB", flush=True)

    results, grads = run_interleaved(unet, scheduler, variants, args, device)
    compiled = {v: run_compiled(unet, scheduler, v, args, device) for v in variants} if args.compile else {}
    if "ours-waveft" in grads and "peft-waveft" in grads:
        print(f"check: first-step spectrum gradients of our WaveFT and PEFT's, relative L2 difference "
              f"{compare_gradients(grads['ours-waveft'], grads['peft-waveft']):.1e} (bf16; unrelated would be ~1.4)")

    reference = REFERENCE if REFERENCE in results else variants[0]
    ref = results[reference]
    rows = [[VARIANTS[v], f"{r['trainable']:,}", f"{r['inject_s']:.2f}", f"{r['step_ms']:.0f}",
             r["step_ms"] / ref["step_ms"], f"{r['peak'] / 2**30:.2f}", r["peak"] / ref["peak"],
             f"{r['transient'] / 2**30:.2f}", f"{spread(r['times']):.0f} %"] for v, r in results.items()]
    rows += [[f"{VARIANTS[v]}, compiled", f"{results[v]['trainable']:,}", f"compile {r['compile_s']:.0f} s",
              f"{r['step_ms']:.0f}", r["step_ms"] / ref["step_ms"], "", "", "", ""] for v, r in compiled.items()]
    memory = "max_memory_allocated" if device.type == "cuda" else "peak RSS"
    print(f"\nSDXL base UNet, bf16 autocast + gradient checkpointing, batch 1, {args.resolution} px, {device}, "
          f"median of {args.steps} interleaved rounds:")
    print_table(["variant", "trainable", "inject s", "step ms", f"x {VARIANTS[reference]}",
                 f"{memory} GB", f"x {VARIANTS[reference]}", "step transient GB", "spread"], rows)
    for v in variants:  # the ratio of each round, taken within the round: load hits both of its steps alike
        ratios = [t / t_ref for t, t_ref in zip(results[v]["times"], ref["times"])]
        print(f"{VARIANTS[v]} / {VARIANTS[reference]}, per round: {min(ratios):.2f} to {max(ratios):.2f} "
              f"(median {statistics.median(ratios):.2f})")
    if {"ours-lora", "ours-waveft", "peft-waveft"} <= results.keys():
        lora, ours, peft = (results[v] for v in ("ours-lora", "ours-waveft", "peft-waveft"))
        print(f"targets: ours WaveFT <= 1.15x ours LoRA r=1 (got {ours['step_ms'] / lora['step_ms']:.2f}); "
              f"peak memory within 5% of ours LoRA r=1 (got {ours['peak'] / lora['peak']:.3f}); "
              f"PEFT WaveFT >= 1.6x ours WaveFT (got {peft['step_ms'] / ours['step_ms']:.2f})")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
