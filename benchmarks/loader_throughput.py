"""Training-sample throughput per worker: cps_hf's pipeline vs the original's, same run.

Each sample is decode (JPEG image + PNG label) + the paper's augmentation at crop 512
(flip, random scale from {0.5..2.0}, ImageNet normalisation, random crop/pad), on VOC-sized
(~500x375) images this script writes to a temporary folder. The reference is a plain
OpenCV/NumPy version of the original code's order: it normalises the whole scaled image
before cropping. One process, one thread each: this is the per-worker rate.

    python benchmarks/loader_throughput.py [--quick] [--samples N]

Prints a table and, last, one JSON line with `speedup_vs_reference`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cps_hf.data import TrainTransform  # noqa: E402
from cps_hf.data.demo import make_scene  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
SCALES = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)
CROP = 512


def write_images(folder: Path, count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for index in range(count):
        height, width = (375, 500) if index % 2 else (500, 375)
        image, label = make_scene(rng, height, width)
        image_path, label_path = folder / f"{index}.jpg", folder / f"{index}.png"
        cv2.imwrite(str(image_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        cv2.imwrite(str(label_path), label)
        pairs.append((str(image_path), str(label_path)))
    return pairs


def reference_sample(image_path: str, label_path: str, rng: np.random.Generator) -> dict:
    """The original order with OpenCV/NumPy: normalise the whole scaled image, then crop/pad."""
    image = cv2.cvtColor(cv2.imread(image_path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    label = cv2.imread(label_path, cv2.IMREAD_GRAYSCALE)
    if rng.random() < 0.5:
        image, label = cv2.flip(image, 1), cv2.flip(label, 1)
    scale = SCALES[int(rng.integers(len(SCALES)))]
    height, width = label.shape
    size = (int(width * scale), int(height * scale))
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    image = (image.astype(np.float32) / 255.0 - MEAN) / STD
    height, width = label.shape
    top = int(rng.integers(height - CROP + 1)) if height > CROP else 0
    left = int(rng.integers(width - CROP + 1)) if width > CROP else 0
    image, label = image[top:top + CROP, left:left + CROP], label[top:top + CROP, left:left + CROP]
    pad_h, pad_w = CROP - label.shape[0], CROP - label.shape[1]
    border = (pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2)
    image = cv2.copyMakeBorder(image, *border, cv2.BORDER_CONSTANT, value=(0.0, 0.0, 0.0))
    label = cv2.copyMakeBorder(label, *border, cv2.BORDER_CONSTANT, value=255)
    return {
        "pixel_values": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
        "labels": torch.from_numpy(label.astype(np.int64)),
    }


def ours_factory():
    transform = TrainTransform(crop_size=CROP, scales=SCALES)

    def ours_sample(image_path: str, label_path: str, rng: np.random.Generator) -> dict:
        return transform({"image": {"path": image_path, "bytes": None}, "label": {"path": label_path, "bytes": None}}, rng=rng)

    return ours_sample


def rate(sample_fn, pairs, samples: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for index in range(samples):
        sample_fn(*pairs[index % len(pairs)], rng)
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few samples, finishes well within a minute")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    samples = args.samples or (60 if args.quick else 400)
    rounds = args.rounds or (3 if args.quick else 5)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as folder:
        pairs = write_images(Path(folder), 24)
        ours, reference = ours_factory(), reference_sample
        rate(ours, pairs, 10, 0), rate(reference, pairs, 10, 0)  # warm caches
        ours_rates, reference_rates = [], []
        for round_index in range(rounds):  # interleave so load changes hit both alike
            reference_rates.append(rate(reference, pairs, samples, round_index))
            ours_rates.append(rate(ours, pairs, samples, round_index))
    ours_best, reference_best = max(ours_rates), max(reference_rates)
    print(f"{'pipeline':<28}{'samples/s per worker (best of ' + str(rounds) + ')':>40}")
    print(f"{'reference (OpenCV/NumPy)':<28}{reference_best:>40.1f}")
    print(f"{'cps_hf TrainTransform':<28}{ours_best:>40.1f}")
    print(json.dumps({
        "benchmark": "loader_throughput",
        "crop": CROP,
        "samples_per_round": samples,
        "rounds": rounds,
        "reference_samples_per_s": round(reference_best, 2),
        "ours_samples_per_s": round(ours_best, 2),
        "speedup_vs_reference": round(ours_best / reference_best, 3),
    }))


if __name__ == "__main__":
    main()
