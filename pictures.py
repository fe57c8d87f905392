"""Pictures with pillow only (no matplotlib): every run's loss.png, image grids, and the line charts of docs/figures.py.

    pictures.plot_loss("outputs/<run>/loss.csv", "loss.png")     # the loss of every step and its moving average
    pictures.image_grid(images, cols=2, labels=[...])            # validation.png
"""
import csv
import math
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

import files

CHART_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#7f7f7f")


def chart_font(size=13):
    """Pillow's bundled TrueType font at `size` px (its small bitmap font where pillow has no FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, TypeError, ValueError):
        return ImageFont.load_default()


def _ticks(lo, hi, count=5):
    """About `count` round values (steps of 1, 2 or 5 times a power of ten) from lo to hi, and that step."""
    raw = (hi - lo) / count if hi > lo else 1.0
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)], step


def line_chart(series, title="", x_label="", y_label="", size=(640, 380)):
    """A white PIL image with one line per series, axes with round ticks and a legend.

    series: [(label, xs, ys)] or [(label, xs, ys, colour, width)]. Points whose y is not finite are left out (the
    line breaks there); a series of a single point is drawn as a dot."""
    font, (width, height) = chart_font(), size
    left, right, top, bottom = 64, 16, 30 if title else 12, 44  # margins: tick labels left, x label below
    points = [(x, y) for _, xs, ys, *_ in series for x, y in zip(xs, ys) if math.isfinite(y)]
    if not points:
        raise ValueError(f"line_chart {title!r}: nothing to draw (no finite values)")
    x_lo, x_hi = min(x for x, _ in points), max(x for x, _ in points)
    y_lo, y_hi = min(y for _, y in points), max(y for _, y in points)
    x_hi, y_hi = max(x_hi, x_lo + 1), y_hi if y_hi > y_lo else y_lo + 1  # one point or a flat line: any range
    y_ticks, y_step = _ticks(y_lo, y_hi)
    y_lo, y_hi = min(y_lo, y_ticks[0]), max(y_hi, y_ticks[-1])
    if y_hi - y_ticks[-1] > 1e-9 * y_step:  # round the top up to a tick, so the highest point sits under one
        y_hi = y_ticks[-1] + y_step
        y_ticks.append(y_hi)
    x_ticks, _ = _ticks(x_lo, x_hi, count=6)

    def px(x, y):  # data -> pixel
        return (left + (x - x_lo) / (x_hi - x_lo) * (width - left - right),
                height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom))

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for y in y_ticks:  # horizontal grid lines with their values
        _, v = px(x_lo, y)
        draw.line([(left, v), (width - right, v)], fill="#e6e6e6")
        draw.text((left - 6, v), f"{y:g}", fill="black", font=font, anchor="rm")
    for x in x_ticks:
        u, _ = px(x, y_lo)
        draw.line([(u, height - bottom), (u, height - bottom + 4)], fill="black")
        draw.text((u, height - bottom + 6), f"{x:g}", fill="black", font=font, anchor="ma")
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    draw.text((width / 2, 4), title, fill="black", font=font, anchor="ma")
    draw.text(((left + width - right) / 2, height - 4), x_label, fill="black", font=font, anchor="md")
    draw.text((4, top - 4), y_label, fill="black", font=font, anchor="ld")
    legend = []  # (label, colour)
    for i, (label, xs, ys, *style) in enumerate(series):
        colour = style[0] if style else CHART_COLOURS[i % len(CHART_COLOURS)]
        line_width = style[1] if len(style) > 1 else 2
        runs, run = [], []  # stretches of finite points
        for x, y in zip(xs, ys):
            if math.isfinite(y):
                run.append(px(x, y))
            elif run:
                runs, run = runs + [run], []
        for run in runs + [run]:
            if len(run) == 1:
                u, v = run[0]
                draw.ellipse([u - 3, v - 3, u + 3, v + 3], fill=colour)
            elif run:
                draw.line(run, fill=colour, width=line_width, joint="curve")
        if label:
            legend.append((label, colour))
    if legend:  # top right, on a white box over the lines
        text_width = max(draw.textlength(label, font=font) for label, _ in legend)
        x0, y0 = width - right - 8 - text_width - 34, top + 4
        draw.rectangle([x0, y0, width - right - 4, y0 + 17 * len(legend) + 6], fill="white", outline="#bbbbbb")
        for i, (label, colour) in enumerate(legend):
            v = y0 + 12 + 17 * i
            draw.line([(x0 + 6, v), (x0 + 26, v)], fill=colour, width=3)
            draw.text((x0 + 32, v), label, fill="black", font=font, anchor="lm")
    return image


def moving_average(values, window):
    """Trailing mean over the last `window` finite values (fewer at the start); NaN until the first finite one."""
    out, recent = [], []
    for value in values:
        if math.isfinite(value):
            recent = (recent + [value])[-window:]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


def plot_loss(csv_path, png_path, window=25):
    """Draw a run's loss.csv (columns step, loss[, prior_loss]) into png_path: the loss of every step (pale), its
    moving average over `window` steps, and, for runs with prior preservation (a prior_loss column that is not all
    zero), the prior loss and its average. The per-step loss of a diffusion model jumps with the random timestep;
    the average is the curve to read."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"step", "loss"} <= set(rows[0]):
        raise ValueError(f"{csv_path}: expected a header 'step,loss,prior_loss' and at least one row")
    try:
        steps = [int(row["step"]) for row in rows]
        columns = {name: [float(row[name]) for row in rows] for name in ("loss", "prior_loss") if name in rows[0]}
    except (TypeError, ValueError) as error:  # TypeError: a short row gives None
        raise ValueError(f"{csv_path}: not a loss log of numbers ({error})") from None
    window = max(1, min(window, len(steps)))
    series = [("loss", steps, columns["loss"], "#aec7e8", 1),
              (f"loss, moving average ({window} steps)", steps, moving_average(columns["loss"], window), "#1f77b4", 2)]
    if any(value != 0 for value in columns.get("prior_loss", [0])):
        series += [("prior loss", steps, columns["prior_loss"], "#ffbb78", 1),
                   (f"prior loss, moving average ({window} steps)", steps,
                    moving_average(columns["prior_loss"], window), "#ff7f0e", 2)]
    chart = line_chart(series, title=f"training loss of {Path(csv_path).resolve().parent.name}", x_label="step",
                       y_label="MSE")
    chart.save(png_path, format="PNG")  # format given: the path may be a temporary name
    return png_path


