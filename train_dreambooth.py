"""DreamBooth personalisation of Stable Diffusion XL with WaveFT adapters, in one plain PyTorch loop.

DreamBooth (Ruiz et al., arXiv 2208.12242) teaches a text-to-image model one subject from 4-6 photos by fine-tuning
it to denoise those photos when prompted "a zjw dog" (zjw: a rare token). Here only WaveFT adapters on the SDXL
UNet's attention projections train (Bilican et al., arXiv 2505.12532): k coefficients per layer in the wavelet domain.
One optimizer step, batch 1 x grad-accum 4, each micro-batch being
    x0 = VAE latent of an instance photo,  eps ~ N(0, I),  t ~ U{0..999},  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    loss = || eps - UNet(x_t, t, text("a zjw dog"), micro-conditioning) ||^2      (+ the same on a class image)
The defaults are the paper's recipe (the authors' configs): 500 steps, AdamW 1e-4, 1024 px, no prior preservation.
Which photos a step sees (--batching epoch, the authors' schedule): shuffled passes over the photos without
replacement, a step after every grad_accum photos and at the end of every pass, the loss always / grad_accum: with
5 photos a pass is a step of 4 photos, then a step of 1 (loss still / 4). --batching uniform: grad_accum photos
drawn with replacement every step. loss.csv holds each step's mean loss over the micro-batches it saw.

    python train_dreambooth.py --subject dog6 --k 2000                      # SDXL on a GPU (about 24 GB)
    python train_dreambooth.py --subject dog6 --method lora --rank 1        # the LoRA baseline, same loop
    python train_dreambooth.py --subject dog6 --k 2000 --model tiny --data-dir ../shared/dreambooth   # CPU demo
    torchrun --nproc-per-node 4 train_dreambooth.py --subject dog6 --k 2000   # data parallel: the same result

Deliberately not here: accelerate, EMA, aspect-ratio bucketing, text-encoder training, hub upload.
"""
import argparse
import csv
import dataclasses
import inspect
import json
import math
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image
from tqdm import tqdm

import sdxl
import waveft


