"""DreamBooth personalisation of Stable Diffusion XL with WaveFT adapters, in one plain PyTorch loop.

DreamBooth (Ruiz et al., arXiv 2208.12242) teaches a text-to-image model one subject from 4-6 photos by fine-tuning
it to denoise those photos when prompted "a zjw dog" (zjw: a rare token). Here only WaveFT adapters on the SDXL
UNet's attention projections train (Bilican et al., arXiv 2505.12532): k coefficients per layer in the wavelet domain.
One optimizer step, batch 1 x grad-accum 4, each micro-batch being
    x0 = VAE latent of an instance photo,  eps ~ N(0, I),  t ~ U{0..999},  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    loss = || eps - UNet(x_t, t, text("a zjw dog"), micro-conditioning) ||^2      (+ the same on a class image)
The defaults are the paper's recipe (the authors' configs): 500 steps, AdamW 1e-4, 1024 px, no prior preservation;
bf16 autocast + gradient checkpointing on CUDA, float32 on the CPU. Every option, the run folder and its files,
--resume: docs/training.md (run folders, checkpoints, safe writes: runs.py and files.py).

    python train_dreambooth.py --subject dog6 --k 2000                      # SDXL on a GPU (about 24 GB)
    python train_dreambooth.py --subject dog6 --method lora --rank 1        # the LoRA baseline, same loop
    python train_dreambooth.py --subject dog6 --method loha                 # vera|loha|lokr|adalora: PEFT's layers
    python train_dreambooth.py --subject dog6 --k 2000 --model tiny     # CPU demo (dataset: see --data-dir)
    python train_dreambooth.py --images my_dog --class-name dog         # your own photos: "a zjw dog", my_dog-...
    torchrun --nproc-per-node 4 train_dreambooth.py --subject dog6 --k 2000   # data parallel: the same result

Deliberately not here: accelerate, EMA, aspect-ratio bucketing, text-encoder training, hub upload.
"""
import dataclasses
import datetime
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import distributed
import dwt
import files
import hub
import interop
import peft_methods
import runs
import sdxl
import waveft


