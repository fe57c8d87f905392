"""SDXL for DreamBooth: the model, the data, the text conditioning and the sampling that both scripts share.

SDXL (Podell et al., arXiv 2307.01952) conditions its UNet on two CLIP text encoders and on "micro-conditioning"
time ids; DreamBooth (Ruiz et al., arXiv 2208.12242) fine-tunes on 4-6 photos of one subject called "a zjw <class>".
This file holds everything train_dreambooth.py and evaluate.py must agree on, so that both see the same thing:

- the model: `tiny`, an SDXL-architecture pipeline with random weights built from configs (the offline CPU demo and
  test fixture: its images are noise); SDXL base 1.0's real UNet with random weights (build_sdxl_unet: layer
  counts, benchmarks); load_pipeline / load_unet: `tiny`, or diffusers' from_pretrained of a hub id or folder;
- the DreamBooth dataset: where it is (`find_data_dir`), subjects, classes, the 25 evaluation prompts, robust
  image loading; and your own subject: a folder of photos (`photo_folder`), a file of prompts (`read_prompt_file`);
- `encode_prompt`: the SDXL text conditioning, built exactly as diffusers' pipeline builds it (or, for training
  only, as the authors' training code builds it);
- `generate`: THE one generation function (the authors' protocol: DPM-Solver++ order 2, 30 steps, CFG 7.5).

Usage:  pipe = load_pipeline("tiny");  images = generate(pipe, ["a zjw dog"], seeds=(42,), cfg=GenerationConfig())
Not here: training (train_dreambooth.py), metrics (evaluate.py), the adapter itself (waveft.py).
"""
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# diffusers/transformers are imported inside the functions that need them: `import sdxl` stays cheap for the
# dataset helpers, and the tiny tokenizer below needs nothing but the standard library.

# Importing diffusers' SDXL pipeline makes transformers resolve CLIPImageProcessor and SiglipImageProcessor, which
# without torchvision fall back to their PIL versions with a warning each. Nothing here uses those processors, so
# exactly that message is dropped, at the logger that emits it; every other transformers warning still shows.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed); falling back to" not in record.getMessage())

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
UNIQUE_TOKEN = "zjw"  # the authors' rare token (not the usual "sks")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LIVE_SUBJECTS = ("cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8")  # get the "live" prompt list
KINDS = ("object", "live")  # DreamBooth's two prompt lists (prompts_for): live for the cats and dogs above


def is_live(subject):
    return subject in LIVE_SUBJECTS


# ----------------------------------------------------------------------------------------------------------------
# The tiny SDXL: same classes as the real one, random weights, about 1 MB of UNet. Its images are noise.

def _byte_symbols():
    """CLIP/GPT-2 byte-level BPE alphabet: each of the 256 bytes gets a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def tiny_tokenizer(pad_token="<|endoftext|>"):
    """A CLIPTokenizer built in memory: 256 byte symbols (+ `</w>` variants), merges that make a few prompt words
    single tokens, and the two special tokens. Every string encodes (unknown words fall back to bytes)."""
    from transformers import CLIPTokenizer
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = []
    words = ["photo", "zjw", "dog", "cat", "the", "of", "in", "on", "with", "toy", "background"]
    words += re.findall(r"[a-z]+", NEGATIVE_PROMPT)  # keeps the negative prompt well under 77 tokens
    for word in dict.fromkeys(words):
        token = word[0]
        for i, char in enumerate(word[1:], start=1):
            char = char + "</w>" if i == len(word) - 1 else char
            if token + char not in vocab:
                merges.append((token, char))
                vocab.setdefault(token + char, len(vocab))
            token += char
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # eos is the highest id: CLIP's pooling (argmax id) finds it either way
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token,
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def build_tiny_pipeline(seed=0):
    """SDXL architecture in miniature (UNet with text_time conditioning, 4-level VAE so vae_scale_factor is 8, two
    CLIP text encoders, DDPM scheduler with SDXL's betas). Deterministic for a seed, without touching the caller's
    RNG: an adapter trained on `tiny` loads into a freshly built `tiny`."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer(pad_token="!")  # SDXL's tokenizer_2 pads with "!"
    text_config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True,  # 64 = 32 + 32
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32)  # 6 time ids x 8 + pooled text (32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# SDXL base 1.0's real UNet (2.6 B parameters, 560 attention projections) with random weights, built from its
# published config without downloading anything: on the meta device for counting layers (tests/test_sdxl_full.py),
# or allocated once in bf16 for the full-size training benchmark (benchmarks/bench_sdxl.py).

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the fields that shape the network (the rest are
# UNet2DConditionModel's defaults). attention_head_dim is really the number of heads (64 channels each).
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)  # 6 time ids x 256 + text_encoder_2's pooled 1280
SDXL_UNET_PARAMETERS = 2_567_463_684  # the published UNet's size: the test checks the config above against it


