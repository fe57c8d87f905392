"""The GPU on paper, without a GPU: one SDXL training step's FLOPs, bytes and kernel launches, the step time they
imply on an A100 and an H100, and evaluate.py's peak GPU memory. Everything is counted op by op, from the shapes.

How: a TorchDispatchMode (Trace) sees every aten op that reaches a kernel, forward and backward, with its inputs
and outputs. The full-size SDXL UNet (sdxl.build_sdxl_unet) runs on the meta device (shapes and dtypes, no data,
no memory: a 1024 px step in seconds); the adapters run on the CPU, one real layer per shape. Per op it counts:
- a launch, unless the op is metadata-only (launches nothing): every output is a view or alias of an input (view,
  t, transpose, expand, slice, the sparse tensors' index accessors, ...), or an allocation left unwritten (empty*),
  or a sparse tensor assembled from existing tensors (_sparse_csr_tensor_unsafe);
- FLOPs of matmuls, convolutions and attention (torch.utils.flop_counter's formulas; a sparse matrix product
  2 * nonzeros * columns); elementwise work is left to the bytes;
- bytes: every input and output tensor once (eager PyTorch fuses nothing, so each op reads and writes memory);
- the live bytes of the tensors it allocates (the peak of what a caching allocator must hold).
CUDA autocast is emulated (Autocast): convolutions, linear layers and attention in bf16, group and layer norm in
float32, fp32 weights that require grad cast once and kept for the autocast region (autocast's cache). Attention is
counted as one flash-attention kernel (forward, backward), as a GPU runs it.

Step time on a GPU (StepModel): the GPU is busy for the sum over ops of max(FLOPs / peak bf16 FLOP/s, bytes /
memory bandwidth) (each op at its roofline: a lower bound); the CPU issues one launch per op at LAUNCH_S each;
eager PyTorch queues ahead of the GPU, so a step takes about the longer of the two. The adapters' part is the
difference between an adapted layer and a plain bf16 nn.Linear at the same shape, dtype and role (forward,
checkpoint recompute, backward), times SDXL's 560 layers. Results: docs/benchmarks.md, "The GPU step on paper" and
"evaluate.py's GPU memory".

    python benchmarks/bench_gpu_paper.py                 # both tables, 1024 px (~1 minute on 2 cores)
    python benchmarks/bench_gpu_paper.py --part memory --resolution 768
"""
import argparse
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sdxl  # noqa: E402
import waveft  # noqa: E402
from common import print_table  # noqa: E402

aten = torch.ops.aten
GPUS = {"A100 SXM": (312e12, 2.04e12), "H100 SXM": (989e12, 3.35e12)}  # dense bf16 FLOP/s, HBM bytes/s
LAUNCH_S = 5e-6  # CPU time to issue one op in eager PyTorch (dispatch + launch), per op
GB = 1e9


# ----------------------------------------------------------------------------------------------------------------
# The trace: launches, FLOPs, bytes and live memory, op by op

NOT_LAUNCHING = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
                 aten.new_empty.default, aten.new_empty_strided.default, aten._unsafe_view.default,
                 aten._sparse_csr_tensor_unsafe.default, aten.sparse_compressed_tensor.comp_plain_value_size,
                 aten.lift_fresh.default}


def launches(func):
    """Whether an op launches a kernel: not an allocation left unwritten, not a view or alias of an input."""
    if func in NOT_LAUNCHING:
        return False
    returns = func._schema.returns
    return not (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns))


def tensor_bytes(t):
    if t.layout == torch.sparse_csr:
        return sum(x.numel() * x.element_size() for x in (t.crow_indices(), t.col_indices(), t.values()))
    return t.numel() * t.element_size()


def flops_of(func, args, kwargs, out):
    """Matmul, convolution and attention FLOPs (torch.utils.flop_counter's formulas; sparse products by hand)."""
    from torch.utils.flop_counter import flop_registry
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    sparse = [t for t in tensors if t.layout == torch.sparse_csr]
    if sparse and func.overloadpacket is aten.sparse_sampled_addmm:  # k sampled dot products of length N
        return 2 * sparse[0].values().numel() * args[1].shape[1]
    if sparse:  # (sparse A) @ dense: 2 per nonzero per column of the dense factor
        return 2 * sparse[0].values().numel() * tensors[-1].shape[-1]
    if func.overloadpacket in flop_registry:
        return flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
    return 0


