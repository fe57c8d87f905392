"""The authors' other baselines, VeRA, LoHa, LoKr and AdaLoRA, through peft: PEFT's own layers in our training loop.

The paper compares WaveFT with every method of the authors' table, each trained by their script through PEFT at
the settings of their sdxl_dreambooth/config/<method>_config.yaml, on the same layers (to_q, to_k, to_v, to_out.0).
These four are PEFT's layers here too: nothing of them is rewritten, so what trains is what the authors trained.
With W frozen (out x in), each learns a dW:

    VeRA     dW = diag(b) B diag(d) A        A (r x in), B (out x r): frozen random, one pair shared by all layers
                                             (sliced to each shape); trains d (r) and b (out) per layer; b = 0
    LoHa     dW = alpha/r (B1 A1) * (B2 A2)  two rank-r products multiplied entry by entry (rank up to r^2);
                                             trains 2 r (out + in) per layer
    LoKr     dW = alpha/r  W1 (x) W2         a Kronecker product: W1 small and full, W2 = B A of rank r (or full
                                             where r is at least half its size); out = o1 o2, in = i1 i2
    AdaLoRA  dW = alpha/r_l B diag(E) A      an SVD-like LoRA, init_r triplets (a_i, e_i, b_i) per layer; during
                                             training the least important e_i are set to 0 until the average rank
                                             is target_r (importance: |p * grad| smoothed; a cubic budget schedule
                                             over total_step); the saved adapter keeps the surviving triplets

The authors' settings are the defaults (AUTHORS; each overridable: --rank, --alpha, --target-rank, --lr). The
training loop, the recipe and the run folder are train_dreambooth.py's; what differs is here: inject (the layers,
seeded, float32 on a bf16 UNet), after_optimizer_step (AdaLoRA's rank allocation, as PEFT prescribes), the
checkpoint's extra state (AdaLoRA's importance averages), save (PEFT's format: <run>/peft_adapter/, which
PeftModel.from_pretrained loads), load and merge_layer (evaluation and sample.py: merged, restored exactly by
eval_images). peft is optional, as LPIPS is: it is imported only by the functions that use these methods, and dwt,
waveft and sdxl never import it; without it --method vera|loha|lokr|adalora is refused in one line.

    python train_dreambooth.py --subject dog6 --method vera          # r 1402, lr 3.2e-3: outputs/dog6-vera-r1402
    python train_dreambooth.py --subject dog6 --method loha          # r 1, alpha 64
    python train_dreambooth.py --subject dog6 --method lokr          # r 20, alpha 192
    python train_dreambooth.py --subject dog6 --method adalora       # init_r 2 -> target_r 1, alpha 32
    python evaluate.py --runs outputs/dog6-*                          # scored like any run
"""
import contextlib
import copy
import json
import sys
import warnings
from pathlib import Path

import torch

import files
import interop
import waveft

METHODS = ("vera", "loha", "lokr", "adalora")
NAMES = {"vera": "VeRA", "loha": "LoHa", "lokr": "LoKr", "adalora": "AdaLoRA"}  # as their papers write them
# The authors' settings: their <method>_config.yaml (LoHa's alpha: 64, the first of their script's sweep 64, 128);
# VeRA's learning rate from its own training_config_vera.yaml (the others train at the recipe's 1e-4). --rank is
# AdaLoRA's init_r. `total_step`, AdaLoRA's schedule length, is --steps (theirs: max_train_steps, 500).
AUTHORS = {"vera": dict(rank=1402, lr=3.2e-3), "loha": dict(rank=1, alpha=64.0), "lokr": dict(rank=20, alpha=192.0),
           "adalora": dict(rank=2, target_rank=1, alpha=32.0)}
