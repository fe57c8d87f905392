"""Run folders: their names, files and checkpoints (train_dreambooth.py), and reading finished runs back (evaluate.py).

A run lives in <output-dir>/<run name> (run_name: the subject, the method and budget, then every option that changes
the result and differs from its default) and holds RUN_FILES: config.json (every option, the "setting"), loss.csv
(one row per step: its mean loss over the step's micro-batches, appended as the step ends), loss.png, checkpoint.pt
(adapter + optimizer + step + RNG states: --resume continues bit for bit), adapter.safetensors, validation.png and,
with --save-merged, merged_unet/; prior preservation's class images live beside the runs (class_images). A run is
never replaced without --overwrite (check_run_dir), every file goes through files.py, and Ctrl-C finishes the step
and saves a checkpoint (ctrl_c_finishes_the_step), so a crash, a full disk or Ctrl-C leaves the last checkpoint and
the log up to it for --resume.
evaluate.py reads each run back as a `Run` (read_runs: our run folders, PEFT adapter folders, or --metrics-only
images), checked before any model is loaded. Nothing here imports a script: what a script knows (its option
defaults, which options cannot change the result) comes in as arguments.
"""
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

import files
import interop
import peft_methods
import pictures
import sdxl
import waveft

# ----------------------------------------------------------------------------------------------------------------
# A run's name: every option that changes the result

def run_name(opts, defaults, neutral):
    """<subject_of>-waveft-k<k> (-waveft_noidwt-k<k>, -fourierft-k<k>, -lora-r<rank>, -loha-r<rank>, ...), then every
    option of `opts` (train_dreambooth.py's Options) that is not in `neutral` (options that cannot change the result)
    and differs from `defaults` (the same dataclass with the defaults for this model, method and device), in field
    order: e.g. dog6-waveft-k2592-db4-lr2e-4.
    Derived from the fields themselves, so a new option is covered without touching this function."""
    tag = f"waveft{'' if opts.use_idwt else '_noidwt'}-k{opts.k}" if opts.method == "waveft" else \
        f"fourierft-k{opts.k}" if opts.method == "fourierft" else f"{opts.method}-r{opts.rank}"
    skip = set(neutral) | {"subject", "images", "class_name", "method", "k", "rank", "use_idwt"}
    parts = [name_part(f.name, getattr(opts, f.name)) for f in dataclasses.fields(opts)
             if f.name not in skip and getattr(opts, f.name) != getattr(defaults, f.name)]
    return "-".join([subject_of(opts), tag] + parts)


def subject_of(opts):
    """What a run learns, as its name and config.json say it: --subject, or the name of the --images folder (your
    photos; their --class-name is part of the subject, not of the name)."""
    return opts.subject or Path(opts.images).resolve().name


SHORT_NAMES = {"model": "", "wavelet": "", "mixed_precision": "", "position_seed": "pos", "unique_token": "token",
               "grad_accum": "ga", "resolution": "res", "weight_decay": "wd", "max_grad_norm": "clip",
               "prior_preservation": "prior", "class_images": "cls", "prior_loss_weight": "pw",
               "text_conditioning": "cond"}


def name_part(name, value):
    """One option in a folder name: a flag as its name (no-name when off), a number glued to a short name
    (lr2e-4, steps1000), a text after it (token-sks), or alone where the name adds nothing (db4, tiny, fp32)."""
    short = SHORT_NAMES.get(name, name.replace("_", "-"))
    if isinstance(value, bool):
        return short if value else "no-" + short
    if isinstance(value, int):
        return f"{short}{value}"
    if isinstance(value, float):  # the shorter of 0.0002 and 2e-4
        mantissa, exponent = f"{value:e}".split("e")
        return short + min(f"{value:g}", f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}", key=len)
    if name == "model":
        value = Path(value).name  # a hub id or a folder: its last part
    if name == "mixed_precision":
        value = "fp32" if value == "no" else value
    return f"{short}-{value}" if short else value


# ----------------------------------------------------------------------------------------------------------------
# A run's files: each written so that a crash or a full disk never destroys what was there before

RUN_FILES = ("config.json", "loss.csv", "loss.png", "checkpoint.pt", "adapter.safetensors", "validation.png",
             "merged_unet")  # PEFT's methods (peft_methods.py): peft_adapter/, a PEFT folder, for adapter.safetensors


