"""Shared pytest fixtures: the DreamBooth dataset, a tiny SDXL pipeline on disk, one short tiny training run and the
same run on a folder of photos (`photos_run`); `need`, how a test asks for a development requirement (the `pywt` and
`peft` fixtures); and the helpers more than one test file uses (a tiny UNet and its inputs, random adapter values, a
tiny training command line, adapter comparisons)."""
import importlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests import the top-level modules (sdxl, waveft, ...) from any working directory


def need(module_name):
    """Import a development requirement (requirements-dev.txt: PyWavelets as `pywt`, peft) for the test that asks.

    Missing, it skips only that test: the rest of the suite (dwt.py and waveft.py themselves) needs neither. Where the
    environment variable CI is set (non-empty, not "0" or "false"; .ci/run sets CI=1) it fails the test instead: CI
    installs requirements-dev.txt, and a reference that silently went missing would leave tests unrun while the
    suite still passes."""
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        error = err  # reported below, outside this block: pytest would print the ImportError's chain too
    ci = os.environ.get("CI", "")
    if ci.lower() not in ("", "0", "false"):
        pytest.fail(f"{module_name} is not installed and CI={ci!r}: pip install -r requirements-dev.txt ({error})",
                    pytrace=False)
    pytest.skip(f"{module_name} is not installed (pip install -r requirements-dev.txt): {error}")


@pytest.fixture
def pywt():
    """PyWavelets, the reference dwt.py is tested against (see `need`)."""
    return need("pywt")


@pytest.fixture
def peft():
    """peft, the reference waveft.py is tested against (see `need`)."""
    return need("peft")