def image_grid(images, cols, labels=None):
    """Paste images row by row into one image; an optional label is written (wrapped) in a strip above each."""
    width, height = images[0].size
    chars_per_line = max(1, width // 6)  # PIL's default bitmap font is about 6 px per character
    labels = [textwrap.wrap(str(label or ""), chars_per_line) for label in labels] if labels else None
    strip = 2 + 11 * max(len(lines) for lines in labels) if labels else 0
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * width, rows * (height + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % cols) * width, (i // cols) * (height + strip)
        grid.paste(image.convert("RGB").resize((width, height)), (x, y + strip))
        if labels:
            draw.multiline_text((x + 2, y + 1), "\n".join(labels[i]), fill="black", spacing=1)
    return grid


def write_grid(path, real_images, entries, images, thumb=256, advice=None):
    """evaluate.py's grid.png: the real photos on the first row, then one row per prompt (its seeds), each cell
    labelled. entries: [(prompt_idx, prompt, path)] of `images`, a prompt's images together; advice: as write_file's."""
    rows = [[(f"real {i}", image) for i, image in enumerate(real_images)]]
    by_prompt = {}
    for image, (prompt_idx, prompt, image_path) in zip(images, entries):
        by_prompt.setdefault(prompt_idx, []).append((f"{prompt} | {image_path.stem}", image))
    rows += list(by_prompt.values())
    cols, thumb = max(map(len, rows)), min(thumb, images[0].width)
    blank = Image.new("RGB", (thumb, thumb), "white")
    cells = [(label, ImageOps.fit(image, (thumb, thumb))) for row in rows  # centre-cropped squares
             for label, image in row + [("", blank)] * (cols - len(row))]
    grid = image_grid([image for _, image in cells], cols, [label for label, _ in cells])
    return files.write_file(path, grid, advice)