@dataclass
class Options:
    subject: str = ""  # DreamBooth subject, a folder of --data-dir (e.g. dog6); or, instead, --images
    images: str = ""  # a folder of your own photos of the subject (4-6), which then names the run
    class_name: str = ""  # with --images: what the photos show (e.g. dog): the prompt is "a <unique-token> <class>"
    data_dir: str = ""  # google/dreambooth's dataset; default: $DREAMBOOTH_DIR, ./dataset, ./dreambooth/dataset, ...
    model: str = sdxl.SDXL_BASE  # hub id, local diffusers folder, or "tiny" (random weights: CPU demo, tests)
    variant: str = ""  # the model's weight files: fp16 for *.fp16.safetensors only (other weights: in the run's name)
    output_dir: str = "outputs"  # the run goes to <output_dir>/<run name> (see --run-name)
    run_name: str = ""  # the run's folder; default <subject>-waveft-k<k> (or -lora-r<rank>) + every non-default option
    overwrite: bool = False  # start again in a folder that holds a run (its files are replaced)
    method: str = "waveft"  # waveft | lora | fourierft | vera | loha | lokr | adalora (the last four: PEFT's layers)
    k: int = 2592  # WaveFT (FourierFT) coefficients per layer (2592 = the LoRA rank-1 budget on SDXL)
    rank: int = None  # LoRA rank [1]; VeRA, LoHa, LoKr r, AdaLoRA init_r: the authors' 1402, 1, 20, 2
    alpha: float = None  # LoHa, LoKr, AdaLoRA alpha (their scaling: alpha / rank); the authors' 64, 192, 32
    target_rank: int = None  # AdaLoRA: the average rank it prunes to (target_r); the authors' 1
    scaling: float = None  # lambda in dW = lambda * IDWT2(C); default 25 for WaveFT, 64 FourierFT, 1 (alpha = r) LoRA
    wavelet: str = "db1"  # WaveFT wavelet (db1 = Haar)
    use_idwt: bool = True  # false: train the sparse matrix directly in weight space (ablation baseline)
    position_seed: int = 777  # seed of the k random coefficient positions
    unique_token: str = "zjw"  # the prompt is "a <unique_token> <class>"
    text_conditioning: str = "pipeline"  # pipeline (as sampled) or authors (encoder 1's last state, as they trained)
    steps: int = 500  # optimizer steps
    grad_accum: int = 4  # micro-batches (of 1 image) per optimizer step
    batching: str = "epoch"  # epoch: shuffled passes, a step per grad_accum photos and at a pass's end; or uniform
    resolution: int = None  # square training crops; default 1024 (64 for --model tiny: 8 x 8 latents, a CPU demo)
    lr: float = None  # AdamW learning rate, constant; default 1e-4 (VeRA: 3.2e-3, the authors')
    weight_decay: float = 1e-4  # AdamW weight decay (betas 0.9/0.999, eps 1e-8)
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 42  # seeds crops, image order, noise, timesteps and LoRA's init
    prior_preservation: bool = False  # add the class-prior loss on generated "a <class>" images
    class_images: int = 100  # number of class images (generated with the base model if missing)
    prior_loss_weight: float = 1.0  # weight of the class-prior MSE term
    class_dir: str = ""  # where class images live; default <output_dir>/class-images/<model>/<class>
    checkpoint_every: int = 100  # write checkpoint.pt every N steps (and on Ctrl-C)
    resume: bool = False  # continue from <run>/checkpoint.pt, exactly
    mixed_precision: str = "auto"  # bf16 (autocast, bf16 UNet, float32 adapter) | no; auto: CUDA bf16 (FourierFT: no)
    gradient_checkpointing: bool = None  # recompute activations in backward (less memory); default: on CUDA only
    validation_prompts: int = 3  # rows of validation.png: the instance prompt, then evaluation prompts (0: none)
    sample_steps: int = 30  # sampler steps for validation and class images
    device: str = "auto"  # cuda if available, else cpu
    fixed_noise: bool = False  # debug: same image, noise and timestep every micro-batch (learning-signal test)
    fast: bool = True  # false: each layer computes the definition F.linear(x, W + dW, b) (teaching; same result)
    compile: bool = False  # torch.compile the UNet for training: same result; off by default, CUDA too (docs)
    save_merged: bool = False  # also write <run>/merged_unet: the UNet with dW folded in, for plain diffusers


# Options that cannot change the adapter: they are left out of the run's folder name.
NO_EFFECT_ON_RESULT = {"data_dir", "output_dir", "run_name", "overwrite", "resume", "checkpoint_every", "class_dir",
                       "validation_prompts", "sample_steps", "device", "gradient_checkpointing", "fast",
                       "compile", "save_merged"}
# Options that may change between an interrupted run and its --resume (--steps extends a run; the photos, like the
# dataset, may have moved); others are refused.
RESUMABLE = NO_EFFECT_ON_RESULT | {"steps", "images"}


