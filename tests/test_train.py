"""Tests of sdxl.py and train_dreambooth.py on the tiny random-weight SDXL (CPU, no downloads).

One real training run as a subprocess (the `tiny_run_dir` fixture) serves the output/adapter/config checks; resume,
learning signal and bad input call `train_dreambooth.main(argv)` in-process, which is the same code without paying
a python + diffusers import per case.
"""
import contextlib
import csv
import dataclasses
import datetime
import errno
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import DDPMScheduler
from PIL import Image

import eval_images
import evaluate
import files
import hub
import interop
import pictures
import runs
import sdxl
import train_dreambooth
import waveft
from conftest import REPO, adapter_tensors, tensors_equal, tiny_argv

SDXL_ID = "stabilityai/stable-diffusion-xl-base-1.0"


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: see conftest.single_thread


def run_dir_of(argv):
    options = train_dreambooth.parse_options(argv)
    return Path(options.output_dir) / train_dreambooth.run_name(options)


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


BF16_CHECKPOINTING = ["--mixed-precision", "bf16", "--gradient-checkpointing"]


def read_losses(run_dir):
    return [float(row["loss"]) for row in csv.DictReader(open(run_dir / "loss.csv"))]


def unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    cond = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=text, added_cond_kwargs=cond).sample


def fill_disk_at(monkeypatch, folder, name, nth=1):
    """A disk that fills up while the nth file whose name starts with `name` (a temporary name counts, as in
    checkpoint.pt.123.tmp) is written under `folder`: where it really happens, in the lowest write call, os.write,
    which writes half of that file's first chunk and then fails with ENOSPC, as does every later write there."""
    write, files, folder = os.write, [], str(Path(folder).resolve())

    def write_to_disk(fd, data):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not path.startswith(folder + os.sep):
            return write(fd, data)
        if len(files) >= nth:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        inode = os.fstat(fd).st_ino
        if Path(path).name.startswith(name) and inode not in files:
            files.append(inode)
            if len(files) == nth:
                return write(fd, memoryview(data)[:max(1, len(data) // 2)])
        return write(fd, data)
    monkeypatch.setattr(os, "write", write_to_disk)


def one_line_disk_error(error, path):
    """The one-line report of a full disk: the file (or folder), the error, the free space, what to do."""
    return "\n" not in str(error) and re.fullmatch(
        rf"cannot write {re.escape(str(path))}: No space left on device \([\d,]+ MiB free there\); the files written "
        r"before are intact: make room and run again \(with --resume once a checkpoint exists\)", str(error))


def files_under(folder):
    """{relative path: bytes} of every file under `folder`, subfolders included."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# The real script, as a subprocess: outputs, config, metadata, adapter

def test_run_writes_outputs_config_and_summary(tiny_run_dir, dreambooth_dir):
    umask = os.umask(0)
    os.umask(umask)
    assert sorted(p.name for p in tiny_run_dir.iterdir()) == sorted(runs.RUN_FILES)  # no temporary files
    for path in tiny_run_dir.iterdir():  # all written atomically, all with the user's umask (not a temp file's 0600)
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    loss_png = Image.open(tiny_run_dir / "loss.png")  # drawn from loss.csv at each checkpoint and at the end
    assert loss_png.format == "PNG" and loss_png.size[0] > 200
    config = json.loads((tiny_run_dir / "config.json").read_text())
    expected = dict(subject="dog6", class_name="dog", unique_token="zjw", model="tiny", method="waveft", k=2000,
                    rank=1, scaling=25.0, wavelet="db1", use_idwt=True, seed=42, resolution=64, steps=4,
                    grad_accum=2, lr=1e-4, instance_prompt="a zjw dog", prior_preservation=False,
                    device="cpu", mixed_precision="no", gradient_checkpointing=False,  # what was used, not "auto"
                    data_dir=str(dreambooth_dir.resolve()), run_name=tiny_run_dir.name)  # absolute, given relative
    assert {key: config[key] for key in expected} == expected
    assert config["argv"][:2] == ["--subject", "dog6"]
    losses = read_losses(tiny_run_dir)
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)
    assert Image.open(tiny_run_dir / "validation.png").size[0] == 2 * 64  # 2 seeds per prompt, 64 px each
    log = (tiny_run_dir.parent / "train.log").read_text()
    assert "64 layers" in log and "128,000 trainable parameters" in log and "device cpu, float32," in log
    assert "it/s" in log or "s/it" in log  # the tqdm bar
    assert "requires torchvision" not in log and "warning" not in log.lower()  # quiet by default
    assert "on the CPU takes hours" not in log  # the tiny model gets no full-model-on-CPU note


def test_transformers_torchvision_fallback_message_alone_is_dropped():
    logger = logging.getLogger("transformers.utils.import_utils")

    def record(message):
        return logging.LogRecord(logger.name, logging.WARNING, __file__, 0, message, None, None)
    assert not logger.filter(record("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                                    "`CLIPImageProcessorPil` for backward compatibility."))
    assert logger.filter(record("`CLIPImageProcessor` something else went wrong"))  # real warnings still show


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


def test_cli_reports_bad_input_in_one_line(dreambooth_dir, tmp_path):
    # A bad value (exit 1) and a value of the wrong type (argparse, exit 2), as a user starts them (at the same time)
    script = [sys.executable, str(REPO / "train_dreambooth.py"), "--data-dir", str(dreambooth_dir), "--output-dir",
              str(tmp_path), "--subject", "dog6"]
    runs = [subprocess.Popen(script + ["--k", value], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}) for value in ("0", "abc")]
    (out_0, err_0), (out_abc, err_abc) = (run.communicate(timeout=120) for run in runs)
    assert runs[0].returncode == 1 and out_0 == ""
    assert err_0 == "error: --k 0: must be positive\n"  # the option and its value; no usage, no traceback
    assert runs[1].returncode == 2 and out_abc == ""
    assert err_abc == "error: --k abc: not an integer; see --help\n"  # not argparse's 26 lines of usage
    assert not any(tmp_path.iterdir())


def test_a_bad_command_line_is_one_line_naming_the_option_and_value(capsys):
    """argparse's own errors (a value of the wrong type, a missing or unknown option): one line, exit code 2."""
    for argv, message in (
            (["--subject", "dog6", "--k", "abc"], "--k abc: not an integer"),
            (["--subject", "dog6", "--lr=fast"], "--lr fast: not a number"),
            (["--subject", "dog6", "--use-idwt", "maybe"], "--use-idwt maybe: not true or false"),
            (["--subject", "dog6", "--k"], "--k: expected one argument"),
            (["--subject", "dog6", "--no-such-flag", "1"], "unrecognized arguments: --no-such-flag 1")):
        with pytest.raises(SystemExit) as exit_info:
            train_dreambooth.parse_options(argv)
        assert exit_info.value.code == 2, argv
        assert capsys.readouterr().err == f"error: {message}; see --help\n", argv
    assert train_dreambooth.parse_options(["--subject", "dog6", "--use-idwt", "no", "--lr", "2e-4", "--k", "7"]) \
        == train_dreambooth.parse_options(["--subject", "dog6", "--use-idwt=false", "--lr=0.0002", "--k=7"])


# ---------------------------------------------------------------------------------------------------------------
# Resume and learning, in-process

@pytest.mark.parametrize("precision", [[], BF16_CHECKPOINTING], ids=["float32", "bf16+checkpointing"])
def test_interrupted_and_resumed_run_equals_uninterrupted_bit_for_bit(dreambooth_dir, tmp_path, monkeypatch, capsys,
                                                                      device, precision):
    def argv(out, *extra):
        return tiny_argv(dreambooth_dir, tmp_path / out, "--k", "2000", "--steps", "4", "--checkpoint-every", "3",
                         "--validation-prompts", "0", "--device", str(device), *precision, *extra)
    full_dir = train_dreambooth.main(argv("full"))

    # Ctrl-C arrives during step 2: the script finishes that step, writes the checkpoint and exits with 130.
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return clip(*args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_interrupt)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_dreambooth.main(argv("cut"))
    assert exit_info.value.code == 130
    monkeypatch.undo()
    assert re.findall(r"(\d+)/4 \[", capsys.readouterr().err)[-1] == "2"  # the bar ends at the saved step
    cut_dir = run_dir_of(argv("cut"))
    assert torch.load(cut_dir / "checkpoint.pt", weights_only=True)["step"] == 2
    assert len(read_losses(cut_dir)) == 2 and not (cut_dir / "adapter.safetensors").exists()

    before = snapshot(cut_dir)
    with pytest.raises(ValueError, match=r"other options: lr \(0.0001 -> 0.001\)"):
        train_dreambooth.main(argv("cut", "--resume", "--lr", "1e-3", "--run-name", cut_dir.name))
    assert snapshot(cut_dir) == before  # a refused start changes no file
    train_dreambooth.main(argv("cut", "--resume"))
    a = dict(waveft.adapted_layers(_loaded(full_dir)))
    b = dict(waveft.adapted_layers(_loaded(cut_dir)))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n].waveft_spectrum, b[n].waveft_spectrum) for n in a)  # bit for bit
    assert read_losses(full_dir) == read_losses(cut_dir)


