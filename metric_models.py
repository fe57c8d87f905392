"""The metric backbones evaluate.py embeds with: DINO and CLIP by hub id or local folder, or tiny random ones for
smoke runs, and LPIPS if the optional `lpips` package is installed.

    models = metric_models.load_metric_models("facebook/dino-vits16", "openai/clip-vit-base-patch32",
                                              "openai/clip-vit-large-patch14-336", device)   # or "tiny" for each

A model that is neither on disk nor reachable fails within seconds, naming its option (hub.from_pretrained). What is
measured with them (the preprocessing, the embeddings, the metrics) is evaluate.py's.
"""
from dataclasses import dataclass

import torch

import hub
import sdxl


def tiny_dino(seed=0):
    """A random DINO-shaped ViT (32 px images, 32-wide, 2 layers, no pooler: DINO is read at its CLS token)."""
    from transformers import ViTConfig, ViTModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64), add_pooling_layer=False).eval()


def tiny_clip(seed=0):
    """A random CLIP (32 px images, 32-wide, 2 layers) with the tiny in-memory tokenizer of the tiny SDXL."""
    from transformers import CLIPConfig, CLIPModel
    tokenizer = sdxl.tiny_tokenizer()
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(small, vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(small, image_size=32, patch_size=8),
                                     projection_dim=16))
    return model.eval(), tokenizer


@dataclass
class MetricModels:
    dino: torch.nn.Module  # ViTModel: DINO
    clip: torch.nn.Module  # CLIPModel: CLIP-I and CLIP-T
    tokenizer: object  # CLIPTokenizer of `clip`
    cmmd_clip: torch.nn.Module  # CLIPModel: CMMD
    names: dict  # what was loaded, for metrics.json


def load_metric_models(dino="facebook/dino-vits16", clip="openai/clip-vit-base-patch32",
                       cmmd_clip="openai/clip-vit-large-patch14-336", device="cpu"):
    """Each model by hub id or local folder (hub.from_pretrained: a missing one fails in seconds), or `tiny`."""
    from transformers import CLIPModel, CLIPTokenizer, ViTModel
    smoke = "a smoke run (meaningless numbers)"
    if dino == "tiny":
        dino_model = tiny_dino()
    else:
        dino_model = hub.from_pretrained(ViTModel.from_pretrained, dino, "DINO model", "--dino", smoke,
                                         add_pooling_layer=False)
    if clip == "tiny":
        clip_model, tokenizer = tiny_clip()
    else:
        clip_model = hub.from_pretrained(CLIPModel.from_pretrained, clip, "CLIP model", "--clip", smoke)
        tokenizer = hub.from_pretrained(CLIPTokenizer.from_pretrained, clip, "CLIP tokenizer", "--clip", smoke)
    if cmmd_clip == clip:  # one model for CLIP-I, CLIP-T and CMMD: embedded once
        cmmd_model = clip_model
    elif cmmd_clip == "tiny":
        cmmd_model = tiny_clip(seed=1)[0]
    else:
        cmmd_model = hub.from_pretrained(CLIPModel.from_pretrained, cmmd_clip, "CMMD CLIP model", "--cmmd-clip", smoke)
    return MetricModels(dino_model.to(device).eval(), clip_model.to(device).eval(), tokenizer,
                        cmmd_model.to(device).eval(), dict(dino=dino, clip=clip, cmmd_clip=cmmd_clip))


def load_lpips():
    """LPIPS (AlexNet) if the optional `lpips` package is installed, else None (diversity then uses DINO)."""
    try:
        import lpips
    except ImportError:
        return None
    return lpips.LPIPS(net="alex", verbose=False).eval()