def main(argv=None):
    """The recipe, step by step; each step is a function below, in the order it runs."""
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parse_options(argv)
    # Everything that can be checked is checked before a multi-GB model loads, and nothing is written before
    # training starts: bad input fails in seconds, naming what is wrong, and a refused start changes no file.
    class_name, image_paths, images, where = read_photos(opts)
    instance_prompt = f"a {opts.unique_token} {class_name}"
    run_dir = Path(opts.output_dir) / (opts.run_name or run_name(opts))
    resume_state = runs.check_run_dir(run_dir, opts, RESUMABLE | ignored_options(opts).keys())
    peft_methods.check_resume(opts, resume_state)  # AdaLoRA: its schedule spans --steps
    rank, world_size, device = start_processes(opts, where)

    # The model: the frozen pipeline with trainable adapters in its UNet. Then everything its frozen parts compute,
    # computed once: the latents of the (cropped) photos [and class images], the text embeddings.
    pipe = load_model(opts, device)
    gen_cfg = sdxl.GenerationConfig(resolution=opts.resolution, num_inference_steps=opts.sample_steps)
    generator = torch.Generator().manual_seed(opts.seed)  # the training RNG: crops, order, VAE samples, noise, t
    cached = cache_inputs(pipe, opts, images, image_paths, instance_prompt, class_name, gen_cfg, generator, device,
                          rank, world_size)

    # The training state: the adapter's parameters, AdamW, the place in the passes over the photos (from the
    # checkpoint with --resume), the same on every rank
    params, optimizer, passes, start = training_state(pipe.unet, opts, generator, resume_state, world_size)
    if resume_state and start == opts.steps:  # e.g. the disk filled up after the last checkpoint
        print(f"{run_dir / 'checkpoint.pt'} is at step {start} = --steps: nothing to train; the run's final files "
              f"are written (again)")
    config = run_config(opts, argv, class_name, instance_prompt, run_dir)
    log = runs.start_files(run_dir, config, start, opts.overwrite) if rank == 0 else None  # the first file written
    print(f"{run_dir.name}: {opts.method} on {len(peft_methods.adapted_layers(pipe.unet))} layers of {opts.model}, "
          f"{sum(p.numel() for p in params.values()):,} trainable parameters; {len(image_paths)} images of "
          f"{instance_prompt!r}{' + prior preservation' if opts.prior_preservation else ''}\n"
          f"device {device}, {'bf16 autocast' if opts.mixed_precision == 'bf16' else 'float32'}"
          f"{', gradient checkpointing' if opts.gradient_checkpointing else ''}, steps {start}->{opts.steps} "
          f"x {opts.grad_accum} micro-batches, output {run_dir}", flush=True)
    train(pipe, cached, params, optimizer, generator, passes, start, opts, run_dir, log, rank, world_size, device)
    distributed.leave_ranks(world_size)  # training is over: rank 0 alone saves and validates
    if rank != 0:
        return run_dir

    # The run's final files: the last checkpoint and loss.png, the adapter, the validation grid, the merged UNet
    runs.save_checkpoint(run_dir / "checkpoint.pt", opts.steps, params, optimizer, generator, opts, passes,
                         peft_methods.checkpoint_state(pipe.unet))
    runs.plot_losses(run_dir)
    adapter = runs.save_adapter(pipe.unet, run_dir, config)  # with what evaluate.py needs in its metadata
    if opts.validation_prompts:  # the instance prompt, then evaluation prompts (a subject's), as evaluate.py samples
        prompts = [instance_prompt] + (sdxl.prompts_for(opts.data_dir, opts.subject, opts.unique_token)
                                       if opts.subject else [])
        runs.save_validation_grid(pipe, run_dir, prompts[:opts.validation_prompts], gen_cfg, device)
    if opts.save_merged:
        # From the base UNet loaded again in float32 on the CPU, not the training UNet (bf16-rounded W, on the GPU):
        # see docs/training.md, "The files of a run"
        interop.export_merged(run_dir, model=opts.model, overwrite=True, variant=opts.variant)
    print(f"saved {adapter}{' and validation.png' if opts.validation_prompts else ''}"
          f"{' and merged_unet/' if opts.save_merged else ''}")
    return run_dir


# ----------------------------------------------------------------------------------------------------------------
# The options: read, checked, their automatic defaults resolved

def parse_options(argv=None):
    """argparse generated from Options: --some-field VALUE for every field, help = the field's comment. Then every
    value is checked (a bad one stops with one line naming the option) and the automatic defaults are resolved."""
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = Options(**vars(cli.options_parser(Options, __doc__.split("\n")[0]).parse_args(argv)))
    ignored = ignored_options(opts)
    cli.warn_if_given(argv, ignored)  # given, but cannot matter: say so (and do not check it)
    check_options(opts, ignored)
    peft_methods.check(resolve(opts))  # PEFT's methods: peft installed, their values (once resolved)
    return opts


# (option, value): the options that have no effect when it has that value (not checked; a warning when given)
NO_EFFECT_WITH = {("method", "waveft"): ("rank", "alpha", "target_rank"),
                  ("method", "lora"): ("k", "wavelet", "use_idwt", "position_seed", "alpha", "target_rank", "fast"),
                  ("method", "fourierft"): ("rank", "alpha", "target_rank", "wavelet", "use_idwt", "fast"),
                  **peft_methods.NO_EFFECT_WITH,
                  ("model", "tiny"): ("variant",),  # built in memory: no weight files
                  ("prior_preservation", False): ("class_images", "prior_loss_weight", "class_dir")}


def ignored_options(opts):
    """{option: why} for the options that have no effect with this method or without prior preservation."""
    return cli.no_effect(opts, NO_EFFECT_WITH)