def test_fourierft_trains_at_the_authors_settings_and_resumes_bit_for_bit(dreambooth_dir, tmp_path, monkeypatch,
                                                                           capsys):
    """--method fourierft: the authors' scaling 64, trained in float32 (their fp32 config) from PEFT's default normal
    spectrum drawn from --seed; 2 steps, and the same run cut after step 1 and resumed, bit for bit."""
    def argv(out, *extra):  # the tiny UNet's layers hold 2048 or 4096 weights: k 2000
        return tiny_argv(dreambooth_dir, tmp_path / out, "--method", "fourierft", "--k", "2000", "--steps", "2",
                         "--grad-accum", "1", "--checkpoint-every", "1", "--validation-prompts", "0", *extra)
    save_checkpoint = runs.save_checkpoint

    def keep_step_1(path, step, *args):  # what an interruption after step 1 leaves
        save_checkpoint(path, step, *args)
        if step == 1:
            shutil.copy(path, path.with_name("checkpoint-1.pt"))
    monkeypatch.setattr(runs, "save_checkpoint", keep_step_1)
    full_dir = train_dreambooth.main(argv("full"))
    monkeypatch.undo()
    assert full_dir.name == "dog6-fourierft-k2000-tiny-steps2-ga1"  # the authors' scaling and precision: unnamed
    config = json.loads((full_dir / "config.json").read_text())
    assert (config["scaling"], config["mixed_precision"], config["method"]) == (64.0, "no", "fourierft")
    assert runs.method_and_budget(config) == ("fourierft", "k=2000")
    meta = waveft.read_metadata(full_dir / "adapter.safetensors")
    assert (meta["method"], meta["k"], meta["scaling"]) == ("fourierft", 2000, 64.0)
    trained = adapter_tensors(full_dir)
    moved = [(trained[f"{name}.fourierft_spectrum"] - torch.randn(2000, generator=torch.Generator().manual_seed(
        42 + i))).abs().max().item() for i, name in enumerate(meta["layers"])]  # --seed 42: layer i from 42 + i
    assert 0 < max(moved) < 1e-3  # trained (Adam: ~lr per step) from that normal start
    assert runs.count_trainable(full_dir / "adapter.safetensors") == 2000 * len(meta["layers"])
    # evaluate.py and sample.py take the adapter merged: each W is W + dW
    pipe = eval_images.adapted_pipeline({}, "tiny", full_dir / "adapter.safetensors", "cpu")
    layers = waveft.adapted_layers(pipe.unet)
    assert [name for name, _ in layers] == list(meta["layers"]) and all(layer.merged for _, layer in layers)
    name, layer = layers[-1]
    plain = sdxl.build_tiny_pipeline().unet.get_submodule(name).weight
    torch.testing.assert_close(layer.base.weight, plain + layer.delta_weight(), rtol=0, atol=1e-7)
    # in PEFT's format (interop.save_peft), a FOURIERFT folder that evaluate.py reads as a run (--subject given)
    interop.save_peft(_loaded(full_dir), tmp_path / "peft_folder")
    [run] = runs.read_runs(evaluate.parse_args(["--runs", str(tmp_path / "peft_folder"), "--subject", "dog6",
                                                "--model", "tiny", "--data-dir", str(dreambooth_dir)]))
    assert (run.setting, runs.count_trainable(run.adapter)) == ("peft fourierft k=2000", 2000 * len(layers))

    cut_dir = tmp_path / "cut" / full_dir.name
    cut_dir.mkdir(parents=True)
    shutil.copy(full_dir / "config.json", cut_dir)
    shutil.copy(full_dir / "checkpoint-1.pt", cut_dir / "checkpoint.pt")
    (cut_dir / "loss.csv").write_text("".join((full_dir / "loss.csv").read_text().splitlines(True)[:2]))
    assert train_dreambooth.main(argv("cut", "--resume")) == cut_dir
    assert tensors_equal(adapter_tensors(cut_dir), adapter_tensors(full_dir))
    assert read_losses(cut_dir) == read_losses(full_dir)
    # WaveFT's options have no effect (a warning, not in the name); another scaling is named
    capsys.readouterr()
    assert run_dir_of(argv("x", "--wavelet", "db4", "--scaling", "32")).name == \
        "dog6-fourierft-k2000-tiny-scaling32-steps2-ga1"
    assert "--wavelet has no effect with --method fourierft" in capsys.readouterr().err


def _loaded(run_dir):
    unet = sdxl.build_tiny_pipeline().unet
    waveft.load(unet, run_dir / "adapter.safetensors")
    return unet


def test_a_first_ctrl_c_waits_for_the_step_a_second_interrupts_and_the_old_handler_returns(capsys):
    """runs.ctrl_c_finishes_the_step: the first SIGINT only sets the flag (the step goes on), the second raises
    KeyboardInterrupt at once; leaving, even by that exception, puts the previous handler back. exit_interrupted:
    the one line and status 130."""
    def previous(*_):
        pass
    original = signal.signal(signal.SIGINT, previous)
    try:
        with pytest.raises(KeyboardInterrupt):
            with runs.ctrl_c_finishes_the_step() as stop_requested:
                assert not stop_requested
                signal.raise_signal(signal.SIGINT)
                assert stop_requested  # no exception: the step finishes
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is previous
    finally:
        signal.signal(signal.SIGINT, original)
    with pytest.raises(SystemExit) as exit_info:
        runs.exit_interrupted(7, Path("run/checkpoint.pt"))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == ("\ninterrupted after step 7; checkpoint saved to run/checkpoint.pt, continue "
                                       "with the same command plus --resume\n")


def fixture_argv(dreambooth_dir, out, *extra):
    """The command line of the `tiny_run_dir` fixture's run (4 steps), with its folder under `out`."""
    return ["--subject", "dog6", "--k", "2000", "--model", "tiny", "--data-dir", str(dreambooth_dir), "--output-dir",
            str(out), "--resolution", "64", "--steps", "4", "--grad-accum", "2", "--checkpoint-every", "2",
            "--sample-steps", "2", "--save-merged", "--run-name", "dog6-waveft-k2000-tiny-steps4-ga2", *extra]


def test_resume_refuses_fewer_steps_than_the_checkpoint_and_writes_nothing(tiny_run_dir, dreambooth_dir, tmp_path):
    run_dir = tmp_path / tiny_run_dir.name  # a copy: a wrongly accepted resume must not touch the shared run
    shutil.copytree(tiny_run_dir, run_dir)
    before = files_under(run_dir)
    with pytest.raises(ValueError) as error:
        train_dreambooth.main(fixture_argv(dreambooth_dir, tmp_path, "--steps", "2", "--resume"))
    assert str(error.value) == (f"--resume: {run_dir / 'checkpoint.pt'} is at step 4, past --steps 2: give --steps 4 "
                                f"(to finish the run) or more (to extend it)")
    assert files_under(run_dir) == before