def build_sdxl_unet(device="meta", dtype=torch.float32, seed=0):
    """SDXL base 1.0's UNet with random weights, built directly in `dtype` on `device`.

    device="meta": shapes only, no memory, instant (layer and parameter counts). Any other device: the weights are
    allocated there once, already in `dtype` (a bf16 UNet takes 5.1 GB and never exists in float32, 10.3 GB), then
    filled cheaply instead of with diffusers' init: Linear/Conv weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the
    scale of torch's default init, so activations stay finite), biases 0, norm scales 1. The values are
    meaningless; only speed and memory are measured on this model."""
    from diffusers import UNet2DConditionModel
    nn = torch.nn
    with torch.device("meta"):  # no storage: 2.6 B parameters cost nothing here
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    nn.Module.to(unet, dtype)  # torch's own .to: diffusers' warns about float32-only modules, which SDXL has none of
    if torch.device(device).type == "meta":
        return unet
    unet.to_empty(device=device)  # uninitialised storage, filled below
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                bound = module.weight[0].numel() ** -0.5  # 1 / sqrt(fan_in)
                module.weight.uniform_(-bound, bound, generator=generator)
            elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                module.weight.fill_(1.0)
            else:  # a new diffusers version added a parameter kind: fill it knowingly rather than leave garbage
                raise TypeError(f"build_sdxl_unet: no fill rule for {name!r} ({type(module).__name__})")
            if module.bias is not None:
                module.bias.zero_()
    if any(True for _ in unet.buffers()):  # to_empty leaves buffers uninitialised too; SDXL's UNet has none
        raise TypeError("build_sdxl_unet: the UNet has buffers, which would be left uninitialised")
    return unet


# ----------------------------------------------------------------------------------------------------------------
# Loading a model: `tiny`, or diffusers' own from_pretrained (the scripts call these through hub.from_pretrained,
# which makes a model that is nowhere to be found fail in seconds instead of a minute of hub retries)

def load_unet(model, dtype=torch.float32, **kwargs):
    """The model's UNet alone, on the CPU, in `dtype` (float32: as load_pipeline loads it): `tiny`, a local
    diffusers folder or a hub id, like load_pipeline, without loading the text encoders and the VAE."""
    if model == "tiny":  # built whole (it is small), so seeded exactly as load_pipeline's; torch's own .to: see
        return torch.nn.Module.to(build_tiny_pipeline().unet, dtype)  # build_sdxl_unet (diffusers' warns)
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=dtype, **kwargs)


