"""Adapters and images outside this repository: PEFT's adapter folders both ways, a merged UNet, the authors' layout.

- PEFT's on-disk format (save_peft, load_peft, read_peft_config): an adapter trained here loads in
  peft.PeftModel.from_pretrained, and one trained with PEFT (or the authors' code) loads here, with the same dW;
- load_adapter(model, path): this project's adapter file or a PEFT adapter folder, whichever `path` is;
- the merged UNet (save_merged_unet, export_merged): W + dW written as a plain diffusers UNet, for tools that know
  neither waveft nor peft;
- the image folders evaluate.py --metrics-only scores (read_image_folder): ours, or the authors'
  prompt_<i>/prompt_<i>_sample_<j>_seed_<s>.png.

    interop.save_peft(unet, "my_peft_adapter")        # then peft.PeftModel.from_pretrained(plain_unet, that folder)
    interop.load_adapter(unet, "outputs/<run>/adapter.safetensors" or "a_peft_folder")
    interop.export_merged("outputs/<run>")            # -> outputs/<run>/merged_unet/
"""
import contextlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

import dwt
import files
import hub
import sdxl
import waveft

# ----------------------------------------------------------------------------------------------------------------
# PEFT's on-disk format
#
# A PEFT adapter folder is adapter_config.json (PEFT's config dataclass as JSON) plus adapter_model.safetensors with
# one tensor per adapted layer and parameter, named as PeftModel.save_pretrained names them:
#     base_model.model.<layer>.waveft_spectrum    (k,)        WaveFT
#     base_model.model.<layer>.fourierft_spectrum (k,)        FourierFT
#     base_model.model.<layer>.lora_A.weight      (r, in)     LoRA, and <layer>.lora_B.weight (out, r)
# "base_model.model." is the path of the wrapped model inside a PeftModel; the adapter's name ("default") is not in
# the file. Positions are not saved: PEFT redraws them from random_loc_seed exactly as waveft.draw_positions does
# (for WaveFT and FourierFT alike), so only layers whose positions are those can be written in this format. Nor are
# layer shapes: a spectrum of k values fits any layer with at least k weights, and positions redrawn for another
# shape make another adapter. So save_peft records each layer's (out, in) in the safetensors metadata
# ("waveft_layers", a field PEFT never reads) and load_peft refuses a folder whose record differs from the model; a
# folder written by PEFT has no record to check. WaveFT's and FourierFT's `scaling` is PEFT's `scaling`; LoRA's is
# lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). Nothing here imports peft: it stays a test dependency.

PEFT_CONFIG, PEFT_WEIGHTS, PEFT_PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
PEFT_SHAPES = "waveft_layers"  # save_peft's record of {layer: [out, in]} in the safetensors metadata
_PEFT_DEFAULTS = {"WAVEFT": dict(n_frequency=2592, scaling=25.0, wavelet_family="db1", use_idwt=True,
                                 random_loc_seed=777),  # PEFT's dataclass defaults, for hand-written configs
                  "FOURIERFT": dict(n_frequency=1000, scaling=150.0, random_loc_seed=777),
                  "LORA": dict(r=8, lora_alpha=8, use_rslora=False)}
# Config fields that change what the adapter computes in ways these layers cannot: each must be unset (None, False,
# "none", empty). Fields that only matter for training (dropout, initialisation) are ignored.
_PEFT_UNSUPPORTED = ("fan_in_fan_out", "bias", "modules_to_save", "layers_to_transform", "layers_pattern")
_PEFT_UNSUPPORTED_BY_TYPE = {
    "WAVEFT": ("proportional_parameters", "n_frequency_pattern"),
    "FOURIERFT": ("n_frequency_pattern",),
    "LORA": ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "use_qalora", "use_bdlora", "layer_replication",
             "target_parameters", "trainable_token_indices", "alora_invocation_tokens", "arrow_config",
             "kasa_config", "velora_config", "monteclora_config", "megatron_config")}


