"""Evaluate DreamBooth runs: generate the protocol's images with each trained adapter, then score them.

The idea (DreamBooth, Ruiz et al. 2023): a personalised model should (1) draw *the* subject, not
just any dog, and (2) still follow the prompt. (1) is measured by comparing generated images with the real photos
of the subject in an embedding space, (2) by comparing each image with its prompt in CLIP's joint space. Notation:
e(.) is an L2-normalised embedding, G the generated images of one subject, R its 4-6 real photos.

    DINO      = mean_{g in G, r in R} e(g).e(r)   DINO ViT-S/16 CLS token        subject fidelity (higher is better)
    CLIP-I    = the same with CLIP ViT-B/32 image embeddings                     subject fidelity
    CLIP-T    = mean_g 100 * e(g).e(prompt_g without "zjw")   CLIP ViT-B/32      prompt fidelity
    CMMD      = 1000 * [mean k(g,g') + mean k(r,r') - 2 mean k(g,r)],  k(x,y) = exp(-|x-y|^2 / (2 * 10^2))
                on CLIP ViT-L/14@336 embeddings; every mean runs over all pairs, i = j included (see cmmd())
                                                                             distribution distance (lower is better)
    diversity = mean over prompts of the mean pairwise LPIPS of its images if `lpips` is installed ("lpips_diversity"),
                else the mean pairwise (1 - DINO cosine) ("dino_diversity"; a different number, never called LPIPS)

Protocol (the authors' generation, sdxl.GenerationConfig): 25 DreamBooth prompts of the subject's kind x 4 seeds
(42..45) = 100 images per subject, DPM-Solver++ 2M, 30 steps, CFG 7.5, 1024 px; the adapter is loaded and merged.
Metric scores are means over a run's images; the comparison table gives mean +- std over subjects.

    python evaluate.py --runs outputs/*                         # the paper's comparison -> evaluation/comparison.md
    torchrun --nproc-per-node 8 evaluate.py --runs outputs/*    # the same, images generated on 8 GPUs
    python evaluate.py --runs outputs/* --low-memory           # a 16 GB GPU: bf16 UNet, adapter unmerged
    python evaluate.py --metrics-only my_images --subject dog6  # score another tool's images (ours or the authors')
    python evaluate.py --runs outputs/my_dog-waveft-k2592 --prompts my_prompts.txt  # your photos, your prompts
    python evaluate.py --runs outputs/dog6-waveft-k2000-tiny-steps4 --max-prompts 2 --images-per-prompt 2 --steps 3 \\
        --resolution 64 --dino tiny --clip tiny --cmmd-clip tiny  # CPU smoke run: tiny models, meaningless numbers

Output: <output-dir>/<run>/images/ (one folder per prompt), scores.csv, metrics.json, grid.png, and comparison.md
and .csv over all runs, one row per setting (the run's options without its subject) and prompt set: see
docs/evaluation.md, "Outputs". The images are made once and kept (eval_images.py): Ctrl-C or a full disk leaves whole
files, and the same command continues with the bytes an uninterrupted evaluation writes; under torchrun each rank
makes its share, and rank 0 alone scores.
"""

import datetime
import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import cli
import distributed
import eval_images
import files
import interop
import metric_models
import pictures
import runs
import sdxl

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINO was trained with these
METRICS = dict(dino="DINO ↑", clip_i="CLIP-I ↑", clip_t="CLIP-T ↑", cmmd="CMMD ↓",  # comparison table headers
               lpips_diversity="LPIPS diversity ↑", dino_diversity="DINO diversity ↑")


