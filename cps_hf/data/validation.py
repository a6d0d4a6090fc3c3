"""Decoding of image/label records with checks that name the file when something is wrong.

Training decodes records itself (datasets' `Image(decode=False)` gives `{"path", "bytes"}`)
so every failure can say which file broke, and so images go through OpenCV, which decodes
and converts faster than PIL (see benchmarks/loader_throughput.py). Labels go through PIL:
OpenCV expands palette PNGs to colours, PIL keeps the class indices.
"""

from __future__ import annotations

import io
import os
from typing import Any

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageOps

from .classes import IGNORE_INDEX
from .errors import DatasetError


def record_name(value: Any, fallback: str = "<in-memory image>") -> str:
    """Best human-readable name of an image record: its path, else the caller's fallback."""
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    filename = getattr(value, "filename", None)
    return filename or fallback


def _read_bytes(value: Any, name: str) -> bytes:
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        value = value.get("path")
        if value is None:
            raise DatasetError(f"{name}: image record has neither 'bytes' nor 'path'")
    try:
        with open(value, "rb") as handle:
            return handle.read()
    except FileNotFoundError as err:
        raise DatasetError(f"{name}: file not found") from err
    except OSError as err:
        raise DatasetError(f"{name}: cannot read file ({err})") from err


def decode_image(value: Any, name: str | None = None) -> np.ndarray:
    """Any image record (path, `{"path","bytes"}`, PIL, array) -> uint8 RGB array (H, W, 3).

    EXIF orientation is applied, matching what `datasets.Image` decoding does, so train (this
    path) and eval (datasets-decoded PIL images) see the same pixels.
    """
    name = name or record_name(value)
    if isinstance(value, np.ndarray):
        array = value
    elif isinstance(value, Image.Image):
        array = np.asarray(value if value.mode == "RGB" else value.convert("RGB"))
    else:
        data = np.frombuffer(_read_bytes(value, name), dtype=np.uint8)
        if data[:2].tobytes() == b"\xff\xd8" and b"\xff\xd9" not in data[-64:].tobytes():
            # OpenCV fills a truncated JPEG with grey and carries on; refuse it instead.
            raise DatasetError(f"{name}: truncated JPEG (no end-of-image marker)")
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if bgr is None:
            raise DatasetError(f"{name}: cannot decode image (truncated, empty or not an image file)")
        array = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise DatasetError(f"{name}: expected an 8-bit RGB image, got array {array.shape} {array.dtype}")
    return array


def decode_label(value: Any, name: str | None = None) -> np.ndarray:
    """A class-index label record -> uint8 array (H, W); palette PNGs keep their indices."""
    name = name or record_name(value)
    if isinstance(value, np.ndarray):
        array = value
    else:
        if isinstance(value, Image.Image):
            image = value
        else:
            try:
                image = Image.open(io.BytesIO(_read_bytes(value, name)))
                image.load()
            except DatasetError:
                raise
            except Exception as err:  # PIL raises several types for bad/truncated files
                raise DatasetError(f"{name}: cannot decode label image ({err})") from err
            if image.getexif().get(ExifTags.Base.Orientation) is not None:
                image = ImageOps.exif_transpose(image)
        if image.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
            raise DatasetError(
                f"{name}: label must be a class-index image (mode P or L), got mode {image.mode!r}; "
                "colour-coded masks need converting to class indices first"
            )
        array = np.asarray(image)
    if array.ndim != 2:
        raise DatasetError(f"{name}: label must be a single-channel class-index image, got shape {array.shape}")
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DatasetError(f"{name}: label values must lie in 0..255, found {array.min()}..{array.max()}")
        array = array.astype(np.uint8)
    return array


def check_same_size(image: np.ndarray, label: np.ndarray, name: str) -> None:
    if image.shape[:2] != label.shape:
        raise DatasetError(
            f"{name}: image is {image.shape[1]}x{image.shape[0]} but its label is {label.shape[1]}x{label.shape[0]} (WxH)"
        )


def check_label_values(label: np.ndarray, num_classes: int, name: str, ignore_index: int = IGNORE_INDEX) -> None:
    """Raise when a label holds a value that is neither a class index nor the ignore index."""
    if label.size == 0 or int(label.max()) < num_classes:
        return
    values = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    bad = [int(v) for v in values if v >= num_classes and v != ignore_index]
    if bad:
        raise DatasetError(
            f"{name}: label values {bad[:10]} are outside the {num_classes} classes (0..{num_classes - 1}) "
            f"and not the ignore index {ignore_index}"
        )


def decode_pair(item: dict, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode `item["image"]` and optional `item["label"]` and check them against each other."""
    image_name = record_name(item["image"], fallback=f"image of sample {item.get('id', '?')!r}")
    image = decode_image(item["image"], image_name)
    raw_label = item.get("label")
    if raw_label is None:
        return image, None
    label_name = record_name(raw_label, fallback=f"label of sample {item.get('id', '?')!r}")
    label = decode_label(raw_label, label_name)
    check_same_size(image, label, label_name)
    if num_classes is not None:
        check_label_values(label, num_classes, label_name)
    return image, label
