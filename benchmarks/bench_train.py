"""Training-step cost of our WaveFT vs our LoRA r=1 vs PEFT's WaveFT and LoRA r=1 (and our FourierFT, the definition
only), on a mid-size SDXL-like UNet.

One step = UNet forward + backward + AdamW on the adapter, as in train_dreambooth.py, batch 1, float32 on the CPU.
The UNet is SDXL's first two levels (block_out_channels (320, 640), 2 transformer layers at width 640, cross-attention
over 2048-d text, text_time conditioning) with random weights, so its attention projections are SDXL's own 640 x 640
and 2048 x 640 layers. All five variants live in one process and are timed interleaved (common.median_ms_interleaved),
so load from other processes hits them alike; ratios are against our LoRA r=1.

Peak memory is measured per variant on Linux as the peak resident set size during one step (reset through
/proc/self/clear_refs, after returning freed heap to the OS with malloc_trim) plus the bytes the model and the
optimizer hold, i.e. what a GPU's max_memory_allocated would report.

    python benchmarks/bench_train.py                 # 128 px (16 x 16 latents), about a minute on 2 cores (58 s idle)
    python benchmarks/bench_train.py --resolution 256 --runs 5
"""
import argparse
import copy
import ctypes
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import waveft  # noqa: E402
from common import median_ms_interleaved, print_table, status_kb  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def mid_size_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(5, 10), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + 1280)


def adapted(base, variant, k):
    unet = copy.deepcopy(base)
    unet.requires_grad_(False)
    if variant == "ours WaveFT":
        waveft.inject(unet, method="waveft", k=k, scaling=25.0, wavelet="db1", seed=777)
    elif variant == "ours LoRA r=1":
        waveft.inject(unet, method="lora", rank=1, scaling=1.0)
    elif variant == "ours FourierFT":  # the definition: dW = 64 Re(IFFT2(C)) out x in per layer call, autograd
        waveft.inject(unet, method="fourierft", k=k, scaling=64.0, seed=777, init_seed=0)
    else:
        from peft import LoraConfig, WaveFTConfig, inject_adapter_in_model
        config = (WaveFTConfig(n_frequency=k, scaling=25.0, wavelet_family="db1", random_loc_seed=777,
                               target_modules=TARGETS) if variant == "PEFT WaveFT" else
                  LoraConfig(r=1, lora_alpha=1, target_modules=TARGETS))
        inject_adapter_in_model(config, unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    return unet, params, torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)


def make_step(unet, params, optimizer, resolution, backward_only=False):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, resolution // 8, resolution // 8, generator=g)
    text = torch.randn(1, 77, 2048, generator=g)
    cond = {"text_embeds": torch.randn(1, 1280, generator=g),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)}
    t = torch.tensor([500])

    def step():
        loss = unet(latents, t, encoder_hidden_states=text, added_cond_kwargs=cond).sample.square().mean()
        loss.backward()
        if backward_only:
            return
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def check_same_gradients(ours, peft, resolution):
    """Before timing: one backward on both WaveFT variants must give the same spectrum gradients (same maths),
    layer by layer, so that the timings compare equal work."""
    grads = []
    for unet, params, _ in (ours, peft):
        make_step(unet, params, None, resolution, backward_only=True)()
        grads.append({name.replace(".default", ""): p.grad.clone() for name, p in unet.named_parameters()
                      if p.requires_grad})
        unet.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys(), "the two WaveFT variants adapt different layers"
    worst = max(((grads[0][n] - grads[1][n]).abs().max() / grads[1][n].abs().max()).item() for n in grads[0])
    assert worst < 1e-3, f"our WaveFT and PEFT's disagree: max relative gradient difference {worst:.2e}"
    print(f"check: our WaveFT and PEFT WaveFT spectrum gradients agree (max rel. diff {worst:.1e})", flush=True)


def peak_step_mb(step, unet, optimizer):
    """Resident bytes held (model + optimizer state) + the peak RSS growth during one step, in MB."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        gc.collect()
        libc.malloc_trim(0)
        before = status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        step()
        transient = (status_kb("VmHWM") - before) / 1024
    except (OSError, RuntimeError):
        return float("nan"), float("nan")
    held = sum(t.numel() * t.element_size() for t in list(unet.parameters()) + list(unet.buffers()))
    held += sum(s.numel() * s.element_size() for state in optimizer.state.values() for s in state.values()
                if torch.is_tensor(s))
    return held / 2**20 + transient, transient


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--k", type=int, default=2592)
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, resolution {args.resolution}, k {args.k}, "
          f"load average {os.getloadavg()[0]:.1f} (compare runs made on an idle machine)", flush=True)
    base = mid_size_unet()
    variants = ["ours LoRA r=1", "ours WaveFT", "PEFT LoRA r=1", "PEFT WaveFT", "ours FourierFT"]
    models, steps = {}, {}
    for name in variants:
        start = time.perf_counter()
        models[name] = adapted(base, name, args.k)
        steps[name] = make_step(*models[name], args.resolution)
        print(f"{name}: {len(models[name][1])} trainable tensors, "
              f"{sum(p.numel() for p in models[name][1]):,} parameters, injected in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    del base

    check_same_gradients(models["ours WaveFT"], models["PEFT WaveFT"], args.resolution)
    ms = median_ms_interleaved(steps, warmup=2, runs=args.runs)
    memory = {}
    for name in variants:  # one at a time, so one model's transients never count against another's
        memory[name] = peak_step_mb(steps[name], models[name][0], models[name][2])
    ref_ms, ref_mb = ms["ours LoRA r=1"], memory["ours LoRA r=1"][0]
    rows = [[name, sum(p.numel() for p in models[name][1]), ms[name], ms[name] / ref_ms,
             ms[name] / ms["ours WaveFT"], memory[name][0], memory[name][1], memory[name][0] / ref_mb]
            for name in variants]
    print_table(["variant", "trainable", "step ms (median)", "x ours LoRA r=1", "x ours WaveFT",
                 "peak MB", "step transient MB", "peak x ours LoRA r=1"], rows)
    print(f"targets: ours WaveFT <= 1.15x ours LoRA r=1 (got {ms['ours WaveFT'] / ref_ms:.2f}); "
          f"PEFT WaveFT >= 1.6x ours WaveFT (got {ms['PEFT WaveFT'] / ms['ours WaveFT']:.2f}); "
          f"peak memory within 5% of ours LoRA r=1 (got {memory['ours WaveFT'][0] / ref_mb:.3f})")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
