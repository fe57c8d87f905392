"""Tests of pictures.py: every run's loss.png (plot_loss, moving_average), drawn from its loss.csv."""
import math

import pytest
from PIL import Image

import pictures


def write_loss_csv(path, steps, prior):
    """A loss.csv exactly as train_dreambooth.py writes it."""
    rows = [f"{s},{0.5 / s:.6f},{(0.25 if prior else 0.0):.6f}" for s in range(1, steps + 1)]
    path.write_text("\n".join(["step,loss,prior_loss"] + rows) + "\n")
    return path


def colours(path):
    with Image.open(path) as image:
        return {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 20)}


def rgb(hex_colour):
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


@pytest.mark.parametrize("prior", [False, True])
def test_plot_loss_draws_the_loss_its_average_and_the_prior_loss_only_when_present(tmp_path, prior):
    png = pictures.plot_loss(write_loss_csv(tmp_path / "loss.csv", 40, prior), tmp_path / "loss.png")
    drawn = colours(png)
    assert rgb("#1f77b4") in drawn and rgb("#aec7e8") in drawn  # the moving average and the per-step loss
    assert (rgb("#ff7f0e") in drawn) == prior  # the prior loss's average, only for prior preservation


def test_plot_loss_of_one_step_and_bad_files(tmp_path):
    pictures.plot_loss(write_loss_csv(tmp_path / "loss.csv", 1, False), tmp_path / "loss.png")  # a single dot
    assert (tmp_path / "loss.png").stat().st_size > 1000
    (tmp_path / "empty.csv").write_text("step,loss,prior_loss\n")
    (tmp_path / "words.csv").write_text("step,loss,prior_loss\n1,high,0\n")
    for name in ("empty.csv", "words.csv"):
        with pytest.raises(ValueError, match=name):
            pictures.plot_loss(tmp_path / name, tmp_path / "x.png")


def test_moving_average_is_trailing_and_skips_non_finite_values():
    got = pictures.moving_average([1.0, 2.0, 3.0, math.nan, 5.0], window=2)
    assert got == [1.0, 1.5, 2.5, 2.5, 4.0]
    assert math.isnan(pictures.moving_average([math.nan, 1.0], 3)[0])