@dataclass
class Options:
    subject: str  # DreamBooth subject, a folder of --data-dir (e.g. dog6)
    data_dir: str = "dataset"  # google/dreambooth's dataset folder
    model: str = sdxl.SDXL_BASE  # hub id, local diffusers folder, or "tiny" (random weights: CPU demo, tests)
    output_dir: str = "outputs"  # the run goes to <output_dir>/<subject>-<method>-k<k> (or -r<rank>)
    method: str = "waveft"  # waveft | lora
    k: int = 2592  # WaveFT coefficients per layer (2592 = the LoRA rank-1 budget on SDXL)
    rank: int = 1  # LoRA rank
    scaling: float = None  # lambda in dW = lambda * IDWT2(C); default 25 for WaveFT, 1 (alpha = rank) for LoRA
    wavelet: str = "db1"  # WaveFT wavelet (db1 = Haar)
    use_idwt: bool = True  # false: train the sparse matrix directly in weight space (ablation baseline)
    position_seed: int = 777  # seed of the k random coefficient positions
    unique_token: str = "zjw"  # the prompt is "a <unique_token> <class>"
    steps: int = 500  # optimizer steps
    grad_accum: int = 4  # micro-batches (of 1 image) per optimizer step
    batching: str = "epoch"  # epoch: shuffled passes, a step per grad_accum photos and at a pass's end; or uniform
    resolution: int = None  # square training crops; default 1024 (64 for --model tiny: 8 x 8 latents, a CPU demo)
    lr: float = 1e-4  # AdamW learning rate, constant
    weight_decay: float = 1e-4  # AdamW weight decay (betas 0.9/0.999, eps 1e-8)
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 42  # seeds crops, image order, noise and timesteps
    prior_preservation: bool = False  # add the class-prior loss on generated "a <class>" images
    class_images: int = 100  # number of class images (generated with the base model if missing)
    prior_loss_weight: float = 1.0  # weight of the class-prior MSE term
    class_dir: str = ""  # where class images live; default <output_dir>/class-images/<model>/<class>
    checkpoint_every: int = 100  # write checkpoint.pt every N steps (and on Ctrl-C)
    resume: bool = False  # continue from <run>/checkpoint.pt, exactly
    mixed_precision: str = "bf16"  # on CUDA: bf16 autocast + bf16 frozen weights, or "no"; CPU is always fp32
    gradient_checkpointing: bool = True  # on CUDA: recompute activations in backward to save memory
    validation_prompts: int = 3  # rows of validation.png: the instance prompt, then evaluation prompts
    sample_steps: int = 30  # sampler steps for validation and class images
    device: str = "auto"  # cuda if available, else cpu
    fixed_noise: bool = False  # debug: same image, noise and timestep every micro-batch (learning-signal test)


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_options(argv=None):
    """argparse generated from Options: --some-field VALUE for every field, help = the field's comment."""
    comments = dict(re.findall(r"^\s+(\w+): .*?#\s*(.*)$", inspect.getsource(Options), re.M))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    for field in dataclasses.fields(Options):
        flag, help_text = "--" + field.name.replace("_", "-"), comments.get(field.name, "")
        if field.default not in (None, dataclasses.MISSING):
            help_text += f" [{str(field.default).lower() if field.type is bool else field.default}]"
        if field.default is dataclasses.MISSING:
            parser.add_argument(flag, type=field.type, required=True, help=help_text)
        elif field.type is bool:  # "--flag", "--flag true", "--flag false"
            parser.add_argument(flag, type=parse_bool, nargs="?", const=True, default=field.default, help=help_text,
                                metavar="true|false")
        else:
            parser.add_argument(flag, type=field.type, default=field.default, help=help_text)
    opts = Options(**vars(parser.parse_args(argv)))
    if opts.method not in ("waveft", "lora"):
        parser.error(f"--method must be waveft or lora, not {opts.method!r}")
    if opts.batching not in BATCHING:
        parser.error(f"--batching must be one of {', '.join(BATCHING)}, not {opts.batching!r}")
    if opts.mixed_precision not in ("bf16", "no"):
        parser.error(f"--mixed-precision must be bf16 or no, not {opts.mixed_precision!r}")
    if opts.resolution is None:
        opts.resolution = 64 if opts.model == "tiny" else 1024
    if opts.resolution % 64 or opts.resolution <= 0:
        parser.error(f"--resolution must be a positive multiple of 64, not {opts.resolution}")
    if min(opts.k, opts.rank, opts.steps, opts.grad_accum, opts.checkpoint_every) <= 0:
        parser.error("--k, --rank, --steps, --grad-accum and --checkpoint-every must be positive")
    if opts.scaling is None:
        opts.scaling = 25.0 if opts.method == "waveft" else 1.0
    return opts


def run_name(opts):
    if opts.method == "lora":
        return f"{opts.subject}-lora-r{opts.rank}"
    return f"{opts.subject}-{'waveft' if opts.use_idwt else 'waveft_noidwt'}-k{opts.k}"


# ----------------------------------------------------------------------------------------------------------------
# Data: one random square crop per image, made once, with SDXL's micro-conditioning recorded for it

