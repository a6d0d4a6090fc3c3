"""Synthetic VOC-layout demo data that a small network learns in minutes on a CPU.

Each scene is a low-saturation, textured background with one to three blobs. A blob's class is
its hue family (reds, greens, blues: each a 60-degree band of hue); its outline, size,
brightness, saturation and texture are random, and the background carries the same textures in
grey-ish colours. The hue cue is quick to learn, but a handful of labeled images covers only
part of each band and of the nuisance factors, so many unlabeled scenes of the same
distribution carry real information: the setting semi-supervised learning is for.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .classes import IGNORE_INDEX, voc_palette

DEMO_CLASSES = ["background", "red", "green", "blue"]
_HUE_CENTRES = {1: 0.0, 2: 120.0, 3: 240.0}  # degrees; each class spans +-30 degrees
_HUE_HALF_WIDTH = 30.0


def hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """HSV (hue in degrees, s and v in [0, 1]) -> RGB float in [0, 255], elementwise."""
    h = (hue % 360.0) / 60.0
    c = value * saturation
    x = c * (1 - np.abs(h % 2 - 1))
    zeros = np.zeros_like(c)
    sector = np.floor(h).astype(int) % 6
    table = [(c, x, zeros), (x, c, zeros), (zeros, c, x), (zeros, x, c), (x, zeros, c), (c, zeros, x)]
    rgb = np.zeros(h.shape + (3,), dtype=np.float32)
    for index, (r, g, b) in enumerate(table):
        where = sector == index
        rgb[where] = np.stack([r[where], g[where], b[where]], -1)
    return (rgb + (value - c)[..., None]) * 255.0


def _pattern(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random texture in [0, 1]: stripes, checks, dots or nothing, at a random scale and angle."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    period = rng.uniform(4.0, 12.0)
    kind = int(rng.integers(0, 4))
    if kind == 0:
        return ((u / period) % 1.0 < 0.5).astype(np.float32)
    if kind == 1:
        return (((np.floor(u / period) + np.floor(v / period)) % 2) == 0).astype(np.float32)
    if kind == 2:
        du, dv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        return (du * du + dv * dv < 0.08).astype(np.float32)
    return np.zeros((height, width), dtype=np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Grey-ish gradient with a grey-ish texture: the same textures as objects, but no strong hue."""
    corners = rng.uniform(40, 220, size=(2, 2, 1)).astype(np.float32)
    tint = rng.uniform(-25, 25, size=(1, 1, 3)).astype(np.float32)
    image = cv2.resize(corners, (width, height), interpolation=cv2.INTER_LINEAR)[..., None] + tint
    image = image + _pattern(rng, height, width)[..., None] * rng.uniform(-50, 50)
    return image


def _blob_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random ellipse or polygon, so the outline says nothing about the class."""
    mask = np.zeros((height, width), dtype=np.uint8)
    short = min(height, width)
    radius = rng.uniform(0.12, 0.3) * short
    cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
    if rng.random() < 0.5:
        axes = (int(radius), int(radius * rng.uniform(0.5, 1.0)))
        cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    else:
        count = int(rng.integers(4, 8))
        angles = np.sort(rng.uniform(0, 2 * np.pi, count))
        radii = radius * rng.uniform(0.6, 1.1, count)
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask.astype(bool)


def _paint_blob(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, family: int) -> None:
    height, width = mask.shape
    hue = _HUE_CENTRES[family] + rng.uniform(-_HUE_HALF_WIDTH, _HUE_HALF_WIDTH)
    saturation = rng.uniform(0.45, 1.0)
    value = rng.uniform(0.45, 1.0)
    texture = _pattern(rng, height, width) * rng.uniform(-0.3, 0.3)
    v_map = np.clip(value + texture, 0.15, 1.0)
    rgb = hsv_to_rgb(np.full((height, width), hue), np.full((height, width), saturation), v_map)
    image[mask] = rgb[mask]


def make_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 image, class-index label) pair; later blobs occlude earlier ones."""
    image = _background(rng, height, width)
    label = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        family = int(rng.integers(1, len(DEMO_CLASSES)))
        mask = _blob_mask(rng, height, width)
        if mask.sum() < 20:
            continue
        _paint_blob(rng, image, mask, family)
        label[mask] = family
    image += rng.normal(0, 4, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), label