def _peft_tuple(method, scaling, k=None, wavelet=None, seed=None, use_idwt=None, rank=None):
    """What PEFT's config holds for these settings, as a comparable tuple (haar is PEFT's db1)."""
    if method == "waveft":
        return "WAVEFT", k, float(scaling), "db1" if wavelet == "haar" else wavelet, seed, bool(use_idwt)
    if method == "fourierft":
        return "FOURIERFT", k, float(scaling), seed
    return "LORA", rank, float(scaling)


def _peft_settings(layer):
    if isinstance(layer, waveft.WaveFTLinear):
        return _peft_tuple("waveft", layer.scaling, layer.k, layer.wavelet, layer.seed, layer.use_idwt)
    if isinstance(layer, waveft.FourierFTLinear):
        return _peft_tuple("fourierft", layer.scaling, layer.k, seed=layer.seed)
    return _peft_tuple("lora", layer.scaling, rank=layer.rank)


def _positions(layer):
    """The name of a layer's positions buffer (waveft_positions, fourierft_positions), or None (LoRA)."""
    return None if isinstance(layer, waveft.LoRALinear) else layer.adapter_names[0].replace("spectrum", "positions")


def _peft_targets(model, names):
    """target_modules that make PEFT adapt exactly `names` in the model without adapters: the names themselves
    (PEFT's list rule: an exact name or a dot-suffix) unless one is also a dot-suffix of another module's name;
    then a regex that full-matches only them."""
    adapted = set(names)
    for name, _ in model.named_modules():
        parts = name.split(".")
        if name in adapted or any(".".join(parts[:i]) in adapted for i in range(1, len(parts))):
            continue  # an adapted layer or its frozen `base`: PEFT sees the plain nn.Linear in their place
        if any(".".join(parts[i:]) in adapted for i in range(1, len(parts))):
            return "|".join(re.escape(n) for n in names)
    return list(names)