def crop_image(image, resolution, generator):
    """Resize the shorter side to `resolution`, then one random square crop. Returns the crop as a (3, R, R) tensor
    in [-1, 1] and SDXL's time ids (original h, w, crop top, left, target h, w) that describe what was done."""
    original_size = (image.height, image.width)
    image = sdxl.resize_shorter_side(image, resolution, Image.BILINEAR)
    top = int(torch.randint(image.height - resolution + 1, (1,), generator=generator))
    left = int(torch.randint(image.width - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    pixels = pixels.permute(2, 0, 1).float() / 127.5 - 1
    return pixels, sdxl.time_ids(original_size, (top, left), (resolution, resolution))


@torch.no_grad()
def encode_images(vae, images, paths, resolution, generator, device):
    """Cache each image's VAE posterior N(mean, std^2) once (fp32 VAE: fp16 overflows to NaN). Training samples
    from it every step, as encoding every step would, at none of the cost."""
    means, stds, ids = [], [], []
    for image, path in zip(images, paths):
        pixels, time_ids = crop_image(image, resolution, generator)
        posterior = vae.encode(pixels[None].to(device, torch.float32)).latent_dist
        if not (torch.isfinite(posterior.mean).all() and torch.isfinite(posterior.std).all()):
            raise ValueError(f"VAE latents of {path} are not finite: run the VAE in float32 (fp16 SDXL VAE overflows)")
        means.append(posterior.mean[0].cpu())
        stds.append(posterior.std[0].cpu())
        ids.append(time_ids)
    return torch.stack(means), torch.stack(stds), torch.stack(ids)


def ensure_class_images(pipe, opts, class_name, gen_cfg):
    """Prior preservation needs images of the class from the *base* model; generate the missing ones (seeded by
    index, so an interrupted generation continues) before any adapter is injected."""
    class_dir = Path(opts.class_dir or Path(opts.output_dir) / "class-images" / Path(opts.model).name / class_name)
    class_dir.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(opts.class_images), desc=f"class images in {class_dir}"):
        if not (class_dir / f"{i:04d}.png").exists():
            sdxl.generate(pipe, [f"a {class_name}"], seeds=[i], cfg=gen_cfg)[0].save(class_dir / f"{i:04d}.png")
    return [class_dir / f"{i:04d}.png" for i in range(opts.class_images)]


# ----------------------------------------------------------------------------------------------------------------
# The diffusion loss

def diffusion_losses(unet, scheduler, latents, prompt_embeds, pooled, time_ids, generator, autocast):
    """Per-sample denoising MSE for a batch of clean latents (B, 4, h, w): noise them to a uniform random timestep,
    predict, and compare with the scheduler's target (eps, or v for v-prediction models)."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
    with autocast:
        prediction = unet(noisy, timesteps, encoder_hidden_states=prompt_embeds,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def sample_batch(cache, count, generator, scaling_factor, shift_factor):
    """Pick `count` cached images uniformly at random and draw their latents x0 = (mean + std * z - shift) * scale.
    (The training loop now plans its images with plan_step and draws latents with draw_latents.)"""
    index = torch.randint(len(cache[0]), (count,), generator=generator)
    return draw_latents(cache, index, generator, scaling_factor, shift_factor)


def draw_latents(cache, index, generator, scaling_factor, shift_factor):
    """Latents x0 = (mean + std * z - shift) * scale of the cached images `index` (a list or tensor of indices)."""
    means, stds, time_ids = cache
    z = torch.randn(means[index].shape, generator=generator)
    return (means[index] + stds[index] * z - shift_factor) * scaling_factor, time_ids[index]


# ----------------------------------------------------------------------------------------------------------------
# Which images a step sees (--batching)
#
# epoch (default; the authors' code and diffusers' DreamBooth scripts, through accelerate's `accumulate`): shuffled
#   passes over the n photos without replacement. A step takes the next grad_accum photos of the pass, or what is
#   left of it, so a pass is ceil(n / grad_accum) steps: with grad_accum 4, n = 4 gives 4 | 4 | ...; n = 5 gives
#   4, 1 | 4, 1 | ...; n = 6 gives 4, 2 | .... The loss is divided by grad_accum in every step, short ones too (a
#   step of 1 photo moves the adapter by a quarter-weight gradient), so 500 steps see 2,000 / 1,250 / 1,500 photos.
# uniform: every step draws grad_accum photos uniformly with replacement.
# Prior preservation pairs every instance micro-batch with one class image: the next of its own shuffled passes
# over the class images (epoch) or one drawn with replacement (uniform).
#
# A step is planned before anything is computed: a list of micro-batches (photo, class image, seed), drawn from the
# run's generator in one fixed order. Everything random inside a micro-batch (its latent sample, noise, timestep)
# comes from its own seed, so any process can compute any micro-batch and get the same numbers: that is what lets
# torchrun split a step across GPUs without changing the result. The position in the current pass (and the pass's
# order) is kept in `passes`, which the checkpoint stores, so --resume continues mid-pass exactly.

BATCHING = ("epoch", "uniform")


def new_passes():
    """Where the run stands in its passes over the photos and over the class images: an order and a position."""
    return {"instance": {"order": torch.zeros(0, dtype=torch.long), "position": 0},
            "class": {"order": torch.zeros(0, dtype=torch.long), "position": 0}}


def take_from_pass(state, n, count, generator):
    """Up to `count` indices from the current pass over n items; a new shuffled pass starts when one is used up."""
    if state["position"] >= len(state["order"]):
        state["order"], state["position"] = torch.randperm(n, generator=generator), 0
    taken = state["order"][state["position"]:state["position"] + count]
    state["position"] += len(taken)
    return taken.tolist()


def plan_step(batching, passes, n_images, n_class_images, grad_accum, generator, fixed_noise_seed=None):
    """The micro-batches of one optimizer step: a list of (photo index, class image index or None, seed).
    fixed_noise_seed (debug, --fixed-noise): photo 0, class image 0 and this seed in every micro-batch; the number of
    micro-batches per step still follows --batching."""
    if batching == "uniform":
        photos = torch.randint(n_images, (grad_accum,), generator=generator).tolist()
    else:
        photos = take_from_pass(passes["instance"], n_images, grad_accum, generator)
    plan = []
    for photo in photos:
        class_image = None
        if n_class_images and batching == "uniform":
            class_image = int(torch.randint(n_class_images, (1,), generator=generator))
        elif n_class_images:
            class_image = take_from_pass(passes["class"], n_class_images, 1, generator)[0]
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        if fixed_noise_seed is not None:
            photo, class_image, seed = 0, None if class_image is None else 0, fixed_noise_seed
        plan.append((photo, class_image, seed))
    return plan


# ----------------------------------------------------------------------------------------------------------------
# Data parallel with torchrun (plain torch.distributed)
#
#     torchrun --nproc-per-node N train_dreambooth.py --subject dog6 ...
#
# Every rank builds the same model and plans every step identically (same seed, same generator); rank r computes the
# micro-batches r, r + N, r + 2N, ... of the step and backpropagates loss / grad_accum, exactly as one process does
# for all of them. Then the adapter gradients are summed over the ranks (SUM, not mean: each micro-batch's loss is
# already divided by grad_accum), so every rank holds the single-process gradient up to float summation order, and
# every rank takes the same clipped AdamW step. A rank without a micro-batch (a short step at the end of a pass)
# contributes zeros. Only rank 0 writes files, prints and checkpoints. No DistributedDataParallel wrapper: one
# flattened all-reduce per step is all that adapters of a million parameters need.

def join_ranks(device):
    """Under torchrun join the process group (NCCL on CUDA, gloo on the CPU) and give each rank its own GPU
    (LOCAL_RANK); returns (rank, world_size, device). Without torchrun: (0, 1, device), nothing started."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    rank, world_size = sdxl.init_distributed(device.type)
    return rank, world_size, device


def broadcast_from_rank0(params, world_size):
    """Start every rank from rank 0's adapter (identical already when initialisation is seeded; this makes sure)."""
    if world_size > 1:
        for p in params.values():
            torch.distributed.broadcast(p.data, src=0)


def sum_over_ranks(params, numbers, world_size):
    """Sum the adapter gradients (None counts as zero) and a few float64 numbers (loss sums) over the ranks."""
    if world_size == 1:
        return numbers
    params = list(params.values())
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    for p, grad in zip(params, flat.split([p.numel() for p in params])):
        p.grad = grad.view_as(p)
    totals = torch.tensor(numbers, dtype=torch.float64, device=flat.device)
    torch.distributed.all_reduce(totals)
    return totals.tolist()


def any_rank(flag, world_size):
    """True on every rank if it is true on one (Ctrl-C reached one rank: all stop after the same step)."""
    if world_size == 1:
        return bool(flag)
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([float(bool(flag))], device=device)
    torch.distributed.all_reduce(flag)
    return bool(flag.item())


def barrier(world_size):
    if world_size > 1:
        torch.distributed.barrier()


def leave_ranks(world_size):
    if world_size > 1:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: adapter + optimizer + step + RNG states in one file, written atomically

def save_checkpoint(path, step, params, optimizer, generator, opts, passes=None):
    state = {"step": step, "adapter": {name: p.detach().cpu() for name, p in params.items()},
             "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
             "torch_rng": torch.get_rng_state(), "options": json.dumps(dataclasses.asdict(opts))}
    if passes is not None:
        state["passes"] = passes  # where the run stands in its shuffled passes (--batching epoch)
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(state, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)  # atomic: a crash mid-write leaves the previous checkpoint intact


# Options that may change between an interrupted run and its --resume; any other change is an error.
RESUMABLE = {"steps", "resume", "checkpoint_every", "validation_prompts", "sample_steps", "data_dir", "output_dir",
             "device", "class_dir", "gradient_checkpointing"}


def load_checkpoint(path, params, optimizer, generator, opts, passes=None):
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, weights_only=True)  # weights_only: tensors and plain types only, never arbitrary pickle
    saved = json.loads(state["options"])
    changed = [f"{key} ({saved[key]} -> {value})" for key, value in dataclasses.asdict(opts).items()
               if key not in RESUMABLE and saved.get(key) != value]
    if changed:
        raise ValueError(f"--resume: {path} was trained with other options: {', '.join(changed)}")
    for name, p in params.items():
        p.data.copy_(state["adapter"][name])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    if passes is not None and "passes" in state:
        passes.update(state["passes"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    opts = parse_options(argv)
    # Check the data before loading a multi-GB model: bad input fails in a second, naming what is wrong.
    class_name = sdxl.read_classes(opts.data_dir).get(opts.subject)
    image_paths = sdxl.instance_images(opts.data_dir, opts.subject)
    images = [sdxl.load_image(path) for path in image_paths]  # a corrupt file fails here, by name
    run_dir = Path(opts.output_dir) / run_name(opts)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / "checkpoint.pt"
    device = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available() else
                          "cpu" if opts.device == "auto" else opts.device)
    rank, world_size, device = join_ranks(device)  # (0, 1, device) without torchrun
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints (errors still reach stderr)
    if opts.model == "tiny" and device.type == "cpu":
        torch.set_num_threads(1)  # its ops are too small to gain from threads; on a busy 2-core machine they lose 4x
    use_bf16 = device.type == "cuda" and opts.mixed_precision == "bf16"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16)
    instance_prompt = f"a {opts.unique_token} {class_name}"
    if rank == 0:
        (run_dir / "config.json").write_text(json.dumps(
            {**dataclasses.asdict(opts), "class_name": class_name, "instance_prompt": instance_prompt,
             "run_name": run_name(opts), "argv": sys.argv[1:] if argv is None else list(argv)}, indent=2))

    pipe = sdxl.load_pipeline(opts.model)  # float32; the VAE and text encoders stay float32
    if use_bf16:
        pipe.unet.to(torch.bfloat16)  # the frozen UNet in bf16 halves its memory; the adapters will be float32
    pipe.to(device)
    gen_cfg = sdxl.GenerationConfig(resolution=opts.resolution, num_inference_steps=opts.sample_steps)
    generator = torch.Generator().manual_seed(opts.seed)  # the training RNG: crops, order, VAE samples, noise, t

    # Cache everything the frozen parts compute: latents of the (cropped) images and the text embeddings.
    instance = encode_images(pipe.vae, images, image_paths, opts.resolution, generator, device)
    prompt_embeds, pooled = sdxl.encode_prompt(pipe, [instance_prompt])
    if opts.prior_preservation:
        if rank == 0:  # rank 0 generates the missing class images, the others wait for them
            ensure_class_images(pipe, opts, class_name, gen_cfg)
        barrier(world_size)
        class_paths = ensure_class_images(pipe, opts, class_name, gen_cfg)
        class_images = [sdxl.load_image(path) for path in class_paths]
        prior = encode_images(pipe.vae, class_images, class_paths, opts.resolution, generator, device)
        prompt_embeds, pooled = sdxl.encode_prompt(pipe, [instance_prompt, f"a {class_name}"])
    if not (torch.isfinite(prompt_embeds).all() and torch.isfinite(pooled).all()):
        raise ValueError(f"text embeddings of {instance_prompt!r} are not finite")
    latent_scale, latent_shift = pipe.vae.config.scaling_factor, getattr(pipe.vae.config, "shift_factor", 0) or 0
    pipe.vae.to("cpu"), pipe.text_encoder.to("cpu"), pipe.text_encoder_2.to("cpu")  # free the accelerator

    # The model: frozen UNet + trainable adapters (waveft creates them in float32 even on a bf16 UNet).
    unet = pipe.unet
    unet.requires_grad_(False)
    waveft.inject(unet, method=opts.method, k=opts.k, scaling=opts.scaling, wavelet=opts.wavelet,
                  seed=opts.position_seed, use_idwt=opts.use_idwt, rank=opts.rank)
    params = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    if device.type == "cuda" and opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
    optimizer = torch.optim.AdamW(params.values(), lr=opts.lr, betas=(0.9, 0.999), weight_decay=opts.weight_decay,
                                  eps=1e-8)
    passes = new_passes()  # the position in the shuffled passes over the photos: part of the checkpoint
    start = load_checkpoint(checkpoint_path, params, optimizer, generator, opts, passes) if opts.resume else 0
    broadcast_from_rank0(params, world_size)

    n_layers = len(waveft.adapted_layers(unet))
    print(f"{run_name(opts)}: {opts.method} on {n_layers} layers of {opts.model}, "
          f"{waveft.count_parameters(unet):,} trainable parameters; {len(image_paths)} images of {instance_prompt!r}"
          f"{' + prior preservation' if opts.prior_preservation else ''}\n"
          f"device {device}, {'bf16 autocast' if use_bf16 else 'float32'}, steps {start}->{opts.steps} "
          f"x {opts.grad_accum} micro-batches, output {run_dir}", flush=True)

    loss_rows = []
    if start and (run_dir / "loss.csv").exists():  # keep the log up to the checkpoint, drop what came after it
        loss_rows = [row for row in csv.reader(open(run_dir / "loss.csv"))][1:start + 1]
    stop_requested = []

    def request_stop(*_):  # Ctrl-C: finish this step, save, leave; a second Ctrl-C interrupts at once
        stop_requested.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_handler = signal.signal(signal.SIGINT, request_stop)
    progress = tqdm(range(start, opts.steps), initial=start, total=opts.steps, desc=run_name(opts),
                    disable=rank != 0)
    try:
        for step in progress:
            # Every rank plans the whole step (the same plan); each computes its share of the micro-batches.
            plan = plan_step(opts.batching, passes, len(image_paths), len(prior[0]) if opts.prior_preservation else 0,
                             opts.grad_accum, generator, opts.seed if opts.fixed_noise else None)
            step_loss, step_prior = 0.0, 0.0
            for photo, class_image, seed in plan[rank::world_size]:
                micro_generator = torch.Generator().manual_seed(seed)  # latent sample, noise, timestep
                latents, time_ids = draw_latents(instance, [photo], micro_generator, latent_scale, latent_shift)
                if opts.prior_preservation:
                    class_latents, class_ids = draw_latents(prior, [class_image], micro_generator, latent_scale,
                                                            latent_shift)
                    latents, time_ids = torch.cat([latents, class_latents]), torch.cat([time_ids, class_ids])
                losses = diffusion_losses(unet, scheduler, latents.to(device), prompt_embeds[:len(latents)],
                                          pooled[:len(latents)], time_ids.to(device), micro_generator, autocast)
                # DreamBooth's objective: instance MSE + weight * class-prior MSE (two explicit terms)
                loss = losses[0] + (opts.prior_loss_weight * losses[1] if opts.prior_preservation else 0)
                (loss / opts.grad_accum).backward()  # / grad_accum even in a short step (as accelerate does)
                step_loss += losses[0].item()
                step_prior += losses[1].item() if opts.prior_preservation else 0.0
            # Gradients and loss sums of all ranks; the logged losses are means over the step's micro-batches.
            step_loss, step_prior = sum_over_ranks(params, [step_loss, step_prior], world_size)
            step_loss, step_prior = step_loss / len(plan), step_prior / len(plan)
            if not math.isfinite(step_loss + step_prior):  # stop before the optimizer writes NaN into the adapter
                raise FloatingPointError(f"loss is {step_loss} at step {step + 1}; the last good state is in "
                                         f"{checkpoint_path} (if one was written): lower --lr, or check the data")
            torch.nn.utils.clip_grad_norm_(params.values(), opts.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_rows.append([step + 1, f"{step_loss:.6f}", f"{step_prior:.6f}"])
            progress.set_postfix(loss=f"{step_loss:.4f}")
            stop = any_rank(stop_requested, world_size)  # all ranks stop after the same step
            if ((step + 1) % opts.checkpoint_every == 0 or stop) and rank == 0:
                save_checkpoint(checkpoint_path, step + 1, params, optimizer, generator, opts, passes)
            if stop:
                print(f"\ninterrupted after step {step + 1}; checkpoint saved to {checkpoint_path}, "
                      f"continue with the same command plus --resume", file=sys.stderr)
                raise SystemExit(130)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        progress.close()
        if rank == 0:
            with open(run_dir / "loss.csv", "w", newline="") as f:
                csv.writer(f).writerows([["step", "loss", "prior_loss"]] + loss_rows)
    leave_ranks(world_size)  # training is over: rank 0 alone saves and validates
    if rank != 0:
        return run_dir
    save_checkpoint(checkpoint_path, opts.steps, params, optimizer, generator, opts, passes)

    # The adapter file describes itself: waveft's own keys (method, k, scaling, wavelet, seed = position seed, ...)
    # plus what evaluate.py needs to rebuild the prompts, and the whole training config under "training".
    training = {key: value for key, value in json.loads((run_dir / "config.json").read_text()).items()
                if key not in ("argv", "resume", "device")}
    waveft.save(unet, run_dir / "adapter.safetensors", extra_metadata={
        "model": opts.model, "subject": opts.subject, "class_name": class_name, "unique_token": opts.unique_token,
        "instance_prompt": instance_prompt, "resolution": opts.resolution, "training": training})

    # Validation grid: the instance prompt and the first evaluation prompts, two seeds each, made by the same
    # function (and settings) evaluate.py uses; the adapter is live in the UNet, exactly as trained.
    unet.eval()
    pipe.to(device)
    prompts = [instance_prompt] + sdxl.prompts_for(opts.data_dir, opts.subject, opts.unique_token)
    prompts = prompts[:opts.validation_prompts]
    seeds = gen_cfg.seeds[:2]
    images = sdxl.generate(pipe, prompts, seeds=seeds, cfg=gen_cfg)
    grid = sdxl.image_grid(images, cols=len(seeds), labels=[p for p in prompts for _ in seeds])
    grid.save(run_dir / "validation.png")
    print(f"saved {run_dir / 'adapter.safetensors'} and {run_dir / 'validation.png'}")
    return run_dir


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # bad input: the message says what to fix; no traceback
        sys.exit(f"error: {error}")
