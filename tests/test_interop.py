"""interop.py: PEFT's adapter folders both ways (interop.save_peft -> PeftModel.from_pretrained, PEFT's
save_pretrained -> interop.load_peft / load_adapter), and a merged UNet that plain diffusers loads (save_merged_unet)."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import interop
import sdxl
import waveft
from conftest import need, randomize, run, tiny_unet  # tests that use peft take the `peft` fixture (conftest.need)

# (method, wavelet, use_idwt): db1 and a longer wavelet, with and without the IDWT, and LoRA
CASES = [("waveft", "db1", True), ("waveft", "db3", True), ("waveft", "db1", False), ("waveft", "db3", False),
         ("lora", None, None), ("fourierft", None, None)]
IDS = ["db1", "db3", "db1-noidwt", "db3-noidwt", "lora", "fourierft"]
STD = {"waveft": 0.02, "lora": 0.2, "fourierft": 1.0}  # random adapter values that visibly change the output


def ours(method, wavelet, use_idwt):
    unet = tiny_unet()
    if method == "waveft":
        waveft.inject(unet, k=40, scaling=25.0, wavelet=wavelet, seed=5, use_idwt=use_idwt)
    elif method == "fourierft":
        waveft.inject(unet, method="fourierft", k=40, scaling=64.0, seed=5, init_seed=0)
    else:
        waveft.inject(unet, method="lora", rank=2, scaling=1.5)
    randomize(unet, STD[method])
    return unet


def peft_config(method, wavelet, use_idwt):
    peft = need("peft")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    if method == "waveft":
        return peft.WaveFTConfig(n_frequency=40, scaling=25.0, wavelet_family=wavelet, use_idwt=use_idwt,
                                 random_loc_seed=5, target_modules=targets)
    if method == "fourierft":
        return peft.FourierFTConfig(n_frequency=40, scaling=64.0, random_loc_seed=5, target_modules=targets)
    return peft.LoraConfig(r=2, lora_alpha=3, target_modules=targets)


@pytest.mark.parametrize("method,wavelet,use_idwt", CASES, ids=IDS)
def test_save_peft_loads_in_peft_with_equal_outputs(tmp_path, unet_inputs, method, wavelet, use_idwt, peft):
    model = ours(method, wavelet, use_idwt)
    interop.save_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_unet(), tmp_path)
    adapted = [n for n, m in loaded.base_model.model.named_modules() if hasattr(m, "get_delta_weight")]
    assert adapted == [n for n, _ in waveft.adapted_layers(model)]  # the same 32 layers, no more
    expected = run(model, unet_inputs)
    assert not torch.allclose(expected, run(tiny_unet(), unet_inputs), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(run(loaded, unet_inputs), expected, rtol=1e-4, atol=1e-5)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        assert all(key.startswith("base_model.model.") for key in f.keys())
        shapes = {name: [m.base.out_features, m.base.in_features] for name, m in waveft.adapted_layers(model)}
        assert json.loads(f.metadata()["waveft_layers"]) == shapes  # PEFT ignores it: test_load_refuses_a_save_peft_...


@pytest.mark.parametrize("method,wavelet,use_idwt", CASES, ids=IDS)
def test_peft_folder_loads_with_load_adapter(tmp_path, unet_inputs, method, wavelet, use_idwt, peft):
    trained = peft.get_peft_model(tiny_unet(), peft_config(method, wavelet, use_idwt))
    randomize(trained, STD[method], seed=1)  # stands in for training with PEFT
    trained.save_pretrained(tmp_path)
    model = tiny_unet()
    with pytest.raises(ValueError, match=r"is a folder; waveft.load reads this project's adapter files .*"
                                         r"interop.load_peft\(model, folder\)"):
        waveft.load(model, tmp_path)  # the core reads its own files only, and says where a PEFT folder goes
    assert not waveft.adapted_layers(model)
    meta = interop.load_adapter(model, tmp_path)
    assert meta["method"] == method and len(meta["layers"]) == 32
    expected = run(trained, unet_inputs)
    assert not torch.allclose(expected, run(tiny_unet(), unet_inputs), atol=1e-3)
    torch.testing.assert_close(run(model, unet_inputs), expected, rtol=1e-4, atol=1e-5)
    interop.save_peft(model, tmp_path / "again")  # and back: the same tensors under the same names
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as a, \
            safe_open(str(tmp_path / "again" / "adapter_model.safetensors"), framework="pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(key), b.get_tensor(key)) for key in a.keys())


def test_load_peft_into_injected_model_replaces_our_positions(tmp_path, unet_inputs):
    """A model that already has adapters (here with positions from our own file) takes PEFT's positions."""
    model = ours("waveft", "db1", True)
    interop.save_peft(model, tmp_path)
    expected = run(model, unet_inputs)
    other = ours("waveft", "db1", True)
    for _, m in waveft.adapted_layers(other):
        m.waveft_positions = m.waveft_positions.flip(1)
    interop.load_peft(other, tmp_path)
    torch.testing.assert_close(run(other, unet_inputs), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"settings .*layer '.*' of this model"):
        interop.load_peft(ours("waveft", "db3", True), tmp_path)


