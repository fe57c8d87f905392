"""SDXL base 1.0's real UNet (sdxl.build_sdxl_unet) on the meta device: the full-size layer and parameter counts,
with nothing allocated (the real model is 5-10 GB). Quick: about 6 s, mostly importing diffusers and peft.

    python -m pytest -q tests/test_sdxl_full.py
"""
from collections import Counter

import pytest
import torch
import torch.nn as nn

import sdxl
import waveft

# (out_features, in_features) -> number of attention projections (to_q/to_k/to_v/to_out.0) of that shape in SDXL's
# 70 transformer blocks: 10 at width 640, 60 at width 1280; cross-attention to_k/to_v read the 2048-d text.
SDXL_SHAPES = {(640, 640): 60, (640, 2048): 20, (1280, 1280): 360, (1280, 2048): 120}
K = 2592  # PEFT's default n_frequency: WaveFT's trainable count then equals LoRA r = 1's on SDXL


@pytest.fixture(scope="module")
def meta_unet():
    """SDXL's UNet on the meta device, built once (1-2 s) for the tests that count on it and leave it as it was."""
    return sdxl.build_sdxl_unet()


def test_config_gives_the_published_parameter_count(meta_unet):
    unet = meta_unet
    assert sum(p.numel() for p in unet.parameters()) == sdxl.SDXL_UNET_PARAMETERS == 2_567_463_684
    assert {p.device.type for p in unet.parameters()} == {"meta"}
    shapes = Counter((m.out_features, m.in_features) for n, m in unet.named_modules()
                     if isinstance(m, nn.Linear) and n.endswith(("to_q", "to_k", "to_v", "to_out.0")))
    assert shapes == SDXL_SHAPES


def test_waveft_and_lora_find_the_560_layers_on_meta():
    unet = sdxl.build_sdxl_unet(dtype=torch.bfloat16)
    params = waveft.inject(unet, method="waveft", k=K)  # works on meta: positions drawn on the CPU, then moved
    layers = waveft.adapted_layers(unet)
    assert len(layers) == 560
    assert Counter((m.base.out_features, m.base.in_features) for _, m in layers) == SDXL_SHAPES
    assert sum(p.numel() for p in params) == waveft.count_parameters(unet) == 560 * K == 1_451_520
    assert all(p.dtype == torch.float32 and p.device.type == "meta" for p in params)  # float32 on a bf16 UNet
    assert all(m.waveft_positions.device.type == "meta" for _, m in layers)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.waveft_spectrum" for n, _ in layers}  # everything else frozen

    waveft.remove(unet)  # the benchmark swaps adapters this way on one UNet
    assert not waveft.adapted_layers(unet)
    assert sum(p.numel() for p in unet.parameters()) == sdxl.SDXL_UNET_PARAMETERS

    params = waveft.inject(unet, method="lora", rank=1, init_seed=0)
    assert len(waveft.adapted_layers(unet)) == 560
    assert sum(p.numel() for p in params) == sum(c * (o + i) for (o, i), c in SDXL_SHAPES.items()) == 1_451_520


def test_peft_waveft_selects_the_same_560_layers(monkeypatch, peft):  # peft: skip without it (conftest)
    from peft import WaveFTConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    ours = sdxl.build_sdxl_unet()
    waveft.inject(ours, method="waveft", k=K)
    unet = sdxl.build_sdxl_unet()
    # PEFT draws a fresh randperm(out * in) per layer to place its coefficients (955 M draws, ~17 s, even on meta).
    # Which layers it adapts does not depend on where the coefficients go, so during this one injection randperm
    # returns the first K integers (PEFT keeps randperm(...)[:K]): everything else (target matching, layer-type
    # checks, replacement) is PEFT's own code.
    monkeypatch.setattr(torch, "randperm", lambda n, generator=None, **kw: torch.arange(min(n, K), **kw))
    inject_adapter_in_model(WaveFTConfig(n_frequency=K, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), unet)
    monkeypatch.undo()
    peft_layers = {n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}
    assert peft_layers == {n for n, _ in waveft.adapted_layers(ours)}
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == waveft.count_parameters(ours) == 1_451_520


def test_every_method_of_the_authors_table_counts_the_budget_the_docs_state(meta_unet, monkeypatch, peft):
    """docs/baselines.md's table: each method's trainable parameters on the 560 layers at the authors' settings,
    counted by the library that trains it on the meta SDXL UNet (WaveFT and LoRA: waveft.inject; the others: PEFT's
    own layers, as train_dreambooth --method builds them, peft_methods.peft_config). AdaLoRA's ranknum (a constant
    per layer, r) is no trainable tensor: train_dreambooth's parameters leave it out, as does this count."""
    import re
    from conftest import REPO
    import peft_methods
    table = (REPO / "docs" / "baselines.md").read_text().split("## The budgets")[1].split("\n## ")[0]
    stated = {row: int(count.replace(",", "")) for row, count in
              re.findall(r"^\| ([^|\n]+?) \|[^|\n]*\| ([\d,]+) \|", table, re.M)}
    unet, counted = meta_unet, {}
    for row, settings in [("WaveFT", dict(k=K)), ("WaveFT without IDWT", dict(k=K, use_idwt=False)),
                          ("LoRA r=1", dict(method="lora", rank=1)), ("ours FourierFT", dict(method="fourierft", k=K))]:
        waveft.inject(unet, **settings)
        counted[row] = waveft.count_parameters(unet)
        waveft.remove(unet)
    ours_fourierft = counted.pop("ours FourierFT")  # waveft.py's FourierFT: checked against PEFT's below
    # FourierFT draws randperm(out * in) per layer for its positions: where they go does not change the count
    monkeypatch.setattr(torch, "randperm", lambda n, generator=None, **kw: torch.arange(min(n, K), **kw))
    for row, config in [("FourierFT", peft.FourierFTConfig(n_frequency=K, scaling=64.0, target_modules=list(
                            waveft.DEFAULT_TARGETS)))] + [
            (peft_methods.NAMES[method], peft_methods.peft_config(peft, method, total_step=500, **{
                name: value for name, value in peft_methods.AUTHORS[method].items() if name != "lr"}))
            for method in peft_methods.METHODS]:
        peft.get_peft_model(unet, config)
        counted[row] = sum(p.numel() for name, p in unet.named_parameters()
                           if p.requires_grad and ".ranknum." not in name)
        peft_methods.remove(unet)  # the plain UNet again, for the next method
    assert counted == stated
    assert ours_fourierft == counted["FourierFT"] == 560 * K == 1_451_520
    assert counted["VeRA"] == 560 * 1402 + sum(c * o for (o, i), c in SDXL_SHAPES.items())  # d and b per layer
    assert counted["LoHa"] == 2 * counted["LoRA r=1"] and counted["AdaLoRA"] == 2 * counted["LoRA r=1"] + 2 * 560