def start_files(run_dir, config, start, overwrite):
    """Training starts: (with --overwrite, the earlier run's files go) config.json, and loss.csv with the rows up to
    the checkpoint (a resumed run drops those after it). Returns loss.csv's file descriptor, open for appending one
    row per step (append_loss)."""
    with files.reported_write(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES + (peft_methods.RUN_ADAPTER,) if overwrite else ():
        if (run_dir / name).is_dir():  # merged_unet, peft_adapter
            shutil.rmtree(run_dir / name)
        else:
            (run_dir / name).unlink(missing_ok=True)
    files.write_file(run_dir / "config.json", json.dumps(config, indent=2))
    loss_path = run_dir / "loss.csv"
    kept = list(csv.reader(loss_path.read_text().splitlines()))[1:start + 1] if start and loss_path.exists() else []
    files.write_file(loss_path, files.csv_text([["step", "loss", "prior_loss"]] + kept))
    with files.reported_write(loss_path):
        return os.open(loss_path, os.O_WRONLY | os.O_APPEND)


def append_loss(log, loss_path, step, loss, prior_loss):
    """One row of loss.csv, appended with plain os.write (a full disk: WriteError; the rows before stay whole)."""
    files.append_bytes(log, loss_path, files.csv_text([[step, f"{loss:.6f}", f"{prior_loss:.6f}"]]).encode())


@contextlib.contextmanager
def closing_log(log):
    """Close loss.csv's descriptor (rank 0's; None on the others) when training ends, however it ends: a failed
    append was reported already, and the file keeps its rows."""
    try:
        yield
    finally:
        if log is not None:
            with contextlib.suppress(OSError):
                os.close(log)


def plot_losses(run_dir):
    """loss.png from loss.csv: the loss of every step and its moving average (pictures.plot_loss)."""
    png = io.BytesIO()
    pictures.plot_loss(run_dir / "loss.csv", png)
    files.write_file(run_dir / "loss.png", png.getvalue())


def save_adapter(unet, run_dir, config):
    """adapter.safetensors describes itself: waveft's own keys (method, k, scaling, wavelet, seed = position seed,
    ...) plus what evaluate.py needs to rebuild the prompts, and the training config (`config`, config.json's
    contents) under "training". PEFT's methods: the folder peft_adapter/ in PEFT's format instead (config.json
    holds the rest). Returns the path written."""
    if peft_methods.layers(unet):
        return peft_methods.save(unet, run_dir / peft_methods.RUN_ADAPTER, config["model"])
    training = {key: value for key, value in config.items() if key not in ("argv", "resume", "overwrite", "device")}
    metadata = {key: config[key] for key in ("model", "subject", "class_name", "unique_token", "instance_prompt",
                                             "resolution")}
    with files.reported_write(run_dir / "adapter.safetensors"):  # waveft.save writes through a temporary file itself
        waveft.save(unet, run_dir / "adapter.safetensors", extra_metadata={**metadata, "training": training})
    return run_dir / "adapter.safetensors"


def save_validation_grid(pipe, run_dir, prompts, gen_cfg, device):
    """validation.png: each prompt with two seeds, made by the function (and settings) evaluate.py uses; the
    adapter is live in the UNet, exactly as trained."""
    pipe.unet.eval()
    pipe.to(device)
    seeds = gen_cfg.seeds[:2]
    images = sdxl.generate(pipe, prompts, seeds=seeds, cfg=gen_cfg)
    grid = pictures.image_grid(images, cols=len(seeds), labels=[f"{p} (seed {s})" for p in prompts for s in seeds])
    files.write_file(run_dir / "validation.png", grid)


def class_images(class_dir, count, make_image):
    """Prior preservation's class images <class_dir>/0000.png, 0001.png, ... (`count` of them): each missing one is
    make_image(i) (seeded by its index, so an interrupted generation continues where it stopped), written whole
    (files.write_file); one that does not decode (cut short by an older version's crash) is made again."""
    with files.reported_write(class_dir):
        class_dir.mkdir(parents=True, exist_ok=True)
    paths = [class_dir / f"{i:04d}.png" for i in range(count)]
    for i, path in enumerate(tqdm(paths, desc=f"class images in {class_dir}")):
        if path.exists():
            try:
                sdxl.load_image(path)
                continue
            except ValueError as error:  # "cannot read image <path>: ..."
                tqdm.write(f"note: {error}; generating it again")
        files.write_file(path, make_image(i))
    return paths


def check_run_dir(run_dir, opts, may_differ):
    """Refuse to start over a run without --resume or --overwrite; with --resume return the checkpoint (checked
    against the options, up to those in `may_differ`). Only reads: a refused start leaves every file as it was."""
    if opts.resume:
        return read_checkpoint(run_dir / "checkpoint.pt", opts, may_differ)
    held = [name for name in ("checkpoint.pt", "adapter.safetensors", peft_methods.RUN_ADAPTER)
            if (run_dir / name).exists()]
    if held and not opts.overwrite:
        raise ValueError(f"{run_dir} already holds a run ({', '.join(held)}): continue it with --resume, start it "
                         f"again with --overwrite, or give this one another folder with --run-name")
    return None


# Checkpoints: adapter + optimizer + step + RNG states in one file

def save_checkpoint(path, step, params, optimizer, generator, opts, passes, method_state=None):
    """checkpoint.pt: the adapter, AdamW's state, the step, every RNG state and the options, written whole; and
    method_state, what else the method needs to continue exactly (AdaLoRA's: peft_methods.checkpoint_state)."""
    state = {"step": step, "adapter": {name: p.detach().cpu() for name, p in params.items()},
             "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
             "torch_rng": torch.get_rng_state(), "options": json.dumps(dataclasses.asdict(opts)),
             "passes": passes}  # where the run stands in its shuffled passes (--batching epoch)
    if method_state is not None:
        state["method_state"] = method_state
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    # Serialised in memory, written with plain os.write: a full disk fails there as an OSError (one line), not
    # inside torch.save's zip writer (a RuntimeError "unexpected pos")
    files.write_file(path, files.torch_bytes(state))


def read_checkpoint(path, opts, may_differ):
    """The checkpoint's state, if it was made with the same options, up to those in `may_differ` (the options that
    may change on --resume, e.g. --steps, and those that have no effect with these options)."""
    if not path.exists():  # the folder's name follows the options, so other options point to another folder
        raise FileNotFoundError(f"--resume: no checkpoint at {path}" + ("" if opts.run_name else
                                " (resume with the run's own options, or name its folder with --run-name)"))
    # weights_only: tensors and plain types only, never arbitrary pickle. map_location cpu: a checkpoint written on a
    # GPU (its optimizer state is tagged cuda:0) loads on a CPU-only machine too, and under torchrun no rank puts
    # its copy on cuda:0; restore_checkpoint then puts everything on each rank's own device (the adapter by copy_,
    # the optimizer state by load_state_dict, which moves it to the parameters'), and the RNG states must be CPU
    # ByteTensors anyway.
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(state["options"])
    changed = [f"{key} ({saved.get(key)} -> {value})" for key, value in dataclasses.asdict(opts).items()
               if key not in may_differ and saved.get(key) != value]
    if changed:
        raise ValueError(f"--resume: {path} was trained with other options: {', '.join(changed)}")
    if state["step"] > opts.steps:  # no step would run, and the checkpoint would be relabelled an earlier step
        raise ValueError(f"--resume: {path} is at step {state['step']}, past --steps {opts.steps}: give --steps "
                         f"{state['step']} (to finish the run) or more (to extend it)")
    return state


def restore_checkpoint(state, params, optimizer, generator, passes):
    """Put a checkpoint's state back in place; returns its step."""
    for name, p in params.items():
        p.data.copy_(state["adapter"][name])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    passes.update(state["passes"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


# Ctrl-C during training: the step finishes, a checkpoint is saved, the run exits with 130

@contextlib.contextmanager
def ctrl_c_finishes_the_step():
    """Inside, a first Ctrl-C only appends to the list this yields (true from then on): the loop finishes its step,
    saves a checkpoint and calls exit_interrupted. A second Ctrl-C interrupts at once. The old handler is restored
    on leaving."""
    requested = []

    def request_stop(*_):
        requested.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_handler = signal.signal(signal.SIGINT, request_stop)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous_handler)


def exit_interrupted(step, checkpoint_path):
    """The one line after a Ctrl-C, then exit status 130 (as for any SIGINT)."""
    print(f"\ninterrupted after step {step}; checkpoint saved to {checkpoint_path}, continue with the same command "
          f"plus --resume", file=sys.stderr)
    raise SystemExit(130)


# ----------------------------------------------------------------------------------------------------------------
# Finished runs, read back for evaluation: everything checked first, so a bad folder fails before any model loads

@dataclass
class Run:
    name: str
    subject: str
    unique_token: str
    data_dir: str
    config: dict  # the run's config.json ({} for --metrics-only)
    adapter: Path = None  # adapter.safetensors or a PEFT adapter folder (a run's peft_adapter/; None: --metrics-only)
    images_dir: Path = None  # --metrics-only: the folder of images to score
    setting: str = ""  # the run's settings without its subject (setting_of): its row of the comparison
    photos: str = None  # a run on your own photos (train_dreambooth.py --images): their folder
    class_name: str = None  # the subject's class: a prompt file's {} is "<unique_token> <class_name>"
    variant: str = None  # the model's weight files to sample with (e.g. fp16): --variant, else config.json's


def setting_of(run):
    """What one row of the comparison holds fixed: every option of the run that changes its result except the
    subject, as a name. train_dreambooth.py records it in config.json ("setting", derived from the options even when
    --run-name chose the folder's name); an older run's folder name without "<subject>-" (the name it was given
    then: method, budget and every option that differs from its default); a PEFT folder records no training
    options: its method and budget; --metrics-only images: "external"."""
    if "setting" in run.config:
        return run.config["setting"]
    if run.config.get("peft_folder"):
        return "peft " + " ".join(method_and_budget(run.config))
    if run.adapter is None:
        return "external"
    return run.name.removeprefix(f"{run.subject}-")


def read_runs(opts):
    """--runs: every run folder among them (checked); --metrics-only: the one folder of images."""
    if opts.metrics_only:
        folder = Path(opts.metrics_only)
        data_dir = str(sdxl.find_data_dir(opts.data_dir or "")[0])  # where training looks, in the same order
        run = Run(folder.name, opts.subject, opts.unique_token, data_dir, {}, images_dir=folder)
        run.setting = setting_of(run)
        check_subject(run, "--metrics-only")
        interop.read_image_folder(folder)  # fail now, not after loading the models
        return [run]
    for folder in opts.runs:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"run folder {folder} does not exist")
    # `outputs/*` also matches folders that are no runs at all (class-images/): skipped, with a note
    folders = [f for f in opts.runs if any((Path(f) / n).exists() for n in RUN_MARKERS)]
    for folder in sorted(set(opts.runs) - set(folders)):
        print(f"skipping {folder}: not a run folder (no config.json, no adapter.safetensors)", file=sys.stderr)
    if not folders:
        raise FileNotFoundError(f"none of --runs {' '.join(opts.runs)} is a run folder of train_dreambooth.py")
    runs = [read_peft_run(folder, opts) if (Path(folder) / interop.PEFT_CONFIG).is_file()
            else read_run(folder, opts.data_dir, opts.model) for folder in folders]
    if opts.prompts:
        sdxl.read_prompt_file(opts.prompts)  # a bad file fails now, not after the models have loaded
    for run in [run for run in runs if run.photos and not opts.prompts]:  # your subject: which prompts?
        if not opts.kind:
            raise ValueError(f"run {run.name} was trained on your photos ({run.photos}), not on a DreamBooth "
                             f"subject: pass --kind object or --kind live (the DreamBooth prompts of that kind) or "
                             f"--prompts FILE (your own)")
        try:
            run.data_dir = str(sdxl.find_data_dir(opts.data_dir or "")[0])  # where the DreamBooth prompts are
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--kind reads the DreamBooth prompts from the dataset (or give --prompts FILE): "
                                    f"{error}") from None
    if len({run.name for run in runs}) < len(runs):
        raise ValueError("two run folders have the same name; their results would overwrite each other")
    first = {}  # (setting, subject) -> its run: a row of the comparison averages over distinct subjects
    for run in runs:
        run.setting = setting_of(run)
        run.variant = run.config.get("variant") if getattr(opts, "variant", None) is None else opts.variant
        other = first.setdefault((run.setting, run.subject), run)
        if other is not run:
            raise ValueError(f"runs {other.name} and {run.name} are both {run.subject} with setting {run.setting}: "
                             f"a row of the comparison holds one run per subject; evaluate one of them, or each "
                             f"with its own --output-dir")
    return runs