@pytest.fixture(scope="session")
def dreambooth_dir():
    """The google/dreambooth `dataset` folder: $DREAMBOOTH_DIR, else ../shared/dreambooth beside the checkout."""
    path = Path(os.environ.get("DREAMBOOTH_DIR", REPO.parent / "shared" / "dreambooth"))
    if not (path / "prompts_and_classes.txt").is_file():
        pytest.fail(f"DreamBooth dataset not found at {path}: set DREAMBOOTH_DIR or place it at ../shared/dreambooth")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny SDXL pipeline saved in the diffusers layout, loadable with from_pretrained(dir)."""
    import sdxl
    path = tmp_path_factory.mktemp("tiny_sdxl")
    sdxl.build_tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_fp16_model_dir(tmp_path_factory):
    """The tiny SDXL pipeline saved as its fp16 weight files only (float16 weights in *.fp16.safetensors), as the
    usual SDXL download that halves the disk holds it; it loads with from_pretrained(dir, variant="fp16")."""
    import torch
    import sdxl
    path = tmp_path_factory.mktemp("tiny_sdxl_fp16")
    sdxl.build_tiny_pipeline().to(dtype=torch.float16).save_pretrained(path, variant="fp16")
    return path


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory, dreambooth_dir):
    """Output folder of one short real `train_dreambooth.py --model tiny` run on dog6 (4 steps at 64 px), run as a
    subprocess exactly as a user would. Its console output is kept next to it in train.log."""
    import subprocess
    out = tmp_path_factory.mktemp("tiny_run")
    argv = [sys.executable, str(REPO / "train_dreambooth.py"), "--subject", "dog6", "--k", "2000", "--model", "tiny",
            "--data-dir", os.path.relpath(dreambooth_dir, out), "--output-dir", ".", "--resolution", "64",
            "--steps", "4", "--grad-accum", "2", "--checkpoint-every", "2", "--sample-steps", "2", "--save-merged"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: one thread is faster on a shared 2-core machine
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=out)  # relative paths
    (out / "train.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    return out / "dog6-waveft-k2000-tiny-steps4-ga2"  # every option that differs from the defaults names the run


@pytest.fixture(scope="session")
def photos_run(tmp_path_factory, dreambooth_dir):
    """A run on your own photos, `train_dreambooth.py --images my_dog --class-name dog`: my_dog/ holds copies of
    dog6's photos (the same names, so the same order; plus a macOS `._` file, which is no photo) and the run has
    tiny_run_dir's options, in-process, while every look for the DreamBooth dataset fails (it needs none). Its
    validation grid (1 sampler step) records the prompts it was made of. Returns (run folder, photos, prompts)."""
    import shutil
    from types import SimpleNamespace
    import sdxl
    import train_dreambooth
    tmp = tmp_path_factory.mktemp("photos_run")
    photos = tmp / "my_dog"
    photos.mkdir()
    for path in sdxl.instance_images(dreambooth_dir, "dog6"):
        shutil.copy(path, photos)
    (photos / "._00.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # what a Mac leaves beside 00.jpg on a stick
    grid_prompts, generate = [], sdxl.generate

    def no_dataset(*args, **kwargs):
        raise AssertionError("a run on --images looked for the DreamBooth dataset")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sdxl, "find_data_dir", no_dataset)
        patch.setattr(sdxl, "_check_data_dir", no_dataset)
        patch.setattr(sdxl, "generate", lambda pipe, prompts, **kw: grid_prompts.append(prompts) or
                      generate(pipe, prompts, **kw))
        run_dir = train_dreambooth.main([
            "--images", str(photos), "--class-name", "dog", "--k", "2000", "--model", "tiny", "--output-dir",
            str(tmp / "outputs"), "--resolution", "64", "--steps", "4", "--grad-accum", "2", "--sample-steps", "1"])
    return SimpleNamespace(dir=run_dir, photos=photos, grid_prompts=grid_prompts)


@pytest.fixture(scope="session")
def device():
    """Where the device-dependent tests run: $WAVEFT_TEST_DEVICE (e.g. cuda), default cpu."""
    import torch
    name = os.environ.get("WAVEFT_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"WAVEFT_TEST_DEVICE={name} but torch.cuda.is_available() is False")
    return torch.device(name)


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("single_thread")`): a second intra-op
    thread only adds overhead there, and on a shared 2-core machine a parallel region waiting for a descheduled
    thread is many times slower. One thread also fixes the summation order (bit-exact resume comparisons)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by several test files (`from conftest import ...`)

def tiny_unet():
    """A 2-level SDXL-architecture UNet (text_time conditioning), random weights, no download.
    Its 32 attention projections are 64 x 64 and, for cross-attention to_k/to_v, 64 x 32."""
    import torch
    from diffusers import UNet2DConditionModel  # here: tests without a UNet do not wait seconds for diffusers
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, transformer_layers_per_block=1, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        use_linear_projection=True).eval()


@pytest.fixture(scope="module")
def unet_inputs():
    """A batch of 2 inputs for tiny_unet()."""
    import torch
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g),
                                   "time_ids": torch.randn(2, 6, generator=g)})


def run(unet, inputs):
    """The UNet's output for `inputs`, without gradients."""
    import torch
    with torch.no_grad():
        return unet(**inputs).sample


def randomize(model, std=0.01, seed=0):
    """Random adapter values (ours or PEFT's: every WaveFT and FourierFT spectrum and LoRA A/B, in module order, each
    in its own dtype), so that every adapted layer visibly changes the output."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "waveft_spectrum" in name or "fourierft_spectrum" in name or "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def tiny_argv(data_dir, out, *extra):
    """train_dreambooth.py's command line for a short run of the tiny SDXL on dog6 at 64 px; `extra` comes last, so
    its options override these."""
    return ["--subject", "dog6", "--model", "tiny", "--data-dir", str(data_dir), "--output-dir", str(out),
            "--resolution", "64", "--grad-accum", "2", "--validation-prompts", "1", "--sample-steps", "1", *extra]


def run_folder(out, file="adapter.safetensors"):
    """The run folder inside a fresh output dir, whatever the run-naming scheme calls it."""
    import glob
    found = glob.glob(str(Path(out) / "*" / file))
    assert len(found) == 1, found
    return Path(found[0]).parent


def adapter_tensors(run_dir):
    """{name: tensor} of a run's adapter.safetensors."""
    import safetensors.torch
    return safetensors.torch.load_file(run_dir / "adapter.safetensors")


def tensors_equal(a, b):
    """Two {name: tensor} with the same names and bit-identical tensors."""
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
