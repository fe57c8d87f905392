"""evaluate.py: the metric maths on controlled inputs, model loading, the by-prompt layout, the comparison table,
an end-to-end run on the tiny SDXL with a tiny adapter (resumable), and clear errors for bad input."""
import csv
import dataclasses
import errno
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import cli
import eval_images
import evaluate
import interop
import metric_models
import runs
import sdxl
import waveft

TINY = ["--dino", "tiny", "--clip", "tiny", "--cmmd-clip", "tiny"]


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: see conftest.single_thread


@pytest.fixture(scope="module")
def tiny_models():
    return metric_models.load_metric_models("tiny", "tiny", "tiny")


def numpy_mmd2(x, y, sigma, unbiased):
    """Independent CMMD: explicit double loop over pairs, distances from coordinates (not from the dot product)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)

    def k(a, b):
        return np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))

    def within(s):
        pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if not (unbiased and i == j)]
        return sum(k(s[i], s[j]) for i, j in pairs) / len(pairs)
    across = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return 1000 * (within(x) + within(y) - 2 * across)


# ----------------------------------------------------------------------------------------------------------------
# metric maths


def test_cmmd_matches_independent_numpy_computation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 12)), rng.normal(0.5, 1.0, size=(5, 12))
    for sigma in (10.0, 0.7):  # 0.7: a bandwidth where the kernel is far from 1, so the test has teeth
        for unbiased in (False, True):
            expected = numpy_mmd2(x, y, sigma, unbiased)
            assert evaluate.cmmd(x, y, sigma=sigma, unbiased=unbiased) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert evaluate.cmmd(x, y) > 0


def test_cmmd_of_a_set_with_itself_is_zero_and_scale_invariant():
    x = np.random.default_rng(1).normal(size=(6, 16))
    assert abs(evaluate.cmmd(x, x)) < 1e-12
    assert abs(evaluate.cmmd(x, 3.0 * x)) < 1e-12  # embeddings are L2-normalised first
    # the paper's unbiased formula is not 0 on identical sets (why the biased form is reported)
    assert evaluate.cmmd(x, x, sigma=0.7, unbiased=True) < -1


def test_dino_and_clip_i_are_one_for_identical_embeddings_and_mean_cosine_otherwise():
    e = torch.randn(1, 8)
    assert torch.allclose(evaluate.mean_cosine(e.repeat(3, 1), 2 * e.repeat(4, 1)), torch.ones(3, dtype=torch.float64))
    g, r = np.random.default_rng(2).normal(size=(3, 8)), np.random.default_rng(3).normal(size=(4, 8))
    cos = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in r] for a in g])
    np.testing.assert_allclose(evaluate.mean_cosine(g, r).numpy(), cos.mean(axis=1), rtol=1e-12)


def test_clip_t_and_dino_diversity_against_numpy():
    a, b = np.random.default_rng(4).normal(size=(2, 5, 8))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(evaluate.clip_t(a, b).numpy(), 100 * cos, rtol=1e-12)
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    pairs = [1 - an[i] @ an[j] for i in range(5) for j in range(i + 1, 5)]
    assert evaluate.dino_diversity(a) == pytest.approx(np.mean(pairs), rel=1e-12)
    assert evaluate.dino_diversity(np.repeat(a[:1], 3, axis=0)) == pytest.approx(0, abs=1e-12)


def test_unique_token_is_stripped_for_clip_t():
    assert evaluate.strip_token("a zjw dog in the snow", "zjw") == "a dog in the snow"
    assert evaluate.strip_token("a red zjw backpack", "zjw") == "a red backpack"
    assert evaluate.strip_token("a zjwx dog", "zjw") == "a zjwx dog"  # whole words only


def test_identical_image_sets_score_one_and_the_prompt_reaches_clip_without_token(tiny_models, dreambooth_dir,
                                                                                   monkeypatch):
    path = dreambooth_dir / "dog6" / "00.jpg"
    seen = []
    real_embed_texts = evaluate.embed_texts
    monkeypatch.setattr(evaluate, "embed_texts", lambda m, t, texts: seen.extend(texts) or real_embed_texts(m, t, texts))
    entries = [(0, "a zjw dog in the snow", path), (0, "a zjw dog in the snow", path)]
    rows, metrics, _ = evaluate.score(entries, [sdxl.load_image(path)] * 2, tiny_models, "zjw")
    assert seen == ["a dog in the snow"] * 2
    assert metrics["dino"] == pytest.approx(1, abs=1e-6) and metrics["clip_i"] == pytest.approx(1, abs=1e-6)
    assert metrics["cmmd"] == pytest.approx(0, abs=1e-6) and metrics["dino_diversity"] == pytest.approx(0, abs=1e-6)
    assert [row["dino"] for row in rows] == pytest.approx([1, 1], abs=1e-6)
    other = [(0, "a zjw dog", dreambooth_dir / "cat" / "00.jpg")] * 2
    _, metrics, _ = evaluate.score(other, [sdxl.load_image(path)], tiny_models, "zjw")
    assert metrics["dino"] < 0.999 and metrics["cmmd"] > 1e-3  # a different subject is not "identical"


def test_lpips_diversity_is_used_and_named_when_available(tiny_models, dreambooth_dir):
    """With an LPIPS model (here a stand-in: mean |a - b|) diversity is the mean over pairs, called lpips_diversity."""
    paths = [dreambooth_dir / "dog6" / f"0{i}.jpg" for i in range(3)]
    _, metrics, images = evaluate.score([(0, "p", p) for p in paths], [sdxl.load_image(paths[0])], tiny_models,
                                        "zjw", lpips_model=lambda a, b: (a - b).abs().mean().view(1, 1, 1, 1))
    x = [np.asarray(im.resize((256, 256), Image.BICUBIC)).astype(np.float64) / 127.5 for im in images]
    expected = np.mean([np.abs(x[i] - x[j]).mean() for i, j in [(0, 1), (0, 2), (1, 2)]])
    assert metrics["lpips_diversity"] == pytest.approx(expected, rel=1e-5) and "dino_diversity" not in metrics


def test_preprocess_resizes_crops_and_normalises():
    image = Image.new("RGB", (40, 20), tuple(round(255 * m) for m in evaluate.CLIP_MEAN))
    x = evaluate.preprocess([image, image.rotate(90, expand=True)], 16, evaluate.CLIP_MEAN, evaluate.CLIP_STD)
    assert x.shape == (2, 3, 16, 16) and x.abs().max() < 0.02  # the mean colour normalises to ~0


def test_cmmd_defaults_are_the_reference_sigma_10_scale_1000_biased():
    """cmmd() as evaluate.py calls it (no arguments) must be the reference CMMD: sigma 10, x 1000, all pairs."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 10)), rng.normal(0.3, 1.0, size=(4, 10))
    assert evaluate.cmmd(x, y) == pytest.approx(numpy_mmd2(x, y, sigma=10.0, unbiased=False), rel=1e-10)


def test_crop_is_centred():
    """A 30 x 10 image whose columns all differ: the 10 x 10 crop must be columns 10..19 (and rows, rotated)."""
    columns = np.repeat(np.arange(0, 240, 8, dtype=np.uint8)[None, :, None], 10, axis=0).repeat(3, axis=2)  # 10x30
    for array in (columns, columns.transpose(1, 0, 2)):
        x = evaluate.preprocess([Image.fromarray(np.ascontiguousarray(array))], 10, (0, 0, 0), (1, 1, 1))
        centre = array[10:20] if array.shape[0] == 30 else array[:, 10:20]
        np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy() * 255, centre, atol=1e-4)


