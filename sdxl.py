"""SDXL and DreamBooth-data plumbing shared by train_dreambooth.py and evaluate.py.

SDXL (Podell et al., arXiv 2307.01952) conditions its UNet on two CLIP text encoders and on "micro-conditioning"
time ids; DreamBooth (Ruiz et al., arXiv 2208.12242) fine-tunes on 4-6 photos of one subject called "a zjw <class>".
This file holds everything both scripts need to agree on, so that training and evaluation see the same thing:

- loading a pipeline: a hub id / local diffusers folder, or `tiny`, an SDXL-architecture pipeline with random
  weights built from configs (the offline CPU demo and test fixture: its images are noise);
- the DreamBooth dataset: where it is (`find_data_dir`), subjects, classes, the 25 evaluation prompts, robust
  image loading;
- `encode_prompt`: the SDXL text conditioning, built exactly as diffusers' pipeline builds it (or, for training
  only, as the authors' training code builds it);
- `generate`: THE one generation function (the authors' protocol: DPM-Solver++ order 2, 30 steps, CFG 7.5);
- pictures with pillow only: `plot_loss` (every run's loss.png) and the `line_chart` it draws with.

Usage:  pipe = load_pipeline("tiny");  images = generate(pipe, ["a zjw dog"], seeds=(42,), cfg=GenerationConfig())
Not here: training (train_dreambooth.py), metrics (evaluate.py), the adapter itself (waveft.py).
"""
import argparse
import contextlib
import csv
import dataclasses
import io
import inspect
import logging
import math
import os
import re
import shutil
import socket
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

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


def is_live(subject):
    return subject in LIVE_SUBJECTS


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


def prompts_for(data_dir, subject, unique_token=UNIQUE_TOKEN):
    """The 25 DreamBooth evaluation prompts of the subject's kind (object or live), read from the dataset's file."""
    classes = read_classes(data_dir)
    _check_subject(data_dir, subject, classes)
    text = (Path(data_dir) / "prompts_and_classes.txt").read_text()
    objects, live = text.split("Live Subject Prompts", 1)
    templates = re.findall(r"'([^']*)'\.format\(unique_token, class_token\)", live if is_live(subject) else objects)
    if len(templates) != 25:
        raise ValueError(f"expected 25 prompts for {subject} in {data_dir}/prompts_and_classes.txt, "
                         f"found {len(templates)}")
    return [t.format(unique_token, classes[subject]) for t in templates]


def _check_subject(data_dir, subject, classes):
    subjects = sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir())
    if subject not in subjects or subject not in classes:
        raise ValueError(f"unknown subject {subject!r} in {data_dir}; the subjects are: {', '.join(subjects)}")


