"""Decoding of image/label records with checks that name the file when something is wrong.

Training decodes records itself (datasets' `Image(decode=False)` gives `{"path", "bytes"}`)
so every failure can say which file broke, and so images go through OpenCV, which decodes
and converts faster than PIL (see benchmarks/loader_throughput.py). Labels go through PIL:
OpenCV expands palette PNGs to colours, PIL keeps the class indices.

`header_problems` is the cheap form of the same checks (file present, header, end marker,
sizes, label mode) that the up-front data check (preflight.py) runs on every record, with
`label_value_problems` (a decode of each label) for the values.
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

LABEL_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L")
_TAIL_BYTES = 64  # end markers are looked for in this many trailing bytes (some writers pad)
_HEAD_BYTES = 16


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


def truncation_problem(head: bytes, tail: bytes, size: int) -> str | None:
    """What the first and last bytes of a file say about truncation (None: looks complete).

    OpenCV fills a truncated JPEG with grey and carries on, so its end marker is checked here;
    a PNG without its IEND chunk (OpenCV refuses those), a WebP or BMP shorter than its header
    declares are truncated too. Other formats are not checked.
    """
    if head[:2] == b"\xff\xd8" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if head[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk at the end)"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and size < int.from_bytes(head[4:8], "little") + 8:
        return f"truncated WebP ({size} bytes, its header says {int.from_bytes(head[4:8], 'little') + 8})"
    if head[:2] == b"BM" and size < int.from_bytes(head[2:6], "little"):
        return f"truncated BMP ({size} bytes, its header says {int.from_bytes(head[2:6], 'little')})"
    return None


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
        problem = truncation_problem(data[:_HEAD_BYTES].tobytes(), data[-_TAIL_BYTES:].tobytes(), data.size)
        if problem:
            raise DatasetError(f"{name}: {problem}")
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
        if image.mode not in LABEL_MODES:
            raise DatasetError(f"{name}: {label_mode_problem(image.mode)}")
        array = np.asarray(image)
    if array.ndim != 2:
        raise DatasetError(f"{name}: label must be a single-channel class-index image, got shape {array.shape}")
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DatasetError(f"{name}: label values must lie in 0..255, found {array.min()}..{array.max()}")
        array = array.astype(np.uint8)
    return array


def label_mode_problem(mode: str) -> str:
    return (
        f"label must be a class-index image (mode P or L), got mode {mode!r}; "
        "colour-coded masks need converting to class indices first"
    )


def size_problem(image_size: tuple[int, int], label_size: tuple[int, int]) -> str:
    """Message for an image/label pair of different (width, height)."""
    return f"image is {image_size[0]}x{image_size[1]} but its label is {label_size[0]}x{label_size[1]} (WxH)"


def check_same_size(image: np.ndarray, label: np.ndarray, name: str) -> None:
    if image.shape[:2] != label.shape:
        raise DatasetError(f"{name}: {size_problem(image.shape[1::-1], label.shape[::-1])}")


def label_values_problem(label: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> str | None:
    """What is wrong with a label's values (None: every value is a class index or the ignore index)."""
    if label.size == 0 or int(label.max()) < num_classes:
        return None
    values = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    bad = [int(v) for v in values if v >= num_classes and v != ignore_index]
    if bad:
        return (f"label values {bad[:10]} are outside the {num_classes} classes (0..{num_classes - 1}) "
                f"and not the ignore index {ignore_index}")
    return None


def check_label_values(label: np.ndarray, num_classes: int, name: str, ignore_index: int = IGNORE_INDEX) -> None:
    """Raise when a label holds a value that is neither a class index nor the ignore index."""
    problem = label_values_problem(label, num_classes, ignore_index)
    if problem:
        raise DatasetError(f"{name}: {problem}")


def label_value_problems(item: dict, num_classes: int, ignore_index: int = IGNORE_INDEX) -> list[tuple[str, str]]:
    """(file, problem) for a record whose label holds values outside the classes: the one check of
    `decode_pair` that needs the pixels, so the up-front data check decodes every label for it."""
    raw_label = item.get("label")
    if raw_label is None:
        return []
    name = record_name(raw_label, fallback=f"label of sample {item.get('id', '?')!r}")
    try:
        problem = label_values_problem(decode_label(raw_label, name), num_classes, ignore_index)
    except DatasetError as error:
        return [(name, str(error).removeprefix(f"{name}: "))]
    return [(name, problem)] if problem else []


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


# ---------------------------------------------------------------- header-only checks

def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, as the decoders will see it, from the header."""
    if image.format == "PNG" and "exif" not in image.info:
        return image.size  # PIL's getexif would decode the whole PNG to look for a late eXIf
    width, height = image.size
    return (height, width) if image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8) else (width, height)


def _probe_file(handle, size: int) -> tuple[tuple[int, int], str]:
    if size == 0:
        raise DatasetError("empty file (0 bytes)")
    head = handle.read(_HEAD_BYTES)
    handle.seek(max(0, size - _TAIL_BYTES))
    problem = truncation_problem(head, handle.read(), size)
    if problem:
        raise DatasetError(problem)
    handle.seek(0)
    try:
        with Image.open(handle) as image:
            return _oriented_size(image), image.mode
    except Exception as err:  # PIL raises several types for bad headers
        raise DatasetError(f"not a readable image ({err})") from err


def _probe(value: Any) -> tuple[tuple[int, int], str]:
    """(width, height) and mode of an image record, from its header and last bytes only."""
    if isinstance(value, Image.Image):
        return value.size, value.mode
    if isinstance(value, np.ndarray):
        return (value.shape[1], value.shape[0]), "L" if value.ndim == 2 else f"array of shape {value.shape}"
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return _probe_file(io.BytesIO(value["bytes"]), len(value["bytes"]))
        value = value.get("path")
    if value is None:
        raise DatasetError("record has neither 'bytes' nor 'path'")
    try:
        with open(value, "rb") as handle:
            return _probe_file(handle, os.fstat(handle.fileno()).st_size)
    except FileNotFoundError as err:
        raise DatasetError("file not found") from err
    except OSError as err:
        raise DatasetError(f"cannot read file ({err})") from err


def header_problems(item: dict, require_label: bool = False) -> list[tuple[str, str]]:
    """(file, problem) pairs found from headers alone: the fast form of `decode_pair`'s checks.

    Reads each file's header and first/last bytes, never its pixels, so it can run over a whole
    dataset before training: presence, emptiness, truncation, header, image/label sizes, label
    mode. Label values need the full decode (`decode_pair`, scripts/check_dataset.py).
    """
    sample = item.get("id", "?")
    image_name = record_name(item["image"], fallback=f"image of sample {sample!r}")
    problems, image_size, label_size = [], None, None
    try:
        image_size, _ = _probe(item["image"])
    except DatasetError as err:
        problems.append((image_name, str(err)))
    raw_label = item.get("label")
    if raw_label is None:
        if require_label:
            problems.append((image_name, f"sample {sample!r} has no label (labeled and val samples need one)"))
        return problems
    label_name = record_name(raw_label, fallback=f"label of sample {sample!r}")
    try:
        label_size, mode = _probe(raw_label)
        if mode not in LABEL_MODES:
            problems.append((label_name, label_mode_problem(mode)))
    except DatasetError as err:
        problems.append((label_name, str(err)))
    if image_size and label_size and image_size != label_size:
        problems.append((label_name, size_problem(image_size, label_size)))
    return problems
