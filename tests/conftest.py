"""Shared pytest fixtures: the DreamBooth dataset, a tiny SDXL pipeline on disk, one short tiny training run."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests import the top-level modules (sdxl, waveft, ...) from any working directory


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
