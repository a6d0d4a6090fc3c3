"""`build_datasets`: one call from CLI-style arguments to labeled/unlabeled/val datasets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets

from .classes import IGNORE_INDEX
from .errors import DatasetError
from .loaders import (
    CITYSCAPES_SPEC,
    class_spec_of,
    load_cityscapes,
    load_hub_dataset,
    load_image_folder,
    load_voc,
    resolve_voc_root,
)
from .partitions import split_labeled
from .protocols import PROTOCOLS, read_id_list


@dataclass
class DatasetBundle:
    labeled: datasets.Dataset
    unlabeled: datasets.Dataset | datasets.IterableDataset
    val: datasets.Dataset
    class_names: list[str]
    ignore_index: int = IGNORE_INDEX
    palette: list[int] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _default_voc_train_split(data_root) -> str:
    voc = resolve_voc_root(data_root)
    has_aug = (voc / "ImageSets" / "SegmentationAug" / "train_aug.txt").is_file() or (voc / "SegmentationClassAug").is_dir()
    return "train_aug" if has_aug else "train"


def _load(dataset: str, data_root, split: str, **kw):
    if dataset == "voc":
        return load_voc(data_root, split, **kw)
    if dataset == "cityscapes":
        return load_cityscapes(data_root, split, **kw)
    if dataset == "folder":
        return load_image_folder(data_root, split, **kw)
    if dataset == "hub":
        return load_hub_dataset(str(data_root), split, **kw)
    raise DatasetError(f"dataset must be one of voc, cityscapes, folder, hub; got {dataset!r}")


def _extra_pool(dataset: str, data_root, extra, **kw):
    """`unlabeled_extra` -> a dataset of extra unlabeled images (or None)."""
    if extra is None or isinstance(extra, (datasets.Dataset, datasets.IterableDataset)):
        return extra
    if dataset == "cityscapes" and extra in PROTOCOLS and PROTOCOLS[extra].labeled is None:
        pool = load_cityscapes(data_root, "train_extra", **kw)
        wanted = set(read_id_list(PROTOCOLS[extra].unlabeled))
        keep = [i for i, sample_id in enumerate(pool["id"]) if sample_id in wanted]
        if len(keep) != len(wanted):
            raise DatasetError(f"protocol {extra}: {len(wanted) - len(keep)} of {len(wanted)} train_extra images are missing under {data_root}")
        return pool.select(keep)
    return _load(dataset, data_root, str(extra), **kw)


def _join_unlabeled(unlabeled, extra):
    if extra is None:
        return unlabeled
    unlabeled = unlabeled.select_columns(["image", "id"])
    extra = extra.select_columns(["image", "id"])
    if isinstance(extra, datasets.IterableDataset):
        return datasets.concatenate_datasets([unlabeled.to_iterable_dataset(), extra.cast(unlabeled.features)])
    return datasets.concatenate_datasets([unlabeled, extra.cast(unlabeled.features)])


def build_datasets(
    dataset: str,
    data_root: str | Path,
    labeled,
    seed: int = 0,
    train_split: str | None = None,
    val_split: str = "val",
    unlabeled_extra=None,
    **kw,
) -> DatasetBundle:
    """Load train and val splits, partition train into labeled/unlabeled, add extra pools.

    `labeled`: see `split_labeled` (fraction, count, protocol name, list file, ids); None or
    "all" labels every training image (supervised upper bound; the unlabeled set is then empty).
    `unlabeled_extra`: a split name (e.g. Cityscapes "train_extra"), a protocol such as
    "cps/cityscapes-extra/3000", or a (streaming) dataset, appended to the unlabeled pool.
    Extra keyword arguments go to the loader (e.g. image_column for hub, classes for folder).
    """
    if train_split is None:
        train_split = _default_voc_train_split(data_root) if dataset == "voc" else "train"
    train = _load(dataset, data_root, train_split, **kw)
    val = _load(dataset, data_root, val_split, **kw)
    if labeled is None or labeled == "all":
        labeled_set, unlabeled_set = train, train.select([])
    else:
        labeled_set, unlabeled_set = split_labeled(train, labeled, seed=seed)
    unlabeled_set = _join_unlabeled(unlabeled_set, _extra_pool(dataset, data_root, unlabeled_extra, **kw))
    spec = class_spec_of(train) or (CITYSCAPES_SPEC if dataset == "cityscapes" else None)
    if spec is None:
        names = kw.get("classes")
        if not names:
            raise DatasetError(f"{data_root}: class names unknown; pass classes=[...]")
        return DatasetBundle(labeled_set, unlabeled_set, val, list(names), IGNORE_INDEX, None)
    return DatasetBundle(labeled_set, unlabeled_set, val, list(spec.names), IGNORE_INDEX, spec.palette)
