"""sample.py: a trained adapter (a run folder, its adapter file, a PEFT folder) and prompts -> images, made by
sdxl.generate with the adapter merged, as evaluate.py makes its images; clear errors for what it cannot sample."""
import numpy as np
import pytest
from PIL import Image

import interop
import sample
import sdxl
import waveft

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: see conftest.single_thread


def test_sample_writes_the_images_sdxl_generate_makes_with_the_merged_adapter(tiny_run_dir, tmp_path, capsys):
    out = tmp_path / "samples"
    paths = sample.main(["--run", str(tiny_run_dir), "--prompts", "a {} on the beach", "a photo of a cat",
                         "--images-per-prompt", "2", "--seed", "7", "--steps", "2", "--guidance", "5",
                         "--negative-prompt", "", "--output-dir", str(out)])
    folder = out / tiny_run_dir.name
    assert paths == [folder / "00_a_zjw_dog_on_the_beach" / "seed7.png", folder / "00_a_zjw_dog_on_the_beach" /
                     "seed8.png", folder / "01_a_photo_of_a_cat" / "seed7.png", folder / "01_a_photo_of_a_cat" /
                     "seed8.png"]
    assert (paths[0].parent / "prompt.txt").read_text() == "a zjw dog on the beach\n"
    assert interop.read_image_folder(folder) == [  # evaluation's layout: evaluate.py --metrics-only reads it
        (i // 2, ["a zjw dog on the beach", "a photo of a cat"][i // 2], path) for i, path in enumerate(paths)]
    pipe = sdxl.load_pipeline("tiny")
    waveft.load(pipe.unet, tiny_run_dir / "adapter.safetensors")
    waveft.merge(pipe.unet)
    cfg = sdxl.GenerationConfig(num_inference_steps=2, guidance_scale=5, resolution=64, negative_prompt="")
    expected = sdxl.generate(pipe, ["a zjw dog on the beach", "a photo of a cat"], [7, 8], cfg)
    assert all(np.array_equal(np.asarray(Image.open(path)), np.asarray(image)) for path, image in zip(paths, expected))
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (f"{tiny_run_dir.name}: tiny with {tiny_run_dir / 'adapter.safetensors'}, 2 prompts x "
                          f"seeds 7..8, 2 steps, guidance 5, 64 px, on cpu")
    assert printed[1:] == [f"{folder / '00_a_zjw_dog_on_the_beach'}/seed7.png, seed8.png: 'a zjw dog on the beach'",
                           f"{folder / '01_a_photo_of_a_cat'}/seed7.png, seed8.png: 'a photo of a cat'"]


def test_sample_defaults_to_the_protocol_and_the_runs_own_prompt(tiny_run_dir, tmp_path, monkeypatch):
    """No prompt: the run's instance prompt; seeds 42..45, 30 steps, guidance 7.5, the authors' negative prompt;
    64 px for the tiny model (1024 otherwise). The adapter file alone is the same run."""
    calls = []
    monkeypatch.setattr(sdxl, "generate", lambda pipe, prompts, seeds, cfg: calls.append((prompts, seeds, cfg)) or
                        [Image.new("RGB", (cfg.resolution,) * 2)] * len(seeds))
    sample.main(["--run", str(tiny_run_dir / "adapter.safetensors"), "--output-dir", str(tmp_path)])
    assert calls == [(["a zjw dog"], [42, 43, 44, 45], sdxl.GenerationConfig(resolution=64))]
    assert sorted(p.name for p in (tmp_path / tiny_run_dir.name / "00_a_zjw_dog").iterdir()) == [
        "prompt.txt", "seed42.png", "seed43.png", "seed44.png", "seed45.png"]


def test_sample_refuses_what_it_cannot_sample_in_one_line(tiny_run_dir, tmp_path):
    def refused(*argv):
        with pytest.raises((ValueError, FileNotFoundError)) as error:
            sample.main(["--output-dir", str(tmp_path / "out"), "--steps", "1", *argv])
        return str(error.value)

    assert refused("--run", str(tmp_path / "nowhere")) == (
        f"--run {tmp_path / 'nowhere'}: not a run folder (no adapter.safetensors), an adapter file or a PEFT adapter "
        f"folder")
    assert refused("--run", str(tiny_run_dir), "--resolution", "100") == "--resolution 100: must be a multiple of 8"
    assert refused("--run", str(tiny_run_dir), "--images-per-prompt", "0") == "--images-per-prompt 0: must be positive"
    unet = sdxl.load_pipeline("tiny").unet
    waveft.load(unet, tiny_run_dir / "adapter.safetensors")
    peft_folder = tmp_path / "peft"
    interop.save_peft(unet, peft_folder)  # records no base model and no subject
    assert refused("--run", str(peft_folder), "--prompts", "a zjw dog") == (
        f"--run {peft_folder} is a PEFT adapter folder, which does not record its base model: pass --model")
    assert refused("--run", str(peft_folder), "--model", "tiny") == (
        f"--run {peft_folder} is a PEFT adapter folder, which records no prompt and no subject: pass --prompts "
        f"with the prompts written out (no {{}})")
    assert refused("--run", str(peft_folder), "--model", "tiny", "--prompts", "a {} dog") == refused(
        "--run", str(peft_folder), "--model", "tiny")
    assert not (tmp_path / "out").exists()
    [path] = sample.main(["--run", str(peft_folder), "--model", "tiny", "--prompts", "a zjw dog", "--images-per-prompt",
                          "1", "--steps", "1", "--output-dir", str(tmp_path / "out")])
    assert path == tmp_path / "out" / "peft" / "00_a_zjw_dog" / "seed42.png"


def test_sample_loads_the_weight_variant_it_is_given_or_the_runs_own(tiny_run_dir, tiny_fp16_model_dir, tmp_path):
    """--variant reaches the model's loading (a folder of fp16 files needs it, one line naming it otherwise); without
    it the run's own --variant (recorded in its adapter file) is used: the tiny run recorded none."""
    argv = ["--run", str(tiny_run_dir), "--model", str(tiny_fp16_model_dir), "--images-per-prompt", "1", "--steps",
            "1", "--resolution", "64", "--output-dir", str(tmp_path)]  # a folder: 1024 px unless told
    with pytest.raises(FileNotFoundError, match="pass --variant fp16$"):
        sample.main(argv)
    assert sample.recorded_variant(tiny_run_dir / "adapter.safetensors") is None
    assert [path.name for path in sample.main(argv + ["--variant", "fp16"])] == ["seed42.png"]
