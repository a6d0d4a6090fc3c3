"""Pictures: coloured label maps, overlays, the paper's Figure-6 grid and Figure-7-style curves.

Palettes are flat `[r, g, b, ...]` lists of 256 colours for PIL's `putpalette`, taken from
`cps_hf.data.classes` (VOC's bit-interleaved colour map; Cityscapes' train-id colours from
cityscapesscripts, ignore (255) black). Curves use matplotlib's object API with the Agg canvas,
so no global backend is switched and no display is needed (matplotlib is the `viz` extra).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data.classes import CITYSCAPES_PALETTE, voc_palette

VOC_PALETTE: list[int] = voc_palette(256)
PALETTES = {"voc": VOC_PALETTE, "cityscapes": list(CITYSCAPES_PALETTE)}


def get_palette(name_or_palette: str | Sequence[int] | None, num_labels: int | None = None) -> list[int]:
    """A palette by dataset name ("voc", "cityscapes"), or a given flat list padded to 256 colours.
    `None` gives the VOC palette, which distinguishes any 256 ids."""
    if name_or_palette is None:
        return VOC_PALETTE
    if isinstance(name_or_palette, str):
        if name_or_palette not in PALETTES:
            raise ValueError(f"unknown palette {name_or_palette!r}; choose one of {sorted(PALETTES)} or pass a list")
        return PALETTES[name_or_palette]
    palette = [int(v) for v in name_or_palette]
    if len(palette) % 3 or len(palette) > 768:
        raise ValueError(f"a palette is a flat [r, g, b, ...] list of at most 256 colours, got {len(palette)} values")
    return palette + VOC_PALETTE[len(palette):]


def _as_array(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def colorize(label_map, palette: str | Sequence[int] | None = "voc", rgb: bool = False) -> Image.Image:
    """A class-id map (H, W) as a palette ("P") image, or RGB with `rgb=True`. Ids must be 0..255."""
    labels = _as_array(label_map)
    if labels.ndim != 2:
        raise ValueError(f"label_map must have shape (H, W), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"label_map values must lie in 0..255 to be coloured, got {labels.min()}..{labels.max()}")
    image = Image.fromarray(labels.astype(np.uint8))  # mode "L"; putpalette turns it into "P"
    image.putpalette(get_palette(palette))
    return image.convert("RGB") if rgb else image


def denormalize(pixel_values, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> np.ndarray:
    """Normalised (3, H, W) pixel values back to an (H, W, 3) uint8 image (ImageNet mean/std by default)."""
    values = _as_array(pixel_values).astype(np.float32)
    if values.ndim != 3 or values.shape[0] != 3:
        raise ValueError(f"pixel_values must have shape (3, H, W), got {values.shape}")
    values = values * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return (values.transpose(1, 2, 0).clip(0, 1) * 255).round().astype(np.uint8)


def as_rgb_image(image) -> Image.Image:
    """PIL image, (H, W, 3) uint8 array, or (3, H, W) tensor/array (normalised floats are denormalised)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = _as_array(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = denormalize(array) if array.dtype.kind == "f" else array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) or (3, H, W), got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (array.clip(0, 1) * 255).round().astype(np.uint8) if array.dtype.kind == "f" else array.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def overlay(image, label_map, palette: str | Sequence[int] | None = "voc", alpha: float = 0.5,
            ignore_index: int | None = 255) -> Image.Image:
    """Blend the coloured label map over the image; `ignore_index` pixels show the image only."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    base = np.asarray(as_rgb_image(image), dtype=np.float32)
    labels = _as_array(label_map)
    if labels.shape != base.shape[:2]:
        raise ValueError(f"label_map shape {labels.shape} differs from the image size {base.shape[:2]}")
    colours = np.asarray(colorize(labels, palette, rgb=True), dtype=np.float32)
    weight = np.full(labels.shape + (1,), alpha, np.float32)
    if ignore_index is not None:
        weight[labels == ignore_index] = 0.0
    return Image.fromarray((base * (1 - weight) + colours * weight).round().astype(np.uint8))


def _cell(value, is_image: bool, palette, size: tuple[int, int]) -> Image.Image:
    picture = as_rgb_image(value) if is_image else colorize(value, palette, rgb=True)
    if picture.size != size:
        picture = picture.resize(size, Image.BILINEAR if is_image else Image.NEAREST)
    return picture


def _grid_cell_size(first_size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """The first image's size, scaled up (aspect kept) until its long side reaches `min_side`,
    so small validation crops are not shown as thumbnails nobody can read."""
    width, height = first_size
    scale = max(1.0, min_side / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _font(size: int) -> ImageFont.ImageFont:
    """A scalable font of `size` px (Pillow's bundled one); the tiny bitmap font where FreeType is missing."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom


def _fitted_font(text: str, size: int, width: int) -> ImageFont.ImageFont:
    """The largest font up to `size` (down to 10 px) in which `text` fits `width`: long titles shrink."""
    font = _font(size)
    while size > 10 and _text_size(font, text)[0] > width:
        size -= 1
        font = _font(size)
    return font


def _title_band(titles, font_size: int, cell_width: int, gap: int) -> tuple[list, int]:
    """Each column title's font (shrunk to fit its cell) and the height of the band above the cells."""
    if titles is None:
        return [], 0
    fonts = [_fitted_font(str(title), font_size, cell_width) for title in titles]
    return fonts, max(_text_size(font, str(title))[1] for font, title in zip(fonts, titles)) + 2 * gap


def _legend_entries(rows, class_names, legend: str, palette) -> list[tuple[int, str, tuple[int, int, int]]]:
    """(id, name, colour) of the classes to explain: those drawn in the label cells, or all named ones."""
    names = dict(enumerate(class_names)) if isinstance(class_names, (list, tuple)) else dict(class_names)
    names = {int(k): str(v) for k, v in names.items()}
    if legend == "all":
        ids = sorted(names)
    elif legend == "present":
        ids = sorted({int(v) for row in rows for cell in row[1:] for v in np.unique(_as_array(cell))})
    else:
        raise ValueError(f"legend must be 'present' or 'all', got {legend!r}")
    colours = get_palette(palette)
    return [(i, names.get(i, "ignore" if i == 255 else str(i)), tuple(colours[3 * i : 3 * i + 3])) for i in ids]


def _legend_layout(entries, font, width: int, gap: int) -> tuple[list[tuple[int, int]], int]:
    """Top-left corner of each legend entry, wrapped into rows across `width`, and the total height."""
    swatch = _text_size(font, "Hg")[1]
    line = swatch + gap
    positions, left, top = [], gap, gap
    for _, name, _ in entries:
        entry_width = swatch + 2 * gap + _text_size(font, name)[0] + 3 * gap
        if left > gap and left + entry_width > width:
            left, top = gap, top + line
        positions.append((left, top))
        left += entry_width
    return positions, (top + line + gap if entries else 0)


def comparison_grid(rows: Sequence[Sequence], titles: Sequence[str] | None = ("Image", "Ground truth"),
                    palette: str | Sequence[int] | None = "voc", cell_size: tuple[int, int] | None = None,
                    gap: int = 4, min_cell_side: int = 256, class_names=None, legend: str = "present",
                    font_size: int | None = None) -> Image.Image:
    """A grid like the paper's Figure 6: each row is (image, ground truth, *predictions).

    Every cell is resized to `cell_size` (width, height; default the first image's size scaled up until
    its long side is at least `min_cell_side`), labels with nearest neighbour so class edges stay sharp.
    `titles` label the columns (e.g. "Image", "Ground truth", "Supervised", "CPS") in a font sized to
    the cells (`font_size` overrides). `class_names` (a list, or an `id2label` dict) adds a legend of
    colour swatches under the grid: the classes drawn in the label cells (`legend="present"`, ignore
    255 included), or every named class (`legend="all"`).
    """
    if not rows:
        raise ValueError("comparison_grid needs at least one row")
    columns = len(rows[0])
    if columns < 2 or any(len(row) != columns for row in rows):
        raise ValueError(f"every row must be (image, ground truth, *predictions) of the same length; got "
                         f"{[len(row) for row in rows]}")
    if titles is not None and len(titles) not in (columns, 2):
        raise ValueError(f"{len(titles)} titles for {columns} columns")
    if titles is not None and len(titles) == 2 < columns:
        titles = list(titles) + [f"Prediction {i}" for i in range(1, columns - 1)]
    size = tuple(cell_size) if cell_size else _grid_cell_size(as_rgb_image(rows[0][0]).size, min_cell_side)
    font_size = font_size or max(14, min(32, round(max(size) / 12)))
    width = columns * size[0] + (columns + 1) * gap
    title_fonts, title_height = _title_band(titles, font_size, size[0], gap)
    entries = _legend_entries(rows, class_names, legend, palette) if class_names is not None else []
    legend_font = _font(font_size)
    positions, legend_height = _legend_layout(entries, legend_font, width, gap)
    body_height = len(rows) * size[1] + (len(rows) + 1) * gap
    grid = Image.new("RGB", (width, title_height + body_height + legend_height), "white")
    draw = ImageDraw.Draw(grid)
    for column in range(columns):
        left = gap + column * (size[0] + gap)
        if titles is not None:
            draw.text((left, gap), str(titles[column]), fill="black", font=title_fonts[column])
        for row_index, row in enumerate(rows):
            top = title_height + gap + row_index * (size[1] + gap)
            grid.paste(_cell(row[column], column == 0, palette, size), (left, top))
    _draw_legend(draw, entries, positions, legend_font, title_height + body_height, gap)
    return grid


def _draw_legend(draw, entries, positions, font, top: int, gap: int) -> None:
    swatch = _text_size(font, "Hg")[1]
    for (_, name, colour), (left, offset) in zip(entries, positions):
        y = top + offset
        draw.rectangle([left, y, left + swatch, y + swatch], fill=colour, outline="black")
        draw.text((left + swatch + 2 * gap, y), name, fill="black", font=font)


def read_log(path: str | Path) -> list[dict]:
    """The trainer's `log.jsonl`: one JSON object per line."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def split_runs(log_records: Sequence[dict], x_key: str = "step") -> list[list[dict]]:
    """The log cut wherever `x_key` goes back: one list per run. A run's own log never goes back (a resume
    drops the records after its checkpoint), so more than one part means several runs wrote to one file,
    one after the other or interleaved, which a single curve would draw as zig-zags."""
    runs, last = [[]], None
    for record in log_records:
        step = record.get(x_key)
        if _is_number(step) and last is not None and step < last:
            runs.append([])
        if _is_number(step):
            last = step
        runs[-1].append(record)
    return [run for run in runs if run]


def numeric_keys(log_records: Iterable[dict]) -> set[str]:
    """Keys with at least one finite number in the log (an all-NaN agreement has nothing to plot)."""
    return {key for record in log_records for key, value in record.items() if _is_number(value)}


def plot_curves(log_records: Iterable[dict], keys: Sequence[str], path: str | Path, x_key: str = "step",
                title: str | None = None, ylabels: dict[str, str] | None = None) -> Path:
    """One panel per key (e.g. loss, loss_cps, agreement, eval_mean_iou) against `x_key`, saved as PNG.

    Records without a key are skipped for that panel (evaluation is logged less often than losses).
    Each panel's y axis is labelled with `ylabels[key]`, else the key.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = list(log_records)
    present = [key for key in keys if any(_is_number(r.get(key)) and _is_number(r.get(x_key)) for r in records)]
    missing = [key for key in keys if key not in present]
    if not present or missing:
        available = sorted({k for r in records for k, v in r.items() if _is_number(v)})
        raise ValueError(f"no numeric values of {missing or list(keys)} against {x_key!r} in the log; "
                         f"numeric keys present: {available}")
    columns = min(len(present), 3)
    rows = math.ceil(len(present) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows), dpi=100)
    FigureCanvasAgg(figure)
    for index, key in enumerate(present):
        axes = figure.add_subplot(rows, columns, index + 1)
        points = [(r[x_key], r[key]) for r in records if _is_number(r.get(key)) and _is_number(r.get(x_key))]
        xs, ys = zip(*points)
        axes.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3)
        axes.set_xlabel(x_key)
        axes.set_ylabel((ylabels or {}).get(key, key))
        axes.set_title(key)
        axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def plot_lines(log_records: Iterable[dict], keys: Sequence[str], path: str | Path, x_key: str = "step",
               labels: dict[str, str] | None = None, title: str | None = None, ylabel: str | None = None) -> Path:
    """All `keys` as labelled lines on one panel, saved as PNG: curves meant to be compared, such as the
    two networks' agreement on labeled and unlabeled images (the paper's Figure 7)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = list(log_records)
    series = {key: [(r[x_key], r[key]) for r in records if _is_number(r.get(key)) and _is_number(r.get(x_key))]
              for key in keys}
    missing = [key for key, points in series.items() if not points]
    if not series or missing:
        available = sorted({k for r in records for k, v in r.items() if _is_number(v)})
        raise ValueError(f"no numeric values of {missing or list(keys)} against {x_key!r} in the log; "
                         f"numeric keys present: {available}")
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for key, points in series.items():
        xs, ys = zip(*points)
        axes.plot(xs, ys, label=(labels or {}).get(key, key), marker="o" if len(points) < 30 else None, markersize=3)
    axes.set_xlabel(x_key)
    if ylabel:
        axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    # below the axes, not over the curves (agreement curves fill the whole panel)
    axes.legend(loc="upper left", bbox_to_anchor=(0.0, -0.16), fontsize=8, frameon=False)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