def instance_images(data_dir, subject):
    """Sorted image files of one subject; unknown subject -> error listing the subjects."""
    data_dir = _check_data_dir(data_dir)
    _check_subject(data_dir, subject, read_classes(data_dir))
    paths = sorted(p for p in (data_dir / subject).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {data_dir / subject}")
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
# Loading a real model: diffusers' own from_pretrained, but never a minutes-long hang when offline

def hub_reachable(timeout=3.0):
    """True if the hub's host accepts a TCP connection within `timeout` s (DNS included: run in a thread, because
    getaddrinfo ignores socket timeouts)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    result = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def from_pretrained(cls, name, what, flag, tiny_use, **kwargs):
    """cls.from_pretrained(name) for a local folder, the local Hugging Face cache or the hub, except that a model in
    none of them fails within seconds (not after a minute of retries), saying which model and what to pass instead.
    Shared by the pipeline here and evaluate.py's metric models; `what`/`flag`/`tiny_use` word the message."""
    if os.path.isdir(name):
        return cls.from_pretrained(name, local_files_only=True, **kwargs)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{what} folder {name} does not exist (pass {flag} with a hub id like owner/name or "
                                f"an existing folder, or {flag} tiny for {tiny_use})")
    try:
        return cls.from_pretrained(name, local_files_only=True, **kwargs)  # already in the local cache
    except (OSError, ValueError):  # not (completely) in the local cache
        if not hub_reachable():
            raise FileNotFoundError(
                f"{what} {name!r} is not available: it is not a local folder, not in the local Hugging Face cache, and "
                f"the hub cannot be reached (no network). Download it where there is network (huggingface-cli "
                f"download {name} --local-dir DIR) and pass {flag} DIR, or pass {flag} tiny for {tiny_use}") from None
    return cls.from_pretrained(name, **kwargs)


def load_unet(model, dtype=torch.float32):
    """The model's UNet alone, on the CPU, in `dtype` (float32: as load_pipeline loads it): `tiny`, a local
    diffusers folder or a hub id, like load_pipeline, without loading the text encoders and the VAE."""
    if model == "tiny":  # built whole (it is small), so seeded exactly as load_pipeline's; torch's own .to: see
        return torch.nn.Module.to(build_tiny_pipeline().unet, dtype)  # build_sdxl_unet (diffusers' warns)
    from diffusers import UNet2DConditionModel
    return from_pretrained(UNet2DConditionModel, model, "model", "--model", "the offline CPU demo", subfolder="unet",
                           dtype=dtype)


def load_pipeline(model, dtype=torch.float32):
    """`tiny` -> build_tiny_pipeline(); a local diffusers folder or a hub id -> diffusers' from_pretrained.
    A hub id is taken from the local cache if it is there; otherwise the hub must answer within seconds."""
    if model == "tiny":
        pipe = build_tiny_pipeline()
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    from diffusers import StableDiffusionXLPipeline
    pipe = from_pretrained(StableDiffusionXLPipeline, model, "model", "--model", "the offline CPU demo", dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# torchrun: which process am I? (training and evaluation both scale out with torch.distributed, nothing else)

def init_distributed(device, backend=None, timeout=None):
    """Under torchrun (RANK and WORLD_SIZE set) join the default process group once, NCCL on CUDA and gloo on the
    CPU (or `backend`; `timeout` a datetime.timedelta, torch's default if None), and give each rank its own GPU
    (LOCAL_RANK) when `device` is CUDA. Returns (rank, world_size, device); without torchrun (0, 1, device), and
    nothing is started."""
    import torch.distributed as dist
    device = torch.device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


# ----------------------------------------------------------------------------------------------------------------
# Files that are never half-written: every file of a run or an evaluation is made in memory, written to a temporary
# file with plain os.write calls and renamed over its name. A full disk then fails inside os.write with an OSError
# (never deep inside a serialiser's own writer, as torch.save's zip writer does with a RuntimeError), the previous
# file stays whole, and the error is one line naming the file.

class WriteError(RuntimeError):
    """A file could not be written (full disk, no permission); the message is one line."""


@contextlib.contextmanager
def reported_write(path, advice="the files written before are intact: make room and run again (with --resume once "
                                "a checkpoint exists)"):
    """An OSError while writing `path` becomes a WriteError: one line naming the file, the error, the free space."""
    try:
        yield
    except OSError as error:
        folder = Path(path).parent
        while not folder.exists() and folder != folder.parent:  # the free space of the disk it would have been on
            folder = folder.parent
        free = shutil.disk_usage(folder).free / 2**20
        raise WriteError(f"cannot write {path}: {error.strerror or error} ({free:,.0f} MiB free there); "
                         f"{advice}") from None


def _write_all(fd, data):
    """os.write until every byte is written (one call may write fewer bytes, e.g. above 2 GB)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_file(path, data, advice=None):
    """Write `data` (bytes, or str as UTF-8, or a PIL image as PNG) to `path` through a temporary file in the same
    folder and one rename: a crash or a full disk mid-write leaves the previous file intact and no temporary file
    behind. The file gets the umask's permissions. Disk errors raise WriteError (one line; `advice` ends it, default
    reported_write's)."""
    if isinstance(data, Image.Image):
        buffer = io.BytesIO()
        data.save(buffer, format="PNG")
        data = buffer.getvalue()
    elif isinstance(data, str):
        data = data.encode()
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: torchrun ranks may write the same file
    with reported_write(path) if advice is None else reported_write(path, advice):
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def torch_bytes(obj):
    """torch.save into memory (then written by write_file): the zip writer never meets the disk."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Command lines from a dataclass: each script lists its options once, each with a comment that becomes its --help

def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


WHAT_A_VALUE_MUST_BE = {int: "not an integer", float: "not a number", bool: "not true or false"}


def value_of(type_, flag):
    """argparse's type= for one option: the text converted to `type_`, or an error that names the option and the
    value the way every other bad value is named (`--k abc: not an integer`)."""
    def convert(text):
        try:
            return parse_bool(text) if type_ is bool else type_(text)
        except (ValueError, argparse.ArgumentTypeError):
            what = WHAT_A_VALUE_MUST_BE.get(type_, f"not a {type_.__name__}")
            raise argparse.ArgumentTypeError(f"{flag} {text}: {what}") from None
    return convert


class OneLineErrors(argparse.ArgumentParser):
    """argparse, except that a bad command line gets one line (`error: --k abc: not an integer; see --help`, exit
    code 2) instead of the usage, which for these scripts is 26 lines that bury the message."""

    def error(self, message):
        # argparse words it "argument --output-dir/--out-dir: <what>"; value_of's <what> names the flag itself
        match = re.match(r"argument (-[^/:\s]+)\S*: (.*)", message, re.S)
        if match:
            flag, what = match.groups()
            message = what if what.startswith(flag + " ") else f"{flag}: {what}"
        self.exit(2, f"error: {message}; see --help\n")


def options_parser(options_class, description, aliases=None):
    """argparse from a dataclass: --some-field VALUE for every field, help = the comment after the field plus its
    [default]. A field without default is required; a bool takes "--flag", "--flag true" or "--flag false"; a list
    takes one or more values. `aliases` maps a field name to more flags (old names that must keep working).
    Errors are one line naming the option and the value (OneLineErrors); so are the scripts' own parser.error()s."""
    comments = dict(re.findall(r"^\s+(\w+): .*?#\s*(.*)$", inspect.getsource(options_class), re.M))
    parser = OneLineErrors(description=description, allow_abbrev=False)
    for field in dataclasses.fields(options_class):
        flags = ["--" + field.name.replace("_", "-"), *(aliases or {}).get(field.name, ())]
        help_text = comments.get(field.name, "").replace("%", "%%")  # argparse %-formats help texts
        if field.default not in (None, "", dataclasses.MISSING):  # None, "": a default that depends on others
            help_text += f" [{str(field.default).lower() if field.type is bool else field.default}]"
        kwargs = dict(dest=field.name, help=help_text)
        if field.default is dataclasses.MISSING:
            kwargs.update(type=value_of(field.type, flags[0]), required=True)
        elif field.type is bool:
            kwargs.update(type=value_of(bool, flags[0]), nargs="?", const=True, default=field.default,
                          metavar="true|false")
        elif field.type is list:
            kwargs.update(nargs="+", default=field.default)
        else:
            kwargs.update(type=value_of(field.type, flags[0]), default=field.default)
        parser.add_argument(*flags, **kwargs)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# SDXL text conditioning

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


def image_grid(images, cols, labels=None):
    """Paste images row by row into one image; an optional label is written (wrapped) in a strip above each."""
    width, height = images[0].size
    chars_per_line = max(1, width // 6)  # PIL's default bitmap font is about 6 px per character
    labels = [textwrap.wrap(str(label or ""), chars_per_line) for label in labels] if labels else None
    strip = 2 + 11 * max(len(lines) for lines in labels) if labels else 0
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * width, rows * (height + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % cols) * width, (i // cols) * (height + strip)
        grid.paste(image.convert("RGB").resize((width, height)), (x, y + strip))
        if labels:
            draw.multiline_text((x + 2, y + 1), "\n".join(labels[i]), fill="black", spacing=1)
    return grid


# ----------------------------------------------------------------------------------------------------------------
# A merged UNet anyone can load: λ·ΔW folded into W, written in diffusers' own layout as a plain UNet, so that
# UNet2DConditionModel.from_pretrained(folder) needs neither waveft nor peft.

MERGED_SHARD_BYTES = 2 * 2**30  # merged_unet/ is written in safetensors shards of at most this many bytes
MERGED_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' names: one file, or shards + an index
MERGED_INDEX = "diffusion_pytorch_model.safetensors.index.json"


@torch.no_grad()
def save_merged_unet(unet, folder, dtype=None, shard_bytes=None):
    """Write `unet` with every adapter folded into its weights (W + λ·ΔW, summed in float32 and rounded once) as a
    plain diffusers model in `folder`, loadable by UNet2DConditionModel.from_pretrained. dtype: default the frozen
    weights' dtype. The model in memory is untouched: adapters live, W unmerged.

    The layout is diffusers' own: config.json plus one diffusion_pytorch_model.safetensors, or, above
    `shard_bytes` (default MERGED_SHARD_BYTES, 2 GiB: SDXL's float32 UNet, 10.3 GB, takes 5 or 6), numbered
    shards and an index ({"metadata": {"total_size"}, "weight_map": {key: shard}}). Shards are merged, serialised
    and written one at a time, so besides the model only one shard (and its bytes) is in memory at a time. The
    folder is written under a temporary name and then takes the place of an existing one (write_folder): never
    half a folder."""
    import json
    import waveft
    from safetensors.torch import save as safetensors_bytes  # looked up at each call: tests count the shards
    layers = dict(waveft.adapted_layers(unet))
    if not layers:
        raise ValueError("the UNet has no waveft adapters to merge (call waveft.inject or waveft.load first)")
    dtype = next(iter(layers.values())).base.weight.dtype if dtype is None else dtype
    shard_bytes = shard_bytes or MERGED_SHARD_BYTES
    with torch.device("meta"):  # the plain model's skeleton costs no memory: its keys, shapes and config
        plain = type(unet).from_config(unet.config)
    # Which tensor of `unet` each key of the plain model comes from: an adapted layer's frozen base.* tensors under
    # the plain nn.Linear's names (and, for its weight, the layer, whose ΔW is added); the adapter's own tensors
    # (spectrum, positions, lora_A/B) are left out.
    sources = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        layer = next((".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in layers), None)
        if layer is None:
            sources[key] = (value, None)
        elif key.startswith(f"{layer}.base."):
            rest = key[len(f"{layer}.base."):]
            sources[f"{layer}.{rest}"] = (value, layers[layer] if rest == "weight" else None)
    expected = plain.state_dict()
    if sources.keys() != expected.keys() or any(sources[k][0].shape != v.shape for k, v in expected.items()):
        raise ValueError(f"the adapted UNet does not map onto a plain {type(unet).__name__}: its keys or shapes "
                         f"differ")

    def merged(key):
        value, layer = sources[key]
        if layer is not None and not layer.merged:  # a merged layer's W already holds ΔW: written as it is
            delta = layer.delta_weight()
            value = value.to(torch.promote_types(value.dtype, delta.dtype)) + delta
            if not torch.isfinite(value).all():
                layer_name = key[:-len(".weight")]
                raise ValueError(f"merging layer {layer_name!r} gives NaN/inf weights; the adapter is broken")
        return (value.to(dtype) if value.is_floating_point() else value).cpu().contiguous()

    # Shards: the keys in the model's order, a new shard where the next tensor would take this one past shard_bytes
    shards, size = [[]], 0
    for key, value in expected.items():
        nbytes = value.numel() * (dtype.itemsize if value.is_floating_point() else value.element_size())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = [MERGED_WEIGHTS] if len(shards) == 1 else [
        MERGED_WEIGHTS.replace(".safetensors", f"-{i:05d}-of-{len(shards):05d}.safetensors")
        for i in range(1, len(shards) + 1)]

    def files():  # (name, bytes), made one at a time as write_folder asks for them
        total = 0
        for name, keys in zip(names, shards):
            tensors = {key: merged(key) for key in keys}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            yield name, safetensors_bytes(tensors, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {key: name for name, keys in zip(names, shards) for key in keys}}
            yield MERGED_INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n"
        yield "config.json", plain.to_json_string()  # what diffusers' save_config writes
    return write_folder(folder, files())


def write_folder(folder, files):
    """Write a folder whole or not at all: `files` yields (name, bytes or str) one at a time, each written with
    plain os.write into <folder>.<pid>.tmp/, which then takes the place of `folder`. An existing folder is first
    renamed to <folder>.<pid>.old (and back if the second rename fails), removed once the new one is in place: at
    every moment the old folder or the new one is complete on disk, and a crash between the two renames leaves the
    old one whole under its .old name. Disk errors raise WriteError naming `folder`; nothing temporary is left."""
    folder = Path(folder)
    tmp, old = (folder.with_name(f"{folder.name}.{os.getpid()}.{end}") for end in ("tmp", "old"))
    with reported_write(folder):
        try:
            for leftover in (tmp, old):  # from a crash of this process id
                shutil.rmtree(leftover, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, data in files:
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                try:
                    _write_all(fd, data.encode() if isinstance(data, str) else data)
                finally:
                    os.close(fd)
            if folder.exists():
                os.replace(folder, old)
            try:
                os.replace(tmp, folder)
            except OSError:
                if old.exists():
                    os.replace(old, folder)
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def export_merged(run_dir, model=None, overwrite=False, dtype=None, shard_bytes=None):
    """`<run_dir>/merged_unet/` for a finished train_dreambooth.py run: its base model's UNet (config.json's
    "model", or `model`, e.g. a local copy of it), loaded alone, in float32, on the CPU (never the training
    device: a float32 SDXL UNet is 10 GB), with its adapter.safetensors merged in, by save_merged_unet. An existing
    folder is replaced (overwrite=True) only once the new one is complete."""
    import json
    import waveft
    run_dir = Path(run_dir)
    folder = run_dir / "merged_unet"
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; pass overwrite=True to replace it")
    if model is None:
        try:
            model = json.loads((run_dir / "config.json").read_text()).get("model")
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {run_dir / 'config.json'}: {error}; is {run_dir} a training run?") from None
        if not model:
            raise ValueError(f'{run_dir / "config.json"} has no "model": pass model= (the base model of the run)')
    unet = load_unet(model)
    waveft.load(unet, run_dir / "adapter.safetensors")
    return save_merged_unet(unet, folder, dtype=dtype, shard_bytes=shard_bytes)


# ----------------------------------------------------------------------------------------------------------------
# Pictures, with pillow only (no matplotlib): every run's loss.png, and the line charts of docs/figures.py

CHART_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#7f7f7f")


def chart_font(size=13):
    """Pillow's bundled TrueType font at `size` px (its small bitmap font where pillow has no FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, TypeError, ValueError):
        return ImageFont.load_default()


def _ticks(lo, hi, count=5):
    """About `count` round values (steps of 1, 2 or 5 times a power of ten) from lo to hi, and that step."""
    raw = (hi - lo) / count if hi > lo else 1.0
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)], step


def line_chart(series, title="", x_label="", y_label="", size=(640, 380)):
    """A white PIL image with one line per series, axes with round ticks and a legend.

    series: [(label, xs, ys)] or [(label, xs, ys, colour, width)]. Points whose y is not finite are left out (the
    line breaks there); a series of a single point is drawn as a dot."""
    font, (width, height) = chart_font(), size
    left, right, top, bottom = 64, 16, 30 if title else 12, 44  # margins: tick labels left, x label below
    points = [(x, y) for _, xs, ys, *_ in series for x, y in zip(xs, ys) if math.isfinite(y)]
    if not points:
        raise ValueError(f"line_chart {title!r}: nothing to draw (no finite values)")
    x_lo, x_hi = min(x for x, _ in points), max(x for x, _ in points)
    y_lo, y_hi = min(y for _, y in points), max(y for _, y in points)
    x_hi, y_hi = max(x_hi, x_lo + 1), y_hi if y_hi > y_lo else y_lo + 1  # one point or a flat line: any range
    y_ticks, y_step = _ticks(y_lo, y_hi)
    y_lo, y_hi = min(y_lo, y_ticks[0]), max(y_hi, y_ticks[-1])
    if y_hi - y_ticks[-1] > 1e-9 * y_step:  # round the top up to a tick, so the highest point sits under one
        y_hi = y_ticks[-1] + y_step
        y_ticks.append(y_hi)
    x_ticks, _ = _ticks(x_lo, x_hi, count=6)

    def px(x, y):  # data -> pixel
        return (left + (x - x_lo) / (x_hi - x_lo) * (width - left - right),
                height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom))

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for y in y_ticks:  # horizontal grid lines with their values
        _, v = px(x_lo, y)
        draw.line([(left, v), (width - right, v)], fill="#e6e6e6")
        draw.text((left - 6, v), f"{y:g}", fill="black", font=font, anchor="rm")
    for x in x_ticks:
        u, _ = px(x, y_lo)
        draw.line([(u, height - bottom), (u, height - bottom + 4)], fill="black")
        draw.text((u, height - bottom + 6), f"{x:g}", fill="black", font=font, anchor="ma")
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    draw.text((width / 2, 4), title, fill="black", font=font, anchor="ma")
    draw.text(((left + width - right) / 2, height - 4), x_label, fill="black", font=font, anchor="md")
    draw.text((4, top - 4), y_label, fill="black", font=font, anchor="ld")
    legend = []  # (label, colour)
    for i, (label, xs, ys, *style) in enumerate(series):
        colour = style[0] if style else CHART_COLOURS[i % len(CHART_COLOURS)]
        line_width = style[1] if len(style) > 1 else 2
        runs, run = [], []  # stretches of finite points
        for x, y in zip(xs, ys):
            if math.isfinite(y):
                run.append(px(x, y))
            elif run:
                runs, run = runs + [run], []
        for run in runs + [run]:
            if len(run) == 1:
                u, v = run[0]
                draw.ellipse([u - 3, v - 3, u + 3, v + 3], fill=colour)
            elif run:
                draw.line(run, fill=colour, width=line_width, joint="curve")
        if label:
            legend.append((label, colour))
    if legend:  # top right, on a white box over the lines
        text_width = max(draw.textlength(label, font=font) for label, _ in legend)
        x0, y0 = width - right - 8 - text_width - 34, top + 4
        draw.rectangle([x0, y0, width - right - 4, y0 + 17 * len(legend) + 6], fill="white", outline="#bbbbbb")
        for i, (label, colour) in enumerate(legend):
            v = y0 + 12 + 17 * i
            draw.line([(x0 + 6, v), (x0 + 26, v)], fill=colour, width=3)
            draw.text((x0 + 32, v), label, fill="black", font=font, anchor="lm")
    return image


def moving_average(values, window):
    """Trailing mean over the last `window` finite values (fewer at the start); NaN until the first finite one."""
    out, recent = [], []
    for value in values:
        if math.isfinite(value):
            recent = (recent + [value])[-window:]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


def plot_loss(csv_path, png_path, window=25):
    """Draw a run's loss.csv (columns step, loss[, prior_loss]) into png_path: the loss of every step (pale), its
    moving average over `window` steps, and, for runs with prior preservation (a prior_loss column that is not all
    zero), the prior loss and its average. The per-step loss of a diffusion model jumps with the random timestep;
    the average is the curve to read."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"step", "loss"} <= set(rows[0]):
        raise ValueError(f"{csv_path}: expected a header 'step,loss,prior_loss' and at least one row")
    try:
        steps = [int(row["step"]) for row in rows]
        columns = {name: [float(row[name]) for row in rows] for name in ("loss", "prior_loss") if name in rows[0]}
    except (TypeError, ValueError) as error:  # TypeError: a short row gives None
        raise ValueError(f"{csv_path}: not a loss log of numbers ({error})") from None
    window = max(1, min(window, len(steps)))
    series = [("loss", steps, columns["loss"], "#aec7e8", 1),
              (f"loss, moving average ({window} steps)", steps, moving_average(columns["loss"], window), "#1f77b4", 2)]
    if any(value != 0 for value in columns.get("prior_loss", [0])):
        series += [("prior loss", steps, columns["prior_loss"], "#ffbb78", 1),
                   (f"prior loss, moving average ({window} steps)", steps,
                    moving_average(columns["prior_loss"], window), "#ff7f0e", 2)]
    chart = line_chart(series, title=f"training loss of {Path(csv_path).resolve().parent.name}", x_label="step",
                       y_label="MSE")
    chart.save(png_path, format="PNG")  # format given: the path may be a temporary name
    return png_path