@dataclass
class Options:
    runs: list = None  # run folders of train_dreambooth.py, e.g. outputs/*, or PEFT adapter folders (or --metrics-only)
    metrics_only: str = None  # instead of --runs: score the images in this folder (our layout or the authors')
    subject: str = None  # with --metrics-only or a PEFT folder: the DreamBooth subject (whose photos to compare with)
    unique_token: str = sdxl.UNIQUE_TOKEN  # with --metrics-only or a PEFT folder: the rare token of the prompts
    data_dir: str = None  # DreamBooth dataset folder; default: the one recorded in each run's config.json
    model: str = None  # SDXL model; must be the run's own; default: the one in each run's config.json
    variant: str = None  # the model's weight files, e.g. fp16 (*.fp16.safetensors); default: each run's config.json's
    low_memory: bool = False  # bf16 UNet, adapter unmerged in float32, VAE one image at a time: ~14 GB, not ~34 (SDXL)
    output_dir: str = "evaluation"  # <output_dir>/<run>/ per run, comparison.md and .csv over all runs
    images_per_prompt: int = 4  # images per prompt, with seeds --seed, --seed + 1, ...
    seed: int = 42  # the first generation seed (the protocol: 42..45)
    max_prompts: int = 25  # evaluate the first N of the 25 DreamBooth prompts (fewer for smoke runs)
    kind: str = None  # object | live: the DreamBooth prompts for runs trained on your photos (--images)
    prompts: str = None  # instead: a file of your own prompts for every run, one a line, {} for "<token> <class>"
    steps: int = None  # sampler steps; default the protocol's 30 (sdxl.GenerationConfig); fewer for smoke runs
    resolution: int = None  # image size in px; default the protocol's 1024; 64 for smoke runs
    dino: str = "facebook/dino-vits16"  # DINO model: hub id, local folder, or tiny (random: smoke runs)
    clip: str = "openai/clip-vit-base-patch32"  # CLIP for CLIP-I and CLIP-T: hub id, local folder, or tiny
    cmmd_clip: str = "openai/clip-vit-large-patch14-336"  # CLIP for CMMD: hub id, local folder, or tiny


def main(argv=None):
    """The evaluation, step by step; each step is a function below, in the order it runs."""
    opts = parse_args(argv)
    out_dir = Path(opts.output_dir)
    to_evaluate = runs.read_runs(opts)  # every rank checks the same things and fails the same way
    # torchrun: one GPU per rank; the one collective is the barrier after generation, where ranks may wait hours for
    # one another (a resumed run's shares differ), so gloo (also between GPUs: nothing big is exchanged), long timeout
    rank, world_size, device = distributed.init_distributed("cuda" if torch.cuda.is_available() else "cpu",
                                                            backend="gloo", timeout=datetime.timedelta(days=7))
    if rank == 0:  # only rank 0 scores; loaded first so that a missing metric model fails before hours of sampling
        models = metric_models.load_metric_models(opts.dino, opts.clip, opts.cmmd_clip, device)
        lpips_model = metric_models.load_lpips()
    gen_cfg = sdxl.GenerationConfig()
    gen_cfg = replace(gen_cfg, num_inference_steps=opts.steps or gen_cfg.num_inference_steps,
                      resolution=opts.resolution or gen_cfg.resolution)
    seeds = [opts.seed + i for i in range(opts.images_per_prompt)]

    # 1. Generation: each run's images, from its adapter merged into its base model (this rank's share)
    plans, generated = generate_images(to_evaluate, opts, gen_cfg, seeds, out_dir, rank, world_size, device)
    if world_size > 1:
        print(f"rank {rank}: generated {generated} images", file=sys.stderr)
        distributed.barrier(world_size)  # every image is on disk
        distributed.leave_ranks(world_size)
        if rank != 0:
            return []

    # 2. Scoring (rank 0): each run's images against its subject's photos and their prompts
    all_metrics = [score_run(run, entries, settings, models, lpips_model, opts, seeds, out_dir)
                   for run, entries, settings in plans]

    # 3. The comparison: one row per setting and prompt set, mean +- std over its subjects
    table = write_comparison(all_metrics, out_dir)
    tiny = "tiny" in models.names.values()
    print(table + f"\nwritten to {out_dir}/" + ("  (tiny metric models: these numbers mean nothing)" if tiny else ""))
    return all_metrics


