"""The authors' other baselines through peft (peft_methods.py): VeRA, LoHa, LoKr and AdaLoRA in train_dreambooth's
loop on the tiny SDXL. Each trains at the authors' settings, resumes bit for bit, writes PEFT's format (which
PeftModel.from_pretrained loads), is scored by evaluate.py and drawn by sample.py with its adapter merged and the
weights restored exactly; AdaLoRA's rank allocation runs as PEFT prescribes and survives a resume; without peft the
methods are refused in one line. The four 2-step runs are made once (`full_runs`) and shared.
"""
import copy
import json
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

import eval_images
import evaluate
import peft_methods
import runs
import sample
import sdxl
import train_dreambooth
import waveft
from conftest import need, tiny_argv

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: see conftest.single_thread
METHODS = peft_methods.METHODS


def argv(dreambooth_dir, out, method, *extra):
    return tiny_argv(dreambooth_dir, out, "--method", method, "--steps", "2", "--grad-accum", "1",
                     "--checkpoint-every", "1", "--validation-prompts", "0", *extra)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, dreambooth_dir, single_thread):
    """One uninterrupted 2-step run per method, at the authors' settings. Kept besides: each run's checkpoint after
    step 1 (checkpoint-1.pt: what an interruption after step 1 leaves) and, for AdaLoRA, the global step of each
    update_and_allocate call."""
    peft = need("peft")
    out, allocations = tmp_path_factory.mktemp("peft_runs"), []
    update_and_allocate, save_checkpoint = peft.AdaLoraModel.update_and_allocate, runs.save_checkpoint

    def keep_step_1(path, step, *args):
        save_checkpoint(path, step, *args)
        if step == 1:
            shutil.copy(path, path.with_name("checkpoint-1.pt"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(peft.AdaLoraModel, "update_and_allocate",
                      lambda self, step: allocations.append(step) or update_and_allocate(self, step))
        patch.setattr(runs, "save_checkpoint", keep_step_1)
        dirs = {method: train_dreambooth.main(argv(dreambooth_dir, out, method)) for method in METHODS}
    return SimpleNamespace(out=out, dirs=dirs, allocations=allocations)


def peft_files(run_dir):
    return {path.name: path.read_bytes() for path in sorted((run_dir / peft_methods.RUN_ADAPTER).iterdir())}


def test_each_method_trains_at_the_authors_settings_and_writes_peft_format(full_runs):
    for method, run_dir in full_runs.dirs.items():
        authors = peft_methods.AUTHORS[method]
        assert run_dir.name == f"dog6-{method}-r{authors['rank']}-tiny-steps2-ga1"  # the authors' values: unnamed
        config = json.loads((run_dir / "config.json").read_text())
        assert config["setting"] == f"{method}-r{authors['rank']}-tiny-steps2-ga1"  # its row of the comparison
        assert config["lr"] == (3.2e-3 if method == "vera" else 1e-4)
        assert (config["alpha"], config["target_rank"]) == (authors.get("alpha"), authors.get("target_rank"))
        assert not (run_dir / "adapter.safetensors").exists()
        saved = json.loads((run_dir / "peft_adapter" / "adapter_config.json").read_text())
        assert saved["peft_type"] == method.upper() and saved["base_model_name_or_path"] == "tiny"
        assert sorted(saved["target_modules"]) == sorted(waveft.DEFAULT_TARGETS) and saved["inference_mode"]
        assert saved["init_r" if method == "adalora" else "r"] == authors["rank"]
        losses = [float(line.split(",")[1]) for line in (run_dir / "loss.csv").read_text().splitlines()[1:]]
        assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    # PeftModel.from_pretrained loads each folder: test_the_pipeline_merges_each_adapter_...


@pytest.mark.parametrize("method", METHODS)
def test_resumed_after_step_1_equals_uninterrupted_bit_for_bit(method, full_runs, dreambooth_dir, tmp_path):
    # The run as an interruption after step 1 leaves it (Ctrl-C, tests/test_train.py): the checkpoint of step 1,
    # loss.csv up to it, no final files. --resume runs step 2 and writes them.
    full_dir = full_runs.dirs[method]
    cut_dir = tmp_path / full_dir.name
    cut_dir.mkdir()
    for name in ("config.json", "loss.csv"):
        shutil.copy(full_dir / name, cut_dir)
    shutil.copy(full_dir / "checkpoint-1.pt", cut_dir / "checkpoint.pt")
    (cut_dir / "loss.csv").write_text("".join((full_dir / "loss.csv").read_text().splitlines(True)[:2]))
    assert train_dreambooth.main(argv(dreambooth_dir, tmp_path, method, "--resume")) == cut_dir
    assert peft_files(cut_dir) == peft_files(full_dir)  # the adapter (AdaLoRA's: cut to the same triplets)
    assert (cut_dir / "loss.csv").read_bytes() == (full_dir / "loss.csv").read_bytes()


def test_adalora_allocates_ranks_each_step_as_peft_prescribes_and_keeps_steps_on_resume(full_runs, dreambooth_dir,
                                                                                        tmp_path):
    # update_and_allocate(global step) after every optimizer step, counted from 0 as in PEFT's example; the budget
    # falls from init_r = 2 to target_r = 1 per layer over total_step = --steps = 2 (PEFT's cubic schedule; no pruning
    # at step 0): after step 1, int((init - target) (1 - 1/2)^3 + target) triplets of the tiny UNet's 2 x 64 are left.
    assert full_runs.allocations == [0, 1]
    run_dir = full_runs.dirs["adalora"]
    tensors = safetensors.torch.load_file(run_dir / "peft_adapter" / "adapter_model.safetensors")
    layers = 64
    survivors = sum(t.shape[0] for key, t in tensors.items() if key.endswith("lora_E"))
    assert survivors == int((2 * layers - layers) * (1 - 1 / 2) ** 3 + layers) == 72
    pattern = json.loads((run_dir / "peft_adapter" / "adapter_config.json").read_text())["rank_pattern"]
    assert sum(map(sum, pattern.values())) == survivors and len(pattern) == layers
    assert runs.count_trainable(run_dir / "peft_adapter") == survivors * (64 + 64 + 1)  # tiny: 64 x 64 layers

    # --steps is total_step: a resume that changes it is refused in one line and changes no file
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    before = {path.name: path.read_bytes() for path in copy.rglob("*") if path.is_file()}
    with pytest.raises(ValueError) as error:
        train_dreambooth.main(argv(dreambooth_dir, tmp_path, "adalora", "--resume", "--steps", "5",
                                   "--run-name", run_dir.name))
    assert str(error.value) == ("--resume: AdaLoRA's rank schedule spans the run's --steps 2 (its total_step), so it "
                                "cannot change to 5: resume with --steps 2")
    assert {path.name: path.read_bytes() for path in copy.rglob("*") if path.is_file()} == before


def test_evaluate_scores_each_method_in_a_row_of_its_own_and_reads_a_bare_peft_folder(full_runs, tmp_path):
    metrics = evaluate.main(["--runs", *map(str, full_runs.dirs.values()), "--max-prompts", "1",
                             "--images-per-prompt", "1", "--steps", "2", "--resolution", "64", "--dino", "tiny",
                             "--clip", "tiny", "--cmmd-clip", "tiny", "--output-dir", str(tmp_path / "eval")])
    rows = {m["setting"]: (m["method"], m["budget"], m["trainable_params"], m["n_images"]) for m in metrics}
    lokr, adalora = (runs.count_trainable(full_runs.dirs[m] / "peft_adapter") for m in ("lokr", "adalora"))
    assert rows == {"vera-r1402-tiny-steps2-ga1": ("vera", "r=1402", 64 * 1402 + 64 * 64, 1),  # d, b per layer
                    "loha-r1-tiny-steps2-ga1": ("loha", "r=1", 64 * 2 * (64 + 64), 1),  # 2 r (in + out) per layer
                    "lokr-r20-tiny-steps2-ga1": ("lokr", "r=20", lokr, 1),
                    "adalora-r2-tiny-steps2-ga1": ("adalora", "r=2->1", adalora, 1)}
    assert len((tmp_path / "eval" / "comparison.md").read_text().splitlines()) == 2 + 4

    # a PEFT folder as the authors' script saves one (no subject, no run config): read with --subject, its own row
    bare = tmp_path / "authors_loha"
    shutil.copytree(full_runs.dirs["loha"] / "peft_adapter", bare)
    [run] = runs.read_runs(evaluate.parse_args(["--runs", str(bare), "--subject", "dog6"]))
    assert (run.setting, run.adapter, run.config["model"]) == ("peft loha r=1", bare, "tiny")
    assert runs.method_and_budget(run.config) == ("loha", "r=1")


def test_the_pipeline_merges_each_adapter_and_puts_every_weight_back_bit_exactly(full_runs, tiny_run_dir, tmp_path):
    """One pipeline serves run after run (eval_images.adapted_pipeline): each PEFT adapter merged by peft and its
    layers taken out (a plain UNet, W + dW), kept as dense copies (every entry of a changed layer changes); before
    the next adapter every weight is put back bit for bit. Each state equals that of a fresh UNet given the same
    adapter by PEFT's own loader (PeftModel.from_pretrained: the run's folder is PEFT's format) and merged, and
    differs from the base model's: the adapter trained."""
    peft = need("peft")
    pipelines, base_unet = {}, sdxl.load_unet("tiny")
    base = base_unet.state_dict()
    adapters = [full_runs.dirs[method] / "peft_adapter" for method in METHODS]
    for adapter in adapters + [tiny_run_dir / "adapter.safetensors", adapters[0]]:  # then WaveFT, then VeRA again
        pipe = eval_images.adapted_pipeline(pipelines, "tiny", adapter, "cpu")
        fresh = copy.deepcopy(base_unet)
        if adapter.is_dir():
            assert not peft_methods.adapted_layers(pipe.unet)  # merged and taken out: sampling costs nothing extra
            with peft_methods.quiet_peft():
                expected = peft.PeftModel.from_pretrained(fresh, adapter).merge_and_unload().state_dict()
            assert not all(torch.equal(expected[name], base[name]) for name in base), adapter  # it trained
            [(_, kept)] = pipelines.values()
            assert len(kept) == 64
            for name, (where, _) in kept.items():  # dense unless the layer did not change (AdaLoRA pruned it)
                changed = not torch.equal(base[f"{name}.weight"], expected[f"{name}.weight"])
                assert (where is None) == changed, (adapter, name)
        else:
            waveft.load(fresh, adapter)
            waveft.merge(fresh)
            expected = fresh.state_dict()
        state = pipe.unet.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[name], expected[name]) for name in state), adapter

    # a folder that lacks a tensor of its layers is refused, by name, and leaves no layer of it behind
    broken = tmp_path / "broken"
    shutil.copytree(adapters[1], broken)
    tensors = safetensors.torch.load_file(broken / "adapter_model.safetensors")
    dropped = sorted(tensors)[0]
    safetensors.torch.save_file({key: t for key, t in tensors.items() if key != dropped},
                                broken / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"does not fit model 'tiny': .* missing \['" + re.escape(dropped)):
        eval_images.adapted_pipeline(pipelines, "tiny", broken, "cpu")
    assert not peft_methods.adapted_layers(pipe.unet)