def load_pipeline(model, dtype=torch.float32, **kwargs):
    """`tiny` -> build_tiny_pipeline(); a local diffusers folder or a hub id -> diffusers' from_pretrained (kwargs,
    e.g. local_files_only or variant="fp16" for a folder of *.fp16.safetensors, go to it)."""
    if model == "tiny":
        pipe = build_tiny_pipeline()
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(model, dtype=dtype, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# The DreamBooth dataset (layout of google/dreambooth's `dataset/` folder: one subfolder per subject)

def _check_data_dir(data_dir):
    data_dir = Path(data_dir)
    if not (data_dir / "prompts_and_classes.txt").is_file():
        raise FileNotFoundError(
            f"DreamBooth dataset not found: {data_dir} has no prompts_and_classes.txt. Fetch it with\n"
            f"    git clone https://github.com/google/dreambooth\n"
            f"and pass its folder: data_dir=\"dreambooth/dataset\" in Python, --data-dir dreambooth/dataset on the "
            f"command line")
    return data_dir


DATA_DIR_DEFAULTS = ("dataset", "dreambooth/dataset", "../shared/dreambooth")  # after `git clone`, in the repo


def find_data_dir(data_dir=""):
    """Where the dataset is: `data_dir` when given (and then it must be the dataset), else the first of
    $DREAMBOOTH_DIR, ./dataset, ./dreambooth/dataset, ../shared/dreambooth that holds it. Returns (path, where
    from); none -> an error listing every place looked at."""
    if data_dir:
        return _check_data_dir(data_dir), "--data-dir"
    env = os.environ.get("DREAMBOOTH_DIR")
    candidates = ([(env, "$DREAMBOOTH_DIR")] if env else []) + [(path, "./" + path) for path in DATA_DIR_DEFAULTS]
    for path, source in candidates:
        if (Path(path) / "prompts_and_classes.txt").is_file():
            return Path(path), source
    looked = ", ".join(f"{path} ({source})" if source.startswith("$") else path for path, source in candidates)
    raise FileNotFoundError(
        f"DreamBooth dataset not found; looked in {looked} (none has prompts_and_classes.txt). Fetch it with\n"
        f"    git clone https://github.com/google/dreambooth\n"
        f"and pass its folder (sdxl.find_data_dir(data_dir) in Python, --data-dir on the command line) or set "
        f"$DREAMBOOTH_DIR")


def read_classes(data_dir):
    """{subject: class} from the 'subject_name,class' table at the top of prompts_and_classes.txt."""
    text = (_check_data_dir(data_dir) / "prompts_and_classes.txt").read_text()
    table = text.split("subject_name,class", 1)[1].strip().split("\n\n", 1)[0]
    return dict(line.strip().split(",", 1) for line in table.splitlines() if "," in line)


def prompts_for(data_dir, subject, unique_token=UNIQUE_TOKEN, kind=None, class_name=None):
    """The 25 DreamBooth evaluation prompts of the subject's kind (object or live), read from the dataset's file.
    subject=None (your own subject): those of `kind` for "<unique_token> <class_name>"."""
    if subject is not None:
        classes = read_classes(data_dir)
        _check_subject(data_dir, subject, classes)
        kind, class_name = "live" if is_live(subject) else "object", classes[subject]
    text = (_check_data_dir(data_dir) / "prompts_and_classes.txt").read_text()
    objects, live = text.split("Live Subject Prompts", 1)
    templates = re.findall(r"'([^']*)'\.format\(unique_token, class_token\)", live if kind == "live" else objects)
    if len(templates) != 25:
        raise ValueError(f"expected 25 {kind} prompts in {data_dir}/prompts_and_classes.txt, found {len(templates)}")
    return [t.format(unique_token, class_name) for t in templates]


def read_prompt_file(path):
    """Your own prompts (evaluate.py --prompts): one a line, blank lines skipped, {} for "<token> <class>"."""
    try:
        prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read prompt file {path}: {getattr(error, 'strerror', None) or error}") from None
    if not prompts:
        raise ValueError(f'prompt file {path} holds no prompt: one a line, {{}} for "<token> <class>"')
    return prompts


def fill_subject(prompts, unique_token, class_name):
    """{} in each prompt -> "<unique_token> <class_name>": "a {} on the beach" -> "a zjw dog on the beach"."""
    return [prompt.replace("{}", f"{unique_token} {class_name}") for prompt in prompts]


def _check_subject(data_dir, subject, classes):
    subjects = sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir())
    if subject not in subjects or subject not in classes:
        raise ValueError(f"unknown subject {subject!r} in {data_dir}; the subjects are: {', '.join(subjects)}")


def instance_images(data_dir, subject):
    """Sorted image files of one subject; unknown subject -> error listing the subjects."""
    data_dir = _check_data_dir(data_dir)
    _check_subject(data_dir, subject, read_classes(data_dir))
    return photo_folder(data_dir / subject)