def test_load_refuses_a_save_peft_folder_for_layers_of_other_shapes(tmp_path):
    """save_peft records each layer's (out, in) in the safetensors metadata, which PEFT ignores: load refuses layers
    of other shapes, naming them (their positions would be redrawn for the new shapes, silently), and changes
    nothing. A folder without the record, as PEFT writes it, has nothing to check the shapes against and loads."""
    def two_linears(width):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, width))

    model = two_linears(5)
    waveft.inject(model, k=6, target_modules=["0", "1"])
    randomize(model, 1.0)
    interop.save_peft(model, tmp_path)
    other = two_linears(7)
    before = {key: value.clone() for key, value in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"(?s)safetensors does not fit.*\['1: file \(5, 8\), model \(7, 8\)'\]"):
        interop.load_peft(other, tmp_path)
    assert not waveft.adapted_layers(other) and all(p.requires_grad for p in other.parameters())
    assert all(torch.equal(value, before[key]) for key, value in other.state_dict().items())
    same = two_linears(5)
    interop.load_peft(same, tmp_path)
    assert torch.equal(same[1].delta_weight(), model[1].delta_weight())
    weights = tmp_path / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    save_file(tensors, str(weights), metadata={"format": "pt", "waveft_layers": "[5, 8]"})
    with pytest.raises(ValueError, match=r"metadata waveft_layers is not a JSON \{layer: \[out, in\]\}"):
        interop.load_peft(other, tmp_path)
    save_file(tensors, str(weights), metadata={"format": "pt"})  # as PEFT writes it
    interop.load_peft(other, tmp_path)
    assert waveft.adapted_layers(other)[1][1].base.out_features == 7


@pytest.mark.parametrize("method", ["waveft", "fourierft"])
def test_save_peft_refuses_positions_peft_cannot_rebuild(tmp_path, method):
    model = ours(method, "db1", True)
    name, layer = waveft.adapted_layers(model)[3]
    setattr(layer, f"{method}_positions", getattr(layer, f"{method}_positions").flip(1))
    with pytest.raises(ValueError, match=rf"layer '{name}': its positions are not PEFT's .* seed 5"):
        interop.save_peft(model, tmp_path)
    with pytest.raises(ValueError, match="no adapters to save"):
        interop.save_peft(tiny_unet(), tmp_path)