class Trace(TorchDispatchMode):
    """Counts of every op that reaches a kernel inside the `with`, in `self.totals[phase]` (set self.phase)."""

    def __init__(self):
        super().__init__()
        self.phase, self.totals = "forward", {}
        self.live = self.peak = 0
        self.seen = weakref.WeakKeyDictionary()

    def known(self, tensors):  # held before the trace (weights, inputs): their views are not new memory
        for t in tensors:
            self.seen[t.untyped_storage()] = 0

    def _allocated(self, t):
        if t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        if storage not in self.seen:
            n = storage.nbytes()
            self.seen[storage] = n
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, n)

    def _freed(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for t in outputs:
            self._allocated(t)
        if launches(func):
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            total = self.totals.setdefault(self.phase, dict(launches=0, flops=0, bytes=0, ops=[]))
            flops, moved = flops_of(func, args, kwargs, out), sum(map(tensor_bytes, inputs + outputs))
            total["launches"] += 1
            total["flops"] += flops
            total["bytes"] += moved
            total["ops"].append((flops, moved))
        return out


class Autocast:
    """CUDA autocast's dtype rules for what SDXL's models call (F.conv2d, F.linear: bf16; F.group_norm,
    F.layer_norm: float32), by wrapping those functions; with cache=True a float32 parameter that requires grad is
    cast once and the copy kept until the region ends, as autocast's weight cache does."""
    LOW, FLOAT32 = ("conv2d", "linear"), ("group_norm", "layer_norm")

    def __init__(self, cache=False):
        self.cache_on, self.cache = cache, {}

    def cast(self, t, dtype):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()) or t.dtype == dtype:
            return t
        if self.cache_on and isinstance(t, torch.nn.Parameter) and t.requires_grad:
            if id(t) not in self.cache:
                self.cache[id(t)] = t.to(dtype)
            return self.cache[id(t)]
        return t.to(dtype)

    def cached_bytes(self):
        return sum(t.numel() * t.element_size() for t in self.cache.values())

    def __enter__(self):
        self.saved = {name: getattr(F, name) for name in self.LOW + self.FLOAT32}
        for names, dtype in ((self.LOW, torch.bfloat16), (self.FLOAT32, torch.float32)):
            for name in names:
                setattr(F, name, self._wrap(self.saved[name], dtype))
        self.sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, flash_attention
        return self

    def _wrap(self, fn, dtype):
        def under_autocast(*args, **kwargs):
            return fn(*[self.cast(a, dtype) for a in args], **{k: self.cast(v, dtype) for k, v in kwargs.items()})
        return under_autocast

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(F, name, fn)
        F.scaled_dot_product_attention = self.sdpa
        self.cache.clear()


def flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """One flash-attention kernel (and one in backward), in bf16, as on a GPU; no N x N matrix."""
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal or attn_mask is not None,
                                                    scale=scale)[0]


# ----------------------------------------------------------------------------------------------------------------
# 1. A training step: the frozen UNet whole (meta), the adapters per layer (CPU)

