"""evaluate.py: the metric maths on controlled inputs, model loading, the by-prompt layout, the comparison table,
an end-to-end run on the tiny SDXL with a tiny adapter (resumable), and clear errors for bad input."""
import json
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import evaluate
import sdxl

TINY = ["--dino", "tiny", "--clip", "tiny", "--cmmd-clip", "tiny"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Every model here is tiny: a second intra-op thread only adds overhead, and on a shared 2-core machine a
    parallel region waiting for a descheduled thread is many times slower. Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_models():
    return evaluate.load_metric_models("tiny", "tiny", "tiny")


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


# ----------------------------------------------------------------------------------------------------------------
# model loading


def test_metric_models_load_from_local_folders_through_from_pretrained(tiny_models, tmp_path, dreambooth_dir):
    tiny_models.dino.save_pretrained(tmp_path / "dino")
    tiny_models.clip.save_pretrained(tmp_path / "clip")
    tiny_models.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = evaluate.load_metric_models(str(tmp_path / "dino"), str(tmp_path / "clip"), str(tmp_path / "clip"))
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
        evaluate.load_metric_models(**names)
    assert time.time() - start < 10
    with pytest.raises(FileNotFoundError, match=f"folder /no/such/dir does not exist .*{flag}"):
        evaluate.load_metric_models(**{**names, flag[2:].replace("-", "_"): "/no/such/dir"})


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
    with pytest.raises(FileNotFoundError, match="no images found"):
        evaluate.main(["--metrics-only", str(tmp_path / "eval"), "--subject", "dog6", "--data-dir",
                       str(dreambooth_dir)] + TINY)
    with pytest.raises(SystemExit):  # --subject is required
        evaluate.parse_args(["--metrics-only", str(images)])


def test_comparison_table_is_mean_and_std_over_subjects(tmp_path):
    runs = [dict(method="waveft", budget="k=2592", trainable_params=1000, dino=d, cmmd=c)
            for d, c in ((0.4, 1.0), (0.6, 2.0), (0.8, 3.0))] + \
           [dict(method="lora", budget="r=1", trainable_params=120, dino=0.5, cmmd=1.5, dino_diversity=0.25)]
    table = evaluate.write_comparison(runs, tmp_path)
    assert "| lora | r=1 | 120 | 1 | 0.500 ± 0.000 | 1.500 ± 0.000 | 0.250 ± 0.000 |" in table
    assert "| waveft | k=2592 | 1,000 | 3 | 0.600 ± 0.200 | 2.000 ± 1.000 | - |" in table  # no diversity there
    assert table.startswith("| method | k or rank | trainable params | subjects | DINO ↑ | CMMD ↓ | DINO diversity ↑ |")
    csv_rows = (tmp_path / "comparison.csv").read_text().splitlines()
    assert csv_rows[0] == ("method,budget,trainable_params,subjects,dino_mean,dino_std,cmmd_mean,cmmd_std,"
                           "dino_diversity_mean,dino_diversity_std")
    assert csv_rows[1:] == ["waveft,k=2592,1000,3,0.6,0.2,2.0,1.0,,", "lora,r=1,120,1,0.5,0.0,1.5,0.0,0.25,0.0"]
    assert evaluate.method_and_budget(dict(method="waveft", use_idwt=False, k=7)) == ("waveft_noidwt", "k=7")
    assert evaluate.method_and_budget(dict(method="lora", rank=1, k=2592)) == ("lora", "r=1")
    assert evaluate.method_and_budget(dict(method="waveft", k=9, wavelet="db1", scaling=25.0)) == ("waveft", "k=9")
    assert evaluate.method_and_budget(dict(method="waveft", k=9, wavelet="db4", scaling=10.0)) == \
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
    import waveft
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
    assert (out / "comparison.csv").read_text().startswith("method,budget,trainable_params,subjects,dino_mean")


def test_images_are_the_merged_adapter_at_each_seed(evaluated):
    import waveft
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
    images[1].unlink()  # 00_.../seed43.png: as if the previous evaluation was killed while writing it
    evaluate.main(["--runs", str(run), "--out-dir", str(out)] + SMOKE)
    assert calls == [(["a zjw dog in the jungle"], [43])] and images[1].is_file()
    with pytest.raises(ValueError, match="holds images made with other steps"):  # never reuse stale images
        evaluate.main(["--runs", str(run), "--out-dir", str(out)] + SMOKE + ["--steps", "3"])


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
    with pytest.raises(FileNotFoundError, match="(?s)r2: DreamBooth dataset not found.*git clone"):
        evaluate.main(["--runs", str(copy_run(tiny_run_dir, tmp_path / "r2", data_dir=str(tmp_path)))] + SMOKE)
    run = copy_run(tiny_run_dir, tmp_path / "r3")
    with pytest.raises(ValueError, match="trained for model 'tiny'.*not for --model 'stabilityai/sdxl-other'"):
        evaluate.main(["--runs", str(run), "--model", "stabilityai/sdxl-other"] + SMOKE)
    other = copy_run(tiny_run_dir, tmp_path / "r4", model=str(tmp_path / "another_sdxl"))
    with pytest.raises(ValueError, match="trained for model 'tiny' but config.json says .*another_sdxl"):
        evaluate.main(["--runs", str(other)] + SMOKE)


def test_adapter_for_a_different_architecture_fails_clearly(tiny_run_dir, tmp_path, monkeypatch):
    import waveft
    run = copy_run(tiny_run_dir, tmp_path / "run")
    model = torch.nn.Sequential()
    model.add_module("to_q", torch.nn.Linear(8, 8))  # a model with a to_q that the tiny UNet does not have
    waveft.inject(model, k=4)
    waveft.save(model, run / "adapter.safetensors", extra_metadata=dict(model="tiny"))
    with pytest.raises(ValueError, match=r"adapter .*run/adapter.safetensors does not fit model 'tiny'"):
        evaluate.main(["--runs", str(run), "--out-dir", str(tmp_path / "eval")] + SMOKE)


def test_command_line_error_is_one_clear_line(tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, str(evaluate.__file__), "--runs", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"evaluate.py: error: run folder {tmp_path / 'nope'} does not exist"