def read_run(folder, data_dir=None, model=None):
    """One run folder of train_dreambooth.py: its config.json and adapter.safetensors (PEFT's methods: peft_adapter/,
    a PEFT folder), checked against each other, against --model and against the dataset (--data-dir, else the one
    config.json records)."""
    folder = Path(folder)
    adapter = folder / "adapter.safetensors"
    if not adapter.is_file() and (folder / peft_methods.RUN_ADAPTER / interop.PEFT_CONFIG).is_file():
        adapter = folder / peft_methods.RUN_ADAPTER  # a run of VeRA, LoHa, LoKr or AdaLoRA: it needs peft to load
        peft_methods.import_peft(peft_methods.folder_method(adapter), f"run {folder}")
    for file in ("config.json", adapter.name):
        if not (folder / file).exists():
            raise FileNotFoundError(f"run folder {folder} has no {file}: pass folders written by train_dreambooth.py "
                                    f"(a run that has not finished has no adapter.safetensors yet)")
    try:
        config = json.loads((folder / "config.json").read_text())
        missing = {"subject", "model"} - set(config)
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"{folder / 'config.json'} is not a train_dreambooth.py config: {error}") from None
    if missing:
        raise ValueError(f"{folder / 'config.json'} has no {' or '.join(sorted(missing))}: "
                         f"not a train_dreambooth.py config")
    trained_for = (peft_methods.read_config(adapter).get("base_model_name_or_path") if adapter.is_dir() else
                   waveft.read_metadata(adapter).get("model")) or config["model"]  # reads (checks) the adapter
    if trained_for != config["model"]:
        raise ValueError(f"{folder}: {adapter.name} was trained for model {trained_for!r} but config.json says "
                         f"{config['model']!r}; the two files come from different runs")
    if model is not None and model != config["model"]:
        raise ValueError(f"{folder}: its adapter was trained for model {config['model']!r} (config.json), not for "
                         f"--model {model!r}; drop --model to evaluate each run with its own model")
    recorded, photos = str(config.get("data_dir", "dataset")), config.get("images") or None  # photos: --images
    if data_dir is None and not photos and not (Path(recorded) / "prompts_and_classes.txt").is_file():  # moved?
        relative = "" if Path(recorded).is_absolute() else f" (relative to the current folder, {Path.cwd()})"
        raise FileNotFoundError(f"{folder}: config.json records the DreamBooth dataset at {recorded}{relative}, but "
                                f"it is not there (no prompts_and_classes.txt); pass --data-dir with its folder")
    run = Run(folder.name, config["subject"], config.get("unique_token", sdxl.UNIQUE_TOKEN),
              str(data_dir or recorded), config, adapter, photos=photos,
              class_name=config.get("class_name"))
    check_subject(run, f"run {folder}")
    return run