def save_peft(model, folder):
    """Write the model's adapter as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors):
    peft.PeftModel.from_pretrained(model_without_adapters, folder) adapts the same layers with the same dW."""
    layers = waveft.adapted_layers(model)
    if not layers:
        raise ValueError("model has no adapters to save; call waveft.inject first")
    first_name, first = layers[0]
    for name, m in layers:
        if _peft_settings(m) != _peft_settings(first):
            raise ValueError(f"layer {name!r} has settings {_peft_settings(m)}, layer {first_name!r} "
                             f"{_peft_settings(first)}: PEFT's config holds one setting for all layers")
        peft_positions = _positions(m) and waveft.draw_positions(m.base.out_features, m.base.in_features, m.k, m.seed)
        if _positions(m) and not torch.equal(getattr(m, _positions(m)).cpu(), peft_positions):
            raise ValueError(f"layer {name!r}: its positions are not PEFT's randperm positions for seed {m.seed} "
                             "(PEFT redraws positions from random_loc_seed and saves none), so PEFT's format cannot "
                             "hold this adapter; save it with waveft.save")
    common = dict(task_type=None, inference_mode=True, base_model_name_or_path=None, revision=None,
                  auto_mapping={"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
                  target_modules=_peft_targets(model, [name for name, _ in layers]), exclude_modules=None,
                  fan_in_fan_out=False, bias="none", modules_to_save=None, layers_to_transform=None,
                  layers_pattern=None)
    if isinstance(first, waveft.WaveFTLinear):
        peft_type, k, scaling, wavelet, seed, use_idwt = _peft_settings(first)
        config = dict(peft_type=peft_type, n_frequency=k, scaling=scaling, wavelet_family=wavelet, use_idwt=use_idwt,
                      random_loc_seed=seed, n_frequency_pattern={}, proportional_parameters=False,
                      init_weights=True, **common)
        tensors = {f"{PEFT_PREFIX}{name}.waveft_spectrum": m.waveft_spectrum for name, m in layers}
    elif isinstance(first, waveft.FourierFTLinear):  # init_weights False: how it was initialised (PEFT's default)
        peft_type, k, scaling, seed = _peft_settings(first)
        config = dict(peft_type=peft_type, n_frequency=k, scaling=scaling, random_loc_seed=seed,
                      n_frequency_pattern={}, init_weights=False, **common)
        tensors = {f"{PEFT_PREFIX}{name}.fourierft_spectrum": m.fourierft_spectrum for name, m in layers}
    else:
        peft_type, rank, scaling = _peft_settings(first)
        alpha = scaling * rank  # PEFT's LoRA scaling is lora_alpha / r
        config = dict(peft_type=peft_type, r=rank, lora_alpha=int(alpha) if alpha.is_integer() else alpha,
                      lora_dropout=0.0, use_rslora=False, use_dora=False, init_lora_weights=True, rank_pattern={},
                      alpha_pattern={}, **common)
        tensors = {f"{PEFT_PREFIX}{name}.lora_{ab}.weight": getattr(m, f"lora_{ab}") for name, m in layers
                   for ab in "AB"}
    os.makedirs(folder, exist_ok=True)
    shapes = {name: [m.base.out_features, m.base.in_features] for name, m in layers}  # for load's check, see above
    metadata = {"format": "pt", PEFT_SHAPES: json.dumps(shapes)}  # "format": what PeftModel.save_pretrained writes
    weights = save_bytes({key: t.detach().cpu().contiguous() for key, t in tensors.items()}, metadata=metadata)
    waveft.write_atomically(os.path.join(folder, PEFT_WEIGHTS), weights)
    waveft.write_atomically(os.path.join(folder, PEFT_CONFIG), json.dumps(config, indent=2).encode())


def read_peft_config(folder):
    """adapter_config.json of a PEFT adapter folder, with PEFT's defaults filled in; anything these layers cannot
    compute exactly as PEFT does is a ValueError naming the field."""
    path = os.path.join(folder, PEFT_CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} is a folder without {PEFT_CONFIG}, so not a PEFT adapter folder "
                         "(waveft's own adapters are single .safetensors files)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} as JSON: {err}") from None
    peft_type = config.get("peft_type")
    if peft_type not in _PEFT_DEFAULTS:
        raise ValueError(f"{path}: peft_type {peft_type!r} is not supported; waveft reads WAVEFT, FOURIERFT and LORA "
                         "adapters")
    for field in _PEFT_UNSUPPORTED + _PEFT_UNSUPPORTED_BY_TYPE[peft_type]:
        value = config.get(field)
        if not (value is None or value is False or value == "none" or (isinstance(value, (dict, list)) and not value)):
            raise ValueError(f"{path}: {field}={value!r} is not supported (waveft's layers need {field} unset); "
                             "load this adapter with peft instead")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq", "lora_ga")):
        raise ValueError(f"{path}: init_lora_weights={init!r} changes the base weights, which the adapter file "
                         "does not hold; convert it to plain LoRA with peft first")
    target = config.get("target_modules")
    if not target or target == "all-linear":
        raise ValueError(f"{path}: target_modules={target!r} is not supported; it must name the layers "
                         "(a list of names or a regex)")
    wavelet = config.get("wavelet_family", "db1")
    if peft_type == "WAVEFT" and wavelet not in dwt.WAVELETS:
        raise ValueError(f"{path}: wavelet_family={wavelet!r} is not supported; supported: {', '.join(dwt.WAVELETS)}")
    return {**_PEFT_DEFAULTS[peft_type], **config}


@torch.no_grad()
def load_peft(model, folder):
    """Load a PEFT adapter folder (WaveFT, FourierFT or LoRA, trained with PEFT or saved by save_peft): inject the
    layers its config selects (PEFT's matching rule) if the model has no adapters, rebuild the positions from
    random_loc_seed as PEFT does, load the spectra (or A, B). Returns the metadata.
    All or nothing, as waveft.load; layer shapes are checked where save_peft recorded them (PEFT records none)."""
    with undone_if_refused(model):
        return _load_peft_folder(model, folder)


@contextlib.contextmanager
def undone_if_refused(model):
    """load_peft injects before its checks (its config selects the layers by PEFT's matching rule, which inject
    applies), so a refused load takes the adapters it injected out again: remove() puts the original nn.Linear
    objects back, and the requires_grad flags that inject cleared are restored."""
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    injected_here = not waveft.adapted_layers(model)
    try:
        yield
    except BaseException:
        if injected_here and waveft.adapted_layers(model):
            waveft.remove(model)
            for name, p in model.named_parameters():
                p.requires_grad_(trainable[name])
        raise