def test_each_metric_model_gets_its_own_normalisation_and_features(tiny_models, dreambooth_dir):
    """DINO: ImageNet mean/std and the CLS token of the last layer; CLIP: CLIP's mean/std and the projected pooled
    embedding. The constants are checked against transformers' own, the features against the models' outputs."""
    from transformers.utils import constants
    assert evaluate.CLIP_MEAN == tuple(constants.OPENAI_CLIP_MEAN)
    assert evaluate.CLIP_STD == tuple(constants.OPENAI_CLIP_STD)
    assert evaluate.IMAGENET_MEAN == tuple(constants.IMAGENET_DEFAULT_MEAN)
    assert evaluate.IMAGENET_STD == tuple(constants.IMAGENET_DEFAULT_STD)
    images = [sdxl.load_image(dreambooth_dir / "dog6" / f"0{i}.jpg") for i in range(2)]
    dino, clip = tiny_models.dino, tiny_models.clip
    with torch.no_grad():
        x = evaluate.preprocess(images, 32, constants.IMAGENET_DEFAULT_MEAN, constants.IMAGENET_DEFAULT_STD)
        cls_token = dino(pixel_values=x).last_hidden_state[:, 0]
        x = evaluate.preprocess(images, 32, constants.OPENAI_CLIP_MEAN, constants.OPENAI_CLIP_STD)
        projected = clip.visual_projection(clip.vision_model(pixel_values=x).pooler_output)
    torch.testing.assert_close(evaluate.embed_images(dino, images), cls_token, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(evaluate.embed_images(clip, images), projected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# model loading (metric_models.py)


def test_metric_models_load_from_local_folders_through_from_pretrained(tiny_models, tmp_path, dreambooth_dir):
    tiny_models.dino.save_pretrained(tmp_path / "dino")
    tiny_models.clip.save_pretrained(tmp_path / "clip")
    tiny_models.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = metric_models.load_metric_models(str(tmp_path / "dino"), str(tmp_path / "clip"), str(tmp_path / "clip"))
    images = [sdxl.load_image(dreambooth_dir / "dog6" / "00.jpg")]
    for a, b in ((tiny_models.dino, loaded.dino), (tiny_models.clip, loaded.clip)):
        torch.testing.assert_close(evaluate.embed_images(a, images), evaluate.embed_images(b, images))
    texts = ["a dog in the snow"]
    torch.testing.assert_close(evaluate.embed_texts(tiny_models.clip, tiny_models.tokenizer, texts),
                               evaluate.embed_texts(loaded.clip, loaded.tokenizer, texts))


@pytest.mark.parametrize("flag", ["--dino", "--clip", "--cmmd-clip"])
def test_missing_metric_model_fails_fast_naming_it(flag, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = dict(dino="tiny", clip="tiny", cmmd_clip="tiny")
    names[flag[2:].replace("-", "_")] = "nobody/no-such-model"
    start = time.time()
    with pytest.raises(FileNotFoundError, match=f"'nobody/no-such-model' is not available.*pass {flag} DIR"):
        metric_models.load_metric_models(**names)
    assert time.time() - start < 30  # not a minute of hub retries (generous: the test machine may be loaded)
    with pytest.raises(FileNotFoundError, match=f"folder /no/such/dir does not exist .*{flag}"):
        metric_models.load_metric_models(**{**names, flag[2:].replace("-", "_"): "/no/such/dir"})


# ----------------------------------------------------------------------------------------------------------------
# layout, metrics-only, table


def test_metrics_only_scores_a_folder_laid_out_by_prompt(tmp_path, dreambooth_dir):
    images = tmp_path / "other_tool"
    for folder, files in {"0_a_zjw_dog_on_the_beach": ["00.jpg", "01.jpg"], "1_x": ["02.jpg"]}.items():
        (images / folder).mkdir(parents=True)
        for name in files:
            shutil.copy(dreambooth_dir / "dog6" / name, images / folder / name)
    (images / "1_x" / "prompt.txt").write_text("a red zjw dog\n")
    (images / "notes").mkdir()  # not <number>_...: ignored
    out = tmp_path / "eval"
    [metrics] = evaluate.main(["--metrics-only", str(images), "--subject", "dog6", "--data-dir", str(dreambooth_dir),
                               "--out-dir", str(out)] + TINY)
    rows = (out / "other_tool" / "scores.csv").read_text().splitlines()
    assert len(rows) == 4 and ",a zjw dog on the beach," in rows[1] and ",a red zjw dog," in rows[3]
    assert metrics["n_images"] == 3 and metrics["n_prompts"] == 2 and metrics["n_real"] == 5
    assert metrics["meaningless_tiny_models"] and (out / "other_tool" / "grid.png").is_file()
    assert (metrics["setting"], metrics["prompt_set"]) == ("external", "from the image folders")
    with pytest.raises(FileNotFoundError, match="no images found"):
        evaluate.main(["--metrics-only", str(tmp_path / "eval"), "--subject", "dog6", "--data-dir",
                       str(dreambooth_dir)] + TINY)
    with pytest.raises(SystemExit):  # --subject is required
        evaluate.parse_args(["--metrics-only", str(images)])


def test_metrics_only_finds_the_dataset_as_training_does(tmp_path, dreambooth_dir, monkeypatch):
    """Without --data-dir, --metrics-only looks where train_dreambooth.py looks (sdxl.find_data_dir): here
    $DREAMBOOTH_DIR; with no dataset anywhere, the error lists the places looked at."""
    (tmp_path / "images" / "0_a_zjw_dog").mkdir(parents=True)
    shutil.copy(dreambooth_dir / "dog6" / "00.jpg", tmp_path / "images" / "0_a_zjw_dog")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DREAMBOOTH_DIR", str(dreambooth_dir))
    [run] = runs.read_runs(evaluate.parse_args(["--metrics-only", "images", "--subject", "dog6"]))
    assert Path(run.data_dir) == dreambooth_dir
    monkeypatch.delenv("DREAMBOOTH_DIR")
    with pytest.raises(FileNotFoundError, match=r"DreamBooth dataset not found; looked in dataset, "):
        runs.read_runs(evaluate.parse_args(["--metrics-only", "images", "--subject", "dog6"]))


def test_metrics_only_reads_the_authors_layout(tmp_path, dreambooth_dir):
    """The authors' repository writes <method>/<subject>/prompt_<i>/prompt_<i>_sample_<j>_seed_<s>.png plus
    prompt_<i>_info.txt ("Prompt: ..." first). Synthetic images in that layout are read as they are."""
    folder, rng = tmp_path / "waveft" / "dog", np.random.default_rng(0)
    prompts = {10: "a zjw dog in the snow", 2: "a zjw dog in the jungle"}  # prompt_10 sorts after prompt_2
    for i, prompt in prompts.items():
        (folder / f"prompt_{i}").mkdir(parents=True)
        (folder / f"prompt_{i}" / f"prompt_{i}_info.txt").write_text(
            f"Prompt: {prompt}\nNegative Prompt: low quality\nGuidance Scale: 7.5\nInference Steps: 30\nSeed: 42\n")
        for j, seed in enumerate((42, 43)):
            image = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
            image.save(folder / f"prompt_{i}" / f"prompt_{i}_sample_{j}_seed_{seed}.png")
    out = tmp_path / "eval"
    [metrics] = evaluate.main(["--metrics-only", str(folder), "--subject", "dog", "--data-dir", str(dreambooth_dir),
                               "--output-dir", str(out)] + TINY)
    with open(out / "dog" / "scores.csv") as f:
        rows = [(row["prompt_idx"], row["prompt"], row["seed"]) for row in csv.DictReader(f)]
    assert rows == [(str(i), prompts[i], seed) for i in (2, 10) for seed in ("42", "43")]
    assert metrics["n_images"] == 4 and metrics["n_prompts"] == 2 and metrics["subject"] == "dog"
    (folder / "prompt_2" / "prompt_2_info.txt").write_text("Negative Prompt: low quality\n")
    with pytest.raises(ValueError, match="prompt_2_info.txt has no 'Prompt:' line"):
        interop.read_image_folder(folder)


@dataclasses.dataclass
class ExampleOptions:
    name: str  # required; 100% needed
    count: int = 3  # how many
    flag: bool = False  # on or off
    items: list = None  # one or more


def test_options_parser_builds_argparse_from_a_dataclass(capsys):
    parser = cli.options_parser(ExampleOptions, "example", aliases=dict(count=["--number"]))
    assert vars(parser.parse_args(["--name", "a"])) == dict(name="a", count=3, flag=False, items=None)
    opts = ExampleOptions(**vars(parser.parse_args(["--name", "b", "--number", "5", "--flag", "--items", "x", "y"])))
    assert opts == ExampleOptions("b", 5, True, ["x", "y"])
    assert parser.parse_args(["--name", "c", "--flag", "false"]).flag is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--count", "2"])  # --name is required
    parser.print_help()
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--name NAME required; 100% needed" in help_text
    assert "--count COUNT, --number COUNT how many [3]" in help_text
    assert "on or off [false]" in help_text and "one or more" in help_text


def test_evaluate_command_line_comes_from_its_options_dataclass(capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    parser = cli.options_parser(evaluate.Options, "")
    assert all(action.help for action in parser._actions)  # every option explained
    for field in dataclasses.fields(evaluate.Options):
        assert "--" + field.name.replace("_", "-") in help_text
    assert "--output-dir OUTPUT_DIR, --out-dir OUTPUT_DIR" in help_text and "[evaluation]" in help_text
    assert "[42]" in help_text  # --seed's default
    opts = evaluate.parse_args(["--runs", "a", "b", "--out-dir", "x", "--seed", "7"])
    assert opts.output_dir == "x" and opts.runs == ["a", "b"] and opts.seed == 7 and opts.steps is None
    assert evaluate.parse_args(["--runs", "a", "--output-dir", "y"]).output_dir == "y"
    for argv in ([], ["--runs", "a", "--metrics-only", "b", "--subject", "dog"]):  # exactly one source
        with pytest.raises(SystemExit):
            evaluate.parse_args(argv)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--runs", "a", "--images-per-prompt", "0"])
    assert "error: --images-per-prompt must be positive, not 0" in capsys.readouterr().err


def test_comparison_table_is_mean_and_std_over_subjects(tmp_path):
    """One row per setting (the run's options without its subject) and prompt set: mean +- std over its subjects.
    A run of the same method and budget with another option (here steps) is a row of its own."""
    common = dict(method="waveft", budget="k=2592", trainable_params=1000, setting="waveft-k2592",
                  prompt_set="dreambooth")
    all_metrics = [dict(common, subject=s, dino=d, cmmd=c) for s, d, c in (("dog", 0.4, 1.0), ("cat", 0.6, 2.0),
                                                                            ("can", 0.8, 3.0))] + \
        [dict(method="lora", budget="r=1", trainable_params=120, setting="lora-r1", prompt_set="dreambooth",
              subject="dog", dino=0.5, cmmd=1.5, dino_diversity=0.25),
         dict(common, setting="waveft-k2592-steps4", subject="dog", dino=0.1, cmmd=9.0)]
    table = evaluate.write_comparison(all_metrics, tmp_path)
    assert "| lora | r=1 | 120 | 1 | 0.500 (n=1) | 1.500 (n=1) | 0.250 (n=1) |" in table  # no std of one value
    assert "| waveft | k=2592 | 1,000 | 3 | 0.600 ± 0.200 | 2.000 ± 1.000 | - |" in table  # no diversity there
    assert "| lora-r1 | dreambooth | lora | r=1 | 120 | 1 |" in table
    assert "| waveft-k2592 | dreambooth | waveft | k=2592 | 1,000 | 3 | 0.600 ± 0.200 |" in table
    assert "| waveft-k2592-steps4 | dreambooth | waveft | k=2592 | 1,000 | 1 | 0.100 (n=1) |" in table
    assert table.startswith("| setting | prompts | method | k or rank | trainable params | subjects | DINO ↑ | CMMD ↓ "
                            "| DINO diversity ↑ |")
    csv_rows = (tmp_path / "comparison.csv").read_text().splitlines()
    assert csv_rows[0] == ("setting,prompt_set,method,budget,trainable_params,subjects,dino_mean,dino_std,cmmd_mean,"
                           "cmmd_std,dino_diversity_mean,dino_diversity_std")
    assert csv_rows[1:] == ["waveft-k2592,dreambooth,waveft,k=2592,1000,3,0.6,0.2,2.0,1.0,,",
                            "lora-r1,dreambooth,lora,r=1,120,1,0.5,,1.5,,0.25,",
                            "waveft-k2592-steps4,dreambooth,waveft,k=2592,1000,1,0.1,,9.0,,,"]
    with pytest.raises(ValueError, match="row waveft-k2592 .*dreambooth.* has subject dog twice"):
        evaluate.write_comparison(all_metrics + [dict(common, subject="dog", dino=0.3, cmmd=1.0)], tmp_path)
    assert runs.method_and_budget(dict(method="waveft", use_idwt=False, k=7)) == ("waveft_noidwt", "k=7")
    assert runs.method_and_budget(dict(method="lora", rank=1, k=2592)) == ("lora", "r=1")
    assert runs.method_and_budget(dict(method="waveft", k=9, wavelet="db1", scaling=25.0)) == ("waveft", "k=9")
    assert runs.method_and_budget(dict(method="waveft", k=9, wavelet="db4", scaling=10.0)) == \
        ("waveft db4 scaling=10", "k=9")


# ----------------------------------------------------------------------------------------------------------------
# end to end on the tiny SDXL with a tiny adapter from train_dreambooth.py --model tiny

SMOKE = ["--max-prompts", "2", "--images-per-prompt", "2", "--steps", "2", "--resolution", "64"] + TINY


def copy_run(run_dir, dest, **config_changes):
    """A private copy of the shared fixture run (config.json + adapter only), optionally with an edited config."""
    dest.mkdir(parents=True)
    shutil.copy(run_dir / "adapter.safetensors", dest)
    config = json.loads((run_dir / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, **config_changes}))
    return dest


@pytest.fixture(scope="module")
def evaluated(tiny_run_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    run = copy_run(tiny_run_dir, tmp / "runs" / tiny_run_dir.name)
    out = tmp / "eval"
    [metrics] = evaluate.main(["--runs", str(run), "--out-dir", str(out)] + SMOKE)
    return run, out, metrics


def test_end_to_end_writes_grid_scores_metrics_and_table(evaluated):
    run, out, metrics = evaluated
    result = out / run.name
    config = json.loads((run / "config.json").read_text())
    prompts = sdxl.prompts_for(config["data_dir"], "dog6")[:2]
    rows = (result / "scores.csv").read_text().splitlines()
    assert rows[0] == "run,subject,prompt_idx,prompt,file,seed,dino,clip_i,clip_t" and len(rows) == 5
    assert [(r.split(",")[3], r.split(",")[5]) for r in rows[1:]] == [(p, s) for p in prompts for s in ("42", "43")]
    saved = json.loads((result / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics)) and saved["n_images"] == 4 and saved["n_real"] == 5
    assert all(np.isfinite(saved[m]) for m in ("dino", "clip_i", "clip_t", "cmmd", "dino_diversity"))
    meta = waveft.read_metadata(run / "adapter.safetensors")
    assert saved["trainable_params"] == len(meta["layers"]) * meta["k"] and saved["method"] == config["method"]
    assert (result / "images" / "01_a_zjw_dog_in_the_snow" / "prompt.txt").read_text() == prompts[1] + "\n"
    grid = np.asarray(Image.open(result / "grid.png"))  # 5 real photos wide; real row + 2 prompt rows, with labels
    assert grid.shape[1] == 5 * 64 and grid.shape[0] % 3 == 0
    cell_h = grid.shape[0] // 3
    real = ImageOps.fit(sdxl.load_image(sdxl.instance_images(config["data_dir"], "dog6")[1]), (64, 64))
    assert np.array_equal(grid[cell_h - 64:cell_h, 64:128], np.asarray(real))
    generated = Image.open(result / "images" / "01_a_zjw_dog_in_the_snow" / "seed43.png")
    assert np.array_equal(grid[3 * cell_h - 64:, 64:128], np.asarray(generated))
    assert (grid[2 * cell_h - 64:2 * cell_h, 128:] == 255).all()  # prompt rows have 2 images: the rest is blank
    table = (out / "comparison.md").read_text()
    assert f"| {config['method']} | k={config['k']} | {saved['trainable_params']:,} | 1 |" in table
    assert f"| {config['setting']} | dreambooth (first 2) | {config['method']} |" in table
    assert (saved["setting"], saved["prompt_set"]) == (config["setting"], "dreambooth (first 2)")
    assert (out / "comparison.csv").read_text().startswith("setting,prompt_set,method,budget,trainable_params,"
                                                           "subjects,dino_mean")


def test_runs_that_differ_in_any_option_are_separate_rows_of_the_comparison(evaluated, tmp_path):
    """`--runs outputs/*` once pooled a 500-step and a 4-step run of dog6 as two subjects of one line. A row is one
    setting: config.json's "setting" (train_dreambooth.py records it even when --run-name chose the folder), for
    older runs the folder name without "<subject>-"; a subject twice in one row is refused before anything runs."""
    run, _, _ = evaluated
    config = json.loads((run / "config.json").read_text())
    assert config["setting"] == "waveft-k2000-tiny-steps4-ga2" == run.name.removeprefix("dog6-")
    runs = tmp_path / "runs"
    short = copy_run(run, runs / run.name)
    named = copy_run(run, runs / "my-cat-run", subject="cat")  # --run-name: the recorded setting counts
    older = copy_run(run, runs / "dog6-waveft-k2000-tiny-ga2", steps=500)  # 500 steps, an older run: no "setting"
    older_config = json.loads((older / "config.json").read_text())
    del older_config["setting"]
    (older / "config.json").write_text(json.dumps(older_config))
    out = tmp_path / "eval"
    metrics = evaluate.main(["--runs", str(short), str(named), str(older), "--output-dir", str(out)] + SMOKE +
                            ["--max-prompts", "1", "--images-per-prompt", "1"])
    assert [(m["subject"], m["setting"], m["prompt_set"]) for m in metrics] == [
        ("dog6", "waveft-k2000-tiny-steps4-ga2", "dreambooth (first 1)"),
        ("cat", "waveft-k2000-tiny-steps4-ga2", "dreambooth (first 1)"),
        ("dog6", "waveft-k2000-tiny-ga2", "dreambooth (first 1)")]
    table = (out / "comparison.md").read_text().splitlines()
    assert len(table) == 4  # header, rule, two rows
    assert table[2].startswith("| waveft-k2000-tiny-steps4-ga2 | dreambooth (first 1) | waveft | k=2000 |")
    assert table[2].split(" | ")[5] == "2" and table[3].split(" | ")[5] == "1"  # subjects
    assert table[3].startswith("| waveft-k2000-tiny-ga2 | dreambooth (first 1) | waveft | k=2000 |")
    again = copy_run(run, runs / "dog6-copy")  # the same setting and subject as `short`: which one is the row's?
    with pytest.raises(ValueError, match=r"runs .*dog6-waveft-k2000-tiny-steps4-ga2 and .*dog6-copy are both dog6 "
                                         r"with setting waveft-k2000-tiny-steps4-ga2"):
        evaluate.main(["--runs", str(short), str(again), "--output-dir", str(tmp_path / "eval2")] + SMOKE)
    assert not (tmp_path / "eval2").exists()


def test_images_are_the_merged_adapter_at_each_seed(evaluated):
    run, out, _ = evaluated
    pipe = sdxl.load_pipeline("tiny")
    waveft.load(pipe.unet, run / "adapter.safetensors")
    waveft.merge(pipe.unet)
    cfg = sdxl.GenerationConfig(num_inference_steps=2, resolution=64)
    expected = sdxl.generate(pipe, ["a zjw dog in the snow"], [42, 43], cfg)  # same batch as evaluate.py's call
    for seed, image in zip((42, 43), expected):
        saved = Image.open(out / run.name / "images" / "01_a_zjw_dog_in_the_snow" / f"seed{seed}.png")
        assert np.array_equal(np.asarray(saved), np.asarray(image))
    waveft.unmerge(pipe.unet)
    with torch.no_grad():
        for _, layer in waveft.adapted_layers(pipe.unet):
            layer.waveft_spectrum.zero_()  # dW = 0: the base model
    base = sdxl.generate(pipe, ["a zjw dog in the snow"], [42, 43], cfg)
    assert np.abs(np.asarray(base[1], dtype=int) - np.asarray(expected[1], dtype=int)).max() > 10  # adapter is on


def test_second_run_skips_existing_images_and_regenerates_only_missing_ones(evaluated, monkeypatch):
    run, out, metrics = evaluated
    images = sorted((out / run.name / "images").rglob("*.png"))
    mtimes = [p.stat().st_mtime_ns for p in images]
    calls = []
    real_generate = sdxl.generate
    monkeypatch.setattr(sdxl, "generate", lambda pipe, prompts, seeds, cfg: calls.append((prompts, seeds)) or
                        real_generate(pipe, prompts, seeds, cfg))
    not_a_run = out.parent / "class-images"  # what `outputs/*` also matches: skipped
    not_a_run.mkdir()
    [again] = evaluate.main(["--runs", str(run), str(not_a_run), "--out-dir", str(out)] + SMOKE)
    assert calls == [] and [p.stat().st_mtime_ns for p in images] == mtimes
    assert again == metrics
    uninterrupted = images[1].read_bytes()
    images[1].unlink()  # 00_.../seed43.png: as if the previous evaluation was killed while writing it
    evaluate.main(["--runs", str(run), "--out-dir", str(out)] + SMOKE)
    # resumed byte for byte: seed 43 is made again in its usual batch (with 42, whose file is left alone), since a
    # seed generated alone can differ in the last bits from the same seed generated in a batch
    assert images[1].read_bytes() == uninterrupted and [p.stat().st_mtime_ns for p in images[:1]] == mtimes[:1]
    assert calls == [(["a zjw dog in the jungle"], [42, 43])]
    for option, value in (("steps", "3"), ("resolution", "128")):  # never reuse stale images
        with pytest.raises(ValueError, match=f"holds images made with other {option}"):
            evaluate.main(["--runs", str(run), "--out-dir", str(out)] + SMOKE + [f"--{option}", value])


def retrained(adapter, dest):
    """Another adapter of the same shape in `dest` (the trained spectra negated), as if retrained."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(adapter), "pt") as f:
        tensors = {key: -f.get_tensor(key) if key.endswith("spectrum") else f.get_tensor(key) for key in f.keys()}
        save_file(tensors, str(dest), metadata=f.metadata())


def test_a_retrained_adapter_at_the_same_path_is_detected(evaluated, tmp_path):
    """Same run folder name, same adapter path, other content: the images on disk are stale (adapter hash)."""
    run, _, _ = evaluated
    again = copy_run(run, tmp_path / "runs" / run.name)
    evaluate.main(["--runs", str(again), "--out-dir", str(tmp_path / "eval"), "--max-prompts", "1"] + SMOKE)
    retrained(run / "adapter.safetensors", again / "adapter.safetensors")  # the same path, another adapter
    with pytest.raises(ValueError, match="holds images made with other adapter_sha256"):
        evaluate.main(["--runs", str(again), "--out-dir", str(tmp_path / "eval"), "--max-prompts", "1"] + SMOKE)


def test_one_pipeline_serves_runs_of_the_same_model_exactly(evaluated, tmp_path, monkeypatch):
    """Two runs on the tiny model: the pipeline is loaded once and the adapter swapped (waveft.remove, then the
    original weights restored exactly), yet every image equals the one a fresh pipeline makes with that adapter."""
    run, out, _ = evaluated
    first = copy_run(run, tmp_path / "runs" / "first")
    second = copy_run(run, tmp_path / "runs" / "second", seed=43, setting=run.name.removeprefix("dog6-") + "-seed43")
    retrained(run / "adapter.safetensors", second / "adapter.safetensors")
    loads, merged = [], []
    real_load_pipeline, real_generate = sdxl.load_pipeline, sdxl.generate
    monkeypatch.setattr(sdxl, "load_pipeline", lambda *a, **kw: loads.append(a) or real_load_pipeline(*a, **kw))
    monkeypatch.setattr(sdxl, "generate", lambda pipe, *a: merged.append(  # the adapter is merged when sampling
        [layer.merged for _, layer in waveft.adapted_layers(pipe.unet)]) or real_generate(pipe, *a))
    evaluate.main(["--runs", str(first), str(second), "--out-dir", str(tmp_path / "eval")] + SMOKE)
    assert len(loads) == 1 and len(merged) == 4 and all(state and all(state) for state in merged)
    pipe = real_load_pipeline("tiny")
    waveft.load(pipe.unet, second / "adapter.safetensors")
    waveft.merge(pipe.unet)
    expected = sdxl.generate(pipe, ["a zjw dog in the snow"], [42, 43], sdxl.GenerationConfig(num_inference_steps=2,
                                                                                                resolution=64))
    for name, images in (("first", None), ("second", expected)):
        for i, seed in enumerate((42, 43)):
            made = Image.open(tmp_path / "eval" / name / "images" / "01_a_zjw_dog_in_the_snow" / f"seed{seed}.png")
            reference = images[i] if images else Image.open(out / run.name / "images" / "01_a_zjw_dog_in_the_snow" /
                                                            f"seed{seed}.png")
            assert np.array_equal(np.asarray(made), np.asarray(reference)), (name, seed)


def test_evaluation_samples_from_the_runs_weight_variant_and_records_it(tiny_run_dir, tiny_fp16_model_dir, tmp_path):
    """A run trained on a folder of fp16 files (config.json: "variant": "fp16") is sampled from those files, and
    generation.json records it; a run that records none cannot load them and fails in one line naming --variant,
    writing nothing; --variant overrides the recorded one. (Before: no --variant, and diffusers' traceback.)"""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(tiny_run_dir / "adapter.safetensors"), "pt") as f:  # the tiny run's adapter, for this model
        tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    model = str(tiny_fp16_model_dir)
    run_dir = copy_run(tiny_run_dir, tmp_path / "run", model=model, variant="fp16")
    save_file(tensors, str(run_dir / "adapter.safetensors"), metadata={**metadata, "model": json.dumps(model)})
    [run] = runs.read_runs(evaluate.parse_args(["--runs", str(run_dir)]))
    assert run.variant == "fp16"
    cfg = sdxl.GenerationConfig(num_inference_steps=2, resolution=64)
    _, settings, made = eval_images.generate_missing(run, tmp_path / "images", ["a zjw dog"], [42], cfg,
                                                     torch.device("cpu"))
    assert made == 1 and settings["variant"] == "fp16"
    assert json.loads((tmp_path / "images" / "generation.json").read_text()) == settings
    run_dir = copy_run(tiny_run_dir, tmp_path / "older", model=model)  # config.json without "variant"
    save_file(tensors, str(run_dir / "adapter.safetensors"), metadata={**metadata, "model": json.dumps(model)})
    [run] = runs.read_runs(evaluate.parse_args(["--runs", str(run_dir)]))
    with pytest.raises(FileNotFoundError, match=r"^model .*: its text_encoder has no default \(non-variant\) weight "
                                                r"files, only fp16-variant ones \(model.fp16.safetensors\): pass "
                                                r"--variant fp16$"):
        eval_images.generate_missing(run, tmp_path / "older-images", ["a zjw dog"], [42], cfg, torch.device("cpu"))
    assert not (tmp_path / "older-images").exists()
    [run] = runs.read_runs(evaluate.parse_args(["--runs", str(run_dir), "--variant", "fp16"]))
    assert run.variant == "fp16"


def test_low_memory_images_equal_the_merged_float32_ones_within_bf16_precision(evaluated, tmp_path):
    """--low-memory: bf16 UNet with the adapter unmerged in float32 (never rounded into a bf16 W), the rest float32
    and frozen, the VAE one image at a time. On the CPU the default path samples in float32 and this one under bf16
    autocast: the images differ by bf16's rounding (measured: at most 7 of 255, under 1 on average), far less than the
    adapter changes them (8 to 11 on average); generation.json records the mode, so the two never mix."""
    run_dir, out, _ = evaluated
    [run] = runs.read_runs(evaluate.parse_args(["--runs", str(run_dir), "--low-memory"]))
    prompts = sdxl.prompts_for(run.data_dir, run.subject)[:2]
    cfg, pipelines, cpu = sdxl.GenerationConfig(num_inference_steps=2, resolution=64), {}, torch.device("cpu")
    _, settings, made = eval_images.generate_missing(run, tmp_path / "images", prompts, [42, 43], cfg, cpu, [1],
                                                     pipelines, low_memory=True)
    assert made == 2 and settings["low_memory"] is True
    [(pipe, originals)] = pipelines.values()
    layers = [layer for _, layer in waveft.adapted_layers(pipe.unet)]
    assert layers and not originals and pipe.vae.use_slicing
    assert all(not layer.merged and layer.waveft_spectrum.dtype == torch.float32 and
               layer.base.weight.dtype == torch.bfloat16 for layer in layers)
    assert pipe.text_encoder_2.dtype == pipe.vae.dtype == torch.float32
    folder = "01_a_zjw_dog_in_the_snow"
    base = sdxl.generate(sdxl.load_pipeline("tiny"), [prompts[1]], [42, 43], cfg)  # no adapter
    for seed, base_image in zip((42, 43), base):
        merged = np.asarray(Image.open(out / run.name / "images" / folder / f"seed{seed}.png"), dtype=int)
        low_memory = np.asarray(Image.open(tmp_path / "images" / folder / f"seed{seed}.png"), dtype=int)
        difference, adapter = np.abs(low_memory - merged), np.abs(merged - np.asarray(base_image, dtype=int))
        assert difference.max() <= 12 and difference.mean() <= 1.5, (difference.max(), difference.mean())
        assert adapter.mean() > 4 * difference.mean(), (adapter.mean(), difference.mean())
    with pytest.raises(ValueError, match="holds images made with other low_memory"):
        eval_images.generate_missing(run, tmp_path / "images", prompts, [42, 43], cfg, cpu, [1])


def random_adapter(path, **inject):
    """An adapter file for the tiny SDXL with random trained values (LoRA's B or WaveFT's spectrum != 0)."""
    unet = sdxl.load_pipeline("tiny").unet
    waveft.inject(unet, init_seed=0, **inject)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in waveft.adapted_layers(unet):
            trained = getattr(layer, layer.adapter_names[-1])  # lora_B, waveft_spectrum
            trained.copy_(0.01 * torch.randn(trained.shape, generator=generator))
    waveft.save(unet, path, extra_metadata=dict(model="tiny"))
    return path


def kept_bytes(kept):
    """Bytes of what evaluate keeps to restore one layer (tensors, alone or in a tuple)."""
    return sum(t.numel() * t.element_size() for t in (kept if isinstance(kept, tuple) else (kept,))
               if torch.is_tensor(t))


def test_weight_restore_keeps_the_smaller_copy_and_puts_every_weight_back_bit_exactly(tiny_run_dir, tmp_path):
    """One pipeline serves run after run: before the next adapter is merged, every weight entry the last merge
    changed is put back bit for bit. What is kept per layer is the smaller of the sparse diff (8-byte index + value
    per changed entry) and a dense copy of the weight in its own dtype: LoRA changes every entry, so its diff would
    be 3x the weight. Each pipeline state is compared with a fresh pipeline given the same adapter: every tensor
    equal; what is kept, with the changed entries counted here."""
    lora = random_adapter(tmp_path / "lora.safetensors", method="lora")
    sparse = random_adapter(tmp_path / "sparse.safetensors", k=8, use_idwt=False)  # 8 entries change per layer
    pipelines, base = {}, sdxl.load_pipeline("tiny").unet.state_dict()
    for adapter in (lora, sparse, tiny_run_dir / "adapter.safetensors", lora):  # restores: dense, sparse, either
        pipe = eval_images.adapted_pipeline(pipelines, "tiny", adapter, "cpu")
        fresh = sdxl.load_pipeline("tiny")
        waveft.load(fresh.unet, adapter)
        waveft.merge(fresh.unet)
        expected = fresh.unet.state_dict()
        for name, value in pipe.unet.state_dict().items():
            assert torch.equal(value, expected[name]), (adapter.name, name)
        [(_, kept)], sizes = pipelines.values(), []  # the one pipeline kept (keyed by model, variant, mode)
        assert kept.keys() == dict(waveft.adapted_layers(pipe.unet)).keys()
        for name in kept:
            before, after = base[f"{name}.weight"], expected[f"{name}.base.weight"]
            changed = int(((before != after) | (torch.signbit(before) != torch.signbit(after))).sum())
            dense = before.numel() * before.element_size()
            assert kept_bytes(kept[name]) == min(changed * (8 + before.element_size()), dense), (adapter.name, name)
            sizes.append((kept_bytes(kept[name]), dense))
        if adapter in (lora, sparse):  # every layer dense (the README's bound: the weights once), or every sparse
            assert all(size == dense if adapter == lora else size == 8 * 12 for size, dense in sizes)


def test_generate_makes_every_seed_in_batches_of_batch_size():
    """More seeds than one batch: every seed gets its image, and each batch is made as it would be alone (the image
    of the last seed, in a batch of its own, equals that seed generated alone)."""
    pipe = sdxl.load_pipeline("tiny")
    cfg = sdxl.GenerationConfig(num_inference_steps=2, resolution=64, batch_size=2)
    images = sdxl.generate(pipe, ["a zjw dog"], [42, 43, 44], cfg)
    alone = sdxl.generate(pipe, ["a zjw dog"], [44], cfg)
    assert len(images) == 3 and np.array_equal(np.asarray(images[2]), np.asarray(alone[0]))
    assert not np.array_equal(np.asarray(images[1]), np.asarray(images[2]))


def files_of(folder):
    """{relative path: bytes} of every file below `folder`; scores.csv names its images by path: made relative."""
    return {path.relative_to(folder): path.read_bytes().replace(str(folder).encode(), b"<out>")
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_ctrl_c_stops_in_one_line_with_130_and_a_rerun_finishes_the_same_files(evaluated, tmp_path, monkeypatch,
                                                                                capsys):
    """Ctrl-C while the second prompt is generated: one line on stderr saying what is kept and how to continue,
    exit status 130, the first prompt's images kept; the same command again gives the files of an uninterrupted
    evaluation, byte for byte."""
    run, out, _ = evaluated
    again, cut = copy_run(run, tmp_path / "runs" / run.name), tmp_path / "eval"
    real_generate, calls = sdxl.generate, []

    def interrupted_generate(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(*args)
    monkeypatch.setattr(sdxl, "generate", interrupted_generate)
    monkeypatch.setattr(evaluate, "tqdm", functools.partial(evaluate.tqdm, disable=True))  # stderr without the bars
    monkeypatch.setattr(eval_images, "tqdm", functools.partial(eval_images.tqdm, disable=True))
    argv = ["--runs", str(again), "--output-dir", str(cut)] + SMOKE
    capsys.readouterr()
    assert evaluate.run_command(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err == (f"evaluate.py: interrupted; the finished images are kept in {cut}: run the same command again to "
                   f"continue\n")
    assert len(list(cut.rglob("*.png"))) == 2 and not list(cut.rglob("*.tmp"))
    monkeypatch.setattr(sdxl, "generate", real_generate)
    assert evaluate.run_command(argv) == 0
    assert files_of(cut) == files_of(out)


@pytest.mark.parametrize("target", ["seed43.png", "scores.csv", "comparison.md"])
def test_a_full_disk_fails_in_one_line_and_keeps_the_earlier_files(evaluated, tmp_path, monkeypatch, capsys, target):
    """The disk fills up part-way through a file (os.write writes half, then ENOSPC): one line naming the file, exit
    status 1, the file as it was before (an image not there at all), no temporary file left behind."""
    run, out, _ = evaluated
    again, full = copy_run(run, tmp_path / "runs" / run.name), tmp_path / "eval"
    shutil.copytree(out, full)
    before = files_of(full)
    if target.endswith(".png"):  # an image to make: the one of the last evaluation that did not finish
        (full / run.name / "images" / "00_a_zjw_dog_in_the_jungle" / target).unlink()
    real_write, written = os.write, []

    def full_disk(fd, data):
        if not os.readlink(f"/proc/self/fd/{fd}").rpartition("/")[2].startswith(target + "."):
            return real_write(fd, data)
        if not written:  # the first half fits
            written.append(real_write(fd, bytes(data[:len(data) // 2])))
            return written[0]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", full_disk)
    monkeypatch.setattr(evaluate, "tqdm", functools.partial(evaluate.tqdm, disable=True))  # stderr without the bars
    monkeypatch.setattr(eval_images, "tqdm", functools.partial(eval_images.tqdm, disable=True))
    capsys.readouterr()
    assert evaluate.run_command(["--runs", str(again), "--output-dir", str(full)] + SMOKE) == 1
    err = capsys.readouterr().err
    assert written and err.count("\n") == 1 and "Traceback" not in err, err
    where = re.escape(str(full)) + r"/\S*" + re.escape(target)
    assert re.fullmatch(rf"evaluate.py: error: cannot write {where}: No space left on device \([\d,]+ MiB free "
                        rf"there\); .*run the same command again.*\n", err), err
    assert not list(full.rglob("*.tmp"))
    after = files_of(full)
    if target.endswith(".png"):
        assert after == {path: data for path, data in before.items() if path.name != target or "jungle" not in
                         str(path)}
    else:
        assert after[next(path for path in after if path.name == target)] == \
            before[next(path for path in before if path.name == target)]


def test_torchrun_two_ranks_make_the_same_images_and_metrics_as_one_process(evaluated, tmp_path):
    """`torchrun --nproc-per-node 2 evaluate.py` (2 gloo ranks on the CPU): each rank generates its share of the
    images, rank 0 scores: the image files (bytes) and metrics.json equal the single-process evaluation's."""
    run, out, _ = evaluated  # the reference: the 1-process evaluation (resumed or not, the same bytes)
    sharded = copy_run(run, tmp_path / "runs" / run.name)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            evaluate.__file__, "--runs", str(sharded), "--output-dir", str(tmp_path / "eval")] + SMOKE
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 0: generated 2 images" in result.stderr and "rank 1: generated 2 images" in result.stderr
    one, two = out / run.name, tmp_path / "eval" / run.name
    files = sorted(path.relative_to(one) for path in (one / "images").rglob("*.png"))
    assert len(files) == 4 and files == sorted(path.relative_to(two) for path in (two / "images").rglob("*.png"))
    assert all((one / file).read_bytes() == (two / file).read_bytes() for file in files)
    assert json.loads((two / "metrics.json").read_text()) == json.loads((one / "metrics.json").read_text())
    assert (tmp_path / "eval" / "comparison.md").read_text() == (out / "comparison.md").read_text()


# ----------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_run_folders_fail_clearly_before_loading_models(tiny_run_dir, tmp_path, dreambooth_dir):
    no_adapter = tmp_path / "no_adapter"
    no_adapter.mkdir()
    shutil.copy(tiny_run_dir / "config.json", no_adapter)
    with pytest.raises(FileNotFoundError, match="no_adapter has no adapter.safetensors"):
        evaluate.main(["--runs", str(no_adapter)] + SMOKE)
    (no_adapter / "config.json").write_text("[1, 2]")
    shutil.copy(tiny_run_dir / "adapter.safetensors", no_adapter)
    with pytest.raises(ValueError, match="no_adapter/config.json .*not a train_dreambooth.py config"):
        evaluate.main(["--runs", str(no_adapter)] + SMOKE)
    (tmp_path / "class-images").mkdir()
    with pytest.raises(FileNotFoundError, match="none of --runs .*class-images is a run folder"):
        evaluate.main(["--runs", str(tmp_path / "class-images")] + SMOKE)
    with pytest.raises(ValueError, match="unknown subject 'dog42'.*dog6"):
        evaluate.main(["--runs", str(copy_run(tiny_run_dir, tmp_path / "r1", subject="dog42"))] + SMOKE)
    with pytest.raises(FileNotFoundError) as error:  # the recorded dataset is gone: say so, suggest --data-dir
        evaluate.main(["--runs", str(copy_run(tiny_run_dir, tmp_path / "r2", data_dir=str(tmp_path / "moved")))]
                      + SMOKE)
    assert f"r2: config.json records the DreamBooth dataset at {tmp_path / 'moved'}" in str(error.value)
    assert "--data-dir" in str(error.value) and "git clone" not in str(error.value)
    runs.read_run(tmp_path / "r2", data_dir=dreambooth_dir)  # and --data-dir is the way out
    run = copy_run(tiny_run_dir, tmp_path / "r3")
    with pytest.raises(ValueError, match="trained for model 'tiny'.*not for --model 'stabilityai/sdxl-other'"):
        evaluate.main(["--runs", str(run), "--model", "stabilityai/sdxl-other"] + SMOKE)
    other = copy_run(tiny_run_dir, tmp_path / "r4", model=str(tmp_path / "another_sdxl"))
    with pytest.raises(ValueError, match="trained for model 'tiny' but config.json says .*another_sdxl"):
        evaluate.main(["--runs", str(other)] + SMOKE)


def test_adapter_for_a_different_architecture_fails_clearly(tiny_run_dir, tmp_path, monkeypatch):
    run = copy_run(tiny_run_dir, tmp_path / "run")
    model = torch.nn.Sequential()
    model.add_module("to_q", torch.nn.Linear(8, 8))  # a model with a to_q that the tiny UNet does not have
    waveft.inject(model, k=4)
    waveft.save(model, run / "adapter.safetensors", extra_metadata=dict(model="tiny"))
    with pytest.raises(ValueError, match=r"adapter .*run/adapter.safetensors does not fit model 'tiny'"):
        evaluate.main(["--runs", str(run), "--out-dir", str(tmp_path / "eval")] + SMOKE)
    assert not (tmp_path / "eval").exists()  # a refused evaluation writes nothing (no stray generation.json)


def test_command_line_error_is_one_clear_line(tmp_path):
    # A run folder that is not there (exit 1) and a value of the wrong type (argparse, exit 2), started together
    runs = [subprocess.Popen([sys.executable, str(evaluate.__file__), "--runs", str(tmp_path / "nope"), *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for extra in ([], ["--steps",
                                                                                                     "abc"])]
    (out, err), (out_abc, err_abc) = (run.communicate(timeout=120) for run in runs)
    assert runs[0].returncode == 1 and "Traceback" not in err
    assert err.strip() == f"evaluate.py: error: run folder {tmp_path / 'nope'} does not exist"
    assert runs[1].returncode == 2 and out_abc == ""
    assert err_abc == "error: --steps abc: not an integer; see --help\n"  # not argparse's usage


def test_a_bad_command_line_is_one_line_naming_the_option_and_value(capsys):
    for argv, message in ((["--runs", "a", "--seed", "x1"], "--seed x1: not an integer"),
                          (["--runs", "a", "--out-dir"], "--output-dir: expected one argument"),
                          (["--runs", "a", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
                          (["--metrics-only", "a"], "--metrics-only needs --subject (whose real photos the images "
                                                    "are compared with)")):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.parse_args(argv)
        assert exit_info.value.code == 2, argv
        assert capsys.readouterr().err == f"error: {message}; see --help\n", argv


def test_a_peft_adapter_folder_is_scored_like_our_run(evaluated, tmp_path, dreambooth_dir):
    """--runs also takes a PEFT adapter folder (PEFT or the authors' code): it names no subject, so --subject (and
    --model, unless its config names the base model) come from the command line. The same adapter saved in PEFT's
    format gives the same images, byte for byte, and the same trainable count as our run folder."""
    run, _, _ = evaluated
    ours = copy_run(run, tmp_path / "runs" / run.name)
    unet = sdxl.load_pipeline("tiny").unet
    waveft.load(unet, run / "adapter.safetensors")
    peft_folder = tmp_path / "runs" / "dog6-peft-waveft"
    interop.save_peft(unet, peft_folder)
    with pytest.raises(ValueError, match="PEFT adapter folder.*--subject"):
        evaluate.main(["--runs", str(peft_folder), "--model", "tiny", "--output-dir", str(tmp_path / "x")] + SMOKE)
    out = tmp_path / "eval"
    mine, theirs = evaluate.main(["--runs", str(ours), str(peft_folder), "--subject", "dog6", "--model", "tiny",
                                  "--data-dir", str(dreambooth_dir), "--output-dir", str(out)] + SMOKE)
    images = [sorted(p.relative_to(out / name) for p in (out / name / "images").rglob("*.png"))
              for name in (ours.name, peft_folder.name)]
    assert images[0] == images[1] and len(images[0]) == 4
    assert all((out / ours.name / p).read_bytes() == (out / peft_folder.name / p).read_bytes() for p in images[0])
    assert (theirs["method"], theirs["trainable_params"]) == (mine["method"], mine["trainable_params"])


# ----------------------------------------------------------------------------------------------------------------
# your own subject: a run trained on a folder of photos (train_dreambooth.py --images), your own prompts

def no_dataset(*args, **kwargs):
    raise AssertionError("looked for the DreamBooth dataset")


def test_a_run_on_your_photos_is_scored_on_them_with_your_prompt_file(photos_run, tmp_path, monkeypatch):
    """--prompts FILE: one prompt a line, {} for "<token> <class>"; the run's photos are its folder's, and neither
    needs the DreamBooth dataset. The table names the prompt set by the file's name."""
    prompt_file = tmp_path / "my_prompts.txt"
    prompt_file.write_text("a {} on the beach\n\n  a watercolour painting of a {}  \n")
    out = tmp_path / "eval"
    with monkeypatch.context() as patch:
        patch.setattr(sdxl, "find_data_dir", no_dataset)
        patch.setattr(sdxl, "_check_data_dir", no_dataset)
        [metrics] = evaluate.main(["--runs", str(photos_run.dir), "--prompts", str(prompt_file), "--output-dir",
                                   str(out)] + SMOKE)
    assert (metrics["subject"], metrics["setting"], metrics["prompt_set"], metrics["n_real"], metrics["n_images"]) == (
        "my_dog", "waveft-k2000-tiny-steps4-ga2", "my_prompts.txt", 5, 4)
    images = out / photos_run.dir.name / "images"
    assert sorted(p.name for p in images.iterdir()) == [
        "00_a_zjw_dog_on_the_beach", "01_a_watercolour_painting_of_a_zjw_dog", "generation.json"]
    assert (images / "01_a_watercolour_painting_of_a_zjw_dog" / "prompt.txt").read_text() == \
        "a watercolour painting of a zjw dog\n"
    assert "| waveft-k2000-tiny-steps4-ga2 | my_prompts.txt | waveft | k=2000 | 128,000 | 1 |" in \
        (out / "comparison.md").read_text()
    [metrics] = evaluate.main(["--runs", str(photos_run.dir), "--prompts", str(prompt_file), "--output-dir", str(out)]
                              + SMOKE + ["--max-prompts", "1"])
    assert metrics["prompt_set"] == "my_prompts.txt (first 1)"


def test_a_run_on_your_photos_with_the_dreambooth_prompts_of_its_kind_scores_as_the_subject_run(
        photos_run, evaluated, dreambooth_dir, tmp_path):
    """--kind live: the 25 prompts of the dataset's cats and dogs, for "zjw dog". The photos run is dog6's run bit for
    bit on copies of dog6's photos, so it scores exactly as the dog6 run does."""
    _, _, dog6 = evaluated
    [metrics] = evaluate.main(["--runs", str(photos_run.dir), "--kind", "live", "--data-dir", str(dreambooth_dir),
                               "--output-dir", str(tmp_path)] + SMOKE)
    assert metrics["prompt_set"] == dog6["prompt_set"] == "dreambooth (first 2)"
    same = ("setting", "prompt_set", "n_images", "n_real", "dino", "clip_i", "clip_t", "cmmd", "dino_diversity")
    assert {key: metrics[key] for key in same} == {key: dog6[key] for key in same}


def test_your_photos_and_prompts_refuse_bad_input_in_one_line(photos_run, tmp_path, capsys, monkeypatch):
    run = str(photos_run.dir)
    out = tmp_path / "eval"
    with pytest.raises(ValueError) as error:
        evaluate.main(["--runs", run, "--output-dir", str(out)] + SMOKE)
    assert str(error.value) == (f"run {photos_run.dir.name} was trained on your photos ({photos_run.photos}), not on a "
                                f"DreamBooth subject: pass --kind object or --kind live (the DreamBooth prompts of "
                                f"that kind) or --prompts FILE (your own)")
    with monkeypatch.context() as patch:  # no dataset where it is looked for
        patch.setenv("DREAMBOOTH_DIR", str(tmp_path / "nowhere"))
        patch.chdir(tmp_path)
        with pytest.raises(FileNotFoundError, match=r"^--kind reads the DreamBooth prompts from the dataset \(or give "
                                                    r"--prompts FILE\): DreamBooth dataset not found; looked in"):
            evaluate.main(["--runs", run, "--kind", "live", "--output-dir", str(out)] + SMOKE)
    moved = copy_run(photos_run.dir, tmp_path / "moved", images=str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"run {moved}: photo folder {tmp_path / 'gone'} does not "
                                                          f"exist")):
        evaluate.main(["--runs", str(moved), "--kind", "object", "--output-dir", str(out)] + SMOKE)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for prompts, message in ((empty, f'prompt file {empty} holds no prompt: one a line, {{}} for "<token> <class>"'),
                             (tmp_path / "nope.txt", f"cannot read prompt file {tmp_path / 'nope.txt'}: No such file "
                                                     f"or directory")):
        with pytest.raises(ValueError) as error:
            evaluate.main(["--runs", run, "--prompts", str(prompts), "--output-dir", str(out)] + SMOKE)
        assert str(error.value) == message
    assert not out.exists()
    for argv, message in ((["--kind", "dog"], "--kind dog: must be one of object, live"),
                          (["--kind", "live", "--prompts", str(empty)], "give --kind (the DreamBooth prompts of a "
                                                                        "kind) or --prompts (a file of your own), not "
                                                                        "both")):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.parse_args(["--runs", run] + argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"error: {message}; see --help\n"