RUN_MARKERS = ("config.json", "adapter.safetensors", interop.PEFT_CONFIG)  # a run folder holds one of these


def read_peft_run(folder, opts):
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors, trained with PEFT or the authors'
    code) is scored like a run of ours. It records no subject or dataset: --subject says whose photos it learned,
    --model its base model (unless the config names one), --data-dir / the usual places where the dataset is."""
    folder = Path(folder)
    peft_method = peft_methods.folder_method(folder)  # VeRA, LoHa, LoKr, AdaLoRA: PEFT's own layers compute them
    if peft_method:
        peft_methods.import_peft(peft_method, f"run {folder}")  # without peft: one line, now
    # interop's check: what our layers can compute as PEFT does
    config = peft_methods.read_config(folder) if peft_method else interop.read_peft_config(folder)
    model = opts.model or config.get("base_model_name_or_path")
    if not opts.subject or not model:
        raise ValueError(f"{folder} is a PEFT adapter folder, which does not record "
                         f"{'its subject' if not opts.subject else 'its base model'}: pass "
                         f"{'--subject (e.g. dog6)' if not opts.subject else '--model'} to evaluate it")
    if config["peft_type"] == "WAVEFT":
        method = dict(method="waveft", k=config["n_frequency"], wavelet=config["wavelet_family"],
                      scaling=config["scaling"], use_idwt=config["use_idwt"])
    elif config["peft_type"] == "FOURIERFT":
        method = dict(method="fourierft", k=config["n_frequency"], scaling=config["scaling"])
    elif peft_method:
        method = peft_methods.settings_of(config)
    else:
        method = dict(method="lora", rank=config["r"])
    run = Run(folder.name, opts.subject, opts.unique_token, str(sdxl.find_data_dir(opts.data_dir or "")[0]),
              dict(method, model=model, subject=opts.subject, peft_folder=True), folder)
    check_subject(run, f"run {folder}")
    run.class_name = sdxl.read_classes(run.data_dir)[run.subject]
    return run


def check_subject(run, where):
    """The run's subject has photos (in its dataset, or its own folder); else the error, prefixed with `where`."""
    try:
        photos_of(run)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"{where}: {error}") from None


