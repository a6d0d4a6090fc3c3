"""Palettes, colourised maps, overlays, the Figure-6 grid and curve PNGs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cps_hf.visualize import (
    PALETTES,
    VOC_PALETTE,
    colorize,
    comparison_grid,
    denormalize,
    get_palette,
    overlay,
    plot_curves,
    read_log,
)


def colour(palette, index):
    return tuple(palette[3 * index : 3 * index + 3])


def test_standard_palette_colours():
    assert len(VOC_PALETTE) == 768
    assert colour(VOC_PALETTE, 0) == (0, 0, 0)
    assert colour(VOC_PALETTE, 1) == (128, 0, 0)  # aeroplane
    assert colour(VOC_PALETTE, 15) == (192, 128, 128)  # person
    assert colour(VOC_PALETTE, 255) == (224, 224, 192)  # VOC boundary / ignore
    cityscapes = PALETTES["cityscapes"]
    assert colour(cityscapes, 0) == (128, 64, 128)  # road
    assert colour(cityscapes, 13) == (0, 0, 142)  # car
    assert colour(cityscapes, 18) == (119, 11, 32)  # bicycle
    assert colour(cityscapes, 255) == (0, 0, 0)
    assert get_palette([1, 2, 3])[:6] == [1, 2, 3, 128, 0, 0]
    with pytest.raises(ValueError, match="unknown palette"):
        get_palette("ade")


def test_colorize_keeps_ids_as_palette_indices():
    labels = np.array([[0, 1], [15, 255]])
    image = colorize(torch.from_numpy(labels))
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), labels)
    rgb = np.asarray(colorize(labels, "voc", rgb=True))
    assert tuple(rgb[1, 0]) == (192, 128, 128) and tuple(rgb[1, 1]) == (224, 224, 192)
    with pytest.raises(ValueError, match="0..255"):
        colorize(np.array([[0, 300]]))


def test_overlay_blends_except_on_ignored_pixels():
    image = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[1, 1], [0, 255]])
    np.testing.assert_array_equal(np.asarray(overlay(image, labels, alpha=0.0)), image)
    full = np.asarray(overlay(image, labels, alpha=1.0))
    assert tuple(full[0, 0]) == (128, 0, 0) and tuple(full[1, 0]) == (0, 0, 0)
    assert tuple(full[1, 1]) == (100, 100, 100)  # ignore shows the image
    half = np.asarray(overlay(image, labels, alpha=0.5))
    assert tuple(half[0, 0]) == (114, 50, 50)
    with pytest.raises(ValueError, match="differs from the image size"):
        overlay(image, np.zeros((3, 3), np.int64))


def test_denormalize_inverts_imagenet_normalisation():
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3)).astype(np.uint8)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    normalised = ((rgb / 255.0 - mean) / std).transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(denormalize(torch.from_numpy(normalised)), rgb)


def test_comparison_grid_layout_and_cells():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (8, 10, 3)).astype(np.uint8)
    truth = np.full((8, 10), 15)
    rows = [(image, truth, np.zeros((8, 10), np.int64), truth), (image, truth, truth, truth)]
    grid = comparison_grid(rows, titles=["Image", "Ground truth", "Supervised", "CPS"], gap=4)
    assert grid.size == (4 * 10 + 5 * 4, 16 + 2 * 8 + 3 * 4)
    pixels = np.asarray(grid)
    np.testing.assert_array_equal(pixels[16 + 4 : 16 + 12, 4:14], image)  # first image cell
    assert tuple(pixels[16 + 5, 4 + 14 + 1]) == (192, 128, 128)  # ground truth cell, person colour
    assert tuple(pixels[16 + 5, 4 + 2 * 14 + 1]) == (0, 0, 0)  # supervised predicted background
    resized = comparison_grid(rows, titles=None, cell_size=(20, 16))
    assert resized.size == (4 * 20 + 5 * 4, 2 * 16 + 3 * 4)
    with pytest.raises(ValueError, match="same length"):
        comparison_grid([(image, truth), (image, truth, truth)])


def test_plot_curves_and_read_log(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"step": s, "loss": 2.0 / (s + 1), "agreement": 0.5 + s / 40} for s in range(20)]
    lines.append({"step": 20, "eval_mean_iou": 0.4})
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    records = read_log(log)
    assert len(records) == 21
    out = plot_curves(records, ["loss", "agreement", "eval_mean_iou"], tmp_path / "figs" / "curves.png")
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size == (1350, 320)
    with pytest.raises(ValueError, match=r"no numeric values of \['loss_cps'\].*agreement"):
        plot_curves(records, ["loss", "loss_cps"], tmp_path / "x.png")
    log.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2: not a JSON object"):
        read_log(log)