PEFT_TYPES = {"VERA": "vera", "LOHA": "loha", "LOKR": "lokr", "ADALORA": "adalora"}  # adapter_config.json's peft_type
# The trainable tensors of each method, as named in PEFT's files (for counting them)
TRAINABLE = ("vera_lambda_b", "vera_lambda_d", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1",
             "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "lora_A", "lora_B", "lora_E")
RUN_ADAPTER = "peft_adapter"  # a run of these methods keeps its adapter here, a PEFT adapter folder
WAVEFT_ONLY = ("k", "wavelet", "use_idwt", "position_seed", "scaling", "fast")
# (option, value) -> the options without effect (train_dreambooth.NO_EFFECT_WITH): WaveFT's, and those of other methods
NO_EFFECT_WITH = {("method", method): WAVEFT_ONLY + (("alpha",) if method == "vera" else ()) +
                  (() if method == "adalora" else ("target_rank",)) for method in METHODS}


def import_peft(method, what=None):
    """peft, or a ValueError in one line saying what needs it (`what`, default "--method <method>") and what to
    install."""
    try:
        import peft
    except ImportError:
        raise ValueError(f"{what or f'--method {method}'} needs peft (these are PEFT's own {NAMES[method]} layers), "
                         f"which is not installed here: pip install peft (or pip install -r requirements-dev.txt)"
                         ) from None
    return peft


def resolve(opts):
    """train_dreambooth's per-method defaults, in place: the authors' settings for these methods; LoRA's rank 1 and
    the recipe's lr 1e-4 otherwise (alpha and target_rank stay None where they have no effect)."""
    for name, value in {"rank": 1, "lr": 1e-4, **AUTHORS.get(opts.method, {})}.items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)


def check(opts):
    """Refuse, in one line, what cannot run: no peft; AdaLoRA pruning to more than it starts with; --save-merged
    (interop.export_merged folds this project's adapter files)."""
    if opts.method not in METHODS:
        return
    import_peft(opts.method)
    if opts.method == "adalora" and opts.target_rank > opts.rank:
        raise ValueError(f"--target-rank {opts.target_rank}: must be at most --rank {opts.rank} (AdaLoRA's init_r, "
                         f"from which it prunes)")
    if opts.save_merged:
        raise ValueError(f"--save-merged: not with --method {opts.method}; peft's merge_and_unload() folds its "
                         f"adapter (<run>/{RUN_ADAPTER}) into the UNet")


def check_resume(opts, state):
    """AdaLoRA's budget schedule runs over total_step = --steps, so its checkpoint only continues the same --steps."""
    if state is not None and opts.method == "adalora":
        steps = json.loads(state["options"])["steps"]
        if steps != opts.steps:
            raise ValueError(f"--resume: AdaLoRA's rank schedule spans the run's --steps {steps} (its total_step), so "
                             f"it cannot change to {opts.steps}: resume with --steps {steps}")


def peft_config(peft, method, rank, alpha=None, target_rank=None, total_step=None):
    """PEFT's config of the method, on the SDXL attention projections, otherwise PEFT's defaults (as the authors'
    script builds it)."""
    targets = list(waveft.DEFAULT_TARGETS)
    if method == "vera":
        return peft.VeraConfig(r=rank, target_modules=targets)
    if method == "loha":
        return peft.LoHaConfig(r=rank, alpha=alpha, target_modules=targets)
    if method == "lokr":
        return peft.LoKrConfig(r=rank, alpha=alpha, target_modules=targets)
    return peft.AdaLoraConfig(init_r=rank, target_r=target_rank, lora_alpha=alpha, total_step=total_step,
                              target_modules=targets)


def inject(unet, opts):
    """PEFT's layers of opts.method in the UNet (in place, the rest frozen), drawn from --seed (torch's global RNG
    left as it was), float32 on a bf16 UNet (peft's autocast_adapter_dtype). Returns the PeftModel, which the UNet
    also keeps (peft_model_of): it saves the adapter and drives AdaLoRA."""
    peft = import_peft(opts.method)
    config = peft_config(peft, opts.method, opts.rank, opts.alpha, opts.target_rank, total_step=opts.steps)
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # PEFT's initialisers draw from the global RNG
        torch.manual_seed(opts.seed)
        model = peft.get_peft_model(unet, config)
    # in __dict__, not as an attribute: nn.Module would register the wrapper as a submodule of the model it wraps
    unet.__dict__["_peft_model"] = model
    return model


