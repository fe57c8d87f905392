"""Data-parallel training under torchrun equals the single-process run (2 gloo ranks on the CPU, tiny SDXL).

The single-process reference runs in-process; the 2-rank run is `python -m torch.distributed.run --standalone
--nproc-per-node 2 train_dreambooth.py ...` as a user would start it (--standalone: a free port, so parallel test
runs do not collide).
"""
import csv
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_dreambooth
from conftest import REPO, run_folder


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: see conftest.single_thread


def read_losses(run_dir):
    return [(float(row["loss"]), float(row["prior_loss"])) for row in csv.DictReader(open(run_dir / "loss.csv"))]


def test_two_ranks_resume_and_equal_one_process(dreambooth_dir, tmp_path, monkeypatch):
    # 5 photos, grad_accum 4, --batching epoch: steps of 4, 1, 4 micro-batches. In the 1-photo step rank 1 has
    # nothing to compute and must still take part (zeros) in the all-reduce. The torchrun run also resumes: step 1
    # is trained by one process and cut (Ctrl-C), then 2 ranks load its checkpoint (mid-pass) and train steps 2-3.
    argv = ["--subject", "dog6", "--model", "tiny", "--data-dir", str(dreambooth_dir), "--resolution", "64",
            "--k", "500", "--validation-prompts", "1", "--sample-steps", "1", "--steps", "3", "--grad-accum", "4"]
    single = run_folder(train_dreambooth.main(argv + ["--output-dir", str(tmp_path / "one")]).parent,
                        "adapter.safetensors")

    clip = torch.nn.utils.clip_grad_norm_

    def clip_then_interrupt(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C in step 1: it finishes, is checkpointed, exit 130
        return clip(*args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_interrupt)
    with pytest.raises(SystemExit):
        train_dreambooth.main(argv + ["--output-dir", str(tmp_path / "two")])
    monkeypatch.undo()

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "train_dreambooth.py"), *argv, "--output-dir", str(tmp_path / "two"), "--resume"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("trainable parameters") == 1  # only rank 0 prints
    assert result.stdout.count("dataset: ") == 1  # the first line too
    two = run_folder(tmp_path / "two", "adapter.safetensors")

    a, b = load_file(single / "adapter.safetensors"), load_file(two / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a if name.endswith("positions"))
    trained = [name for name in a if a[name].is_floating_point()]  # the spectra (the positions are integers)
    difference = sum(float((a[name] - b[name]).pow(2).sum()) for name in trained) ** 0.5
    norm = sum(float(a[name].pow(2).sum()) for name in trained) ** 0.5
    assert norm > 0 and difference <= 1e-5 * norm, (difference, norm)  # equal up to float summation order
    losses_one, losses_two = read_losses(single), read_losses(two)
    assert len(losses_one) == len(losses_two) == 3
    assert all(abs(x - y) <= 1e-6 for row_one, row_two in zip(losses_one, losses_two)
               for x, y in zip(row_one, row_two)), (losses_one, losses_two)  # to loss.csv's printed precision
    state_one = torch.load(single / "checkpoint.pt", weights_only=True)
    state_two = torch.load(two / "checkpoint.pt", weights_only=True)
    assert state_two["step"] == 3 and torch.equal(state_one["generator"], state_two["generator"])
    assert torch.equal(state_one["passes"]["instance"]["order"], state_two["passes"]["instance"]["order"])