def unet_step(resolution, checkpointing):
    """One training micro-batch of the bf16 SDXL UNet on meta: {phase: totals}. The noisy latent requires grad, so
    the backward pass runs through every layer (as it must to reach adapters at every level)."""
    unet = sdxl.build_sdxl_unet("meta", torch.bfloat16)
    unet.requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    meta = dict(device="meta")
    latent = torch.empty(1, 4, resolution // 8, resolution // 8, requires_grad=True, **meta)
    cond = dict(encoder_hidden_states=torch.empty(1, 77, 2048, **meta),
                added_cond_kwargs={"text_embeds": torch.empty(1, 1280, **meta), "time_ids": torch.empty(1, 6, **meta)})
    trace = Trace()
    trace.known([*unet.parameters(), latent])
    with trace, Autocast():
        prediction = unet(latent, torch.tensor([500], **meta), **cond).sample
        loss = F.mse_loss(prediction.float(), torch.empty(latent.shape, **meta))
        trace.phase = "backward"
        loss.backward()
    trace.totals["peak"] = trace.peak
    return trace.totals


# SDXL's attention projections by role, per transformer block: (out, in, tokens, input dtype, bias, input needs a
# gradient, layers). x is the layer norm's float32 output for to_q/to_k/to_v (autocast runs layer norm in float32),
# the attention's bf16 output for to_out.0 (the one with a bias), and the float32 text embeddings for
# cross-attention's to_k/to_v, which need no input gradient.
def roles(width, tokens):
    return [(width, width, tokens, torch.float32, False, True, 4),  # attn1 to_q, to_k, to_v; attn2 to_q
            (width, width, tokens, torch.bfloat16, True, True, 2),  # attn1 to_out.0, attn2 to_out.0
            (width, 2048, 77, torch.float32, False, False, 2)]  # attn2 to_k, to_v: 77 text tokens


LEVELS = [(640, 16, 10), (1280, 32, 60)]  # (width, pixels per token, transformer blocks): 70 x 8 = 560 layers


def layer_step(method, out_f, in_f, tokens, x_dtype, bias, grad_x):
    """{phase: totals} of one layer call (forward, backward) on the CPU under emulated autocast, bf16 W."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=bias)).to(torch.bfloat16).requires_grad_(False)
    if method == "waveft":
        waveft.inject(model, method="waveft", k=2592, scaling=25.0, wavelet="db1", seed=777, target_modules=["0"])
    elif method == "lora":
        waveft.inject(model, method="lora", rank=1, scaling=1.0, init_seed=0, target_modules=["0"])
    x = torch.randn(1, tokens, in_f, dtype=x_dtype, requires_grad=grad_x)
    with Autocast():
        y = model(x)  # untraced: WaveFT builds its plan here, once per shape (not per step)
        g = torch.ones_like(y)
        if y.requires_grad:
            y.backward(g)
        x.grad = None  # as after optimizer.zero_grad(set_to_none=True): a gradient is stored, not added
        model.zero_grad(set_to_none=True)
        trace = Trace()
        with trace:
            y = model(x)
            trace.phase = "backward"
            if y.requires_grad:
                y.backward(g)
    return {phase: trace.totals.get(phase, dict(launches=0, flops=0, bytes=0, ops=[]))
            for phase in ("forward", "backward")}


def step_ops(resolution):
    """{variant: [(sign, FLOPs, bytes) per op]} of one training step with checkpointing, and the per-layer-call
    launch counts [(adapter, layer, phase, plain, adapted)]. An adapter's step is the frozen UNet's ops, plus an
    adapted layer's (forward twice: the checkpoint recomputes it; backward once) minus the plain layer's (sign -1)."""
    frozen = unet_step(resolution, checkpointing=True)
    plain = unet_step(resolution, checkpointing=False)
    print(f"frozen UNet at {resolution} px: forward {frozen['forward']['launches']:,} launches, backward "
          f"{plain['backward']['launches']:,}, checkpoint recompute "
          f"{frozen['backward']['launches'] - plain['backward']['launches']:,}; activations peak at "
          f"{frozen['peak'] / GB:.1f} GB with checkpointing, {plain['peak'] / GB:.1f} GB without (weights: "
          f"{2 * sdxl.SDXL_UNET_PARAMETERS / GB:.1f} GB in bf16)", flush=True)
    base_ops = [(1, f, m) for phase in ("forward", "backward") for f, m in frozen[phase]["ops"]]
    ops, per_layer = {"frozen UNet": base_ops}, []
    for method, label in (("lora", "ours LoRA r=1"), ("waveft", "ours WaveFT k=2592")):
        ops[label] = list(base_ops)
        for width, pixels, blocks in LEVELS:
            for out_f, in_f, tokens, x_dtype, bias, grad_x, count in roles(width, (resolution // pixels) ** 2):
                base, adapted = (layer_step(m, out_f, in_f, tokens, x_dtype, bias, grad_x) for m in ("frozen", method))
                for phase, repeat in (("forward", 2), ("backward", 1)):
                    extra = [(1, f, m) for f, m in adapted[phase]["ops"]] + \
                            [(-1, f, m) for f, m in base[phase]["ops"]]
                    ops[label] += extra * (repeat * count * blocks)
                    per_layer.append([label, f"{out_f}x{in_f} @{tokens} {str(x_dtype)[6:]}", phase,
                                      base[phase]["launches"], adapted[phase]["launches"],
                                      f"{base[phase]['bytes'] / 1e6:.1f}", f"{adapted[phase]['bytes'] / 1e6:.1f}"])
    return ops, per_layer


def step_time(ops, flops_per_s, bytes_per_s):
    """(GPU busy s, launch s): each op at its roofline, summed; LAUNCH_S per op."""
    busy = sum(sign * max(f / flops_per_s, m / bytes_per_s) for sign, f, m in ops)
    return busy, sum(sign for sign, _, _ in ops) * LAUNCH_S


def print_step(resolution, efficiency=1.0):
    ops, per_layer = step_ops(resolution)
    print("\nper layer call: launches and MB moved of a plain bf16 nn.Linear and of the adapted layer:")
    print_table(["adapter", "layer (out x in @tokens, x dtype)", "phase", "plain", "adapted", "plain MB",
                 "adapted MB"], per_layer)
    rows = []
    for label, entries in ops.items():
        row = [label, f"{sum(s for s, _, _ in entries):,}", f"{sum(s * f for s, f, _ in entries) / 1e12:.2f}",
               f"{sum(s * m for s, _, m in entries) / GB:.1f}"]
        for flops, bandwidth in GPUS.values():
            busy, launch = step_time(entries, efficiency * flops, efficiency * bandwidth)
            row += [f"{busy * 1e3:.0f}", f"{launch * 1e3:.0f}", f"{max(busy, launch) * 1e3:.0f}"]
        rows.append(row)
    print(f"\none training step at {resolution} px (batch 1, bf16, checkpointing); ms; GPUs at {efficiency:.0%} of "
          f"their peak FLOP/s and bandwidth; a launch {LAUNCH_S * 1e6:g} us:")
    print_table(["", "launches", "TFLOP", "GB moved"] + [f"{gpu} {what}" for gpu in GPUS
                                                         for what in ("busy", "launch", "step")], rows)


# ----------------------------------------------------------------------------------------------------------------
# 2. evaluate.py's peak GPU memory

def text_encoders_and_vae():
    """SDXL's two text encoders (CLIP ViT-L/14's, OpenCLIP ViT-bigG/14's) and its VAE, on meta, from their
    published configs."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    common = dict(vocab_size=49408, max_position_embeddings=77)
    with torch.device("meta"):
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, hidden_act="quick_gelu", **common))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                         num_hidden_layers=32, num_attention_heads=20,
                                                         hidden_act="gelu", projection_dim=1280, **common))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, norm_num_groups=32)
    return te1, te2, vae


