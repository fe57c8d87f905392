"""Shared pytest fixtures: the DreamBooth dataset, a tiny SDXL pipeline on disk, one short tiny training run; and
`need`, how a test asks for a development requirement (the `pywt` and `peft` fixtures)."""
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
