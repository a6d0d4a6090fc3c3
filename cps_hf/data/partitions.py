"""Labeled/unlabeled partitions: published protocols, list files, counts and fractions.

Counts and fractions draw a seeded random subset (fraction -> ceil(fraction * N), which gives
the published sizes: 1/8 of 10,582 is 1,323, 1/16 of 2,975 is 186). Every result is
deterministic for a seed, disjoint and complete (protocols: their own unlabeled list).
"""

from __future__ import annotations

import math
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np

from .errors import DatasetError
from .protocols import PROTOCOLS, get_protocol, read_id_list

_FRACTION = re.compile(r"^\s*(\d+)\s*[/-]\s*(\d+)\s*$")
_DECIMAL = re.compile(r"^\s*\d*\.\d+\s*$")


def _indices_of(ids: Sequence[str], wanted: Sequence[str], source: str, dataset_ids: list[str]) -> list[int]:
    position = {sample_id: index for index, sample_id in enumerate(dataset_ids)}
    missing = [i for i in wanted if i not in position]
    if missing:
        raise DatasetError(
            f"{source}: {len(missing)} of {len(wanted)} ids are not in the dataset ({len(dataset_ids)} samples), "
            f"e.g. {', '.join(missing[:5])}"
        )
    return sorted({position[i] for i in wanted})


def _parse_amount(labeled, total: int) -> int | None:
    """A count or fraction -> number of labeled samples; None when `labeled` is not one."""
    if isinstance(labeled, bool):
        return None
    if isinstance(labeled, int):
        count = labeled
    elif isinstance(labeled, (float, Fraction)):
        if not 0 < labeled <= 1:
            raise DatasetError(f"labeled fraction must be in (0, 1], got {labeled}")
        count = math.ceil(Fraction(labeled).limit_denominator(10_000) * total)
    elif isinstance(labeled, str) and (match := _FRACTION.match(labeled)):
        return _parse_amount(Fraction(int(match.group(1)), int(match.group(2))), total)
    elif isinstance(labeled, str) and labeled.strip().isdigit():
        count = int(labeled)
    elif isinstance(labeled, str) and _DECIMAL.match(labeled):  # "0.125" from the command line
        return _parse_amount(float(labeled), total)
    else:
        return None
    if not 0 < count <= total:
        raise DatasetError(f"labeled count must be in 1..{total} (dataset size), got {count}")
    return count


def split_labeled(dataset: datasets.Dataset, labeled, seed: int = 0) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split `dataset` into (labeled, unlabeled).

    `labeled`: a fraction (0.125, "1/8", "1-8"), a count (92), a protocol name
    ("cps/voc/1-8"), a list-file path in any published format, or a list of ids.
    """
    if len(dataset) == 0:
        raise DatasetError("split_labeled: the dataset is empty")
    dataset_ids = list(dataset["id"])
    if len(set(dataset_ids)) != len(dataset_ids):
        raise DatasetError("split_labeled: the dataset's 'id' column has duplicates")
    count = _parse_amount(labeled, len(dataset_ids))
    unlabeled_indices = None
    if count is not None:
        order = np.random.default_rng(seed).permutation(len(dataset_ids))
        labeled_indices = sorted(order[:count].tolist())
    elif isinstance(labeled, str) and labeled in PROTOCOLS:
        protocol = get_protocol(labeled)
        labeled_indices = _indices_of(dataset_ids, read_id_list(protocol.labeled), f"protocol {labeled} (labeled)", dataset_ids)
        if protocol.unlabeled is not None:
            unlabeled_ids = read_id_list(protocol.unlabeled)
            found = _indices_of(dataset_ids, unlabeled_ids, f"protocol {labeled} (unlabeled)", dataset_ids)
            taken = set(labeled_indices)
            unlabeled_indices = [i for i in found if i not in taken]
    elif isinstance(labeled, (str, os.PathLike)):
        path = Path(labeled)
        if not path.is_file():
            raise DatasetError(
                f"labeled={labeled!r} is neither a fraction, a count, a known protocol (see available_protocols()) nor an existing list file"
            )
        labeled_indices = _indices_of(dataset_ids, read_id_list(path), str(path), dataset_ids)
    elif isinstance(labeled, (list, tuple)):
        labeled_indices = _indices_of(dataset_ids, [str(i) for i in labeled], "labeled id list", dataset_ids)
    else:
        raise DatasetError(f"labeled: unsupported value {labeled!r}")
    if unlabeled_indices is None:
        taken = set(labeled_indices)
        unlabeled_indices = [i for i in range(len(dataset_ids)) if i not in taken]
    return dataset.select(labeled_indices), dataset.select(unlabeled_indices)
