"""Kernel-launching operations per adapted layer call and per training step, counted with torch.profiler: ours WaveFT
(k=2592, db1) vs ours LoRA r=1 vs PEFT's WaveFT (n_frequency=2592), the frozen layer alone for scale.

On a GPU each operation is at least one kernel launch, a few microseconds whatever its size; SDXL has 560 adapted
layers, each called three times per step (forward, checkpoint recompute, backward), so an adapter's count of small
operations is a floor under the step time that a CPU timing cannot show. Counts do not depend on the machine's
load or speed: they are what this script measures on a shared machine.

The counting rule, the same for every variant. torch.profiler records each aten operator call with the calls it
makes. An op counts when it is not metadata-only and none of the ops it calls counts (the innermost op does the
work: aten::linear counts as its aten::addmm, aten::to as its aten::copy_, aten::zeros as its aten::fill_).
Metadata-only ops, not counted, make no kernel on any device:
- views and aliases (view, reshape's _reshape_alias, as_strided, t, transpose, permute, expand, unsqueeze, squeeze,
  select, slice, narrow, unfold, split, unbind, chunk, detach, alias, lift_fresh, view_as, unflatten, flatten):
  a new tensor header over the same memory;
- allocations without initialisation (empty, empty_strided, empty_like, new_empty, resize_): an allocator call;
- the sparse tensors' constructors and index accessors (sparse_csr_tensor, _sparse_csr_tensor_unsafe,
  crow_indices, col_indices, values, _nnz, _values): they wrap or hand out existing tensors;
- queries (size, stride, dim, is_nonzero's dispatch, result_type, _has_compatible_shallow_copy_type).
Autograd's and the profiler's own events (autograd::engine::..., record_param_comms) are not aten ops.

Layer calls: SDXL's four adapted shape groups (640 x 640 at 4096 tokens, 1280 x 1280 at 1024, 2048 -> 640 and
2048 -> 1280 at the 77 text tokens), each on the recipe's path: bf16 weight, bf16 autocast, the call inside
torch.utils.checkpoint (forward without saving, recompute, backward), input float32 with requires_grad (a
LayerNorm's output under autocast, as to_q/to_k/to_v see it). Steps: bench_train.py's mid-size UNet (SDXL's first
two levels, 128 px, batch 1): its float32 step and the recipe's (bf16 UNet, bf16 autocast, checkpointing), both
forward + backward + clipping + AdamW.

    python benchmarks/bench_ops.py            # the table (about 2 minutes on 2 cores)
    python benchmarks/bench_ops.py --quick    # small layers, no UNet (seconds; tests/test_ops.py runs it)
"""
import argparse
import collections
import functools
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import waveft  # noqa: E402
from common import print_table, without_kineto_start_stop_lines  # noqa: E402

METADATA_ONLY = {
    "view", "_reshape_alias", "reshape", "as_strided", "t", "transpose", "permute", "expand", "expand_as",
    "unsqueeze", "squeeze", "select", "slice", "narrow", "unfold", "split", "split_with_sizes", "unbind", "chunk",
    "detach", "alias", "lift_fresh", "view_as", "unflatten", "flatten", "numpy_T", "_unsafe_view", "movedim",
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_", "set_",
    "sparse_csr_tensor", "_sparse_csr_tensor_unsafe", "crow_indices", "col_indices", "values", "_nnz", "_values",
    "size", "stride", "dim", "result_type", "_has_compatible_shallow_copy_type", "is_same_size", "contiguous", "to",
    "resolve_conj", "resolve_neg", "detach_", "as_strided_", "dense_dim", "sparse_dim", "_sparse_compressed_tensor_unsafe",
    "sparse_compressed_tensor", "_local_scalar_dense_query"}
LAYER_CASES = [(640, 640, 4096), (1280, 1280, 1024), (640, 2048, 77), (1280, 2048, 77)]  # (out, in, tokens)
QUICK_CASES = [(64, 64, 256), (128, 128, 64), (64, 96, 7), (128, 96, 7)]  # the same paths, small
VARIANTS = ["frozen nn.Linear", "ours LoRA r=1", "ours WaveFT", "PEFT WaveFT"]
K = 2592


