"""Class names, palettes and label-id tables of the supported datasets.

Cityscapes comes from cityscapesscripts' own label table (the single source of truth for
labelId -> trainId), so nothing here can drift from the benchmark's definition.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DatasetError

IGNORE_INDEX = 255

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]


def voc_palette(num_colors: int = 256) -> list[int]:
    """The VOC colour map (bit-interleaved class index), flat [r, g, b, ...] for PIL `putpalette`."""
    palette = []
    for index in range(num_colors):
        r = g = b = 0
        value = index
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette += [r, g, b]
    return palette


def _cityscapes_table():
    from cityscapesscripts.helpers.labels import labels

    train_labels = sorted((lab for lab in labels if 0 <= lab.trainId < IGNORE_INDEX), key=lambda lab: lab.trainId)
    names = [lab.name for lab in train_labels]
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for lab in labels:
        if 0 <= lab.id < 256 and 0 <= lab.trainId < IGNORE_INDEX:
            lut[lab.id] = lab.trainId
    palette = [c for lab in train_labels for c in lab.color]
    palette += [0, 0, 0] * (256 - len(train_labels))
    return names, lut, palette


CITYSCAPES_CLASSES, CITYSCAPES_LABELID_TO_TRAINID, CITYSCAPES_PALETTE = _cityscapes_table()


@dataclass(frozen=True)
class ClassSpec:
    """Class names plus the label value that means 'ignore' in the files on disk."""

    names: list[str]
    ignore_index: int = IGNORE_INDEX
    palette: list[int] | None = None


def read_classes_json(path: str | Path) -> ClassSpec:
    """Read `{"classes": [...], "ignore_index": N, "palette": [...]?}` (custom or demo data)."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: cannot read class file ({err})") from err
    names = spec.get("classes") if isinstance(spec, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DatasetError(f"{path}: field 'classes' must be a non-empty list of class names")
    if len(names) > IGNORE_INDEX:
        raise DatasetError(f"{path}: field 'classes' has {len(names)} names; at most {IGNORE_INDEX} are supported")
    ignore_index = spec.get("ignore_index", IGNORE_INDEX)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not 0 <= ignore_index <= 255:
        raise DatasetError(f"{path}: field 'ignore_index' must be an integer in 0..255, got {ignore_index!r}")
    if ignore_index < len(names):
        raise DatasetError(f"{path}: 'ignore_index' {ignore_index} collides with class index of {names[ignore_index]!r}")
    palette = spec.get("palette")
    if palette is not None and (not isinstance(palette, list) or len(palette) % 3):
        raise DatasetError(f"{path}: field 'palette' must be a flat [r, g, b, ...] list")
    return ClassSpec(names=list(names), ignore_index=ignore_index, palette=palette)
