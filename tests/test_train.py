"""Tests of sdxl.py and train_dreambooth.py on the tiny random-weight SDXL (CPU, no downloads).

One real training run as a subprocess (the `tiny_run_dir` fixture) serves the output/adapter/config checks; resume,
learning signal and bad input call `train_dreambooth.main(argv)` in-process, which is the same code without paying
a python + diffusers import per case.
"""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import sdxl
import train_dreambooth
import waveft
from conftest import REPO

SDXL_ID = "stabilityai/stable-diffusion-xl-base-1.0"


@pytest.fixture(autouse=True)
def single_thread():
    """The tiny model gains nothing from a second intra-op thread, and on a shared 2-core machine a parallel
    region waiting for a descheduled thread is many times slower. One thread also fixes the summation order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_argv(data_dir, out, *extra):
    return ["--subject", "dog6", "--model", "tiny", "--data-dir", str(data_dir), "--output-dir", str(out),
            "--resolution", "64", "--grad-accum", "2", "--validation-prompts", "1", "--sample-steps", "1", *extra]


def read_losses(run_dir):
    return [float(row["loss"]) for row in csv.DictReader(open(run_dir / "loss.csv"))]


def unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    cond = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=text, added_cond_kwargs=cond).sample


# ---------------------------------------------------------------------------------------------------------------
# The real script, as a subprocess: outputs, config, metadata, adapter

def test_run_writes_outputs_config_and_summary(tiny_run_dir):
    for name in ("config.json", "adapter.safetensors", "loss.csv", "validation.png", "checkpoint.pt"):
        assert (tiny_run_dir / name).is_file(), name
    config = json.loads((tiny_run_dir / "config.json").read_text())
    expected = dict(subject="dog6", class_name="dog", unique_token="zjw", model="tiny", method="waveft", k=2000,
                    rank=1, scaling=25.0, wavelet="db1", use_idwt=True, seed=42, resolution=64, steps=4,
                    grad_accum=2, lr=1e-4, instance_prompt="a zjw dog", prior_preservation=False)
    assert {key: config[key] for key in expected} == expected
    assert config["argv"][:2] == ["--subject", "dog6"] and "data_dir" in config
    losses = read_losses(tiny_run_dir)
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)
    assert Image.open(tiny_run_dir / "validation.png").size[0] == 2 * 64  # 2 seeds per prompt, 64 px each
    log = (tiny_run_dir.parent / "train.log").read_text()
    assert "64 layers" in log and "128,000 trainable parameters" in log and "device cpu, float32" in log
    assert "it/s" in log or "s/it" in log  # the tqdm bar


def test_adapter_loads_into_fresh_tiny_unet_and_changes_it(tiny_run_dir):
    meta = waveft.read_metadata(tiny_run_dir / "adapter.safetensors")
    settings = (meta["method"], meta["k"], meta["scaling"], meta["wavelet"], meta["seed"], meta["use_idwt"])
    assert settings == ("waveft", 2000, 25.0, "db1", 777, True)
    assert (meta["model"], meta["subject"], meta["class_name"], meta["unique_token"]) == ("tiny", "dog6", "dog", "zjw")
    assert meta["training"]["seed"] == 42 and meta["training"]["steps"] == 4
    unet = sdxl.build_tiny_pipeline().unet
    before = unet_output(unet)
    waveft.load(unet, tiny_run_dir / "adapter.safetensors")
    assert waveft.count_parameters(unet) == 64 * 2000
    assert all(layer.waveft_spectrum.abs().sum() > 0 for _, layer in waveft.adapted_layers(unet))
    after = unet_output(unet)
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-6


def test_cli_reports_bad_input_without_traceback(dreambooth_dir, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train_dreambooth.py"), "--subject", "dog4",
                             "--data-dir", str(dreambooth_dir), "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    assert "error: unknown subject 'dog4'" in result.stderr and "dog6" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Resume and learning, in-process

def test_interrupted_and_resumed_run_equals_uninterrupted_bit_for_bit(dreambooth_dir, tmp_path, monkeypatch):
    argv = tiny_argv(dreambooth_dir, tmp_path / "full", "--k", "2000", "--steps", "4", "--checkpoint-every", "3")
    full_dir = train_dreambooth.main(argv)

    # Ctrl-C arrives during step 2: the script finishes that step, writes the checkpoint and exits with 130.
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return clip(*args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_interrupt)
    argv = tiny_argv(dreambooth_dir, tmp_path / "cut", "--k", "2000", "--steps", "4", "--checkpoint-every", "3")
    with pytest.raises(SystemExit) as exit_info:
        train_dreambooth.main(argv)
    assert exit_info.value.code == 130
    monkeypatch.undo()
    cut_dir = tmp_path / "cut" / "dog6-waveft-k2000"
    assert torch.load(cut_dir / "checkpoint.pt", weights_only=True)["step"] == 2
    assert len(read_losses(cut_dir)) == 2 and not (cut_dir / "adapter.safetensors").exists()

    with pytest.raises(ValueError, match=r"other options: lr \(0.0001 -> 0.001\)"):
        train_dreambooth.main(argv + ["--resume", "--lr", "1e-3"])
    train_dreambooth.main(argv + ["--resume"])
    a = dict(waveft.adapted_layers(_loaded(full_dir)))
    b = dict(waveft.adapted_layers(_loaded(cut_dir)))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n].waveft_spectrum, b[n].waveft_spectrum) for n in a)  # bit for bit
    assert read_losses(full_dir) == read_losses(cut_dir)

    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_dreambooth.main(tiny_argv(dreambooth_dir, tmp_path / "empty", "--resume"))


def _loaded(run_dir):
    unet = sdxl.build_tiny_pipeline().unet
    waveft.load(unet, run_dir / "adapter.safetensors")
    return unet


def test_fixed_noise_training_lowers_the_loss(dreambooth_dir, tmp_path):
    # With the image, noise and timestep fixed, the loss is one deterministic function of the adapter: 30 optimizer
    # steps of WaveFT at the paper's learning rate must lower it clearly (about 30 % here).
    argv = tiny_argv(dreambooth_dir, tmp_path, "--k", "2000", "--steps", "30", "--grad-accum", "1", "--fixed-noise")
    losses = read_losses(train_dreambooth.main(argv))
    assert len(losses) == 30 and losses[-1] < 0.9 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 25  # and it goes down step after step


@pytest.mark.parametrize("method_args, folder, tensor", [
    (["--k", "2000", "--use-idwt", "false"], "dog6-waveft_noidwt-k2000", "waveft_spectrum"),
    (["--method", "lora", "--rank", "2"], "dog6-lora-r2", "lora_B"),
])
def test_baselines_run_in_the_same_loop(dreambooth_dir, tmp_path, method_args, folder, tensor):
    argv = tiny_argv(dreambooth_dir, tmp_path, *method_args, "--steps", "3", "--grad-accum", "1", "--fixed-noise")
    run_dir = train_dreambooth.main(argv)
    assert run_dir.name == folder
    losses = read_losses(run_dir)
    assert losses[2] < losses[1] < losses[0], losses
    unet = _loaded(run_dir)
    layer = waveft.adapted_layers(unet)[0][1]
    assert getattr(layer, tensor).abs().sum() > 0 and layer.scaling == (25.0 if "waveft" in folder else 1.0)


def test_prior_preservation_from_a_local_model_folder(dreambooth_dir, tiny_model_dir, tmp_path):
    # --model DIR: the same from_pretrained path a real SDXL folder takes. Class images come from the base model.
    argv = tiny_argv(dreambooth_dir, tmp_path, "--k", "2000", "--steps", "2", "--prior-preservation",
                     "--class-images", "2", "--model", str(tiny_model_dir))
    run_dir = train_dreambooth.main(argv)
    assert json.loads((run_dir / "config.json").read_text())["model"] == str(tiny_model_dir)
    class_images = sorted((tmp_path / "class-images" / tiny_model_dir.name / "dog").glob("*.png"))
    assert [p.name for p in class_images] == ["0000.png", "0001.png"]
    assert Image.open(class_images[0]).size == (64, 64)
    rows = list(csv.DictReader(open(run_dir / "loss.csv")))
    assert len(rows) == 2 and all(float(row["loss"]) > 0 and float(row["prior_loss"]) > 0 for row in rows)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each with its specific error

def test_bad_inputs_give_clear_errors(dreambooth_dir, tmp_path, capsys, monkeypatch):
    def run(*extra, data_dir=dreambooth_dir):
        return train_dreambooth.main(tiny_argv(data_dir, tmp_path, "--steps", "1", *extra))

    with pytest.raises(FileNotFoundError, match=r"git clone https://github.com/google/dreambooth[\s\S]*--data-dir"):
        run(data_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"unknown subject 'dog4'.*dog6.*wolf_plushie"):
        run("--subject", "dog4")

    corrupt = tmp_path / "corrupt"
    (corrupt / "dog6").mkdir(parents=True)
    shutil.copy(dreambooth_dir / "prompts_and_classes.txt", corrupt)
    shutil.copy(dreambooth_dir / "dog6" / "00.jpg", corrupt / "dog6")
    (corrupt / "dog6" / "01.jpg").write_bytes((dreambooth_dir / "dog6" / "01.jpg").read_bytes()[:2000])  # truncated
    with pytest.raises(ValueError, match=r"cannot read image .*01\.jpg"):
        run(data_dir=corrupt)

    if sdxl.hub_reachable():  # keep the test hermetic where a hub happens to be reachable
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"not available[\s\S]*--model tiny"):
        run("--model", SDXL_ID)
    assert time.perf_counter() - start < 5

    for bad in (["--no-such-flag", "1"], ["--use-idwt", "maybe"], ["--method", "vera"], ["--resolution", "100"]):
        with pytest.raises(SystemExit) as exit_info:
            run(*bad)
        assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert train_dreambooth.parse_options(["--subject", "x", "--use-idwt", "false", "--prior-preservation"]) == \
        train_dreambooth.Options(subject="x", use_idwt=False, prior_preservation=True, scaling=25.0,
                                 resolution=1024)


# ---------------------------------------------------------------------------------------------------------------
# sdxl.py

def test_load_image_handles_rgba_grayscale_exif_and_names_corrupt_files(tmp_path):
    rgba = Image.new("RGBA", (6, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent: must become white, not black
    rgba.save(tmp_path / "rgba.png")
    Image.new("L", (5, 3), 90).save(tmp_path / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (8, 2), (0, 200, 0)).save(tmp_path / "rotated.jpg", exif=exif)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")

    image = sdxl.load_image(tmp_path / "rgba.png")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((1, 1)) == (255, 0, 0)
    image = sdxl.load_image(tmp_path / "gray.png")
    assert image.mode == "RGB" and image.getpixel((2, 2)) == (90, 90, 90)
    assert sdxl.load_image(tmp_path / "rotated.jpg").size == (2, 8)
    with pytest.raises(ValueError, match="broken.jpg"):
        sdxl.load_image(tmp_path / "broken.jpg")


def test_crop_records_sdxl_micro_conditioning():
    image = Image.new("RGB", (300, 200), "white")  # landscape: the height becomes 64, one crop along the width
    pixels, ids = train_dreambooth.crop_image(image, 64, torch.Generator().manual_seed(0))
    assert pixels.shape == (3, 64, 64) and pixels.min() == pixels.max() == 1.0
    orig_h, orig_w, top, left, target_h, target_w = ids.tolist()
    assert (orig_h, orig_w, top, target_h, target_w) == (200, 300, 0, 64, 64) and 0 <= left <= 96 - 64


def test_dataset_helpers(dreambooth_dir):
    classes = sdxl.read_classes(dreambooth_dir)
    assert len(classes) == 30 and classes["bear_plushie"] == "stuffed animal"
    live, obj = sdxl.prompts_for(dreambooth_dir, "dog6"), sdxl.prompts_for(dreambooth_dir, "vase", "sks")
    assert len(live) == len(obj) == 25
    assert "a zjw dog wearing a santa hat" in live and "a sks vase with the Eiffel Tower in the background" in obj
    assert [p.name for p in sdxl.instance_images(dreambooth_dir, "dog6")] == [f"0{i}.jpg" for i in range(5)]


def test_tiny_pipeline_is_deterministic_and_loads_from_disk(tiny_model_dir):
    fresh = sdxl.build_tiny_pipeline()
    loaded = sdxl.load_pipeline(str(tiny_model_dir))
    assert fresh.vae_scale_factor == 8 and fresh.unet.config.addition_embed_type == "text_time"
    for a, b in zip(fresh.unet.state_dict().values(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b)
    embeds, pooled = sdxl.encode_prompt(fresh, ["a zjw dog"])
    ref_embeds, _, ref_pooled, _ = fresh.encode_prompt("a zjw dog", do_classifier_free_guidance=False)
    assert embeds.shape == (1, 77, 64) and torch.equal(embeds, ref_embeds) and torch.allclose(pooled, ref_pooled)
    cfg = sdxl.GenerationConfig(num_inference_steps=2, resolution=64)
    images = sdxl.generate(fresh, ["a zjw dog", "a cat"], seeds=(1, 2), cfg=cfg)
    again = sdxl.generate(loaded, ["a cat"], seeds=(2,), cfg=cfg)
    assert len(images) == 4 and images[0].size == (64, 64)
    pixels = [torch.tensor(np.asarray(image), dtype=torch.float32) for image in images + again]
    assert (pixels[3] - pixels[4]).abs().max() <= 2  # (prompt, seed) decides the image, batched or not
    assert (pixels[2] - pixels[3]).abs().mean() > 5  # and another seed gives another image
    assert type(fresh.scheduler).__name__ == "DDPMScheduler"  # generate() swaps its sampler only temporarily