CHOICES = dict(method=("waveft", "lora", "fourierft", *peft_methods.METHODS), mixed_precision=("auto", "bf16", "no"),
               wavelet=dwt.WAVELETS, batching=("epoch", "uniform"), text_conditioning=sdxl.TEXT_CONDITIONINGS)
POSITIVE = ("k", "rank", "alpha", "target_rank", "steps", "grad_accum", "checkpoint_every", "class_images",
            "sample_steps", "lr", "max_grad_norm", "resolution")


def check_options(opts, ignored):
    """Raise ValueError naming the first bad option and its value."""
    cli.check_subject_or_images(opts)
    cli.check_values(opts, CHOICES, POSITIVE, ignored)
    if opts.resolution is not None and opts.resolution % 64:
        raise cli.bad_value(opts, "resolution", "must be a multiple of 64")
    if opts.validation_prompts < 0:
        raise cli.bad_value(opts, "validation_prompts", "must be 0 or more")
    if opts.resume and opts.overwrite:
        raise ValueError("--resume continues the run in its folder, --overwrite starts it again: give one of them")
    cli.check_device(opts)


def resolve(opts):
    """Fill in, in place, the defaults that depend on other options: the device (and, from it, the precision and
    checkpointing: bf16 + checkpointing on CUDA, float32 without on the CPU), resolution and scaling."""
    if opts.device == "auto":
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = torch.device(opts.device).type == "cuda"
    if opts.mixed_precision == "auto":
        opts.mixed_precision = "bf16" if on_cuda and opts.method != "fourierft" else "no"
    if opts.gradient_checkpointing is None:
        opts.gradient_checkpointing = on_cuda
    if opts.resolution is None:
        opts.resolution = 64 if opts.model == "tiny" else 1024
    if opts.scaling is None:
        opts.scaling = waveft.DEFAULT_SCALING.get(opts.method, 1.0)  # PEFT's methods: no effect
    peft_methods.resolve(opts)  # rank, lr, alpha, target_rank: per method
    return opts


def run_name(opts):
    """The run's folder name (runs.run_name): <subject or --images folder>-waveft-k<k> then every option that changes
    the result and differs from its default for this model, method and device, e.g. dog6-waveft-k2592-db4-lr2e-4."""
    defaults = resolve(Options(subject=opts.subject, model=opts.model, method=opts.method, device=opts.device))
    defaults.model = sdxl.SDXL_BASE  # another model is named, but what follows from it (its resolution) is not
    return runs.run_name(opts, defaults, NO_EFFECT_ON_RESULT | ignored_options(opts).keys())


# ----------------------------------------------------------------------------------------------------------------
# Before the model: the photos, the processes

def read_photos(opts):
    """The subject's class and photos, each decoded now (a corrupt file fails here, by name): a DreamBooth subject's
    (the dataset's folder is recorded in opts.data_dir as an absolute path, for config.json), or those of --images
    (recorded the same way; the class is --class-name). Returns the class, the photo files, the images, and where
    they were found."""
    if opts.images:
        image_paths = sdxl.photo_folder(opts.images)
        opts.images = str(Path(opts.images).resolve())
        class_name, where = opts.class_name, f"photos: {opts.images} (--images)"
    else:
        data_dir, source = sdxl.find_data_dir(opts.data_dir)
        opts.data_dir = str(data_dir.resolve())
        image_paths = sdxl.instance_images(opts.data_dir, opts.subject)
        class_name, where = sdxl.read_classes(opts.data_dir)[opts.subject], f"dataset: {opts.data_dir} ({source})"
    return class_name, image_paths, [sdxl.load_image(path) for path in image_paths], where


# torchrun with --prior-preservation: the other ranks wait at a barrier while rank 0 makes the class images (an hour
# on a slow GPU): evaluate.py's long timeout, not torch's default (10 minutes with NCCL, which would stop them)
CLASS_IMAGES_WAIT = datetime.timedelta(days=7)