def _load_peft_folder(model, folder):
    config = read_peft_config(folder)
    weights = os.path.join(folder, PEFT_WEIGHTS)
    if not os.path.isfile(weights):
        pickle = os.path.isfile(os.path.join(folder, "adapter_model.bin"))
        raise ValueError(f"{folder} has no {PEFT_WEIGHTS}" + (
            " but an adapter_model.bin (a pickle): waveft loads adapters only from safetensors; re-save it with "
            "peft's save_pretrained(folder, safe_serialization=True)" if pickle else ""))
    if config["peft_type"] == "WAVEFT":
        settings = dict(method="waveft", k=config["n_frequency"], scaling=float(config["scaling"]),
                        wavelet=config["wavelet_family"], seed=config["random_loc_seed"], use_idwt=config["use_idwt"])
        attrs = {"waveft_spectrum": "waveft_spectrum"}  # {our parameter: its key in the file after "<layer>."}
    elif config["peft_type"] == "FOURIERFT":
        settings = dict(method="fourierft", k=config["n_frequency"], scaling=float(config["scaling"]),
                        seed=config["random_loc_seed"])
        attrs = {"fourierft_spectrum": "fourierft_spectrum"}
    else:
        rank, alpha = config["r"], config["lora_alpha"]
        settings = dict(method="lora", rank=rank, scaling=alpha / (rank ** 0.5 if config["use_rslora"] else rank))
        attrs = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    if not waveft.adapted_layers(model):
        waveft.inject(model, **settings, target_modules=config["target_modules"],  # init_seed: leave the RNG alone
                      exclude_modules=config.get("exclude_modules") or (), init_seed=0)
    layers = dict(waveft.adapted_layers(model))
    with safe_open(weights, framework="pt") as f:
        tensors = {key.removeprefix(PEFT_PREFIX): key for key in f.keys()}  # PeftModel's prefix, or none
        expected = {f"{name}.{suffix}" for name in layers for suffix in attrs.values()}
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise ValueError(f"{weights} does not fit the adapted layers of this model (the layers its config selects,"
                             f" or those already injected):\n  missing ({len(missing)}): {missing[:5]}\n"
                             f"  unexpected ({len(unexpected)}): {unexpected[:5]}")
        recorded = (f.metadata() or {}).get(PEFT_SHAPES)
        if recorded is not None:  # written by save_peft: the shapes of the layers it was saved from
            try:
                saved_from = {name: tuple(shape) for name, shape in json.loads(recorded).items()}
            except (ValueError, TypeError, AttributeError):
                raise ValueError(f"{weights}: metadata {PEFT_SHAPES} is not a JSON {{layer: [out, in]}}") from None
            waveft.check_same_layers(weights, saved_from,
                                     {name: (m.base.out_features, m.base.in_features) for name, m in layers.items()})
        want = _peft_tuple(**settings)
        for name, m in layers.items():  # all checks first: a refused file changes nothing
            if _peft_settings(m) != want:
                raise ValueError(f"{folder} holds an adapter with settings {want}, but layer {name!r} of this model "
                                 f"has {_peft_settings(m)}; load it into a model without adapters")
            if m.merged:
                raise ValueError(f"layer {name!r} is merged; call waveft.unmerge(model) before loading")
        values = {(name, attr): waveft.read_tensor(f, weights, tensors[f"{name}.{suffix}"], getattr(m, attr).shape)
                  for name, m in layers.items() for attr, suffix in attrs.items()}  # shapes checked too
    for name, m in layers.items():
        if _positions(m):  # PEFT's positions, whatever this layer held before
            positions, held = waveft.draw_positions(m.base.out_features, m.base.in_features, m.k, m.seed), \
                getattr(m, _positions(m))
            if not torch.equal(positions, held.cpu()):
                setattr(m, _positions(m), positions.to(held.device, copy=True))
        for attr in attrs:
            getattr(m, attr).copy_(values[name, attr])
    shapes = {name: [m.base.out_features, m.base.in_features] for name, m in layers.items()}
    return dict(getattr(model, "_waveft_config", {}), layers=shapes, peft_config=config)