def _voc_border(label: np.ndarray) -> np.ndarray:
    """VOC-style 1-px ignore band on object boundaries (SegmentationClass has these)."""
    grown = cv2.dilate(label, np.ones((3, 3), np.uint8))
    shrunk = cv2.erode(label, np.ones((3, 3), np.uint8))
    bordered = label.copy()
    bordered[(grown != shrunk)] = IGNORE_INDEX
    return bordered


def demo_palette() -> list[int]:
    """Flat [r, g, b, ...] colours that look like the demo's classes (black background, then red, green and
    blue; VOC's colour map would draw "blue" olive), VOC's for every other index, 255 (ignore) included."""
    colours = [0, 0, 0, 200, 30, 30, 30, 160, 30, 40, 70, 210]
    return colours + voc_palette()[len(colours):]


def write_voc_sample(folders: dict, sample_id: str, image: np.ndarray, label: np.ndarray, palette: list[int]) -> None:
    """One scene in VOC's layout: the JPEG, the palette PNG with VOC's ignore border, and the plain
    SegmentationClassAug PNG (what the trainer reads)."""
    cv2.imwrite(str(folders["JPEGImages"] / f"{sample_id}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, 95])
    bordered = Image.fromarray(_voc_border(label), mode="P")
    bordered.putpalette(palette)
    bordered.save(folders["SegmentationClass"] / f"{sample_id}.png")
    Image.fromarray(label, mode="L").save(folders["SegmentationClassAug"] / f"{sample_id}.png")


def write_voc_image_sets(voc: Path, ids: dict[str, list[str]]) -> None:
    """VOC's split lists for `ids["train"]` and `ids["val"]` (train_aug = train)."""
    sets = voc / "ImageSets"
    (sets / "Segmentation" / "train.txt").write_text("\n".join(ids["train"]) + "\n")
    (sets / "Segmentation" / "val.txt").write_text("\n".join(ids["val"]) + "\n")
    (sets / "Segmentation" / "trainval.txt").write_text("\n".join(ids["train"] + ids["val"]) + "\n")
    (sets / "SegmentationAug" / "train_aug.txt").write_text("\n".join(ids["train"]) + "\n")


def make_demo_voc(
    root: str | Path,
    num_train: int = 400,
    num_val: int = 100,
    size: tuple[int, int] = (64, 96),
    seed: int = 0,
) -> Path:
    """Write a VOC-layout tree under `root`/VOCdevkit/VOC2012 and return that folder.

    Layout: JPEGImages, SegmentationClass (palette PNGs with 255 borders), SegmentationClassAug
    (index PNGs), ImageSets/Segmentation/{train,val,trainval}.txt,
    ImageSets/SegmentationAug/train_aug.txt and classes.json. Image sides are drawn from `size`
    (low, high) per image; an int gives square images. Deterministic for a seed.
    """
    low, high = (size, size) if isinstance(size, int) else size
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    folders = {name: voc / name for name in ("JPEGImages", "SegmentationClass", "SegmentationClassAug")}
    for folder in list(folders.values()) + [voc / "ImageSets" / "Segmentation", voc / "ImageSets" / "SegmentationAug"]:
        folder.mkdir(parents=True, exist_ok=True)
    palette = demo_palette()
    rng = np.random.default_rng(seed)
    ids = {"train": [f"demo_{i:06d}" for i in range(num_train)], "val": [f"demo_{num_train + i:06d}" for i in range(num_val)]}
    for split_ids in ids.values():
        for sample_id in split_ids:
            height, width = (int(v) for v in rng.integers(low, high + 1, size=2))
            image, label = make_scene(rng, height, width)
            write_voc_sample(folders, sample_id, image, label, palette)
    write_voc_image_sets(voc, ids)
    classes = {"classes": DEMO_CLASSES, "ignore_index": IGNORE_INDEX, "palette": palette[: 3 * len(DEMO_CLASSES)]}
    (voc / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    return voc