def peft_model_of(unet):
    return unet.__dict__.get("_peft_model")


def layers(model):
    """[(dotted name, layer)] of PEFT's adapter layers in the model; none if peft was never imported."""
    if "peft" not in sys.modules or sys.modules["peft"] is None:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def adapted_layers(model):
    """Every adapted layer, this project's (waveft.adapted_layers) and PEFT's."""
    return waveft.adapted_layers(model) + layers(model)


def remove(model):
    """Undo any adapter: waveft.remove, or each of PEFT's layers replaced by the nn.Linear it wraps (what peft's
    unload() does, without its per-layer bookkeeping; a merged layer leaves W + dW). Nothing to undo: nothing done."""
    if waveft.adapted_layers(model):
        waveft.remove(model)
    for name, layer in layers(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    for attribute in ("_peft_model", "peft_config"):  # ours (inject), and what PEFT's tuner leaves on the model
        model.__dict__.pop(attribute, None)


def base_weight(layer):
    """The frozen W of an adapted layer, this project's or PEFT's."""
    return layer.base.weight if isinstance(layer, waveft.LAYER_TYPES) else \
        layer.get_base_layer().weight


@torch.no_grad()
def merge_layer(layer):
    """Fold one adapted layer's dW into its W (waveft.merge, or PEFT's own merge); returns that W."""
    waveft.merge(layer) if isinstance(layer, waveft.LAYER_TYPES) else layer.merge()
    return base_weight(layer)


# ----------------------------------------------------------------------------------------------------------------
# AdaLoRA's rank allocation: one call per step, and its state in the checkpoint

def after_optimizer_step(unet, step):
    """AdaLoRA only: update the importance scores (from this step's gradients, so before zero_grad) and set the
    least important triplets to zero to meet the step's budget, as PEFT prescribes: update_and_allocate(global_step)
    after optimizer.step(), global_step counted from 0 (PEFT's AdaLoRA example). The schedule: no pruning at step 0
    (tinit 0), then the budget falls from init_r to target_r per layer (cubic) until total_step."""
    model = peft_model_of(unet)
    if model is not None and hasattr(model.base_model, "rankallocator"):
        model.base_model.update_and_allocate(step)


def checkpoint_state(unet):
    """What checkpoint.pt keeps beyond the parameters for an exact --resume: AdaLoRA's rank allocator (the
    importance scores and their moving averages, on the CPU) and its rank pattern so far; None otherwise."""
    model = peft_model_of(unet)
    if model is None or not hasattr(model.base_model, "rankallocator"):
        return None
    allocator = model.base_model.rankallocator
    return {"ipt": _on(allocator.ipt, "cpu"), "exp_avg_ipt": _on(allocator.exp_avg_ipt, "cpu"),
            "exp_avg_unc": _on(allocator.exp_avg_unc, "cpu"),
            "rank_pattern": model.peft_config["default"].rank_pattern}


def restore_state(unet, state):
    """Put checkpoint_state's record back (from a checkpoint's "method_state"; state None: a new run)."""
    saved, model = (state or {}).get("method_state"), peft_model_of(unet)
    if saved is None or model is None:
        return
    allocator, device = model.base_model.rankallocator, next(iter(unet.parameters())).device
    allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = (_on(saved[key], device) for key in
                                                                   ("ipt", "exp_avg_ipt", "exp_avg_unc"))
    model.peft_config["default"].rank_pattern = saved["rank_pattern"]


def _on(tensors, device):
    return {name: t.detach().to(device, copy=True) for name, t in tensors.items()}


# ----------------------------------------------------------------------------------------------------------------
# The adapter in PEFT's format: written here, read by PeftModel.from_pretrained and by load below

def save(unet, folder, base_model):
    """The adapter as PeftModel.save_pretrained writes it (adapter_config.json with inference_mode true and the base
    model, adapter_model.safetensors with PEFT's keys; AdaLoRA's cut to its surviving triplets by peft), written
    whole (files.write_folder). Returns the folder."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save as safetensors_bytes
    model = peft_model_of(unet)
    with quiet_peft():
        tensors = get_peft_model_state_dict(model, save_embedding_layers=False)  # no hub look-up for embeddings
    config = copy.deepcopy(model.peft_config["default"])  # after: for AdaLoRA the call renames its rank pattern
    config.inference_mode, config.base_model_name_or_path = True, base_model
    fields = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    weights = safetensors_bytes({key: t.detach().cpu().contiguous() for key, t in tensors.items()},
                                metadata={"format": "pt"})
    return files.write_folder(folder, iter([(interop.PEFT_WEIGHTS, weights),
                                            (interop.PEFT_CONFIG, json.dumps(fields, indent=2, sort_keys=True))]))


def folder_method(folder):
    """The method of a PEFT adapter folder if it is one of these (vera, loha, lokr, adalora), else None (WaveFT and
    LoRA folders are interop.py's; anything else is refused there)."""
    try:
        config = read_config(folder)
    except (OSError, ValueError):
        return None
    return PEFT_TYPES.get(config.get("peft_type")) if isinstance(config, dict) else None


def read_config(folder):
    """adapter_config.json of such a folder, as a dict."""
    return json.loads((Path(folder) / interop.PEFT_CONFIG).read_text())


def settings_of(config):
    """A PEFT config's method and budget in train_dreambooth's option names (method, rank, alpha, target_rank)."""
    method = PEFT_TYPES[config["peft_type"]]
    if method == "adalora":
        return dict(method=method, rank=config["init_r"], target_rank=config["target_r"], alpha=config["lora_alpha"])
    return dict(method=method, rank=config["r"], **({} if method == "vera" else {"alpha": config["alpha"]}))


@torch.no_grad()
def load(unet, folder):
    """Load a PEFT adapter folder of these methods into a UNet without adapters (PEFT injects the layers its config
    names and loads the weights, as PeftModel.from_pretrained does, for inference); every trainable tensor of the
    model must come from the file and every tensor of the file must fit, else nothing stays and a ValueError names
    the first ones."""
    method = folder_method(folder)
    peft = import_peft(method, f"the {NAMES[method]} adapter {folder}")
    config = peft.PeftConfig.from_pretrained(str(folder))
    config.inference_mode = True
    try:
        from safetensors.torch import load_file
        with quiet_peft():
            model = unet.__dict__["_peft_model"] = peft.get_peft_model(unet, config)
            result = peft.set_peft_model_state_dict(model, load_file(str(Path(folder) / interop.PEFT_WEIGHTS)))
        missing = [key for key in result.missing_keys if key.split(".")[-2] in TRAINABLE]
        if missing or result.unexpected_keys:
            raise ValueError(f"{folder} does not fit the layers its config selects in this model: missing "
                             f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    except BaseException:
        remove(unet)
        raise
    return model


@contextlib.contextmanager
def quiet_peft():
    """Silence three warnings of peft that are wrong here: a saved AdaLoRA layer pruned to rank 0 is no unfinished
    DeepSpeed shard; AdaLoRA's rank pattern (per triplet) is not LoRA's (per module), which peft also tries to match
    on load; and the base model's name, which get_peft_model resets, is recorded by save (and config.json)."""
    with warnings.catch_warnings():
        for message in ("LoRA tensor.s. have invalid shape", "The following rank_pattern keys did not match",
                        "The PEFT config's `base_model_name_or_path` was renamed"):
            warnings.filterwarnings("ignore", message=f".*{message}")
        yield
