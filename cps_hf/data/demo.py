"""Synthetic VOC-layout demo data that a small network can learn at 64-96 px.

Each scene is a textured background with several objects from 5 families (disc, square,
triangle, ring, striped ellipse); an object's class is its shape/texture family, never its
colour, which is random. Sizes, positions, rotations and overlaps vary, so a handful of labeled
images underfits the variation while many unlabeled scenes of the same distribution carry real
information: the setting semi-supervised learning is for.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .classes import IGNORE_INDEX, voc_palette

DEMO_CLASSES = ["background", "disc", "square", "triangle", "ring", "striped"]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour gradient + noise + distractor strokes (all background class)."""
    corners = rng.uniform(0, 255, size=(2, 2, 3)).astype(np.float32)
    image = cv2.resize(corners, (width, height), interpolation=cv2.INTER_LINEAR)
    image += rng.normal(0, rng.uniform(4, 18), size=image.shape).astype(np.float32)
    for _ in range(int(rng.integers(0, 4))):
        p1 = tuple(int(v) for v in rng.integers(0, [width, height]))
        p2 = tuple(int(v) for v in rng.integers(0, [width, height]))
        cv2.line(image, p1, p2, tuple(float(c) for c in rng.uniform(0, 255, 3)), int(rng.integers(1, 3)))
    return image


def _shape_mask(rng: np.random.Generator, family: int, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    short = min(height, width)
    radius = int(rng.uniform(0.08, 0.22) * short) + 3
    cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
    angle = rng.uniform(0, 2 * np.pi)
    if family == 1:  # disc
        cv2.circle(mask, (cx, cy), radius, 1, -1)
    elif family == 2:  # square, rotated
        corners = [(cx + radius * np.cos(angle + k * np.pi / 2), cy + radius * np.sin(angle + k * np.pi / 2)) for k in range(4)]
        cv2.fillPoly(mask, [np.round(corners).astype(np.int32)], 1)
    elif family == 3:  # triangle, rotated and slightly irregular
        corners = [
            (cx + radius * rng.uniform(0.8, 1.3) * np.cos(angle + k * 2 * np.pi / 3),
             cy + radius * rng.uniform(0.8, 1.3) * np.sin(angle + k * 2 * np.pi / 3))
            for k in range(3)
        ]
        cv2.fillPoly(mask, [np.round(corners).astype(np.int32)], 1)
    elif family == 4:  # ring
        cv2.circle(mask, (cx, cy), radius + 2, 1, max(2, radius // 2))
    else:  # striped ellipse
        axes = (radius + 2, max(3, int(radius * rng.uniform(0.5, 0.9))))
        cv2.ellipse(mask, (cx, cy), axes, float(np.degrees(angle)), 0, 360, 1, -1)
    return mask.astype(bool)


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, family: int) -> None:
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    if family == 5:
        other = rng.uniform(0, 255, 3).astype(np.float32)
        period = int(rng.integers(3, 6))
        yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
        direction = rng.choice([xx, yy, xx + yy])
        stripes = ((direction // period) % 2).astype(bool)
        image[mask & stripes] = colour
        image[mask & ~stripes] = other
    else:
        shade = rng.normal(0, 6, size=(int(mask.sum()), 3)).astype(np.float32)
        image[mask] = colour + shade


def make_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 image, class-index label) pair; later objects occlude earlier ones."""
    image = _background(rng, height, width)
    label = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        family = int(rng.integers(1, len(DEMO_CLASSES)))
        mask = _shape_mask(rng, family, height, width)
        if mask.sum() < 6:
            continue
        _paint(rng, image, mask, family)
        label[mask] = family
    return np.clip(image, 0, 255).astype(np.uint8), label


def _voc_border(label: np.ndarray) -> np.ndarray:
    """VOC-style 1-px ignore band on object boundaries (SegmentationClass has these)."""
    grown = cv2.dilate(label, np.ones((3, 3), np.uint8))
    shrunk = cv2.erode(label, np.ones((3, 3), np.uint8))
    bordered = label.copy()
    bordered[(grown != shrunk)] = IGNORE_INDEX
    return bordered


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
    palette = voc_palette()
    rng = np.random.default_rng(seed)
    ids = {"train": [f"demo_{i:06d}" for i in range(num_train)], "val": [f"demo_{num_train + i:06d}" for i in range(num_val)]}
    for split_ids in ids.values():
        for sample_id in split_ids:
            height, width = (int(v) for v in rng.integers(low, high + 1, size=2))
            image, label = make_scene(rng, height, width)
            cv2.imwrite(str(folders["JPEGImages"] / f"{sample_id}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            bordered = Image.fromarray(_voc_border(label), mode="P")
            bordered.putpalette(palette)
            bordered.save(folders["SegmentationClass"] / f"{sample_id}.png")
            Image.fromarray(label, mode="L").save(folders["SegmentationClassAug"] / f"{sample_id}.png")
    sets = voc / "ImageSets"
    (sets / "Segmentation" / "train.txt").write_text("\n".join(ids["train"]) + "\n")
    (sets / "Segmentation" / "val.txt").write_text("\n".join(ids["val"]) + "\n")
    (sets / "Segmentation" / "trainval.txt").write_text("\n".join(ids["train"] + ids["val"]) + "\n")
    (sets / "SegmentationAug" / "train_aug.txt").write_text("\n".join(ids["train"]) + "\n")
    classes = {"classes": DEMO_CLASSES, "ignore_index": IGNORE_INDEX, "palette": palette[: 3 * len(DEMO_CLASSES)]}
    (voc / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    return voc