def test_save_peft_writes_a_regex_when_a_name_would_match_more_layers(tmp_path):
    """PEFT's list rule also matches dot-suffixes: adapting only `a.to_q` must not make PEFT adapt `b.a.to_q`."""
    net = torch.nn.ModuleDict({"a": torch.nn.ModuleDict({"to_q": torch.nn.Linear(4, 4)}),
                               "b": torch.nn.ModuleDict({"a": torch.nn.ModuleDict({"to_q": torch.nn.Linear(4, 4)})})})
    waveft.inject(net, k=3, target_modules=r"a\.to_q")
    interop.save_peft(net, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == r"a\.to_q"
    plain = torch.nn.ModuleDict({"c": torch.nn.Linear(4, 4)})
    waveft.inject(plain, k=3, target_modules=["c"])
    interop.save_peft(plain, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["c"]


def test_a_full_disk_while_save_peft_writes_the_config_keeps_the_previous_one_whole(tmp_path, monkeypatch):
    """Both files of a PEFT folder are written whole or not at all: the disk filling up part-way through
    adapter_config.json (os.write writes half of it, then ENOSPC) leaves the folder's previous config as it was and
    no temporary file."""
    import errno
    import os
    net = torch.nn.ModuleDict({"to_q": torch.nn.Linear(4, 4)})
    waveft.inject(net, k=3, target_modules=["to_q"])
    interop.save_peft(net, tmp_path)
    before = (tmp_path / "adapter_config.json").read_bytes()
    write = os.write

    def full_at_the_config(fd, data):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("adapter_config.json"):
            write(fd, memoryview(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)
    monkeypatch.setattr(os, "write", full_at_the_config)
    with pytest.raises(OSError, match="No space left on device"):
        interop.save_peft(net, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "adapter_config.json").read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("method,field,value", [
    ("waveft", "proportional_parameters", True), ("waveft", "n_frequency_pattern", {"to_q": 8}),
    ("waveft", "fan_in_fan_out", True), ("waveft", "bias", "all"), ("waveft", "modules_to_save", ["conv_in"]),
    ("waveft", "layers_to_transform", 0), ("waveft", "peft_type", "LOHA"), ("waveft", "target_modules", "all-linear"),
    ("waveft", "wavelet_family", "bior1.3"), ("fourierft", "n_frequency_pattern", {"to_q": 8}),
    ("fourierft", "bias", "fourier_only")])
def test_load_peft_refuses_what_it_cannot_represent(tmp_path, method, field, value):
    interop.save_peft(ours(method, "db1", True), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=rf"adapter_config.json: {field}"):
        interop.load_peft(tiny_unet(), tmp_path)


def test_load_peft_refuses_lora_variants_and_bad_folders(tmp_path):
    interop.save_peft(ours("lora", None, None), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for field, value in [("use_dora", True), ("rank_pattern", {"to_q": 4}), ("init_lora_weights", "pissa")]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match=rf"{field}="):
            interop.load_peft(tiny_unet(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(ValueError, match=r"lora_A.weight' has shape \(2, 64\), the model expects \(3, 64\)"):
        interop.load_peft(tiny_unet(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \(1\): \['" + dropped.removeprefix("base_model.model.")):
        interop.load_peft(tiny_unet(), tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin .*only from safetensors"):
        interop.load_peft(tiny_unet(), tmp_path)
    with pytest.raises(ValueError, match="without adapter_config.json"):
        interop.load_peft(tiny_unet(), tmp_path / "..")


def test_runtime_code_never_imports_peft():
    """The PEFT format is read and written here without peft; peft itself is imported only by peft_methods.py, for
    the methods that are PEFT's own layers (inside its functions: tests/test_layout.py)."""
    import pathlib
    import re
    for path in sorted((pathlib.Path(__file__).parent.parent).glob("*.py")):  # every module and script
        if path.name != "peft_methods.py":
            assert not re.search(r"^\s*(import|from) peft\b", path.read_text(), re.M), path.name


# ----------------------------------------------------------------------------------------------------------------
# A merged UNet anyone can load

@pytest.fixture(scope="module")
def tiny_pipe():
    return sdxl.load_pipeline("tiny")


def small(seed=0):
    return sdxl.GenerationConfig(num_inference_steps=2, resolution=64, seeds=(seed,))


def pixels(images):
    import numpy as np
    return torch.from_numpy(np.stack([np.asarray(image, dtype=np.int16) for image in images]))


@pytest.mark.parametrize("method", ["waveft", "lora"])
def test_merged_unet_loads_with_diffusers_and_generates_the_same_images(tmp_path, tiny_pipe, method):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    pipe = tiny_pipe
    base_images = pixels(sdxl.generate(pipe, ["a zjw dog"], cfg=small()))
    waveft.inject(pipe.unet, method=method, k=300, rank=2)
    try:
        randomize(pipe.unet, 0.05 if method == "waveft" else 0.5)
        before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        adapter_images = pixels(sdxl.generate(pipe, ["a zjw dog"], cfg=small()))
        interop.save_merged_unet(pipe.unet, tmp_path / "merged_unet")
        after = pipe.unet.state_dict()  # the in-memory model is as it was: adapters live, W untouched
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not any(m.merged for _, m in waveft.adapted_layers(pipe.unet))
        with safe_open(str(tmp_path / "merged_unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
        assert not [k for k in keys if "waveft" in k or "lora" in k or ".base." in k]
        merged = UNet2DConditionModel.from_pretrained(tmp_path / "merged_unet")
        plain = StableDiffusionXLPipeline(**dict(pipe.components, unet=merged), add_watermarker=False)
        plain.set_progress_bar_config(disable=True)
        merged_images = pixels(sdxl.generate(plain, ["a zjw dog"], cfg=small()))
    finally:
        waveft.remove(pipe.unet)
    assert (adapter_images - base_images).abs().max() > 10  # the adapter changes the images...
    assert (merged_images - adapter_images).abs().max() <= 1  # ...and the merged UNet makes the same ones


def test_save_merged_unet_dtype_and_refusals(tmp_path):
    from diffusers import UNet2DConditionModel
    unet = sdxl.build_tiny_pipeline().unet.to(torch.bfloat16)
    with pytest.raises(ValueError, match="no waveft adapters"):
        interop.save_merged_unet(unet, tmp_path / "merged_unet")
    waveft.inject(unet, k=50)
    randomize(unet, 0.05)
    name, layer = waveft.adapted_layers(unet)[0]
    interop.save_merged_unet(unet, tmp_path / "merged_unet")
    with safe_open(str(tmp_path / "merged_unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"BF16"}  # the frozen weights' dtype
        weight = f.get_tensor(f"{name}.weight")
    assert torch.equal(weight, (layer.base.weight.float() + layer.delta_weight()).to(torch.bfloat16))  # rounded once
    interop.save_merged_unet(unet, tmp_path / "f32", dtype=torch.float32)
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "f32")
    assert torch.equal(merged.get_submodule(name).weight, layer.base.weight.float() + layer.delta_weight())
    waveft.merge(unet)  # a merged layer's W already holds dW: written as it is
    interop.save_merged_unet(unet, tmp_path / "merged_unet")
    assert torch.equal(UNet2DConditionModel.from_pretrained(tmp_path / "merged_unet").get_submodule(name).weight,
                       layer.base.weight.float())


def test_export_merged_from_a_run_folder(tmp_path):
    run_dir = tmp_path / "dog6-waveft-k300"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"model": "tiny", "subject": "dog6"}))
    pipe = sdxl.load_pipeline("tiny")
    waveft.inject(pipe.unet, k=300)
    randomize(pipe.unet, 0.05)
    waveft.save(pipe.unet, run_dir / "adapter.safetensors")
    interop.save_merged_unet(pipe.unet, tmp_path / "expected")
    folder = interop.export_merged(run_dir)
    assert folder == run_dir / "merged_unet"
    expected = (tmp_path / "expected" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (folder / "diffusion_pytorch_model.safetensors").read_bytes() == expected
    with pytest.raises(FileExistsError, match="merged_unet already exists.*overwrite=True"):
        interop.export_merged(run_dir)
    interop.export_merged(run_dir, overwrite=True)
    (run_dir / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no \"model\""):
        interop.export_merged(run_dir, overwrite=True)
    assert interop.export_merged(run_dir, model="tiny", overwrite=True) == folder


def test_merged_unet_is_written_shard_by_shard_in_diffusers_sharded_layout(tmp_path, monkeypatch):
    """A 10 GB UNet never in memory twice: each shard is merged, serialised and written before the next is made;
    the folder is diffusers' sharded layout (shards + index), which from_pretrained loads as the one-file one."""
    from diffusers import UNet2DConditionModel
    import safetensors.torch
    unet = sdxl.build_tiny_pipeline().unet
    waveft.inject(unet, k=50)
    randomize(unet, 0.05)
    interop.save_merged_unet(unet, tmp_path / "whole")  # the default shard size: the tiny UNet in one file
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == ["config.json",
                                                                      "diffusion_pytorch_model.safetensors"]
    serialise, shards = safetensors.torch.save, []

    def record(tensors, *args, **kwargs):
        shards.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return serialise(tensors, *args, **kwargs)
    monkeypatch.setattr(safetensors.torch, "save", record)
    interop.save_merged_unet(unet, tmp_path / "sharded", shard_bytes=2**20)
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    n = len(shards)
    assert n >= 6 and max(shards) <= 2**20, shards  # 5.5 MB of float32 weights, at most 1 MiB at a time
    shard_names = [f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert names == ["config.json", *shard_names, "diffusion_pytorch_model.safetensors.index.json"]
    index = json.loads((tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(shards) and set(index["weight_map"].values()) == set(names[1:-1])
    whole = safetensors.torch.load_file(tmp_path / "whole" / "diffusion_pytorch_model.safetensors")
    sharded = UNet2DConditionModel.from_pretrained(tmp_path / "sharded").state_dict()  # what diffusers reads
    assert whole.keys() == sharded.keys() == index["weight_map"].keys()
    assert all(torch.equal(whole[key], sharded[key]) for key in whole)
    assert (tmp_path / "sharded" / "config.json").read_text() == (tmp_path / "whole" / "config.json").read_text()