def photo_folder(folder):
    """A subject's photos (also your own: train_dreambooth.py --images): the folder's image files, sorted by name,
    hidden ones left out (macOS's `._<name>.jpg` beside each photo on some disks); fewer than 2 is an error."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"photo folder {folder} does not exist")
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.name[0] != ".")
    if len(paths) < 2:
        raise ValueError(f"{folder} holds {f'1 image ({paths[0].name})' if paths else 'no image'}: DreamBooth learns "
                         f"a subject from a few photos of it, 4-6 as in its dataset (files ending "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    return paths


def load_image(path):
    """Any file PIL reads -> upright RGB. EXIF rotation is applied (phone photos), alpha is composited on white
    (a transparent background must not turn black), grayscale/palette become RGB. Unreadable -> error naming it."""
    try:
        with Image.open(path) as image:
            image.load()  # force the full decode here, so a truncated file fails now and names itself
            image = ImageOps.exif_transpose(image)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, image)
    return image.convert("RGB")


def resize_shorter_side(image, size, resample=Image.BILINEAR):
    """Scale so that the shorter side is `size` px, keeping the aspect ratio (the longer side is at least `size`)."""
    scale = size / min(image.size)
    return image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), resample)


# ----------------------------------------------------------------------------------------------------------------
# SDXL conditioning: the text, and the micro-conditioning time ids (of a training crop: crop_image)

TEXT_CONDITIONINGS = ("pipeline", "authors")


@torch.no_grad()
def encode_prompt(pipe, prompts, conditioning="pipeline"):
    """conditioning="pipeline" (the default): exactly what StableDiffusionXLPipeline.encode_prompt computes
    (clip_skip=None), i.e. what every image is sampled with:
        prompt_embeds = concat(penultimate hidden states of text_encoder, of text_encoder_2)   (B, 77, d1 + d2)
        pooled        = text_encoder_2's projected pooled output ("text_embeds")              (B, d_proj)
    conditioning="authors": what the authors' training code feeds the UNet (train_dreambooth --text-conditioning
    authors): text_encoder's *last* hidden state, after its final layer norm, in place of its penultimate one;
    text_encoder_2's part and the pooled output are the same. Sampling (`generate`: the validation grid,
    evaluate.py) always conditions as the pipeline does, as the authors' sampling does too."""
    if conditioning not in TEXT_CONDITIONINGS:
        raise ValueError(f"conditioning {conditioning!r}: must be one of {', '.join(TEXT_CONDITIONINGS)}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    hidden = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        if conditioning == "authors" and encoder is pipe.text_encoder:
            hidden.append(out.last_hidden_state)  # = final_layer_norm(hidden_states[-1])
        else:
            hidden.append(out.hidden_states[-2])  # penultimate layer: SDXL was trained on it, not on the last one
    pooled = out.text_embeds  # out is text_encoder_2's output here
    return torch.cat(hidden, dim=-1).to(pipe.text_encoder_2.dtype), pooled


def time_ids(original_size, crop_top_left, target_size):
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) as a float tensor."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def crop_image(image, resolution, generator):
    """A training crop: the shorter side resized to `resolution`, then one random square crop. Returns the crop as a
    (3, R, R) tensor in [-1, 1] and the time ids (original h, w, crop top, left, target h, w) that describe it."""
    original_size = (image.height, image.width)
    image = resize_shorter_side(image, resolution, Image.BILINEAR)
    top = int(torch.randint(image.height - resolution + 1, (1,), generator=generator))
    left = int(torch.randint(image.width - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    pixels = pixels.permute(2, 0, 1).float() / 127.5 - 1
    return pixels, time_ids(original_size, (top, left), (resolution, resolution))


# ----------------------------------------------------------------------------------------------------------------
# Generation: the authors' evaluation protocol, in one place

# The authors' fixed negative prompt, exactly (their evaluation code and every stored example output).
NEGATIVE_PROMPT = ("low quality, bad anatomy, worst quality, low res, blurry, distorted, deformed, ugly, duplicate, "
                   "morbid, mutilated, mutation, disfigured, poorly drawn face, bad proportions")


@dataclass
class GenerationConfig:
    num_inference_steps: int = 30  # DPM-Solver++ (2M) steps
    guidance_scale: float = 7.5  # classifier-free guidance
    resolution: int = 1024  # square images, SDXL's native size
    seeds: tuple = (42, 43, 44, 45)  # one image per seed and prompt
    negative_prompt: str = NEGATIVE_PROMPT
    solver_order: int = 2  # DPM-Solver++ order
    cuda_dtype: torch.dtype = torch.bfloat16  # autocast dtype on CUDA (CPU always runs float32)
    batch_size: int = 4  # images per pipeline call (seeds of one prompt); does not change which noise each gets


@torch.no_grad()
def generate(pipe, prompts, seeds=None, cfg=None):
    """One image per (prompt, seed), prompt-major: [p0 s0, p0 s1, ..., p1 s0, ...]. Each image's initial noise comes
    from its own torch.Generator(device=the UNet's device).manual_seed(seed), as in the authors' evaluation: on a GPU
    a seed gives their initial noise (a CUDA generator draws other numbers than a CPU one), on the CPU it is the CPU
    generator's. Either way an image does not depend on the batch it is made in."""
    from diffusers import DPMSolverMultistepScheduler
    cfg = cfg or GenerationConfig()
    seeds = list(cfg.seeds if seeds is None else seeds)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = pipe.unet.device
    original_scheduler = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=cfg.solver_order)
    # CUDA samples under bf16 autocast (the protocol); the CPU in float32, unless the UNet itself is bf16 (validation
    # of a bf16 training run): then under autocast to bf16, since float32 latents cannot meet bf16 weights.
    on_cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=cfg.cuda_dtype if on_cuda else torch.bfloat16,
                              enabled=on_cuda or pipe.unet.dtype == torch.bfloat16)
    images = []
    try:
        for prompt in prompts:
            for start in range(0, len(seeds), cfg.batch_size):
                chunk = seeds[start:start + cfg.batch_size]
                with autocast:
                    images += pipe(prompt=[prompt] * len(chunk), negative_prompt=[cfg.negative_prompt] * len(chunk),
                                   num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                                   height=cfg.resolution, width=cfg.resolution,
                                   generator=[torch.Generator(device).manual_seed(s) for s in chunk]).images
    finally:
        pipe.scheduler = original_scheduler
    return images