def photos_of(run):
    """The real photos a run's images are compared with: its subject's in the dataset, or its own folder's."""
    return sdxl.photo_folder(run.photos) if run.photos else sdxl.instance_images(run.data_dir, run.subject)


def prompts_of(run, prompt_file=None, kind=None):
    """The prompts of a run's images: a prompt file's for its subject (evaluate.py --prompts), else the 25 DreamBooth
    prompts of its subject's kind (`kind` for a run on your photos: their class is not in the dataset)."""
    if prompt_file:
        return sdxl.fill_subject(sdxl.read_prompt_file(prompt_file), run.unique_token, run.class_name)
    if run.photos:
        return sdxl.prompts_for(run.data_dir, None, run.unique_token, kind, run.class_name)
    return sdxl.prompts_for(run.data_dir, run.subject, run.unique_token)


def method_and_budget(config):
    """('waveft', 'k=2592'), ('waveft_noidwt', 'k=2592'), ('fourierft', 'k=2592'), ('lora', 'r=1'), ('loha', 'r=1'),
    ('adalora', 'r=2->1'), as in the output folder names; a non-default wavelet or scaling (alpha: PEFT's methods) is added to the method,
    so a sweep over them does not share one table line."""
    method = config.get("method", "external")
    if method in peft_methods.METHODS:
        authors = peft_methods.AUTHORS[method].get("alpha")
        alpha = f" alpha={config['alpha']:g}" if config.get("alpha") not in (None, authors) else ""
        target = f"->{config['target_rank']}" if method == "adalora" else ""
        return method + alpha, f"r={config['rank']}{target}"
    if method == "waveft" and config.get("use_idwt", True) in (False, "false", "False", 0):
        method = "waveft_noidwt"
    if method.startswith("waveft"):
        method += f" {config['wavelet']}" if config.get("wavelet", "db1") != "db1" else ""
        method += f" scaling={config['scaling']:g}" if config.get("scaling") not in (None, 25) else ""
    if method == "fourierft" and config.get("scaling") not in (None, 64):
        method += f" scaling={config['scaling']:g}"
    budget = f"r={config.get('rank')}" if method == "lora" else f"k={config['k']}" if "k" in config else ""
    return method, budget


def count_trainable(adapter):
    """Trainable adapter parameters, read from the file: the spectra (WaveFT, FourierFT), A and B (LoRA), PEFT's
    methods' tensors (peft_methods.TRAINABLE: VeRA's d and b, not its frozen shared A and B; AdaLoRA's surviving
    triplets)."""
    path = adapter / interop.PEFT_WEIGHTS if adapter.is_dir() else adapter  # a PEFT folder: its weights file
    with safe_open(str(path), "pt") as f:
        return sum(int(np.prod(f.get_slice(key).get_shape())) for key in f.keys()
                   if key.endswith(("waveft_spectrum", "fourierft_spectrum", "lora_A.weight", "lora_B.weight",
                                    *peft_methods.TRAINABLE)))


def adapter_hash(adapter):
    """sha256 of the adapter's bytes (of a PEFT folder: its config's, then its weights')."""
    digest = hashlib.sha256()
    for path in [adapter / interop.PEFT_CONFIG, adapter / interop.PEFT_WEIGHTS] if adapter.is_dir() else [adapter]:
        digest.update(path.read_bytes())
    return digest.hexdigest()