def test_sample_draws_a_run_of_a_peft_method(full_runs, tmp_path):
    paths = sample.main(["--run", str(full_runs.dirs["lokr"]), "--prompts", "a {} on the beach", "--steps", "1",
                         "--images-per-prompt", "1", "--output-dir", str(tmp_path)])
    assert [path.relative_to(tmp_path).as_posix() for path in paths] == [
        "dog6-lokr-r20-tiny-steps2-ga1/00_a_zjw_dog_on_the_beach/seed42.png"]


def test_without_peft_each_method_is_refused_in_one_line_and_nothing_is_written(full_runs, dreambooth_dir,
                                                                                 tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` fails, as where it is not installed
    for method, name in peft_methods.NAMES.items():
        with pytest.raises(ValueError) as error:
            train_dreambooth.main(argv(dreambooth_dir, tmp_path / "out", method))
        assert str(error.value) == (f"--method {method} needs peft (these are PEFT's own {name} layers), which is "
                                    f"not installed here: pip install peft (or pip install -r requirements-dev.txt)")
    assert not (tmp_path / "out").exists()
    run_dir = full_runs.dirs["vera"]
    with pytest.raises(ValueError, match=rf"^run {run_dir} needs peft \(these are PEFT's own VeRA layers\)"):
        evaluate.main(["--runs", str(run_dir), "--output-dir", str(tmp_path / "eval")])
    with pytest.raises(ValueError, match=rf"^--run {run_dir} needs peft"):
        sample.main(["--run", str(run_dir), "--output-dir", str(tmp_path / "samples")])
    assert not (tmp_path / "eval").exists() and not (tmp_path / "samples").exists()
    for method in ("waveft", "lora"):  # need no peft
        assert train_dreambooth.parse_options(["--subject", "dog6", "--method", method]).method == method


def test_options_of_other_methods_warn_and_bad_values_are_one_line(dreambooth_dir, tmp_path, capsys):
    need("peft")
    parse = train_dreambooth.parse_options
    assert parse(["--subject", "dog6", "--method", "loha", "--k", "7"]).k == 7  # no effect: warned, not checked
    assert capsys.readouterr().err == "warning: --k has no effect with --method loha\n"
    parse(["--subject", "dog6", "--method", "lora", "--alpha", "3"])
    assert capsys.readouterr().err == "warning: --alpha has no effect with --method lora\n"
    for args, message in [(["--method", "adalora", "--target-rank", "3"],
                           "--target-rank 3: must be at most --rank 2 (AdaLoRA's init_r, from which it prunes)"),
                          (["--method", "loha", "--alpha", "0"], "--alpha 0.0: must be positive"),
                          (["--method", "vera", "--save-merged"], "--save-merged: not with --method vera; peft's "
                           "merge_and_unload() folds its adapter (<run>/peft_adapter) into the UNet")]:
        with pytest.raises(ValueError) as error:
            parse(["--subject", "dog6", *args])
        assert str(error.value) == message
