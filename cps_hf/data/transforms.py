"""The paper's training augmentation and the deterministic evaluation transform.

Order follows the original code: horizontal flip (p=0.5) -> random scale -> ImageNet
normalisation -> random crop, where the crop pads the *normalised* image with 0 (the mean
colour) and the label with 255. Two exact rewrites make it cheaper than the original without
changing its output: the crop window is cut from the uint8 image before normalising (pixels
outside it would be thrown away anyway), and normalisation is a per-channel lookup table that
writes straight into the channels-first output.

Randomness comes from an explicit `numpy.random.Generator` (`rng=`), so TrainStreams can seed
each sample from (seed, epoch, position, stream) and replay augmentations exactly on resume.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .classes import IGNORE_INDEX
from .validation import decode_pair

PAPER_SCALES = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)


def normalisation_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, 256) float32 table: value v of channel c -> (v / 255 - mean[c]) / std[c]."""
    values = np.arange(256, dtype=np.float64) / 255.0
    table = (values[None, :] - np.asarray(mean, dtype=np.float64)[:, None]) / np.asarray(std, dtype=np.float64)[:, None]
    return table.astype(np.float32)


def normalise_into(out: np.ndarray, image: np.ndarray, table: np.ndarray) -> None:
    """Write normalised channels of uint8 HWC `image` into float32 CHW `out` (same H, W)."""
    for channel in range(3):
        np.take(table[channel], image[:, :, channel], out=out[channel])


def _as_pixel_values(image: np.ndarray, table: np.ndarray) -> torch.Tensor:
    out = np.empty((3,) + image.shape[:2], dtype=np.float32)
    normalise_into(out, image, table)
    return torch.from_numpy(out)


class TrainTransform:
    """Flip, random scale, normalise, random crop/pad; labels optional (unlabeled images).

    `scales` is either the discrete list of the original code or a `(low, high)` range sampled
    uniformly. Items are dicts with `image` and optional `label` (records, PIL images or arrays).
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int] = 512,
        scales: Sequence[float] = PAPER_SCALES,
        flip: bool = True,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        ignore_index: int = IGNORE_INDEX,
        scale_range: bool | None = None,
        num_classes: int | None = None,
    ):
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.scales = tuple(float(s) for s in scales)
        # A 2-tuple is a range unless told otherwise; a longer sequence is always a list of choices.
        self.scale_range = (len(self.scales) == 2) if scale_range is None else scale_range
        if self.scale_range and (len(self.scales) != 2 or self.scales[0] > self.scales[1]):
            raise ValueError(f"scales: a range must be (low, high) with low <= high, got {scales}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales: need positive scale factors, got {scales}")
        self.flip = flip
        self.mean, self.std = tuple(mean), tuple(std)
        self.ignore_index = ignore_index
        self.num_classes = num_classes
        self.table = normalisation_table(mean, std)

    def __repr__(self) -> str:
        kind = "range" if self.scale_range else "choices"
        return f"TrainTransform(crop_size={self.crop_size}, scales={self.scales} ({kind}), flip={self.flip})"

    def sample_scale(self, rng: np.random.Generator) -> float:
        if self.scale_range:
            return float(rng.uniform(self.scales[0], self.scales[1]))
        return self.scales[int(rng.integers(len(self.scales)))]

    def __call__(self, item: dict, rng: np.random.Generator | None = None) -> dict:
        rng = rng if rng is not None else np.random.default_rng()
        image, label = decode_pair(item, self.num_classes)
        if self.flip and rng.random() < 0.5:
            image = cv2.flip(image, 1)
            label = None if label is None else cv2.flip(label, 1)
        scale = self.sample_scale(rng)
        if scale != 1.0:
            height, width = image.shape[:2]
            size = (max(1, int(width * scale)), max(1, int(height * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
            label = None if label is None else cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
        return self._crop_normalise(image, label, rng)

    def _crop_normalise(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator) -> dict:
        """Random crop of the (scaled) image; smaller sides are padded centrally, as the original."""
        crop_h, crop_w = self.crop_size
        height, width = image.shape[:2]
        top = int(rng.integers(height - crop_h + 1)) if height > crop_h else 0
        left = int(rng.integers(width - crop_w + 1)) if width > crop_w else 0
        image = image[top:top + crop_h, left:left + crop_w]
        h, w = image.shape[:2]
        pad_top, pad_left = (crop_h - h) // 2, (crop_w - w) // 2
        pixels = np.zeros((3, crop_h, crop_w), dtype=np.float32)  # 0 = mean colour after normalising
        normalise_into(pixels[:, pad_top:pad_top + h, pad_left:pad_left + w], image, self.table)
        out = {"pixel_values": torch.from_numpy(pixels)}
        if label is not None:
            labels = np.full((crop_h, crop_w), self.ignore_index, dtype=np.int64)
            labels[pad_top:pad_top + h, pad_left:pad_left + w] = label[top:top + crop_h, left:left + crop_w]
            out["labels"] = torch.from_numpy(labels)
        return out


class EvalTransform:
    """Whole image, normalised, no randomness: {"pixel_values", "labels", "id"}."""

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        num_classes: int | None = None,
    ):
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_classes = num_classes
        self.table = normalisation_table(mean, std)

    def __call__(self, item: dict) -> dict:
        image, label = decode_pair(item, self.num_classes)
        out = {"pixel_values": _as_pixel_values(image, self.table), "id": item.get("id")}
        if label is not None:
            out["labels"] = torch.from_numpy(label.astype(np.int64))
        return out