def retag_storages(path, location):
    """Rewrite a torch.save file as if its tensors had been saved from `location` (e.g. cuda:0, as optimizer states
    saved on a GPU are): data.pkl is re-pickled with the location in every storage's persistent id changed, the
    tensors' bytes and every other record are copied as they are."""
    import io
    import pickle
    import zipfile

    class Rebuild:  # a tensor-rebuilding call of the pickle, kept as a call (not run) and pickled back as one
        def __init__(self, function, args):
            self.function, self.args = function, args

        def __reduce__(self):
            return self.function, self.args

    class Storage:
        def __init__(self, pid):
            self.pid = pid

    class Reader(pickle.Unpickler):
        def find_class(self, module, name):
            found = super().find_class(module, name)
            if module == "torch._utils" and name.startswith("_rebuild"):
                return lambda *args: Rebuild(found, args)
            return found

        def persistent_load(self, pid):
            return Storage(pid)

    class Writer(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                kind, storage_type, key, _, numel = obj.pid
                return kind, storage_type, key, location, numel
            return None
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            if name.endswith("/data.pkl"):
                buffer = io.BytesIO()
                Writer(buffer, protocol=2).dump(Reader(io.BytesIO(data)).load())
                data = buffer.getvalue()
            archive.writestr(name, data)


def test_a_checkpoint_written_on_a_gpu_resumes_here(tiny_run_dir, dreambooth_dir, tmp_path):
    run_dir = tmp_path / tiny_run_dir.name
    shutil.copytree(tiny_run_dir, run_dir)
    retag_storages(run_dir / "checkpoint.pt", "cuda:0")
    if not torch.cuda.is_available():  # the file really says cuda:0: a plain load fails on a machine without one
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(run_dir / "checkpoint.pt", weights_only=True)
    train_dreambooth.main(fixture_argv(dreambooth_dir, tmp_path, "--steps", "5", "--resume", "--save-merged", "false",
                                       "--validation-prompts", "0"))
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["step"] == 5 and len(read_losses(run_dir)) == 5
    assert all(t.device.type == "cpu" for t in state["adapter"].values())


def test_ranks_wait_for_the_class_images_with_a_long_timeout(dreambooth_dir, tmp_path, monkeypatch):
    # Under torchrun with --prior-preservation the other ranks wait at a barrier while rank 0 makes up to 100 class
    # images: longer than the process group's default timeout (10 minutes with NCCL) on a slow GPU.
    timeouts = []

    class Joined(Exception):
        pass

    def init_process_group(backend, timeout=None, **kwargs):
        timeouts.append(timeout)
        raise Joined  # the call is what is checked; stop before the model loads
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for extra in (["--prior-preservation"], []):
        with pytest.raises(Joined):
            train_dreambooth.main(tiny_argv(dreambooth_dir, tmp_path, "--steps", "1", *extra))
    assert timeouts[0] is not None and timeouts[0] >= datetime.timedelta(days=1), timeouts
    assert timeouts[1] is None  # without class images to wait for, torch's default still catches a hung rank
    assert not any(tmp_path.iterdir())


def test_fixed_noise_training_lowers_the_loss(dreambooth_dir, tmp_path):
    # With the image, noise and timestep fixed, the loss is one deterministic function of the adapter: 30 optimizer
    # steps of WaveFT at the paper's learning rate must lower it clearly (about 30 % here).
    argv = tiny_argv(dreambooth_dir, tmp_path, "--k", "2000", "--steps", "30", "--grad-accum", "1", "--fixed-noise")
    losses = read_losses(train_dreambooth.main(argv))
    assert len(losses) == 30 and losses[-1] < 0.9 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 25  # and it goes down step after step


@pytest.mark.parametrize("method_args, folder, tensor", [
    (["--k", "2000", "--use-idwt", "false"], "dog6-waveft_noidwt-k2000-tiny-steps3-ga1-fixed-noise", "waveft_spectrum"),
    (["--method", "lora", "--rank", "2"], "dog6-lora-r2-tiny-steps3-ga1-fixed-noise", "lora_B"),
])
def test_baselines_run_in_the_same_loop(dreambooth_dir, tmp_path, method_args, folder, tensor):
    argv = tiny_argv(dreambooth_dir, tmp_path, *method_args, "--steps", "3", "--grad-accum", "1", "--fixed-noise",
                     "--validation-prompts", "0")
    run_dir = train_dreambooth.main(argv)
    assert run_dir.name == folder
    losses = read_losses(run_dir)
    assert losses[2] < losses[1] < losses[0], losses
    unet = _loaded(run_dir)
    layer = waveft.adapted_layers(unet)[0][1]
    assert getattr(layer, tensor).abs().sum() > 0 and layer.scaling == (25.0 if "waveft" in folder else 1.0)


def test_prior_preservation_from_a_local_model_folder(dreambooth_dir, tiny_model_dir, tmp_path, capsys):
    # --model DIR: the same from_pretrained path a real SDXL folder takes. Class images come from the base model.
    argv = tiny_argv(dreambooth_dir, tmp_path, "--k", "2000", "--steps", "2", "--prior-preservation",
                     "--class-images", "2", "--model", str(tiny_model_dir))
    run_dir = train_dreambooth.main(argv)
    assert capsys.readouterr().out.count("on the CPU takes hours") == 1  # not the tiny model: said once, up front
    assert run_dir.name == f"dog6-waveft-k2000-{tiny_model_dir.name}-steps2-ga2-res64-prior-cls2"
    assert json.loads((run_dir / "config.json").read_text())["model"] == str(tiny_model_dir)
    class_images = sorted((tmp_path / "class-images" / tiny_model_dir.name / "dog").glob("*.png"))
    assert [p.name for p in class_images] == ["0000.png", "0001.png"]
    assert Image.open(class_images[0]).size == (64, 64)
    rows = list(csv.DictReader(open(run_dir / "loss.csv")))
    assert len(rows) == 2 and all(float(row["loss"]) > 0 and float(row["prior_loss"]) > 0 for row in rows)


def test_class_images_are_written_whole_and_one_that_does_not_decode_is_made_again(tmp_path, monkeypatch, capsys):
    pipe = sdxl.build_tiny_pipeline()
    opts = train_dreambooth.Options(subject="dog6", model="tiny", class_images=2, class_dir=str(tmp_path / "dog"))
    cfg = sdxl.GenerationConfig(resolution=64, num_inference_steps=1)
    fill_disk_at(monkeypatch, tmp_path, "0000.png")
    with pytest.raises(files.WriteError) as error:
        train_dreambooth.ensure_class_images(pipe, opts, "dog", cfg)
    monkeypatch.undo()
    assert one_line_disk_error(error.value, tmp_path / "dog" / "0000.png"), str(error.value)
    assert not any((tmp_path / "dog").iterdir())  # no half-written image that would count as made

    # A truncated image (from a crash of an older version, or a disk that filled up) is made again, with a note
    paths = train_dreambooth.ensure_class_images(pipe, opts, "dog", cfg)
    images = {path.name: path.read_bytes() for path in paths}
    paths[0].write_bytes(images["0000.png"][:len(images["0000.png"]) // 2])
    capsys.readouterr()
    assert train_dreambooth.ensure_class_images(pipe, opts, "dog", cfg) == paths
    out = capsys.readouterr().out
    assert re.search(rf"note: cannot read image {re.escape(str(paths[0]))}: .*; generating it again", out), out
    assert "0001.png" not in out
    assert {path.name: path.read_bytes() for path in paths} == images  # the same image again, the other untouched


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

    if hub.hub_reachable():  # keep the test hermetic where a hub happens to be reachable
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionXLPipeline  # noqa: F401 (imported before the clock starts: not what is timed)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"not available[\s\S]*--model tiny"):
        run("--model", SDXL_ID)
    assert time.perf_counter() - start < 5

    # A bad value: one line naming the option and its value
    for bad, message in ((["--k", "0"], "--k 0: must be positive"), (["--steps", "-1"], "--steps -1: must be positive"),
                         (["--method", "dora"],
                          "--method dora: must be one of waveft, lora, fourierft, vera, loha, lokr, adalora"),
                         (["--wavelet", "db99"], "--wavelet db99: must be one of haar, db1, db2"),
                         (["--resolution", "100"], "--resolution 100: must be a multiple of 64"),
                         (["--mixed-precision", "fp16"], "--mixed-precision fp16: must be one of auto, bf16, no"),
                         (["--device", "tpu9"], "--device tpu9: not a torch device"),
                         (["--resume", "--overwrite"], "give one of them")):
        with pytest.raises(ValueError, match=re.escape(message)):
            run(*bad)
    assert [p.name for p in tmp_path.iterdir()] == ["corrupt"]  # nothing above wrote anything

    # An option that cannot matter is not checked, and given explicitly it draws a one-line warning
    parse = train_dreambooth.parse_options
    assert parse(["--subject", "x", "--rank", "0"]).rank == 0
    assert parse(["--subject", "x", "--method", "lora", "--k=0", "--class-images", "5"]).k == 0
    assert capsys.readouterr().err.splitlines() == [
        "warning: --rank has no effect with --method waveft", "warning: --class-images has no effect without "
        "--prior-preservation", "warning: --k has no effect with --method lora"]
    cuda = torch.cuda.is_available()
    assert parse(["--subject", "x", "--use-idwt", "false", "--prior-preservation"]) == train_dreambooth.Options(
        subject="x", use_idwt=False, prior_preservation=True, scaling=25.0, resolution=1024, rank=1, lr=1e-4,
        device="cuda" if cuda else "cpu", mixed_precision="bf16" if cuda else "no", gradient_checkpointing=cuda)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------------------------
# Never lose a run: one folder per distinct run, no overwrite, nothing written before training starts, a full disk

def test_a_folder_of_fp16_files_needs_variant_which_is_recorded_and_names_the_run(dreambooth_dir, tiny_fp16_model_dir,
                                                                                   tmp_path, capsys):
    """A model folder holding only the fp16 files (save_pretrained(variant="fp16"), the usual download to halve the
    disk) failed with diffusers' traceback (OSError: Error no file named model.safetensors ... text_encoder). Now it
    is one line naming --variant, before anything is written; with --variant fp16 the run trains, config.json and
    the run's name record it (other weights: another result), and the merged UNet starts from the same files."""
    argv = tiny_argv(dreambooth_dir, tmp_path, "--model", str(tiny_fp16_model_dir), "--k", "300", "--steps", "1",
                     "--validation-prompts", "0")
    with pytest.raises(FileNotFoundError) as error:
        train_dreambooth.main(argv)
    assert str(error.value) == (f"model {tiny_fp16_model_dir}: its text_encoder has no default (non-variant) weight "
                                f"files, only fp16-variant ones (model.fp16.safetensors): pass --variant fp16")
    assert not any(tmp_path.iterdir())  # a refused start writes nothing
    run_dir = train_dreambooth.main(argv + ["--variant", "fp16", "--save-merged"])
    assert run_dir.name == f"dog6-waveft-k300-{tiny_fp16_model_dir.name}-variant-fp16-steps1-ga2-res64"
    assert json.loads((run_dir / "config.json").read_text())["variant"] == "fp16"
    merged = safetensors.torch.load_file(run_dir / "merged_unet" / "diffusion_pytorch_model.safetensors")
    fp16_weights = sdxl.load_pipeline("tiny").unet.conv_in.weight.half().float()  # what the fp16 files hold
    assert torch.equal(merged["conv_in.weight"], fp16_weights)
    interop.export_merged(run_dir, overwrite=True)  # from config.json's model and variant
    assert safetensors.torch.load_file(run_dir / "merged_unet" / "diffusion_pytorch_model.safetensors").keys() == \
        merged.keys()
    capsys.readouterr()
    opts = train_dreambooth.parse_options(["--subject", "dog6", "--model", "tiny", "--variant", "fp16"])
    assert "warning: --variant has no effect with --model tiny" in capsys.readouterr().err
    assert train_dreambooth.run_name(opts) == "dog6-waveft-k2592-tiny"  # built in memory: no files to choose


def test_weight_variants_are_read_from_the_file_names_of_each_component(tmp_path):
    """diffusers and transformers name a variant's files <name>.<variant>.safetensors, sharded either
    <name>.<variant>-00001-of-00002 or <name>-00001-of-00002.<variant>; .bin files count too; a pipeline's
    components are those model_index.json names (not every subfolder)."""
    layout = {"unet": ["diffusion_pytorch_model.fp16-00001-of-00002.safetensors", "config.json",
                       "diffusion_pytorch_model.safetensors.index.fp16.json"],
              "text_encoder": ["model-00001-of-00002.fp16.safetensors", "model.safetensors"],
              "vae": ["diffusion_pytorch_model.bin"], "scheduler": ["scheduler_config.json"],
              "merged_unet": ["diffusion_pytorch_model.bf16.safetensors"]}  # not a component
    for folder, names in layout.items():
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_bytes(b"")
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"], "image_encoder": [None, None]}))
    assert hub.variants_in(tmp_path) == {
        "unet": {"fp16": "diffusion_pytorch_model.fp16-00001-of-00002.safetensors"},
        "text_encoder": {"fp16": "model-00001-of-00002.fp16.safetensors", None: "model.safetensors"},
        "vae": {None: "diffusion_pytorch_model.bin"}}
    assert hub.missing_variant(tmp_path, "fp16") == ("its vae has no fp16-variant weight files, only default ones "
                                                     "(diffusion_pytorch_model.bin): leave out --variant")
    assert hub.missing_variant(tmp_path / "unet", "fp16") is None  # a model folder alone
    assert hub.missing_variant(tmp_path / "vae", "fp16", "--dino").endswith("--dino needs a folder with default "
                                                                            "weight files")


def test_every_option_that_changes_the_result_changes_the_folder_name():
    parse, name = train_dreambooth.parse_options, train_dreambooth.run_name
    assert name(parse(["--subject", "dog6"])) == "dog6-waveft-k2592"
    assert name(parse(["--subject", "dog6", "--wavelet", "db4", "--lr", "2e-4"])) == "dog6-waveft-k2592-db4-lr2e-4"
    assert name(parse(["--subject", "dog6", "--model", "tiny", "--resolution", "64"])) == "dog6-waveft-k2592-tiny"
    assert name(parse(["--subject", "dog6", "--variant", "fp16"])) == "dog6-waveft-k2592-variant-fp16"
    assert name(parse(["--subject", "dog6", "--method", "lora", "--k", "7", "--steps", "1000"])) == \
        "dog6-lora-r1-steps1000"  # --k cannot matter for LoRA
    # Generically, from the fields: every option not declared result-neutral, changed alone (where it has an effect),
    # gives a new folder name; so will an option added later.
    base = parse(["--subject", "dog6"])
    valid = {"method": "lora", "wavelet": "db4", "model": "tiny", "mixed_precision": "no" if
             base.mixed_precision == "bf16" else "bf16"}
    names = set()
    for field in dataclasses.fields(train_dreambooth.Options):
        if field.name in train_dreambooth.NO_EFFECT_ON_RESULT | SUBJECT:
            continue
        context = base
        if field.name in train_dreambooth.ignored_options(base):  # a context where it has an effect
            method = {"rank": "lora", "alpha": "loha", "target_rank": "adalora"}.get(field.name)
            context = train_dreambooth.resolve(dataclasses.replace(base, method=method, rank=None, lr=None)) \
                if method else dataclasses.replace(base, prior_preservation=True)
        value = getattr(context, field.name)
        other = valid.get(field.name, not value if isinstance(value, bool) else
                          value * 2 + 1 if isinstance(value, (int, float)) else value + "x")
        changed = name(dataclasses.replace(context, **{field.name: other}))
        assert changed != name(context), field.name
        names.add(changed)
    assert len(names) == len(dataclasses.fields(train_dreambooth.Options)) - len(
        train_dreambooth.NO_EFFECT_ON_RESULT) - len(SUBJECT)
    # the subject names the run first: a DreamBooth subject, or the folder of your photos (whatever its class)
    assert name(parse(["--images", "photos/my_dog/", "--class-name", "dog"])) == "my_dog-waveft-k2592"
    assert name(parse(["--images", "my_dog", "--class-name", "puppy", "--lr", "2e-4"])) == "my_dog-waveft-k2592-lr2e-4"


SUBJECT = {"subject", "images", "class_name"}  # what the run is of: the first part of its name


def test_an_existing_run_is_never_replaced_and_a_refused_start_writes_nothing(dreambooth_dir, tmp_path):
    argv = tiny_argv(dreambooth_dir, tmp_path, "--steps", "1", "--validation-prompts", "0")
    run_dir = train_dreambooth.main(argv)
    before, adapter = snapshot(run_dir), adapter_tensors(run_dir)
    with pytest.raises(ValueError, match=re.escape(f"{run_dir} already holds a run (checkpoint.pt, adapter.safetensors)"
                                                   ": continue it with --resume, start it again with --overwrite")):
        train_dreambooth.main(argv)
    assert snapshot(run_dir) == before
    (run_dir / "validation.png").write_bytes(b"from the earlier run")
    assert train_dreambooth.main(argv + ["--overwrite"]) == run_dir
    after = snapshot(run_dir)
    assert sorted(after) == ["adapter.safetensors", "checkpoint.pt", "config.json", "loss.csv", "loss.png"]  # all replaced
    assert tensors_equal(adapter_tensors(run_dir), adapter) and after["loss.csv"] == before["loss.csv"]

    refused = tmp_path / "refused"
    for extra, error in ((["--k", "5000"], "k=5000 is invalid for layer"), (["--resume"], "no checkpoint at")):
        with pytest.raises((ValueError, FileNotFoundError), match=error):
            train_dreambooth.main(tiny_argv(dreambooth_dir, refused, "--steps", "1", *extra))
    assert not refused.exists()


def full_disk_argv(dreambooth_dir, out, *extra):
    return tiny_argv(dreambooth_dir, out, "--steps", "3", "--checkpoint-every", "1", "--validation-prompts", "0",
                     *extra)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, dreambooth_dir, single_thread):
    """The run the full-disk tests cut and resume, trained without interruption."""
    return train_dreambooth.main(full_disk_argv(dreambooth_dir, tmp_path_factory.mktemp("uninterrupted")))


def test_a_full_disk_at_a_checkpoint_loses_nothing(dreambooth_dir, tmp_path, monkeypatch, uninterrupted_run):
    def argv(out, *extra):
        return full_disk_argv(dreambooth_dir, tmp_path / out, *extra)
    full_dir = uninterrupted_run

    fill_disk_at(monkeypatch, tmp_path / "cut", "checkpoint.pt", nth=2)  # part-way through the second checkpoint
    with pytest.raises(files.WriteError) as error:
        train_dreambooth.main(argv("cut"))
    monkeypatch.undo()
    cut_dir = run_dir_of(argv("cut"))
    assert re.fullmatch(rf"cannot write {re.escape(str(cut_dir / 'checkpoint.pt'))}: No space left on device "
                        r"\([\d,]+ MiB free there\).*--resume once a checkpoint exists\)", str(error.value))
    kept = ["checkpoint.pt", "config.json", "loss.csv", "loss.png"]  # loss.png of the first checkpoint; no .tmp
    assert sorted(p.name for p in cut_dir.iterdir()) == kept
    assert torch.load(cut_dir / "checkpoint.pt", weights_only=True)["step"] == 1  # the previous one, loadable
    assert read_losses(cut_dir) == read_losses(full_dir)[:2]  # the log up to the failure, not truncated
    train_dreambooth.main(argv("cut", "--resume"))
    assert read_losses(cut_dir) == read_losses(full_dir)
    assert tensors_equal(adapter_tensors(cut_dir), adapter_tensors(full_dir))


@pytest.fixture
def small_disk(tmp_path):
    """(folder, resize): a real tmpfs mounted at tmp_path/disk, 64 KiB until resize(bytes); unmounted afterwards.
    Needs Linux and root (mount); skipped where mounting is not allowed."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root on Linux")
    folder = tmp_path / "disk"
    folder.mkdir()

    def mount(size, *more):
        command = ["mount", "-t", "tmpfs", "-o", ",".join([*more, f"size={size}"]), "tmpfs", str(folder)]
        return subprocess.run(command, capture_output=True, text=True)
    mounted = mount(64 * 1024)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")

    def resize(size):
        result = mount(size, "remount")
        assert result.returncode == 0, result.stderr
    try:
        yield folder, resize
    finally:  # lazily if a file there is still open (say, held by a failed test's traceback): never left mounted
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_real_full_disk_fails_in_one_line_and_resume_finishes_the_run(dreambooth_dir, small_disk,
                                                                          uninterrupted_run):
    # A real small filesystem: room for the first checkpoint (and the small files) but not for the second next to
    # it. torch.save writing there itself fails inside its zip writer with a RuntimeError ("unexpected pos").
    disk, resize = small_disk
    pages = [-(-(uninterrupted_run / name).stat().st_size // 4096) * 4096 for name in ("checkpoint.pt", "loss.png")]
    resize(sum(pages) + 64 * 1024)
    argv = full_disk_argv(dreambooth_dir, disk)
    with pytest.raises(files.WriteError) as error:
        train_dreambooth.main(argv)
    run_dir = run_dir_of(argv)
    assert one_line_disk_error(error.value, run_dir / "checkpoint.pt"), str(error.value)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "config.json", "loss.csv", "loss.png"]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 1
    assert read_losses(run_dir) == read_losses(uninterrupted_run)[:2]
    resize(64 * 2**20)  # room made
    train_dreambooth.main(argv + ["--resume"])
    assert read_losses(run_dir) == read_losses(uninterrupted_run)
    assert tensors_equal(adapter_tensors(run_dir), adapter_tensors(uninterrupted_run))


def test_a_full_disk_at_each_final_file_loses_nothing_and_resume_finishes_the_run(dreambooth_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    # The files written after the last step, each in turn on a disk that fills up while it is written; each time
    # --resume (with the same --steps: the checkpoint is at the last step, nothing is left to train) goes on.
    # (validation.png is written as loss.png is, by files.write_file: not run again here)
    argv = tiny_argv(dreambooth_dir, tmp_path, "--steps", "1", "--save-merged", "--validation-prompts", "0")
    run_dir = run_dir_of(argv)
    written = ["checkpoint.pt", "config.json", "loss.csv", "loss.png"]
    for fault, name in (("adapter.safetensors", "adapter.safetensors"), ("diffusion_pytorch_model", "merged_unet")):
        fill_disk_at(monkeypatch, tmp_path, fault)
        with pytest.raises(files.WriteError) as error:
            train_dreambooth.main(argv + (["--resume"] if name != "adapter.safetensors" else []))
        monkeypatch.undo()
        assert one_line_disk_error(error.value, run_dir / name), str(error.value)
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(written)  # no temporary file or folder
        written.append(name)
    assert "nothing to train" in capsys.readouterr().out
    train_dreambooth.main(argv + ["--resume"])
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(set(runs.RUN_FILES) - {"validation.png"})
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["step"] == 1 and len(read_losses(run_dir)) == 1
    adapter = adapter_tensors(run_dir)
    assert all(torch.equal(adapter[name], value) for name, value in state["adapter"].items())  # the trained one


def test_each_small_file_of_a_run_keeps_its_previous_version_on_a_full_disk(tiny_run_dir, tmp_path, monkeypatch):
    # config.json and loss.csv (when training starts), a loss.csv row (every step), loss.png (at checkpoints)
    run_dir = tmp_path / tiny_run_dir.name
    shutil.copytree(tiny_run_dir, run_dir)
    before = files_under(run_dir)
    config = json.loads(before["config.json"])
    for name, write in (("config.json", lambda: runs.start_files(run_dir, config, 4, False)),
                        ("loss.csv", lambda: runs.start_files(run_dir, config, 4, False)),
                        ("loss.png", lambda: runs.plot_losses(run_dir))):
        fill_disk_at(monkeypatch, run_dir, name)
        with pytest.raises(files.WriteError) as error:
            write()
        monkeypatch.undo()
        assert one_line_disk_error(error.value, run_dir / name), str(error.value)
        assert files_under(run_dir) == before  # the previous version, whole; no temporary file
    log = runs.start_files(run_dir, config, 4, False)
    try:
        fill_disk_at(monkeypatch, run_dir, "loss.csv")
        with pytest.raises(files.WriteError) as error:
            runs.append_loss(log, run_dir / "loss.csv", 5, 0.5, 0.0)
        monkeypatch.undo()
    finally:
        os.close(log)
    assert one_line_disk_error(error.value, run_dir / "loss.csv"), str(error.value)
    assert (run_dir / "loss.csv").read_bytes().startswith(before["loss.csv"])  # the rows before it are intact


def test_replacing_merged_unet_leaves_the_old_or_the_new_one_whole(tiny_run_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / tiny_run_dir.name
    shutil.copytree(tiny_run_dir, run_dir)
    before = files_under(run_dir / "merged_unet")
    monkeypatch.setattr(interop, "MERGED_SHARD_BYTES", 2**20)  # the tiny UNet (5.5 MB) in 6 shards
    fill_disk_at(monkeypatch, run_dir, "diffusion_pytorch_model", nth=2)  # part-way through the second shard
    with pytest.raises(files.WriteError) as error:
        interop.export_merged(run_dir, overwrite=True)
    assert one_line_disk_error(error.value, run_dir / "merged_unet"), str(error.value)
    monkeypatch.undo()
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(runs.RUN_FILES)  # nothing left over
    assert files_under(run_dir / "merged_unet") == before

    # A crash between the two renames (the old folder moved aside, the new one not yet in its place): the old one
    # is moved back
    replace, calls = os.replace, []

    def crash_at_the_second_rename(source, target):
        calls.append(source)
        if len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return replace(source, target)
    monkeypatch.setattr(os, "replace", crash_at_the_second_rename)
    with pytest.raises(files.WriteError, match=r"merged_unet: Input/output error"):
        files.write_folder(run_dir / "merged_unet", [("config.json", "{}")])
    monkeypatch.undo()
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(runs.RUN_FILES)
    assert files_under(run_dir / "merged_unet") == before
    files.write_folder(run_dir / "merged_unet", [("config.json", "{}")])  # and without a crash, replaced
    assert files_under(run_dir / "merged_unet") == {"config.json": b"{}"}
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(runs.RUN_FILES)


def test_two_lora_runs_with_the_same_options_are_equal(dreambooth_dir, tmp_path):
    adapters = []
    for name in ("first", "second"):
        argv = tiny_argv(dreambooth_dir, tmp_path, "--method", "lora", "--steps", "1", "--grad-accum", "1",
                         "--validation-prompts", "0", "--run-name", name)
        adapters.append(adapter_tensors(train_dreambooth.main(argv)))
    assert (tmp_path / "first").is_dir() and (tmp_path / "second").is_dir()  # --run-name chooses the folder
    assert tensors_equal(*adapters)  # lora_A's init comes from --seed, not from the global RNG


# ---------------------------------------------------------------------------------------------------------------
# Your own subject: --images DIR --class-name NAME instead of --subject

def test_a_run_on_copies_of_a_subjects_photos_equals_the_subject_run_bit_for_bit(photos_run, tiny_run_dir, tmp_path,
                                                                                 monkeypatch):
    """The photos_run fixture trains on my_dog/, copies of dog6's photos, with tiny_run_dir's options and no dataset
    anywhere: the same photos in the same order, the same prompt "a zjw dog", the same seeds, so the same adapter and
    losses, bit for bit. The folder names the run and the subject; the validation grid has the instance prompt only."""
    assert photos_run.dir.name == "my_dog-waveft-k2000-tiny-steps4-ga2"
    assert tensors_equal(adapter_tensors(photos_run.dir), adapter_tensors(tiny_run_dir))
    assert read_losses(photos_run.dir) == read_losses(tiny_run_dir)
    config, subject_config = (json.loads((run / "config.json").read_text()) for run in (photos_run.dir, tiny_run_dir))
    assert {key: config[key] for key in ("images", "subject", "class_name", "instance_prompt", "data_dir")} == dict(
        images=str(photos_run.photos), subject="my_dog", class_name="dog", instance_prompt="a zjw dog", data_dir="")
    assert config["setting"] == subject_config["setting"] == "waveft-k2000-tiny-steps4-ga2"
    assert waveft.read_metadata(photos_run.dir / "adapter.safetensors")["subject"] == "my_dog"
    assert photos_run.grid_prompts == [["a zjw dog"]]  # --validation-prompts 3, but no dataset: the instance prompt
    # --resume from another folder, the photos named by a relative path: the same run (nothing left to train)
    run_dir = shutil.copytree(photos_run.dir, tmp_path / "outputs" / photos_run.dir.name)
    monkeypatch.chdir(photos_run.photos)
    argv = ["--images", ".", "--class-name", "dog", "--k", "2000", "--model", "tiny", "--output-dir",
            str(tmp_path / "outputs"), "--resolution", "64", "--steps", "4", "--grad-accum", "2",
            "--validation-prompts", "0", "--resume"]
    assert train_dreambooth.main(argv) == run_dir
    assert tensors_equal(adapter_tensors(run_dir), adapter_tensors(tiny_run_dir))


def test_a_run_on_a_folder_refuses_bad_input_in_one_line_and_writes_nothing(dreambooth_dir, tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()

    def refused(*argv):
        with pytest.raises((ValueError, FileNotFoundError)) as error:
            train_dreambooth.main(["--model", "tiny", "--k", "2000", "--output-dir", str(out), *argv])
        return str(error.value)

    assert refused("--subject", "dog6", "--images", str(photos), "--class-name", "dog") == (
        "give --subject (a subject of the DreamBooth dataset, e.g. dog6) or --images (a folder of your photos), not "
        "both")
    assert refused() == ("give --subject (a subject of the DreamBooth dataset, e.g. dog6) or --images (a folder of "
                         "your photos)")
    assert refused("--images", str(photos)) == ('--images needs --class-name: what the photos show (e.g. dog), for '
                                                'the prompt "a zjw <class-name>"')
    assert refused("--subject", "dog6", "--class-name", "cat") == (
        "--class-name goes with --images: --subject dog6's class is the dataset's")
    assert refused("--images", str(tmp_path / "nowhere"), "--class-name", "dog") == (
        f"photo folder {tmp_path / 'nowhere'} does not exist")
    (photos / "notes.txt").write_text("not a photo")
    expected = ("{} holds {}: DreamBooth learns a subject from a few photos of it, 4-6 as in its dataset (files "
                "ending .jpg, .jpeg, .png, .webp, .bmp)")
    assert refused("--images", str(photos), "--class-name", "dog") == expected.format(photos, "no image")
    shutil.copy(dreambooth_dir / "dog6" / "00.jpg", photos)
    assert refused("--images", str(photos), "--class-name", "dog") == expected.format(photos, "1 image (00.jpg)")
    (photos / "01.jpg").write_bytes((dreambooth_dir / "dog6" / "01.jpg").read_bytes()[:2000])  # cut short
    assert refused("--images", str(photos), "--class-name", "dog").startswith(f"cannot read image {photos / '01.jpg'}:")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# The GPU's path on any device: bf16 autocast + bf16 frozen UNet + float32 adapters, gradient checkpointing

def first_step_gradients(dreambooth_dir, out, device, *extra, monkeypatch):
    """The adapter gradients of one real training step (grabbed where they are clipped), and how many blocks
    were recomputed (checkpointed) on the way."""
    clip, checkpoint, grads, recomputed = torch.nn.utils.clip_grad_norm_, torch.utils.checkpoint.checkpoint, [], []

    def grab(params, *args, **kwargs):
        params = list(params)
        grads.append(torch.cat([p.grad.detach().float().flatten().cpu() for p in params]))
        return clip(params, *args, **kwargs)

    def count(*args, **kwargs):
        recomputed.append(1)
        return checkpoint(*args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", grab)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", count)
    train_dreambooth.main(tiny_argv(dreambooth_dir, out, "--steps", "1", "--validation-prompts", "0", "--device",
                                    str(device), *extra))
    monkeypatch.undo()
    return grads[0], len(recomputed)


def test_bf16_gradients_are_close_to_float32_and_checkpointing_changes_none(dreambooth_dir, tmp_path, device,
                                                                             monkeypatch):
    def gradients(*extra):
        return first_step_gradients(dreambooth_dir, tmp_path / "-".join(extra or ["fp32"]), device, "--mixed-precision",
                                    *extra, monkeypatch=monkeypatch)
    (fp32, plain), (fp32_checkpointed, recomputed) = gradients("no"), gradients("no", "--gradient-checkpointing")
    bf16, recomputed_bf16 = gradients("bf16", "--gradient-checkpointing")
    assert plain == 0 and recomputed > 0 and recomputed_bf16 == recomputed  # checkpointing is really on, or off
    assert fp32.abs().max() > 0 and torch.isfinite(bf16).all()
    assert torch.equal(fp32_checkpointed, fp32)  # recomputing activations replays the same float32 ops exactly
    # bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2 %). The frozen weights and every matmul's inputs are
    # rounded to it, through the UNet's ~20 layers, so the adapter gradient differs by a few %: 2.8 % measured on
    # the CPU; 6 % leaves room for other kernels (CUDA). And it must differ: bf16 really is in use.
    relative = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert 1e-3 < relative < 0.06, relative


def test_bf16_and_checkpointing_run_trains_and_says_what_it_used(dreambooth_dir, tmp_path, device, monkeypatch,
                                                                 capsys):
    grid, grid_labels = pictures.image_grid, []
    monkeypatch.setattr(pictures, "image_grid", lambda images, cols, labels: grid_labels.extend(labels) or grid(
        images, cols, labels))
    argv = tiny_argv(dreambooth_dir, tmp_path, "--k", "2000", "--steps", "12", "--grad-accum", "1", "--fixed-noise",
                     "--device", str(device), *BF16_CHECKPOINTING)
    run_dir = train_dreambooth.main(argv)
    losses = read_losses(run_dir)
    assert all(np.isfinite(losses)) and losses[-1] < 0.95 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 9, losses
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["mixed_precision"], config["gradient_checkpointing"], config["device"]) == ("bf16", True,
                                                                                               str(device))
    out = capsys.readouterr().out
    assert f"dataset: {dreambooth_dir.resolve()} (--data-dir)" in out
    assert f"device {device}, bf16 autocast, gradient checkpointing" in out
    assert grid_labels == ["a zjw dog (seed 42)", "a zjw dog (seed 43)"]  # validation.png labels its seeds
    assert Image.open(run_dir / "validation.png").size[0] == 2 * 64


# ---------------------------------------------------------------------------------------------------------------
# Training numerics pinned down

def test_the_loss_compares_the_prediction_with_the_noise_at_a_ddpm_noised_latent():
    scheduler = DDPMScheduler.from_config(sdxl.build_tiny_pipeline().scheduler.config)
    assert scheduler.config.prediction_type == "epsilon"
    latents, seen = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)), {}

    def unet(noisy, timesteps, **conditioning):  # predicts zero: the loss is then |target|^2
        seen.update(noisy=noisy, timesteps=timesteps)
        return SimpleNamespace(sample=torch.zeros_like(noisy))
    losses = train_dreambooth.diffusion_losses(unet, scheduler, latents, None, None, None,
                                               torch.Generator().manual_seed(0), contextlib.nullcontext())
    replay = torch.Generator().manual_seed(0)  # the same draws: noise first, then the timesteps
    noise = torch.randn(latents.shape, generator=replay)
    timesteps = torch.randint(1000, (3,), generator=replay)
    abar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    assert torch.equal(seen["timesteps"], timesteps)
    assert torch.allclose(seen["noisy"], abar.sqrt() * latents + (1 - abar).sqrt() * noise, atol=1e-6)
    assert torch.allclose(losses, noise.pow(2).mean(dim=(1, 2, 3)))  # the target is the noise itself


def test_latents_are_shifted_then_scaled_and_gradients_are_clipped(dreambooth_dir, tmp_path, monkeypatch):
    load, encode, losses, step = (sdxl.load_pipeline, train_dreambooth.encode_images,
                                  train_dreambooth.diffusion_losses, torch.optim.AdamW.step)
    caches, latents_seen, norms = [], [], []

    def load_with_shift(*args, **kwargs):  # SDXL's VAE has no shift; give it one, so the order of the two shows
        pipe = load(*args, **kwargs)
        pipe.vae.register_to_config(shift_factor=0.25)
        return pipe

    def encode_without_noise(*args, **kwargs):  # std 0: every latent is exactly (mean - shift) * scale
        means, stds, ids = encode(*args, **kwargs)
        caches.append(means)
        return means, torch.zeros_like(stds), ids

    def record_latents(unet, scheduler, latents, *args):
        latents_seen.append(latents.cpu())
        return losses(unet, scheduler, latents, *args)

    def record_norm(optimizer, *args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return step(optimizer, *args, **kwargs)
    monkeypatch.setattr(sdxl, "load_pipeline", load_with_shift)
    monkeypatch.setattr(train_dreambooth, "encode_images", encode_without_noise)
    monkeypatch.setattr(train_dreambooth, "diffusion_losses", record_latents)
    monkeypatch.setattr(torch.optim.AdamW, "step", record_norm)
    train_dreambooth.main(tiny_argv(dreambooth_dir, tmp_path, "--steps", "2", "--max-grad-norm", "1e-3",
                                    "--validation-prompts", "0"))
    scale = sdxl.build_tiny_pipeline().vae.config.scaling_factor
    expected = (caches[0] - 0.25) * scale  # (5, 4, 8, 8): one per photo
    assert len(latents_seen) == 4 and all(
        min((seen[0] - e).abs().max() for e in expected) < 1e-6 for seen in latents_seen)
    assert len(norms) == 2 and all(abs(norm - 1e-3) < 1e-6 for norm in norms), norms  # clipped to --max-grad-norm


def test_prior_loss_weight_multiplies_the_class_prior_term(dreambooth_dir, tmp_path, monkeypatch):
    # The instance term is zeroed here, so the gradient is prior_loss_weight * d(class-prior MSE) / grad_accum: the
    # same micro-batches (the weight changes no random draw) with weight 2 give 4 times the gradient of weight 0.5.
    losses, clip, norms = train_dreambooth.diffusion_losses, torch.nn.utils.clip_grad_norm_, {}

    def prior_term_only(*args):
        return losses(*args) * torch.tensor([0.0, 1.0])  # rows: the instance image, then the class image

    def record_norm(params, *args, **kwargs):
        params = list(params)
        norms.setdefault(weight, []).append(float(torch.stack([p.grad.norm() for p in params]).norm()))
        return clip(params, *args, **kwargs)
    monkeypatch.setattr(train_dreambooth, "diffusion_losses", prior_term_only)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record_norm)
    for weight in ("0.5", "2"):  # one output folder: the class image is generated once
        train_dreambooth.main(tiny_argv(dreambooth_dir, tmp_path, "--steps", "1", "--grad-accum", "1",
                                        "--prior-preservation", "--class-images", "1", "--prior-loss-weight", weight,
                                        "--max-grad-norm", "1e9", "--validation-prompts", "0"))
    assert norms["0.5"][0] > 0 and norms["2"][0] / norms["0.5"][0] == pytest.approx(4, rel=1e-5), norms


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
    pixels, ids = sdxl.crop_image(image, 64, torch.Generator().manual_seed(0))
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


def test_the_authors_text_conditioning_is_encoder_1s_last_state_after_its_final_layer_norm():
    """conditioning="authors" (--text-conditioning authors) is what the authors' training feeds the UNet, computed
    here by hand from the tiny encoders: encoder 1's last hidden state after its final layer norm, then encoder 2's
    penultimate state; the pooled embedding is encoder 2's text_embeds either way."""
    pipe = sdxl.build_tiny_pipeline()
    prompts = ["a zjw dog", "a dog"]
    ids_1, ids_2 = (tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids for tokenizer in (pipe.tokenizer, pipe.tokenizer_2))
    with torch.no_grad():
        states_1 = pipe.text_encoder(ids_1, output_hidden_states=True).hidden_states
        out_2 = pipe.text_encoder_2(ids_2, output_hidden_states=True)
        final_norm = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm  # (transformers 4
        last_1 = final_norm(states_1[-1])  # after the last layer, its final layer norm             nests text_model)
    embeds, pooled = sdxl.encode_prompt(pipe, prompts, conditioning="authors")
    assert embeds.shape == (2, 77, 64) and pooled.shape == (2, 32)
    torch.testing.assert_close(embeds, torch.cat([last_1, out_2.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(pooled, out_2.text_embeds)
    pipeline_embeds, pipeline_pooled = sdxl.encode_prompt(pipe, prompts)  # the default: the pipeline's, as sampled
    torch.testing.assert_close(pipeline_embeds, torch.cat([states_1[-2], out_2.hidden_states[-2]], dim=-1))
    assert torch.equal(pipeline_embeds[..., 32:], embeds[..., 32:]) and torch.equal(pipeline_pooled, pooled)
    assert (pipeline_embeds[..., :32] - embeds[..., :32]).abs().mean() > 0.1  # encoder 1's part differs
    with pytest.raises(ValueError, match="conditioning 'last': must be one of pipeline, authors"):
        sdxl.encode_prompt(pipe, prompts, conditioning="last")


def test_text_conditioning_authors_trains_on_it_and_is_recorded_and_kept_on_resume(dreambooth_dir, tmp_path,
                                                                                     monkeypatch):
    used, encode_prompt = [], sdxl.encode_prompt

    def recording(pipe, prompts, conditioning="pipeline"):
        used.append(conditioning)
        return encode_prompt(pipe, prompts, conditioning)
    monkeypatch.setattr(sdxl, "encode_prompt", recording)
    argv = tiny_argv(dreambooth_dir, tmp_path, "--steps", "1", "--validation-prompts", "0")
    run_dir = train_dreambooth.main(argv + ["--text-conditioning", "authors"])
    assert used == ["authors"]  # training's conditioning (sampling keeps StableDiffusionXLPipeline's own)
    assert "-cond-authors-" in run_dir.name  # it changes the result, so it names the run
    assert json.loads((run_dir / "config.json").read_text())["text_conditioning"] == "authors"
    assert waveft.read_metadata(run_dir / "adapter.safetensors")["training"]["text_conditioning"] == "authors"
    before = snapshot(run_dir)
    for other in ([], ["--text-conditioning", "pipeline"]):  # the default (pipeline) is another run
        with pytest.raises(ValueError, match=re.escape("trained with other options: text_conditioning (authors -> "
                                                       "pipeline)")):
            train_dreambooth.main(argv + other + ["--run-name", run_dir.name, "--resume", "--steps", "2"])
    assert snapshot(run_dir) == before
    with pytest.raises(ValueError, match=re.escape("--text-conditioning last: must be one of pipeline, authors")):
        train_dreambooth.parse_options(["--subject", "dog6", "--text-conditioning", "last"])
    assert train_dreambooth.run_name(train_dreambooth.parse_options(["--subject", "dog6"])) == "dog6-waveft-k2592"


def test_each_of_the_30_subjects_gets_the_prompt_list_of_its_kind(dreambooth_dir):
    live = {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}  # the dataset's 9 live subjects
    classes = sdxl.read_classes(dreambooth_dir)
    assert len(classes) == 30 and live <= classes.keys()
    for subject, class_name in classes.items():
        prompts = sdxl.prompts_for(dreambooth_dir, subject)
        assert len(prompts) == 25 and prompts[0] == f"a zjw {class_name} in the jungle"
        assert (f"a zjw {class_name} wearing a santa hat" in prompts) == (subject in live), subject
        assert (f"a zjw {class_name} on top of a mirror" in prompts) == (subject not in live), subject


def test_resizing_keeps_the_aspect_ratio():
    assert sdxl.resize_shorter_side(Image.new("RGB", (300, 200)), 64).size == (96, 64)
    assert sdxl.resize_shorter_side(Image.new("RGB", (200, 300)), 64).size == (64, 96)
    assert sdxl.resize_shorter_side(Image.new("RGB", (1000, 999)), 64).size == (64, 64)  # never below the crop


def test_the_dataset_is_found_where_a_newcomer_puts_it(dreambooth_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DREAMBOOTH_DIR", raising=False)
    with pytest.raises(FileNotFoundError) as error:
        sdxl.find_data_dir()
    assert "looked in dataset, dreambooth/dataset, ../shared/dreambooth" in str(error.value)
    assert "git clone https://github.com/google/dreambooth" in str(error.value)
    assert "sdxl.find_data_dir(data_dir)" in str(error.value) and "--data-dir" in str(error.value)  # both callers
    with pytest.raises(FileNotFoundError) as error:
        sdxl.read_classes("dreambooth/dataset")  # the Python API speaks to a Python caller too
    assert 'data_dir="dreambooth/dataset"' in str(error.value) and "--data-dir dreambooth/dataset on the " \
        "command line" in str(error.value)
    (tmp_path / "dreambooth").mkdir()
    (tmp_path / "dreambooth" / "dataset").symlink_to(dreambooth_dir)  # where `git clone` puts it
    assert sdxl.find_data_dir() == (Path("dreambooth/dataset"), "./dreambooth/dataset")
    monkeypatch.setenv("DREAMBOOTH_DIR", str(dreambooth_dir))
    assert sdxl.find_data_dir() == (dreambooth_dir, "$DREAMBOOTH_DIR")  # the variable comes first
    assert sdxl.find_data_dir(str(dreambooth_dir)) == (dreambooth_dir, "--data-dir")  # and --data-dir before it
    with pytest.raises(FileNotFoundError, match="nowhere has no prompts_and_classes.txt"):
        sdxl.find_data_dir("nowhere")  # a --data-dir that is not the dataset is an error, not skipped
    monkeypatch.setenv("DREAMBOOTH_DIR", str(tmp_path / "gone"))
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"looked in .*gone \(\$DREAMBOOTH_DIR\), dataset"):
        sdxl.find_data_dir()


def test_generation_follows_the_authors_protocol(device, monkeypatch):
    from diffusers import DPMSolverMultistepScheduler
    pipe = sdxl.build_tiny_pipeline().to(device)
    # diffusers imports the schedulers it swaps between lazily, and their annotations read torch.Generator: import
    # them now, before torch.Generator is patched (run alone, this test otherwise fails inside diffusers)
    DPMSolverMultistepScheduler.from_config(pipe.scheduler.config).compatibles
    calls, generator, generator_devices = [], torch.Generator, []

    def make_generator(*args, **kwargs):  # the device each generator is asked for (None: not given)
        generator_devices.append(torch.device(*args, **kwargs) if args or kwargs else None)
        return generator(*args, **kwargs)
    monkeypatch.setattr(torch, "Generator", make_generator)

    def record(self, **kwargs):  # no sampling: the arguments are the point
        calls.append(dict(kwargs, scheduler=self.scheduler))
        return SimpleNamespace(images=[Image.new("RGB", (8, 8))] * len(kwargs["prompt"]))
    monkeypatch.setattr(type(pipe), "__call__", record)
    images = sdxl.generate(pipe, ["a zjw dog", "a zjw dog on the beach"])
    assert len(images) == 8 and len(calls) == 2  # one call per prompt, its four seeds batched
    negative = ("low quality, bad anatomy, worst quality, low res, blurry, distorted, deformed, ugly, duplicate, "
                "morbid, mutilated, mutation, disfigured, poorly drawn face, bad proportions")  # the authors' string
    for call in calls:
        assert call["negative_prompt"] == [negative] * 4
        assert (call["num_inference_steps"], call["guidance_scale"], call["height"], call["width"]) == (30, 7.5, 1024,
                                                                                                        1024)
        assert [g.initial_seed() for g in call["generator"]] == [42, 43, 44, 45]
        assert all(g.device.type == device.type for g in call["generator"])  # made on the pipeline's device
        scheduler = call["scheduler"]
        assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
        assert (scheduler.config.algorithm_type, scheduler.config.solver_order) == ("dpmsolver++", 2)
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"  # swapped back
    assert generator_devices == [pipe.unet.device] * 8  # asked for explicitly (on the CPU it is the default too)


def test_save_merged_writes_the_unet_with_the_adapter_folded_in(tiny_run_dir):
    """--save-merged: <run>/merged_unet is a plain diffusers UNet (float32, as the base loads) whose adapted weights
    are W + delta_weight() of the run's adapter, and whose other weights are the base model's."""
    from diffusers import UNet2DConditionModel
    merged = UNet2DConditionModel.from_pretrained(tiny_run_dir / "merged_unet").state_dict()
    base = sdxl.load_pipeline("tiny").unet
    expected = dict(base.state_dict())
    waveft.load(base, tiny_run_dir / "adapter.safetensors")
    layers = waveft.adapted_layers(base)
    assert any(m.waveft_spectrum.abs().max() > 0 for _, m in layers)  # the run trained something to fold in
    for name, layer in layers:
        expected[f"{name}.weight"] = layer.base.weight.detach() + layer.delta_weight().detach()
    assert merged.keys() == expected.keys() and all(v.dtype == torch.float32 for v in merged.values())
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6, msg=key)


def test_save_merged_after_a_bf16_run_folds_the_adapter_into_the_float32_base(dreambooth_dir, tmp_path, monkeypatch,
                                                                               device):
    """Training casts the frozen UNet to bf16; merged_unet/ must still be W + dW of the float32 base (W not rounded
    to bf16), exactly what sdxl.export_merged makes from the run's adapter, built on the CPU from the UNet alone:
    every tensor of the merged UNet is on the CPU, never on the training device (a float32 SDXL UNet is 10.3 GB
    more on a GPU that holds the training UNet). With WAVEFT_TEST_DEVICE=cuda the run trains on the GPU."""
    save, merged_from, pipelines = interop.save_merged_unet, [], []
    load_pipeline = sdxl.load_pipeline

    def record(unet, *args, **kwargs):
        layer = waveft.adapted_layers(unet)[0][1]
        devices = {t.device.type for t in [*unet.parameters(), *unet.buffers()]}
        merged_from.append((layer.base.weight.dtype, devices))
        return save(unet, *args, **kwargs)
    monkeypatch.setattr(interop, "save_merged_unet", record)
    monkeypatch.setattr(sdxl, "load_pipeline", lambda *args, **kwargs: pipelines.append(1) or load_pipeline(*args,
                                                                                                           **kwargs))
    run_dir = train_dreambooth.main(tiny_argv(dreambooth_dir, tmp_path, "--steps", "1", "--mixed-precision", "bf16",
                                              "--save-merged", "--validation-prompts", "0", "--device", str(device)))
    merged = safetensors.torch.load_file(run_dir / "merged_unet" / "diffusion_pytorch_model.safetensors")
    interop.export_merged(run_dir, overwrite=True)
    exported = safetensors.torch.load_file(run_dir / "merged_unet" / "diffusion_pytorch_model.safetensors")
    assert merged.keys() == exported.keys()
    for key, value in exported.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6, msg=lambda text: f"{key}: {text}")
    assert merged_from[0] == (torch.float32, {"cpu"}) and len(pipelines) == 1  # the training pipeline only


def test_fast_false_trains_through_the_definition_to_the_same_adapter(tmp_path, dreambooth_dir):
    """--fast false: every layer's forward is F.linear(x, W + delta_weight(), b); 2 steps end at the same adapter as
    the fast path, up to float rounding (the folder name does not change: the result is the same)."""
    common = ["--subject", "dog6", "--k", "300", "--model", "tiny", "--data-dir", str(dreambooth_dir), "--steps", "2",
              "--validation-prompts", "0", "--lr", "1e-2"]
    fast = train_dreambooth.main(common + ["--output-dir", str(tmp_path / "fast")])
    slow = train_dreambooth.main(common + ["--output-dir", str(tmp_path / "slow"), "--fast", "false"])
    assert fast.name == slow.name
    assert json.loads((slow / "config.json").read_text())["fast"] is False
    a, b = (safetensors.torch.load_file(run / "adapter.safetensors") for run in (fast, slow))
    assert a.keys() == b.keys()
    spectra = [key for key in a if key.endswith("waveft_spectrum")]
    assert max(float(a[key].abs().max()) for key in spectra) > 1e-3  # it moved
    for key in spectra:  # Adam's step is ~lr for every coefficient, so float rounding in a tiny gradient shows as
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)  # ~1e-6 here: 1e-3 of the 2e-2 moved


@pytest.mark.parametrize("method", ["lora", "fourierft", "vera"])
def test_fast_false_warns_that_it_has_no_effect_without_waveft(method, capsys, request):
    """--fast chooses between WaveFT's fast path and its definition; the other methods have only their definition,
    so --fast false given with them draws the one-line warning of an option without effect (and nothing else)."""
    if method == "vera":
        request.getfixturevalue("peft")  # PEFT's methods need peft (skipped without it, failed under CI)
    train_dreambooth.parse_options(["--subject", "x", "--method", method, "--fast", "false"])
    assert f"warning: --fast has no effect with --method {method}\n" in capsys.readouterr().err
    train_dreambooth.parse_options(["--subject", "x", "--fast", "false"])  # WaveFT: it has an effect
    assert "--fast" not in capsys.readouterr().err