def counted_ops(fn):
    """{aten op name: calls} of the kernel-launching ops fn() runs (the rule in the docstring)."""
    with without_kineto_start_stop_lines(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = collections.Counter()

    def visit(event):
        name = event.name.removeprefix("aten::")
        if event.name.startswith("aten::") and not decomposes(name):
            if name not in METADATA_ONLY:
                counts[name] += 1
            return  # what it calls is its own implementation
        for child in event.cpu_children:  # a decomposing op, autograd's nodes, a custom op or Function
            visit(child)
    for event in prof.events():
        if event.cpu_parent is None:
            visit(event)
    return counts


@functools.cache
def decomposes(name):
    """Whether aten::name is defined by other aten ops (every overload but the out= ones registered as
    CompositeImplicitAutograd: linear, to, matmul, reshape, conv1d, dropout, ...), so that those count instead."""
    packet = getattr(torch.ops.aten, name, None)
    kernels = []
    for overload in packet.overloads() if packet is not None else []:
        if "out" not in overload:
            try:
                kernels.append(torch._C._dispatch_has_kernel_for_dispatch_key(
                    getattr(packet, overload).name(), "CompositeImplicitAutograd"))
            except RuntimeError:  # an overload listed but not registered (aten::to.prim_Device)
                pass
    return bool(kernels) and all(kernels)


def adapted_layer(variant, out_f, in_f, k):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, out_f)).to(torch.bfloat16).requires_grad_(False)
    if variant == "ours LoRA r=1":
        waveft.inject(model, method="lora", rank=1, target_modules=["0"], init_seed=0)
    elif variant == "ours WaveFT":
        waveft.inject(model, k=k, target_modules=["0"])
    elif variant == "PEFT WaveFT":
        import peft  # here, not at the top: --help answers without its seconds of import
        peft.inject_adapter_in_model(peft.WaveFTConfig(n_frequency=k, target_modules=["0"]), model)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=1e-3)  # nonzero adapters (LoRA's B, both spectra start at zero)
    return model


def layer_call(model, x):
    """One layer call on the recipe's path: autocast, checkpointed forward, then backward (which recomputes). The
    gradient arrives in the output's dtype, as it does from the next layer's backward."""
    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    y = forward()
    g = torch.randn(y.shape, dtype=y.dtype)

    def call():
        x.grad = None
        model.zero_grad(set_to_none=True)  # as a training step leaves them: the backward makes the gradients anew
        forward().backward(g)
    return call


def layer_count(variant, out_f, in_f, tokens, k=K):
    """{op: calls} of one layer call of the variant (after a warm-up call: index plans, caches)."""
    torch.manual_seed(0)
    call = layer_call(adapted_layer(variant, out_f, in_f, min(k, out_f * in_f)),
                      torch.randn(1, tokens, in_f, requires_grad=True))
    call()
    return counted_ops(call)


def layer_counts(cases, k):
    return [(f"{in_f}->{out_f} x{tokens}" if in_f != out_f else f"{out_f}^2 x{tokens}",
             {variant: layer_count(variant, out_f, in_f, tokens, k) for variant in VARIANTS})
            for out_f, in_f, tokens in cases]


def step_counts(k, resolution=128):
    """Ops of one bench_train.py step per variant: float32 (bench_train's), and the recipe's: bf16 UNet, bf16
    autocast around the forward only (as train_dreambooth.py), gradient checkpointing."""
    import bench_train
    rows = []
    base = bench_train.mid_size_unet()
    for recipe in (False, True):
        counts = {}
        for variant in VARIANTS[1:]:
            unet, params, optimizer = bench_train.adapted(base, variant, k)
            if recipe:
                unet.bfloat16()  # the adapters stay float32
                unet.enable_gradient_checkpointing()
                unet.train()
                unet.forward = torch.autocast("cpu", dtype=torch.bfloat16)(unet.forward)
            step = bench_train.make_step(unet, params, optimizer, resolution)
            step()  # warm-up
            counts[variant] = counted_ops(step)
            del unet, params, optimizer, step
        rows.append((f"mid-size UNet step, {'bf16 + checkpointing' if recipe else 'float32'}", counts))
    return rows


def table(rows):
    out = []
    for case, counts in rows:
        total = {v: sum(c.values()) for v, c in counts.items()}
        frozen = total.get("frozen nn.Linear")
        cells = [case] + [f"{total[v]:,}" if v in total else "-" for v in VARIANTS]
        adapter = (lambda v: total[v] - frozen) if frozen is not None else (lambda v: None)
        cells.append(f"{total['ours WaveFT'] / total['ours LoRA r=1']:.2f}x")
        cells.append(f"{adapter('ours WaveFT')} / {adapter('ours LoRA r=1')}" if frozen is not None else "-")
        cells.append(f"{total['PEFT WaveFT'] / total['ours LoRA r=1']:.2f}x")
        out.append(cells)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small layers of the same paths, no UNet (seconds)")
    parser.add_argument("--ops", action="store_true", help="also list each variant's ops by name")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (counts do not depend on it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = layer_counts(QUICK_CASES if args.quick else LAYER_CASES, K)
    if not args.quick:
        rows += step_counts(K)
    print(f"torch {torch.__version__}; kernel-launching aten ops (rule: benchmarks/bench_ops.py's docstring), "
          f"per layer call (bf16 autocast, checkpointed: forward, recompute, backward) and per training step; "
          f"{time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.1f} (counts do not depend on it)")
    print_table(["case"] + VARIANTS + ["ours WaveFT / LoRA", "adapter ops WaveFT / LoRA", "PEFT WaveFT / LoRA"],
                table(rows))
    if args.ops:
        for case, counts in rows:
            for variant, c in counts.items():
                print(f"{case}, {variant}: " + ", ".join(f"{n} {m}" for n, m in sorted(c.items())))
    return rows


if __name__ == "__main__":
    main()
