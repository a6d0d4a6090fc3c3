#!/usr/bin/env python
"""Validate a dataset tree fully and print per-class pixel counts.

Decodes every image and label of the chosen splits and reports each problem (missing,
truncated or undecodable file, image/label size mismatch, label values outside the classes):
all of them, not just the first. Exit status 1 when any problem was found; 2, with one line
`error: ...`, for a mistake in the arguments (a --root that does not exist). Each record first gets
the header-only checks that training runs up front (cps_hf.data.preflight), then a full decode.

    python scripts/check_dataset.py --dataset voc --root data/ --splits train_aug val
    python scripts/check_dataset.py --dataset folder --root my_data/ --splits train val
"""

from __future__ import annotations

import functools
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cps_hf.cli import ArgumentParser, run_cli
from cps_hf.data import DatasetError, class_spec_of, load_cityscapes, load_image_folder, load_voc
from cps_hf.data.preflight import map_records
from cps_hf.data.validation import decode_pair, header_problems
from cps_hf.errors import UserInputError

LOADERS = {"voc": load_voc, "cityscapes": load_cityscapes, "folder": load_image_folder}
DEFAULT_SPLITS = {"voc": ["train", "val"], "cityscapes": ["train", "val"], "folder": ["train", "val"]}


def check_sample(record: dict, num_classes: int) -> tuple[np.ndarray | None, list[str]]:
    """(label histogram, problems): header checks name every bad file, the decode the rest."""
    found = header_problems(record)
    if found:
        return None, [f"{file}: {problem}" for file, problem in found]
    try:
        _, label = decode_pair(record, num_classes)
    except DatasetError as err:
        return None, [str(err)]
    if label is None:
        return None, []
    return np.bincount(label.ravel(), minlength=256), []


def check_split(dataset: str, root: str, split: str, workers: int) -> tuple[int, list[str]]:
    try:
        ds = LOADERS[dataset](root, split)
    except DatasetError as err:
        print(f"[{split}] cannot load: {err}")
        return 0, [str(err)]
    spec = class_spec_of(ds)
    counts = np.zeros(256, np.int64)
    problems = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _, _, (hist, found) in map_records(ds, functools.partial(check_sample, num_classes=len(spec.names)), pool):
            problems += found
            if hist is not None:
                counts += hist
    print(f"\n[{split}] {len(ds)} samples, {len(problems)} problem(s)")
    total = counts.sum()
    if total:
        print(f"  {'id':>3}  {'class':<20}{'pixels':>14}{'share':>9}")
        for index, name in enumerate(spec.names):
            print(f"  {index:>3}  {name:<20}{counts[index]:>14,}{counts[index] / total:>9.2%}")
        print(f"  {255:>3}  {'(ignore)':<20}{counts[255]:>14,}{counts[255] / total:>9.2%}")
    for problem in problems[:50]:
        print(f"  PROBLEM {problem}")
    if len(problems) > 50:
        print(f"  ... and {len(problems) - 50} more")
    return len(ds), problems


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", choices=sorted(LOADERS), required=True, help="layout of the tree under --root")
    parser.add_argument("--root", required=True, help="dataset root (for VOC: the folder holding VOCdevkit, or below)")
    parser.add_argument("--splits", nargs="+", default=None,
                        help="splits to check; default: train and val")
    parser.add_argument("--workers", type=int, default=4, help="threads reading and decoding files")
    args = parser.parse_args(argv)
    if not Path(args.root).expanduser().is_dir():
        raise DatasetError(f"--root {args.root}: folder does not exist")
    if args.workers < 1:
        raise UserInputError(f"--workers must be at least 1, got {args.workers}")
    all_problems = []
    for split in args.splits or DEFAULT_SPLITS[args.dataset]:
        _, problems = check_split(args.dataset, args.root, split, args.workers)
        all_problems += problems
    print(f"\n{'OK' if not all_problems else 'FAILED'}: {len(all_problems)} problem(s) in total")
    return 1 if all_problems else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # 1 when problems were found, 2 for a mistake in the flags