def parse_args(argv=None):
    """Options from the command line: one --flag per field of Options, checked."""
    # --out-dir: the old name of --output-dir, kept because users' commands and scripts still type it
    parser = cli.options_parser(Options, __doc__.split("\n\n")[0], aliases=dict(output_dir=["--out-dir"]))
    opts = Options(**vars(parser.parse_args(argv)))
    if bool(opts.runs) == bool(opts.metrics_only):
        parser.error("pass either --runs (run folders to evaluate) or --metrics-only (a folder of images to score)")
    if opts.metrics_only and not opts.subject:
        parser.error("--metrics-only needs --subject (whose real photos the images are compared with)")
    for name in ("images_per_prompt", "max_prompts", "steps", "resolution"):
        if getattr(opts, name) is not None and getattr(opts, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, not {getattr(opts, name)}")
    if opts.kind not in (None, *sdxl.KINDS):
        parser.error(f"--kind {opts.kind}: must be one of {', '.join(sdxl.KINDS)}")
    if opts.kind and opts.prompts:
        parser.error("give --kind (the DreamBooth prompts of a kind) or --prompts (a file of your own), not both")
    return opts


def prompt_set(opts):
    """The prompts the images were made from, the other half of a row's key (and shown in its table line): the
    DreamBooth prompts, or a --prompts file by its name."""
    if opts.metrics_only:
        return "from the image folders"
    name, count = (Path(opts.prompts).name, len(sdxl.read_prompt_file(opts.prompts))) if opts.prompts else \
        ("dreambooth", 25)
    return name if opts.max_prompts >= count else f"{name} (first {opts.max_prompts})"


# ----------------------------------------------------------------------------------------------------------------
# 1. Generation: the protocol's images with each run's adapter, on disk once (a rerun makes only what is missing)

def generate_images(to_evaluate, opts, gen_cfg, seeds, out_dir, rank, world_size, device):
    """Every run's missing images (this rank's share), and what each run is to be scored on: [(run, entries,
    settings)] (eval_images.generate_missing), and how many images this rank made. --metrics-only images are read as
    they are. The n-th (run, prompt) folder over all runs belongs to rank n % world_size: a fixed rule that needs no
    communication, and a prompt's seeds are made in their usual batches, so every image is the one 1 process makes."""
    pipelines, plans, generated, n = {}, [], 0, 0
    for run in to_evaluate:
        if run.adapter is None:  # --metrics-only
            plans.append((run, interop.read_image_folder(run.images_dir), None))
            continue
        prompts = runs.prompts_of(run, opts.prompts, opts.kind)[:opts.max_prompts]
        mine = [i for i in range(len(prompts)) if (n + i) % world_size == rank]
        n += len(prompts)
        entries, settings, count = eval_images.generate_missing(run, out_dir / run.name / "images", prompts, seeds,
                                                                gen_cfg, device, mine, pipelines, opts.low_memory)
        plans.append((run, entries, settings))
        generated += count
    return plans, generated  # the pipeline (in `pipelines`) goes: its memory is free for scoring


# ----------------------------------------------------------------------------------------------------------------
# 2. Scoring: one run's images, laid out by prompt

def score_run(run, entries, settings, models, lpips_model, opts, seeds, out_dir):
    """Score one run's images (entries: [(prompt_idx, prompt, path)]) against its subject's photos and their prompts;
    write <out_dir>/<run>/scores.csv, metrics.json and grid.png. Returns the metrics."""
    run_out = out_dir / run.name
    run_out.mkdir(parents=True, exist_ok=True)
    real_images = [sdxl.load_image(path) for path in runs.photos_of(run)]
    rows, metrics, images = score(entries, real_images, models, run.unique_token, lpips_model)
    method, budget = runs.method_and_budget(run.config)
    metrics = dict(run=run.name, subject=run.subject, setting=run.setting, prompt_set=prompt_set(opts),
                   method=method, budget=budget,
                   trainable_params=runs.count_trainable(run.adapter) if run.adapter else None,
                   n_images=len(rows), n_prompts=len({r["prompt_idx"] for r in rows}), n_real=len(real_images),
                   **metrics, metric_models=models.names, meaningless_tiny_models="tiny" in models.names.values(),
                   generation=dict(settings, seeds=seeds) if run.adapter else None)
    files.write_csv(run_out / "scores.csv", [dict(run=run.name, subject=run.subject, **row) for row in rows],
                    eval_images.AFTER_A_WRITE_ERROR)
    eval_images.save(run_out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    pictures.write_grid(run_out / "grid.png", real_images, entries, images, advice=eval_images.AFTER_A_WRITE_ERROR)
    return metrics


def score(entries, real_images, models, unique_token, lpips_model=None):
    """entries: [(prompt_idx, prompt, path)]. Returns (one row per image, the run's metrics, the loaded images)."""
    images = [sdxl.load_image(path) for _, _, path in tqdm(entries, desc="scoring", unit="image")]

    def embed(model):  # the generated and the real images
        return embed_images(model, images), embed_images(model, real_images)

    (dino, dino_real), (clip, clip_real) = embed(models.dino), embed(models.clip)
    text = embed_texts(models.clip, models.tokenizer, [strip_token(prompt, unique_token) for _, prompt, _ in entries])
    per_image = dict(dino=mean_cosine(dino, dino_real), clip_i=mean_cosine(clip, clip_real), clip_t=clip_t(clip, text))
    rows = [dict(prompt_idx=idx, prompt=prompt, file=str(path), seed=(re.findall(r"seed_?(\d+)", path.stem) or [""])[0],
                 **{name: round(float(values[i]), 6) for name, values in per_image.items()})
            for i, (idx, prompt, path) in enumerate(entries)]
    metrics = {name: float(values.mean()) for name, values in per_image.items()}
    metrics["cmmd"] = cmmd(clip, clip_real) if models.cmmd_clip is models.clip else cmmd(*embed(models.cmmd_clip))
    by_prompt = group_by(range(len(entries)), key=lambda i: entries[i][0]).values()
    groups = [group for group in by_prompt if len(group) >= 2]  # diversity needs pairs
    if groups and lpips_model is not None:
        metrics["lpips_diversity"] = float(np.mean([lpips_diversity([images[i] for i in group], lpips_model)
                                                    for group in groups]))
    elif groups:
        metrics["dino_diversity"] = float(np.mean([dino_diversity(dino[group]) for group in groups]))
    return rows, metrics, images


def group_by(items, key):
    """{key(item): [the items with that key]}, keys in order of first appearance."""
    groups = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


# ----------------------------------------------------------------------------------------------------------------
# The metrics, on embeddings (rows = images). float64: they are tiny and then exact to compare.

def normalize(x):
    return F.normalize(torch.as_tensor(x).double(), dim=-1)


def mean_off_diagonal(matrix):
    """Mean over i != j of a square matrix: for a symmetric one (cosines, kernels) the mean over pairs i < j."""
    n = len(matrix)
    return (matrix.sum() - matrix.diagonal().sum()) / (n * (n - 1))


def mean_cosine(generated, real):
    """Per generated image, its mean cosine to every real image. DINO and CLIP-I are the mean of this vector."""
    return (normalize(generated) @ normalize(real).T).mean(dim=1)


def clip_t(image_embeds, text_embeds):
    """Per image, 100 * cosine with its own prompt (row i with row i); not clipped at 0."""
    return 100 * (normalize(image_embeds) * normalize(text_embeds)).sum(dim=-1)


def cmmd(x, y, sigma=10.0, scale=1000.0, unbiased=False):
    """CMMD (Jayasumana et al. 2024, "Rethinking FID"): scale * MMD^2 between two sets of CLIP embeddings with the
    Gaussian RBF kernel k(a, b) = exp(-|a - b|^2 / (2 sigma^2)) on L2-normalised embeddings.

    The paper's text writes the unbiased U-statistic (i = j left out of the within-set means), but the authors'
    released code, which produced their numbers and which every CMMD reimplementation copies, averages over all
    pairs including i = j: the biased "V-statistic" (Gretton et al. 2012, eq. 5). We report that one, because it is
    what "CMMD" means in practice, it is never negative, and a set compared with itself gives exactly 0. The two
    differ by scale * [(1 - mean_{i!=j} k(r_i, r_j)) / |R| + the same for G]: with 4-6 real photos a few tenths,
    more than the gaps between methods, though nearly the same offset for every method on a subject. `unbiased=True`
    gives the paper's formula."""
    x, y = normalize(x), normalize(y)

    def kernel(a, b):
        squared_distance = (2 - 2 * a @ b.T).clamp(min=0)  # |a - b|^2 = 2 - 2 a.b for unit vectors
        return torch.exp(-squared_distance / (2 * sigma**2))

    within_mean = mean_off_diagonal if unbiased else torch.mean
    return float(scale * (within_mean(kernel(x, x)) + within_mean(kernel(y, y)) - 2 * kernel(x, y).mean()))


def dino_diversity(embeds):
    """Mean pairwise (1 - cosine) between the images of one prompt (pairs i < j). Needs at least 2 images."""
    embeds = normalize(embeds)
    return float(1 - mean_off_diagonal(embeds @ embeds.T))


def pixels(images):
    """Same-size RGB PIL images -> (N, 3, H, W) float tensor of 0..255 values."""
    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float()


def lpips_diversity(images, lpips_model, size=256):
    """Mean pairwise LPIPS (Zhang et al. 2018) between the images of one prompt, pairs i < j, at size x size px."""
    x = pixels([image.convert("RGB").resize((size, size), Image.BICUBIC) for image in images]) / 127.5 - 1  # [-1, 1]
    with torch.no_grad():
        return float(torch.stack([lpips_model(x[i:i + 1], x[j:j + 1]).flatten()[0]
                                  for i in range(len(x)) for j in range(i + 1, len(x))]).mean())


def strip_token(prompt, unique_token):
    """CLIP-T compares the image with the prompt a *normal* model understands: "a zjw dog in the snow" -> "a dog in
    the snow" (the rare token means nothing to CLIP and would only add noise)."""
    return " ".join(word for word in prompt.split() if word != unique_token)


# ----------------------------------------------------------------------------------------------------------------
# Embeddings: what each metric model sees of an image or a prompt (the models: metric_models.py)

def preprocess(images, size, mean, std):
    """PIL images -> (N, 3, size, size): shorter side resized to `size` (bicubic), centre crop, [0, 1], normalised.
    This is CLIP's own preprocessing, written out so that no torchvision is needed."""
    squares = []
    for image in images:
        image = sdxl.resize_shorter_side(image.convert("RGB"), size, Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        squares.append(image.crop((left, top, left + size, top + size)))
    x = pixels(squares) / 255
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def features(output):
    return output if torch.is_tensor(output) else output.pooler_output  # transformers 5 returns a model output


@torch.no_grad()
def embed_images(model, images, batch_size=16):
    """DINO: the CLS token of the last layer. CLIP: the projected image embedding. Not normalised (metrics do it)."""
    is_clip = hasattr(model, "get_image_features")
    size = model.config.vision_config.image_size if is_clip else model.config.image_size
    mean, std = (CLIP_MEAN, CLIP_STD) if is_clip else (IMAGENET_MEAN, IMAGENET_STD)
    embeds = []
    for start in range(0, len(images), batch_size):
        x = preprocess(images[start:start + batch_size], size, mean, std).to(model.device, model.dtype)
        embeds.append(features(model.get_image_features(pixel_values=x)) if is_clip
                      else model(pixel_values=x).last_hidden_state[:, 0])
    return torch.cat(embeds).float().cpu()


@torch.no_grad()
def embed_texts(model, tokenizer, texts):
    tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(model.device)
    output = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    return features(output).float().cpu()


# ----------------------------------------------------------------------------------------------------------------
# 3. The comparison table: one line per configuration (setting and prompt set), mean +- std over its subjects

def write_comparison(all_metrics, out_dir):
    """Writes comparison.md (returned) and comparison.csv; a metric no run has gets no column.

    A row is one configuration: the runs' setting (every option that changes the result except the subject, e.g.
    waveft-k2592 or waveft-k2592-steps1000: see setting_of) and the prompt set. Runs that differ in anything but
    their subject are never averaged together; a subject twice in one row is an error."""
    names = [name for name in METRICS if any(name in m for m in all_metrics)]
    md = ["| setting | prompts | method | k or rank | trainable params | subjects | " +
          " | ".join(METRICS[n] for n in names) + " |", "|---" * (6 + len(names)) + "|"]
    rows = []
    for (setting, prompts), row_runs in group_by(all_metrics, key=lambda m: (m["setting"], m["prompt_set"])).items():
        subjects = [m["subject"] for m in row_runs]
        twice = next((subject for subject in subjects if subjects.count(subject) > 1), None)
        if twice:
            raise ValueError(f"row {setting} (prompts: {prompts}) of the comparison has subject {twice} twice: "
                             f"runs {', '.join(m.get('run', '?') for m in row_runs if m['subject'] == twice)}")

        def one(key):  # one value per row, unless the runs differ: then all of them, "/"-separated
            return list(dict.fromkeys(m[key] for m in row_runs))
        method, budget, params = "/".join(one("method")), "/".join(one("budget")), one("trainable_params")
        row = dict(setting=setting, prompt_set=prompts, method=method, budget=budget,
                   trainable_params="/".join(map(str, params)), subjects=len(row_runs))
        cells = [setting, prompts, method, budget, "/".join(f"{p:,}" if p else "-" for p in params), str(len(row_runs))]
        for name in names:
            values = [m[name] for m in row_runs if name in m]
            if not values:  # a metric that some methods have (the diversity kind) and these runs lack
                cells.append("-")
                continue
            mean, digits = float(np.mean(values)), 2 if name == "clip_t" else 3  # CLIP-T is x 100
            std = float(np.std(values, ddof=1)) if len(values) > 1 else None  # the std of one value is undefined
            row.update({f"{name}_mean": round(mean, 4), f"{name}_std": None if std is None else round(std, 4)})
            count = f" (n={len(values)})" if len(values) < len(row_runs) or std is None else ""  # fewer than "subjects"
            cells.append(f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}") + count)
        rows.append(row)
        md.append("| " + " | ".join(cells) + " |")
    eval_images.save(out_dir / "comparison.md", "\n".join(md) + "\n")
    files.write_csv(out_dir / "comparison.csv", rows, eval_images.AFTER_A_WRITE_ERROR)
    return "\n".join(md)


def run_command(argv=None):
    """What `python evaluate.py ...` does: main(), with bad input or a full disk as one line on stderr (status 1),
    and Ctrl-C as one line saying what is kept and how to go on (status 130, as for any SIGINT). Every file is
    written whole or not at all (save), so the same command again continues: finished images are not made again."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, files.WriteError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"evaluate.py: interrupted; the finished images are kept in {parse_args(argv).output_dir}: run the "
              f"same command again to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run_command())