def start_processes(opts, where):
    """Join torchrun's ranks, if any (rank 0 alone prints from here on), and say where the photos are (`where`).
    Returns (rank, world_size, device): (0, 1, device) without torchrun."""
    rank, world_size, device = distributed.start(opts.device,
                                                 timeout=CLASS_IMAGES_WAIT if opts.prior_preservation else None)
    print(where)
    if opts.model != "tiny" and device.type == "cpu":
        print(f"note: training {opts.model} on the CPU takes hours per run; --model tiny runs the whole loop in "
              f"a minute, a GPU the real thing", flush=True)
    if opts.model == "tiny" and device.type == "cpu":
        torch.set_num_threads(1)  # its ops are too small to gain from threads; on a busy 2-core machine they lose 4x
    return rank, world_size, device


# ----------------------------------------------------------------------------------------------------------------
# The model, and what its frozen parts compute (once)

def load_model(opts, device):
    """The pipeline (float32, the VAE and text encoders too) with adapters in its UNet (created in float32 even on
    a bf16 UNet), on `device`. Injecting now checks --k against every layer before anything is written."""
    pipe = hub.from_pretrained(sdxl.load_pipeline, opts.model, variant=opts.variant)
    if opts.mixed_precision == "bf16":  # the same on any device: torch's CPU autocast has bfloat16 too
        # The frozen UNet in bf16 halves its memory; cast before inject, so the adapters are made float32.
        # (.bfloat16(), the same cast as .to(dtype), which makes diffusers warn about float32 modules it has none of)
        pipe.unet.bfloat16()
    add_adapter(pipe.unet, opts)
    return pipe.to(device)


def add_adapter(unet, opts):
    if opts.method in peft_methods.METHODS:
        return peft_methods.inject(unet, opts)
    waveft.inject(unet, method=opts.method, k=opts.k, scaling=opts.scaling, wavelet=opts.wavelet,
                  seed=opts.position_seed, use_idwt=opts.use_idwt, rank=opts.rank, init_seed=opts.seed, fast=opts.fast)


class Cached(NamedTuple):
    """What the frozen parts compute, computed once before training."""
    instance: tuple  # the photos' VAE posteriors and time ids: (means, stds, time_ids) (encode_images)
    prior: tuple  # the same for the class images (None without --prior-preservation)
    prompt_embeds: torch.Tensor  # (1 or 2, 77, d): the instance prompt [and "a <class>"] (sdxl.encode_prompt)
    pooled: torch.Tensor  # (1 or 2, d_pooled)
    latent_scale: float  # the VAE's scaling_factor and shift_factor: x0 = (latent - shift) * scale
    latent_shift: float


def cache_inputs(pipe, opts, images, image_paths, instance_prompt, class_name, gen_cfg, generator, device, rank,
                 world_size):
    """Encode the photos (and, with --prior-preservation, make and encode the class images) and the prompts, then
    move the VAE and text encoders off the accelerator."""
    instance = encode_images(pipe.vae, images, image_paths, opts.resolution, generator, device)
    prior, prompts = None, [instance_prompt]
    if opts.prior_preservation:
        peft_methods.remove(pipe.unet)  # class images come from the base model
        if rank == 0:  # rank 0 generates the missing class images, the others wait for them
            ensure_class_images(pipe, opts, class_name, gen_cfg)
        distributed.barrier(world_size)
        class_paths = ensure_class_images(pipe, opts, class_name, gen_cfg)
        add_adapter(pipe.unet, opts)
        class_images = [sdxl.load_image(path) for path in class_paths]
        prior = encode_images(pipe.vae, class_images, class_paths, opts.resolution, generator, device)
        prompts.append(f"a {class_name}")
    prompt_embeds, pooled = sdxl.encode_prompt(pipe, prompts, opts.text_conditioning)
    if not (torch.isfinite(prompt_embeds).all() and torch.isfinite(pooled).all()):
        raise ValueError(f"text embeddings of {instance_prompt!r} are not finite")
    pipe.vae.to("cpu"), pipe.text_encoder.to("cpu"), pipe.text_encoder_2.to("cpu")  # free the accelerator
    vae = pipe.vae.config
    return Cached(instance, prior, prompt_embeds, pooled, vae.scaling_factor, getattr(vae, "shift_factor", 0) or 0)