def load_adapter(model, path):
    """Load `path` into the model, whichever it is: this project's adapter file (waveft.load) or a PEFT adapter
    folder (load_peft). Returns the metadata."""
    return load_peft(model, path) if os.path.isdir(path) else waveft.load(model, path)


# ----------------------------------------------------------------------------------------------------------------
# The authors' image layout (and ours), as evaluate.py --metrics-only reads it

def natural_order(path):
    """Sort key: numbers by value ("sample_10" after "sample_2")."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def folder_prompt(folder, name):
    """A prompt folder's prompt: prompt.txt, else the authors' prompt_<i>_info.txt ("Prompt: ..."), else the name."""
    if (folder / "prompt.txt").is_file():
        return (folder / "prompt.txt").read_text().strip()
    for info in folder.glob("prompt_*_info.txt"):
        for line in info.read_text().splitlines():
            if line.startswith("Prompt:"):  # not "Negative Prompt:"
                return line[len("Prompt:"):].strip()
        raise ValueError(f"{info} has no 'Prompt:' line, so the prompt of the images in {folder} is unknown")
    if name is None:
        raise ValueError(f"{folder} has no prompt_<i>_info.txt or prompt.txt: the prompt of its images is unknown")
    return name.replace("_", " ")


def read_image_folder(images_dir):
    """--metrics-only: [(prompt_idx, prompt, path)] from one folder per prompt, `<number>_<anything>` (ours) or
    `prompt_<number>` (the authors')."""
    entries = []
    folders = [(int(m.group(1) or m.group(3)), m.group(2), p) for p in Path(images_dir).iterdir()
               if p.is_dir() and (m := re.fullmatch(r"(\d+)_(.*)|prompt_(\d+)", p.name))]
    for prompt_idx, name, folder in sorted(folders, key=lambda f: (f[0], f[2])):
        images = [path for path in folder.iterdir() if path.suffix.lower() in sdxl.IMAGE_EXTENSIONS]
        prompt = folder_prompt(folder, name) if images else None
        entries += [(prompt_idx, prompt, path) for path in sorted(images, key=natural_order)]
    if not entries:
        raise FileNotFoundError(f"no images found in {images_dir}: expected one folder <number>_<prompt> per prompt "
                                f"holding its images (and optionally prompt.txt), e.g. 00_a_dog_in_the_jungle/"
                                f"seed42.png, or the authors' prompt_<i>/prompt_<i>_sample_<j>_seed_<s>.png")
    return entries


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

    def contents():  # (name, bytes), made one at a time as write_folder asks for them
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
    return files.write_folder(folder, contents())


def export_merged(run_dir, model=None, overwrite=False, dtype=None, shard_bytes=None, variant=None):
    """`<run_dir>/merged_unet/` for a finished train_dreambooth.py run: its base model's UNet (config.json's
    "model" and "variant", or `model` and `variant`, e.g. a local copy of it), loaded alone, in float32, on the CPU
    (never the training device: a float32 SDXL UNet is 10 GB), with its adapter.safetensors merged in, by
    save_merged_unet. An existing folder is replaced (overwrite=True) only once the new one is complete."""
    run_dir = Path(run_dir)
    folder = run_dir / "merged_unet"
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; pass overwrite=True to replace it")
    if model is None:
        try:
            config = json.loads((run_dir / "config.json").read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {run_dir / 'config.json'}: {error}; is {run_dir} a training run?") from None
        model, variant = config.get("model"), variant or config.get("variant")
        if not model:
            raise ValueError(f'{run_dir / "config.json"} has no "model": pass model= (the base model of the run)')
    unet = hub.from_pretrained(sdxl.load_unet, model, variant=variant)
    waveft.load(unet, run_dir / "adapter.safetensors")
    return save_merged_unet(unet, folder, dtype=dtype, shard_bytes=shard_bytes)
