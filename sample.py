"""Sample a trained adapter: prompts in, images out, the shortest path from a run to a picture.

The adapter (a run folder of train_dreambooth.py, its adapter.safetensors, or a PEFT adapter folder: WaveFT, LoRA, or
through peft VeRA, LoHa, LoKr, AdaLoRA) is loaded into its base model and merged, W + dW (sampling then costs what
the base model costs), and each prompt is drawn once per seed by sdxl.generate, the function evaluate.py makes its
images with. The settings are the protocol's unless an
option changes them: DPM-Solver++ (2M), 30 steps, guidance 7.5, the authors' negative prompt, seeds 42..45, 1024 px
(64 px for the tiny model). In a prompt, {} stands for the run's "<token> <class>" ("a {} on the beach" -> "a zjw dog
on the beach"); without --prompts, the run's own prompt is drawn ("a zjw dog"). The images go to
<output-dir>/<run>/<NN>_<prompt>/seed<seed>.png, the prompt beside them in prompt.txt: evaluate.py's layout, which
`evaluate.py --metrics-only` scores. Each file is written whole; sampling again replaces them.

    python sample.py --run outputs/dog6-waveft-k2592                                  # "a zjw dog", seeds 42..45
    python sample.py --run outputs/dog6-waveft-k2592 --prompts "a {} on the beach" "a {} in the snow" --seed 7
    python sample.py --run outputs/my_dog-waveft-k2592-tiny-steps4 --prompts "a {} on the beach"   # CPU, seconds
    python sample.py --run my_peft_adapter --model stabilityai/stable-diffusion-xl-base-1.0 --prompts "a sks dog"
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import cli
import eval_images
import files
import interop
import peft_methods
import sdxl
import waveft


@dataclass
class Options:
    run: str  # a run folder of train_dreambooth.py, an adapter .safetensors file, or a PEFT adapter folder
    prompts: list = None  # one or more prompts, {} for the run's "<token> <class>"; default: the run's own prompt
    model: str = None  # the base model; default: the adapter's own (a PEFT folder: its base_model_name_or_path)
    variant: str = None  # the model's weight files to load (e.g. fp16); default: the run's own (its --variant)
    output_dir: str = "samples"  # the images go to <output_dir>/<run>/<NN>_<prompt>/seed<seed>.png
    images_per_prompt: int = 4  # images per prompt, with seeds --seed, --seed + 1, ...
    seed: int = 42  # the first seed (the protocol's: 42..45)
    steps: int = sdxl.GenerationConfig.num_inference_steps  # DPM-Solver++ (2M) steps
    guidance: float = sdxl.GenerationConfig.guidance_scale  # classifier-free guidance scale (1: none)
    negative_prompt: str = None  # default: the protocol's (the authors' list of defects); "" for none
    resolution: int = None  # square images, px; default 1024, the protocol's (64 with --model tiny)
    device: str = "auto"  # cuda if available, else cpu


def main(argv=None):
    """Everything is checked before the model loads; then each prompt's images are made and written. Returns their
    paths, prompt by prompt."""
    opts = parse_options(argv)
    name, adapter, model, subject, own_prompt = read_adapter(Path(opts.run), opts.model)
    prompts = prompts_to_draw(opts, adapter, subject, own_prompt)
    seeds = list(range(opts.seed, opts.seed + opts.images_per_prompt))
    cfg = sdxl.GenerationConfig(
        num_inference_steps=opts.steps, guidance_scale=opts.guidance,
        resolution=opts.resolution or (64 if model == "tiny" else sdxl.GenerationConfig.resolution),
        negative_prompt=sdxl.NEGATIVE_PROMPT if opts.negative_prompt is None else opts.negative_prompt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else \
        torch.device(opts.device)
    print(f"{name}: {model} with {adapter}, {len(prompts)} prompt{'s' * (len(prompts) > 1)} x seeds "
          f"{seeds[0]}..{seeds[-1]}, {cfg.num_inference_steps} steps, guidance {cfg.guidance_scale:g}, "
          f"{cfg.resolution} px, on {device}", flush=True)
    variant = opts.variant if opts.variant is not None else recorded_variant(adapter)
    pipe = eval_images.adapted_pipeline({}, model, adapter, device, variant)  # merged; one that does not fit: refused
    paths = []
    for i, prompt in enumerate(prompts):
        images = sdxl.generate(pipe, [prompt], seeds, cfg)  # the prompt's seeds in batches, as evaluate.py makes them
        folder = eval_images.prompt_folder(Path(opts.output_dir) / name, i, prompt)
        with files.reported_write(folder):
            folder.mkdir(parents=True, exist_ok=True)
        files.write_file(folder / "prompt.txt", prompt + "\n")
        paths += [files.write_file(folder / f"seed{seed}.png", image) for seed, image in zip(seeds, images)]
        print(f"{folder}/{', '.join(f'seed{seed}.png' for seed in seeds)}: {prompt!r}", flush=True)
    return paths


def parse_options(argv=None):
    """argparse generated from Options (--some-field VALUE, help = the field's comment), then every value checked:
    a bad one stops with one line naming the option."""
    opts = Options(**vars(cli.options_parser(Options, __doc__.split("\n")[0]).parse_args(argv)))
    cli.check_values(opts, {}, ("images_per_prompt", "steps", "resolution"))
    if opts.resolution is not None and opts.resolution % 8:  # the VAE's factor
        raise cli.bad_value(opts, "resolution", "must be a multiple of 8")
    if opts.guidance < 0:
        raise cli.bad_value(opts, "guidance", "must be 0 or more")
    cli.check_device(opts)
    return opts


def read_adapter(path, model=None):
    """What --run names: its name, the adapter (file or PEFT folder), the base model (`model` if given), the
    subject's ("<token>", "<class>") and the run's own prompt. A run's adapter file records them all (runs.py's
    save_adapter; a run of PEFT's methods: its config.json); a PEFT folder records at most its base model (None for
    the rest)."""
    if (path / interop.PEFT_CONFIG).is_file():
        peft_method = peft_methods.folder_method(path)  # VeRA, LoHa, LoKr, AdaLoRA: PEFT's own layers, via peft
        if peft_method:
            peft_methods.import_peft(peft_method, f"--run {path}")
        config = peft_methods.read_config(path) if peft_method else interop.read_peft_config(path)
        model = model or config.get("base_model_name_or_path")
        if not model:
            raise ValueError(f"--run {path} is a PEFT adapter folder, which does not record its base model: pass "
                             f"--model")
        return path.name, path, model, None, None
    if (path / peft_methods.RUN_ADAPTER / interop.PEFT_CONFIG).is_file() and (path / "config.json").is_file():
        peft_methods.import_peft(peft_methods.folder_method(path / peft_methods.RUN_ADAPTER), f"--run {path}")
        config = json.loads((path / "config.json").read_text())  # a run of VeRA, LoHa, LoKr or AdaLoRA
        return (path.name, path / peft_methods.RUN_ADAPTER, model or config["model"],
                (config["unique_token"], config["class_name"]), config["instance_prompt"])
    adapter = path / "adapter.safetensors" if path.is_dir() else path
    if not adapter.is_file():
        raise FileNotFoundError(f"--run {path}: not a run folder (no adapter.safetensors), an adapter file or a PEFT "
                                f"adapter folder")
    meta = waveft.read_metadata(adapter)  # checks that it is an adapter file
    if not (model or meta.get("model")):
        raise ValueError(f"--run {path} does not record its base model: pass --model")
    subject = (meta["unique_token"], meta["class_name"]) if "class_name" in meta else None
    name = path.name if path.is_dir() else path.parent.name if path.name == "adapter.safetensors" else path.stem
    return name, adapter, model or meta["model"], subject, meta.get("instance_prompt")


def recorded_variant(adapter):
    """The weight variant the run trained with (train_dreambooth --variant, in its adapter file or, for a run's
    peft_adapter/, its config.json); another PEFT folder records none."""
    if adapter.name == peft_methods.RUN_ADAPTER and (adapter.parent / "config.json").is_file():
        return json.loads((adapter.parent / "config.json").read_text()).get("variant") or None
    return None if adapter.is_dir() else waveft.read_metadata(adapter).get("training", {}).get("variant") or None


def prompts_to_draw(opts, adapter, subject, own_prompt):
    """--prompts with {} filled in, or the run's own prompt; a PEFT folder knows neither its prompt nor its subject."""
    if subject is None and (not opts.prompts or any("{}" in prompt for prompt in opts.prompts)):
        peft = "is a PEFT adapter folder, which records" if adapter.is_dir() else "records"
        raise ValueError(f"--run {opts.run} {peft} no prompt and no subject: pass --prompts with the prompts written "
                         f"out (no {{}})")
    if not opts.prompts:
        return [own_prompt]
    return sdxl.fill_subject(opts.prompts, *subject) if subject else opts.prompts


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, files.WriteError) as error:  # bad input, full disk: one line, no traceback
        sys.exit(f"error: {error}")