def metric_model_parameters():
    """DINO ViT-S/16 (no pooler), CLIP ViT-B/32, CLIP ViT-L/14@336: evaluate.py loads them onto the GPU first."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel
    text = dict(vocab_size=49408, max_position_embeddings=77, num_hidden_layers=12)
    with torch.device("meta"):
        models = [ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                     intermediate_size=1536, patch_size=16, image_size=224), add_pooling_layer=False),
                  CLIPModel(CLIPConfig(text_config=dict(text, hidden_size=512, intermediate_size=2048,
                                                        num_attention_heads=8),
                                       vision_config=dict(hidden_size=768, intermediate_size=3072,
                                                          num_hidden_layers=12, num_attention_heads=12,
                                                          patch_size=32, image_size=224), projection_dim=512)),
                  CLIPModel(CLIPConfig(text_config=dict(text, hidden_size=768, intermediate_size=3072,
                                                        num_attention_heads=12),
                                       vision_config=dict(hidden_size=1024, intermediate_size=4096,
                                                          num_hidden_layers=24, num_attention_heads=16,
                                                          patch_size=14, image_size=336), projection_dim=768))]
    return sum(p.numel() for model in models for p in model.parameters())


def activation_peak(module, call, *inputs, cache=False):
    """(peak bytes allocated by `call(*inputs)` above the weights, bytes of autocast's cached weight copies)."""
    trace = Trace()
    trace.known([*module.parameters(), *module.buffers(), *inputs])
    with torch.no_grad(), trace, Autocast(cache) as autocast:
        out = call(*inputs)
        cached = autocast.cached_bytes()
        del out
    return trace.peak, cached


def nbytes(module, dtype=None):
    return sum(p.numel() * (dtype.itemsize if dtype else p.element_size()) for p in module.parameters())


def print_memory(resolution, seeds):
    """evaluate.py's generation: one pipeline call makes `seeds` images (sdxl.GenerationConfig.batch_size), the UNet
    sees 2 x seeds (classifier-free guidance), the VAE decodes `seeds` at once (default) or one by one."""
    te1, te2, vae = text_encoders_and_vae()
    latent, meta = resolution // 8, dict(device="meta")
    ids = torch.zeros(seeds, 77, dtype=torch.long, **meta)
    rows = []
    for mode in ("default", "low-memory"):
        low = mode == "low-memory"
        unet = sdxl.build_sdxl_unet("meta", torch.bfloat16 if low else torch.float32)
        for model in (unet, te1, te2, vae):  # default: weights require grad (as loaded), so autocast caches casts
            model.requires_grad_(not low)
        b = 2 * seeds
        unet_inputs = (torch.empty(b, 4, latent, latent, **meta), torch.tensor([500.0], **meta),
                       torch.empty(b, 77, 2048, **meta), torch.empty(b, 1280, **meta), torch.empty(b, 6, **meta))
        unet_peak, unet_cache = activation_peak(unet, lambda s, t, e, p, i: unet(
            s, t, encoder_hidden_states=e, added_cond_kwargs={"text_embeds": p, "time_ids": i}).sample,
            *unet_inputs, cache=not low)
        decode = 1 if low else seeds
        vae_peak, vae_cache = activation_peak(vae, lambda z: vae.decode(z).sample,
                                              torch.empty(decode, 4, latent, latent, **meta), cache=not low)
        text = [activation_peak(te, lambda i: te(i, output_hidden_states=True), ids, cache=not low)
                for te in (te1, te2)]
        weights = nbytes(unet) + nbytes(te1) + nbytes(te2) + nbytes(vae)
        if low:  # WaveFT k = 2592 on 560 layers: float32 spectrum + int64 positions (row, column) per coefficient
            weights += 560 * 2592 * (4 + 2 * 8)
        cache = unet_cache + vae_cache + sum(c for _, c in text)  # held until the pipeline call returns
        activations = max(unet_peak - unet_cache, vae_peak - vae_cache, *(p - c for p, c in text))
        metric = metric_model_parameters() * 4
        rows.append([mode, f"{weights / GB:.2f}", f"{cache / GB:.2f}", f"{(unet_peak - unet_cache) / GB:.2f}",
                     f"{(vae_peak - vae_cache) / GB:.2f} ({decode})", f"{metric / GB:.2f}",
                     f"{(weights + cache + activations + metric) / GB:.1f}"])
    print(f"\nevaluate.py at {resolution} px, {seeds} seeds per call (UNet batch {2 * seeds}); GB (1e9 bytes):")
    print_table(["mode", "pipeline weights", "autocast cache", "UNet activations", "VAE decode (images)",
                 "metric models", "peak"], rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("step", "memory", "all"), default="all")
    parser.add_argument("--resolution", type=int, default=1024, help="image size in px [1024]")
    parser.add_argument("--seeds", type=int, default=4, help="images per pipeline call in evaluate.py [4]")
    parser.add_argument("--efficiency", type=float, default=1.0,
                        help="fraction of the GPUs' peak FLOP/s and bandwidth that kernels reach [1.0: the roofline]")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.part in ("step", "all"):
        print_step(args.resolution, args.efficiency)
    if args.part in ("memory", "all"):
        print_memory(args.resolution, args.seeds)


if __name__ == "__main__":
    main()
