"""Evaluation images made once and kept: which are missing, the batches they are made in, images/generation.json, and
one pipeline per base model whose adapter is swapped exactly.

evaluate.py decides which images a run is scored on (the protocol's prompts x seeds, this rank's share) and asks
generate_missing for them. An image on disk is never made again, so an interrupted evaluation continues; a missing
one is made in the batch an uninterrupted evaluation makes it in, so the bytes are the same; generation.json
records everything an image depends on besides its prompt and seed, and images made otherwise are refused, never
reused. Every file is written whole (`save`, files.write_file): a full disk is one line, and the same command
continues.
"""
import json
import re

import torch
from tqdm import tqdm

import files
import hub
import interop
import peft_methods
import runs
import sdxl
import waveft

# A full disk is one line naming the file (files.WriteError), ending:
AFTER_A_WRITE_ERROR = "the files written before are intact: make room and run the same command again (it continues)"


def generate_missing(run, images_dir, prompts, seeds, gen_cfg, device, mine=None, pipelines=None, low_memory=False):
    """Generate every (prompt, seed) image that is not on disk yet, so an interrupted evaluation resumes, byte for
    byte; under torchrun only those of the prompts `mine` (indices; default all), this rank's share. Returns
    [(prompt_idx, prompt, path)] of all images, the settings recorded in generation.json (everything an image
    depends on besides its prompt and seed) and how many images were generated here. Images on disk made with other
    settings or another adapter (by its hash) are an error, never silently reused. The model's weight files
    (run.variant) and low_memory (adapted_pipeline) are recorded only when set: older records stay valid."""
    settings = dict(model=run.config["model"], adapter_sha256=runs.adapter_hash(run.adapter),
                    steps=gen_cfg.num_inference_steps, resolution=gen_cfg.resolution, guidance=gen_cfg.guidance_scale,
                    solver_order=gen_cfg.solver_order, negative_prompt=gen_cfg.negative_prompt,
                    **({"variant": run.variant} if run.variant else {}), **({"low_memory": True} if low_memory else {}))
    record = images_dir / "generation.json"
    old = json.loads(record.read_text()) if record.is_file() else settings
    if old != settings:
        changed = [key for key in {**old, **settings} if old.get(key) != settings.get(key)]
        raise ValueError(f"{images_dir} holds images made with other {', '.join(changed)} (see {record}); delete "
                         f"that folder or pass another --output-dir")
    folders = [prompt_folder(images_dir, i, prompt) for i, prompt in enumerate(prompts)]
    entries = [(i, prompt, folders[i] / f"seed{seed}.png") for i, prompt in enumerate(prompts) for seed in seeds]
    missing = {i: [seed for seed in seeds if not (folders[i] / f"seed{seed}.png").is_file()]
               for i in (range(len(prompts)) if mine is None else mine)}
    missing = {i: todo for i, todo in missing.items() if todo}
    if not missing:
        return entries, settings, 0  # nothing to do: not even the pipeline is loaded
    # the adapter first: one that does not fit the model is refused before any file is written
    pipe = adapted_pipeline({} if pipelines is None else pipelines, run.config["model"], run.adapter, device,
                            run.variant, low_memory)
    images_dir.mkdir(parents=True, exist_ok=True)
    save(record, json.dumps(settings, indent=2) + "\n")  # every rank writes the same text
    # A seed's image can differ in the last bits between batches of other seeds (batched kernels sum in another
    # order), so a missing image is made in the batch an uninterrupted run makes it in: the prompt's seeds in
    # batches of gen_cfg.batch_size, and only the batches with a missing seed. A resumed evaluation (or a torchrun
    # rank) then writes exactly the bytes one uninterrupted process writes.
    batches = [seeds[start:start + gen_cfg.batch_size] for start in range(0, len(seeds), gen_cfg.batch_size)]
    with tqdm(total=sum(map(len, missing.values())), desc=f"{run.name}: generating", unit="image") as bar:
        for i, todo in missing.items():
            folders[i].mkdir(parents=True, exist_ok=True)
            save(folders[i] / "prompt.txt", prompts[i] + "\n")
            for batch in [batch for batch in batches if set(batch) & set(todo)]:
                for seed, image in zip(batch, sdxl.generate(pipe, [prompts[i]], batch, gen_cfg)):
                    if seed in todo:  # the batch's other images are on disk already, the same bytes
                        save(folders[i] / f"seed{seed}.png", image)
                        bar.update(1)
    return entries, settings, sum(map(len, missing.values()))


def prompt_folder(images_dir, i, prompt):
    """Where the images of the i-th prompt go (here and in sample.py): <images_dir>/<i>_<the prompt as a safe name>,
    e.g. 01_a_zjw_dog_in_the_snow."""
    return images_dir / (f"{i:02d}_" + re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60])