@torch.no_grad()
def encode_images(vae, images, paths, resolution, generator, device):
    """Cache each image's VAE posterior N(mean, std^2) once (fp32 VAE: fp16 overflows to NaN). Training samples
    from it every step, as encoding every step would, at none of the cost."""
    means, stds, ids = [], [], []
    for image, path in zip(images, paths):
        pixels, time_ids = sdxl.crop_image(image, resolution, generator)  # one random crop, and its time ids
        posterior = vae.encode(pixels[None].to(device, torch.float32)).latent_dist
        if not (torch.isfinite(posterior.mean).all() and torch.isfinite(posterior.std).all()):
            raise ValueError(f"VAE latents of {path} are not finite: run the VAE in float32 (fp16 SDXL VAE overflows)")
        means.append(posterior.mean[0].cpu())
        stds.append(posterior.std[0].cpu())
        ids.append(time_ids)
    return torch.stack(means), torch.stack(stds), torch.stack(ids)


def ensure_class_images(pipe, opts, class_name, gen_cfg):
    """Prior preservation needs images of the class from the *base* model: the missing ones are generated while no
    adapter is in the UNet, image i from seed i (runs.class_images: files, resuming, redoing a broken one)."""
    class_dir = Path(opts.class_dir or Path(opts.output_dir) / "class-images" / Path(opts.model).name / class_name)
    return runs.class_images(class_dir, opts.class_images,
                             lambda i: sdxl.generate(pipe, [f"a {class_name}"], seeds=[i], cfg=gen_cfg)[0])


# ----------------------------------------------------------------------------------------------------------------
# Training

def training_state(unet, opts, generator, resume_state, world_size):
    """The adapter's parameters {name: Parameter}, AdamW over them, the place in the passes over the photos, and
    the first step: restored from the checkpoint with --resume (the generator too), then rank 0's on every rank."""
    params = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(params.values(), lr=opts.lr, betas=(0.9, 0.999), weight_decay=opts.weight_decay,
                                  eps=1e-8)
    passes = new_passes()  # the position in the shuffled passes over the photos: part of the checkpoint
    start = runs.restore_checkpoint(resume_state, params, optimizer, generator, passes) if resume_state else 0
    peft_methods.restore_state(unet, resume_state)  # AdaLoRA's rank allocator, with --resume
    distributed.broadcast_from_rank0(params, world_size)
    return params, optimizer, passes, start


def run_config(opts, argv, class_name, instance_prompt, run_dir):
    """config.json: every option, what was derived from them, and the command line."""
    # "setting": the options that shape the result, without the subject, whatever --run-name called the folder:
    # evaluate.py's comparison gives each setting its own row (the runs of one row differ only in their subject).
    # "subject": --subject, or the name of the --images folder (as in the run's name)
    subject = runs.subject_of(opts)
    return {**dataclasses.asdict(opts), "subject": subject, "class_name": class_name, "instance_prompt":
            instance_prompt, "run_name": run_dir.name, "setting": run_name(opts).removeprefix(f"{subject}-"),
            "argv": argv}