@torch.no_grad()
def adapted_pipeline(pipelines, model, adapter, device, variant=None, low_memory=False):
    """The pipeline of `model` (its `variant` weight files) with `adapter` loaded and merged (the update folded into
    W: sampling costs what the base model costs). `adapter`: this project's file, a PEFT folder of WaveFT or LoRA
    (interop.load_adapter) or of VeRA, LoHa, LoKr, AdaLoRA (PEFT's own layers, peft_methods.load: merged by peft,
    then taken out, W + dW staying). `pipelines` ({(model, variant, low_memory): (pipeline, originals)}) keeps one
    pipeline for the next run of the same model: its adapter is taken out (peft_methods.remove) and every weight
    entry the merge changed is put back bit for bit, because merge + unmerge is exact only up to
    rounding, and an image must not depend on which run came before it (resuming, torchrun). The CPU copy this
    takes is at most the adapted weights once (keep_original). low_memory: see low_memory_pipeline."""
    key = (model, variant or None, low_memory)
    if key not in pipelines:
        pipelines.clear()  # one model in memory at a time
        pipe = hub.from_pretrained(sdxl.load_pipeline, model, variant=variant)  # float32; generate() autocasts on CUDA
        pipelines[key] = ((low_memory_pipeline(pipe) if low_memory else pipe).to(device), {})
    pipe, originals = pipelines[key]
    peft_methods.remove(pipe.unet)  # the previous adapter's layers, if any (merged PEFT layers are gone already)
    for name, kept in originals.items():
        put_back(pipe.unet.get_submodule(name).weight, kept)
    originals.clear()
    try:
        (peft_methods.load if peft_methods.folder_method(adapter) else interop.load_adapter)(pipe.unet, adapter)
    except (ValueError, RuntimeError, KeyError) as error:
        raise ValueError(f"adapter {adapter} does not fit model {model!r}: {error}") from None
    for name, layer in [] if low_memory else peft_methods.adapted_layers(pipe.unet):  # one at a time: one extra copy
        before = peft_methods.base_weight(layer).clone()
        originals[name] = keep_original(before, peft_methods.merge_layer(layer))
    if not low_memory and peft_methods.layers(pipe.unet):
        peft_methods.remove(pipe.unet)  # PEFT's merged layers out: the UNet is plain again, its W = W + dW
    return pipe


def low_memory_pipeline(pipe):
    """evaluate.py --low-memory: the pipeline in about half the GPU memory (docs/benchmarks.md, "evaluate.py's GPU
    memory"). The UNet in bf16 (5.1 GB instead of 10.3 for SDXL), with the adapter then loaded into it in float32
    and never merged: merged into a bf16 W, an update below half of W's last bit would be rounded away; unmerged,
    the layer adds its float32 update to the bf16 matmul's output. The text encoders and the VAE stay float32 (the
    latents keep prompt_embeds' dtype), frozen (requires_grad off: CUDA autocast then casts their weights per op
    instead of keeping a bf16 copy of every weight for the whole call), and the VAE decodes one image at a time
    (at 1024 px a batch of 4 needs 10.7 GB of activations, one image 2.7 GB). Images equal the default path's
    within bf16 precision (tests/test_evaluate.py), not bit for bit: generation.json records the mode."""
    pipe.unet.bfloat16()  # torch's own cast (see train_dreambooth.load_model); the adapter comes after, float32
    for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        model.requires_grad_(False)
    pipe.vae.enable_slicing()
    return pipe


def keep_original(before, after):
    """What puts a merged layer's weight back to `before` bit for bit, on the CPU: the smaller of its sparse diff,
    (int64 index, value) of every entry the merge changed, and a dense copy of `before` in its own dtype, as
    (None, copy). WaveFT changes k footprints per layer: its diff is small (~70 MB over SDXL's 560 layers at
    k = 2592). LoRA changes every entry: its diff would be 3x the weight in float32 (12 bytes an entry; 11.5 GB for
    SDXL), the dense copy is 1x. So what is kept over all layers is at most one copy of the adapted weights in their
    dtype (SDXL: 955 M entries, 3.8 GB in float32), whatever the method."""
    changed = (after != before) | (torch.signbit(after) != torch.signbit(before))  # -0.0 vs 0.0 counts too
    where = changed.view(-1).nonzero().squeeze(1)
    if where.numel() * (where.element_size() + before.element_size()) < before.numel() * before.element_size():
        return where.cpu(), before.view(-1)[where].cpu()
    return None, before.cpu()


def put_back(weight, kept):
    """Undo a merge exactly from keep_original's record."""
    where, values = kept
    if where is None:
        weight.copy_(values)
    else:
        weight.view(-1).index_copy_(0, where.to(weight.device), values.to(weight.device))


def save(path, data):
    """files.write_file(path, data): str, bytes or a PIL image (as PNG), written whole; a full disk is one line. An
    interrupted evaluation leaves no half-written image to be taken as finished."""
    return files.write_file(path, data, advice=AFTER_A_WRITE_ERROR)