def train(pipe, cached, params, optimizer, generator, passes, start, opts, run_dir, log, rank, world_size, device):
    """Steps start+1 .. opts.steps. One step: plan its micro-batches, compute this rank's share (forward, backward),
    sum gradients and losses over the ranks, clip, AdamW, log the loss; a checkpoint every --checkpoint-every steps.
    Ctrl-C finishes the step, saves a checkpoint and exits with 130 (a second Ctrl-C interrupts at once)."""
    from diffusers import DDPMScheduler  # here, not at the top: a bad command line fails before its seconds of import
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.mixed_precision == "bf16")
    unet = torch.compile(pipe.unet, fullgraph=True) if opts.compile else pipe.unet  # one graph, compiled in step 1
    checkpoint_path = run_dir / "checkpoint.pt"
    progress = tqdm(total=opts.steps, initial=start, desc=run_dir.name, disable=rank != 0)  # counts finished steps
    with runs.ctrl_c_finishes_the_step() as stop_requested, progress, runs.closing_log(log):
        for step in range(start, opts.steps):
            # Every rank plans the whole step (the same plan); each computes its share of the micro-batches.
            plan = plan_step(opts.batching, passes, len(cached.instance[0]), len(cached.prior[0]) if cached.prior
                             else 0, opts.grad_accum, generator, opts.seed if opts.fixed_noise else None)
            step_loss, step_prior = 0.0, 0.0
            for photo, class_image, seed in plan[rank::world_size]:
                losses = micro_batch_losses(unet, scheduler, cached, photo, class_image, seed, device, autocast)
                # DreamBooth's objective: instance MSE + weight * class-prior MSE (two explicit terms)
                loss = losses[0] + (opts.prior_loss_weight * losses[1] if cached.prior else 0)
                (loss / opts.grad_accum).backward()  # / grad_accum even in a short step (as accelerate does)
                step_loss += losses[0].item()
                step_prior += losses[1].item() if cached.prior else 0.0
            # Gradients and loss sums of all ranks; the logged losses are means over the step's micro-batches.
            step_loss, step_prior = distributed.sum_over_ranks(params, [step_loss, step_prior], world_size)
            step_loss, step_prior = step_loss / len(plan), step_prior / len(plan)
            if not math.isfinite(step_loss + step_prior):  # stop before the optimizer writes NaN into the adapter
                raise FloatingPointError(f"loss is {step_loss} at step {step + 1}; the last good state is in "
                                         f"{checkpoint_path} (if one was written): lower --lr, or check the data")
            torch.nn.utils.clip_grad_norm_(params.values(), opts.max_grad_norm)
            optimizer.step()
            peft_methods.after_optimizer_step(pipe.unet, step)  # AdaLoRA's rank allocation (uses the gradients)
            optimizer.zero_grad(set_to_none=True)
            if log is not None:  # the log before the checkpoint: it may run ahead of it, never behind
                runs.append_loss(log, run_dir / "loss.csv", step + 1, step_loss, step_prior)
            progress.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
            progress.update()  # before a Ctrl-C exit: the bar shows the step that is saved
            stop = distributed.any_rank(stop_requested, world_size)  # all ranks stop after the same step
            if ((step + 1) % opts.checkpoint_every == 0 or stop) and rank == 0:
                runs.save_checkpoint(checkpoint_path, step + 1, params, optimizer, generator, opts, passes,
                                     peft_methods.checkpoint_state(pipe.unet))
                runs.plot_losses(run_dir)
            if stop:
                runs.exit_interrupted(step + 1, checkpoint_path)


def micro_batch_losses(unet, scheduler, cached, photo, class_image, seed, device, autocast):
    """The losses of one micro-batch: the photo's [and the class image's], from the micro-batch's own seed (latent
    sample, noise, timestep), so that any rank computes the same numbers."""
    generator = torch.Generator().manual_seed(seed)
    latents, time_ids = draw_latents(cached.instance, [photo], generator, cached.latent_scale, cached.latent_shift)
    if cached.prior:
        class_latents, class_ids = draw_latents(cached.prior, [class_image], generator, cached.latent_scale,
                                                cached.latent_shift)
        latents, time_ids = torch.cat([latents, class_latents]), torch.cat([time_ids, class_ids])
    return diffusion_losses(unet, scheduler, latents.to(device), cached.prompt_embeds[:len(latents)],
                            cached.pooled[:len(latents)], time_ids.to(device), generator, autocast)


def draw_latents(cache, index, generator, scaling_factor, shift_factor):
    """Latents x0 = (mean + std * z - shift) * scale of the cached images `index` (a list or tensor of indices)."""
    means, stds, time_ids = cache
    z = torch.randn(means[index].shape, generator=generator)
    return (means[index] + stds[index] * z - shift_factor) * scaling_factor, time_ids[index]


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


# ----------------------------------------------------------------------------------------------------------------
# Which images a step sees (--batching; see docs/training.md, "Which photos a step sees")
#
# epoch (the authors' schedule): shuffled passes over the n photos; a step takes the next grad_accum photos of the
#   pass, or what is left of it (n = 5: steps of 4, 1, 4, 1, ...), its loss still / grad_accum. uniform: grad_accum
#   photos drawn with replacement. With prior preservation each micro-batch also gets one class image, the same way.
# A step is planned before anything is computed: micro-batches (photo, class image, seed) drawn from the run's
# generator in one fixed order, everything random inside one from its own seed. So any process can compute any
# micro-batch and get the same numbers (torchrun splits a step without changing the result), and `passes`, stored in
# the checkpoint, lets --resume continue mid-pass exactly.


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


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, files.WriteError) as error:  # bad input, full disk: one line, no traceback
        sys.exit(f"error: {error}")
