"""Loaders that turn dataset trees (VOC, Cityscapes, image folders) and Hub datasets into
`datasets.Dataset`s with columns `image` (RGB), `label` (class-index image) and `id` (str).

The datasets store file paths and decode lazily; labels decode in their native mode so VOC
palette PNGs give class indices. Class names travel with each dataset (see `class_spec_of`),
so split subsets and the training streams can check label values without extra arguments.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import datasets
import numpy as np

from .classes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABELID_TO_TRAINID,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    VOC_CLASSES,
    ClassSpec,
    read_classes_json,
    voc_palette,
)
from .errors import DatasetError
from .labelcache import remap_label_files
from .protocols import BUNDLED_SPLIT_LISTS, read_id_list

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.Image(), "id": datasets.Value("string")})
_SPEC_KEY = "cps_hf_classes"


def _first_missing(paths: Iterable[str | None], what: str, split: str) -> None:
    missing = [p for p in paths if p is not None and not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:5])
        raise DatasetError(f"split {split!r}: {len(missing)} {what} file(s) missing, e.g. {shown}")


def _identity_table(ignore_index: int) -> np.ndarray:
    table = np.arange(256, dtype=np.uint8)
    table[ignore_index] = IGNORE_INDEX
    return table


def make_dataset(images: list[str], labels: list[str | None], ids: list[str], spec: ClassSpec, split: str) -> datasets.Dataset:
    """Path-backed dataset with the class spec stored in its info (survives select/shuffle)."""
    if not ids:
        raise DatasetError(f"split {split!r} is empty: no samples found")
    description = json.dumps({_SPEC_KEY: {"names": spec.names, "ignore_index": IGNORE_INDEX, "palette": spec.palette}})
    info = datasets.DatasetInfo(description=description, features=FEATURES)
    return datasets.Dataset.from_dict({"image": images, "label": labels, "id": ids}, features=FEATURES, info=info)


def class_spec_of(dataset) -> ClassSpec | None:
    """The class spec a loader attached to `dataset` (or a subset of it); None if unknown."""
    try:
        spec = json.loads(dataset.info.description or "{}").get(_SPEC_KEY)
    except (AttributeError, json.JSONDecodeError):
        return None
    return None if spec is None else ClassSpec(spec["names"], spec["ignore_index"], spec.get("palette"))


# ---------------------------------------------------------------- Pascal VOC

def resolve_voc_root(root: str | Path) -> Path:
    """Accept the folder holding VOCdevkit, VOCdevkit itself, or VOCdevkit/VOC2012."""
    root = Path(root)
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DatasetError(
        f"{root}: no VOC tree found (looked for JPEGImages in {root}/VOCdevkit/VOC2012, {root}/VOC2012 and {root})"
    )


def voc_class_spec(root: str | Path, voc_dir: Path) -> ClassSpec:
    for candidate in (voc_dir / "classes.json", Path(root) / "classes.json"):
        if candidate.is_file():
            return read_classes_json(candidate)
    return ClassSpec(list(VOC_CLASSES), IGNORE_INDEX, voc_palette())


def _voc_split_ids(voc_dir: Path, split: str) -> list[str]:
    folder = "SegmentationAug" if split == "train_aug" else "Segmentation"
    for candidate in (voc_dir / "ImageSets" / folder / f"{split}.txt", voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt"):
        if candidate.is_file():
            return read_id_list(candidate)
    if split == "trainval" and ("voc", "train") in BUNDLED_SPLIT_LISTS:
        return _voc_split_ids(voc_dir, "train") + _voc_split_ids(voc_dir, "val")
    if ("voc", split) in BUNDLED_SPLIT_LISTS:
        return read_id_list(BUNDLED_SPLIT_LISTS[("voc", split)])
    raise DatasetError(f"{voc_dir}: no id list for split {split!r} (ImageSets/{folder}/{split}.txt) and none bundled")


def load_voc(root: str | Path, split: str = "train", label_cache_dir: str | Path | None = None) -> datasets.Dataset:
    """Pascal VOC 2012 (or any VOC-layout tree) split as a datasets.Dataset.

    `train_aug` labels come from SegmentationClassAug (falling back to SegmentationClass per
    id); other splits from SegmentationClass. A classes.json next to the tree replaces the 21
    VOC classes (custom data in VOC layout).
    """
    voc_dir = resolve_voc_root(root)
    spec = voc_class_spec(root, voc_dir)
    ids = _voc_split_ids(voc_dir, split)
    images = [str(voc_dir / "JPEGImages" / f"{i}.jpg") for i in ids]
    label_dirs = [voc_dir / "SegmentationClassAug", voc_dir / "SegmentationClass"] if split == "train_aug" else [voc_dir / "SegmentationClass"]
    labels = []
    for i in ids:
        found = next((d / f"{i}.png" for d in label_dirs if (d / f"{i}.png").is_file()), label_dirs[0] / f"{i}.png")
        labels.append(str(found))
    _first_missing(images, "image", split)
    _first_missing(labels, "label", split)
    if spec.ignore_index != IGNORE_INDEX:
        labels = remap_label_files(labels, _identity_table(spec.ignore_index), "voc-ignore", label_cache_dir, str(voc_dir))
    return make_dataset(images, labels, ids, spec, split)


# ---------------------------------------------------------------- Cityscapes

CITYSCAPES_SPEC = ClassSpec(list(CITYSCAPES_CLASSES), IGNORE_INDEX, CITYSCAPES_PALETTE)


def load_cityscapes(root: str | Path, split: str = "train", label_cache_dir: str | Path | None = None) -> datasets.Dataset:
    """Cityscapes `leftImg8bit/<split>/<city>/*` with gtFine labels as trainIds (0-18, 255).

    `*_gtFine_labelTrainIds.png` is used when present; otherwise `*_gtFine_labelIds.png` is
    mapped with cityscapesscripts' table once into a cache. `train_extra` (the coarse set)
    comes without labels: an unlabeled pool.
    """
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise DatasetError(f"{root}: Cityscapes image folder {image_dir} not found")
    images = sorted(str(p) for p in image_dir.glob("*/*_leftImg8bit.png"))
    ids = [Path(p).name[: -len("_leftImg8bit.png")] for p in images]
    if split == "train_extra":
        return make_dataset(images, [None] * len(images), ids, CITYSCAPES_SPEC, split)
    label_dir = root / "gtFine" / split
    train_ids, label_ids = [], []
    for image_path, sample_id in zip(images, ids):
        city = Path(image_path).parent.name
        train_ids.append(label_dir / city / f"{sample_id}_gtFine_labelTrainIds.png")
        label_ids.append(label_dir / city / f"{sample_id}_gtFine_labelIds.png")
    if all(p.is_file() for p in train_ids):
        labels = [str(p) for p in train_ids]
    else:
        _first_missing([str(p) for p in label_ids], "gtFine labelIds", split)
        labels = remap_label_files(
            [str(p) for p in label_ids], CITYSCAPES_LABELID_TO_TRAINID, "cityscapes-trainid", label_cache_dir, str(root / "gtFine")
        )
    return make_dataset(images, labels, ids, CITYSCAPES_SPEC, split)


# ---------------------------------------------------------------- image folders

def load_image_folder(
    root: str | Path,
    split: str = "train",
    classes: list[str] | None = None,
    ignore_index: int | None = None,
    label_cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """`<root>/<split>/images/*` with `<root>/<split>/labels/<stem>.png` (your own data).

    Class names and ignore index come from `<root>/classes.json` or the arguments; labels come
    out with the ignore index mapped to 255. A split without a `labels` folder is an
    unlabeled pool (label column None).
    """
    root = Path(root)
    if (root / "classes.json").is_file():
        spec = read_classes_json(root / "classes.json")
    elif classes:
        spec = ClassSpec(list(classes), IGNORE_INDEX if ignore_index is None else ignore_index, voc_palette())
    else:
        raise DatasetError(f"{root}: no classes.json and no class names given (classes=[...])")
    if ignore_index is not None and ignore_index != spec.ignore_index and (root / "classes.json").is_file():
        raise DatasetError(f"{root}/classes.json says ignore_index {spec.ignore_index} but {ignore_index} was passed")
    if spec.palette is None:
        spec = ClassSpec(spec.names, spec.ignore_index, voc_palette())
    image_dir, label_dir = root / split / "images", root / split / "labels"
    if not image_dir.is_dir():
        raise DatasetError(f"{root}: image folder {image_dir} not found")
    images = sorted(str(p) for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    ids = [Path(p).stem for p in images]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{image_dir}: several images share a file stem; ids must be unique")
    if not label_dir.is_dir():
        return make_dataset(images, [None] * len(images), ids, spec, split)
    labels = [str(label_dir / f"{i}.png") for i in ids]
    _first_missing(labels, "label", split)
    if spec.ignore_index != IGNORE_INDEX:
        labels = remap_label_files(labels, _identity_table(spec.ignore_index), "folder-ignore", label_cache_dir, str(root))
    return make_dataset(images, labels, ids, spec, split)


# ---------------------------------------------------------------- Hub / parquet

def load_hub_dataset(
    path: str,
    split: str = "train",
    image_column: str = "image",
    label_column: str | None = "label",
    id_column: str | None = None,
    streaming: bool = False,
    classes: list[str] | None = None,
    **load_kwargs,
):
    """A Hub (or local parquet/imagefolder) dataset with image and label columns.

    Returns a Dataset, or an IterableDataset when `streaming=True` (pools too large to index).
    Columns are renamed to image/label/id; a missing id column becomes the row number.
    """
    try:
        ds = datasets.load_dataset(path, split=split, streaming=streaming, **load_kwargs)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; say what was asked
        raise DatasetError(f"cannot load dataset {path!r} split {split!r}: {err}") from err
    columns = ds.column_names if ds.column_names is not None else list(ds.features or {})
    for column in (image_column, label_column, id_column):
        if column is not None and column not in columns:
            raise DatasetError(f"dataset {path!r}: column {column!r} not found (columns: {columns})")
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "label"), (id_column, "id")) if old and old != new}
    if renames:
        ds = ds.rename_columns(renames)
    keep = ["image"] + (["label"] if label_column else []) + (["id"] if id_column else [])
    ds = ds.select_columns(keep).cast_column("image", datasets.Image())
    if label_column:
        ds = ds.cast_column("label", datasets.Image())
    if id_column is None:
        features = datasets.Features({**ds.features, "id": datasets.Value("string")})
        ds = ds.map(lambda _, index: {"id": str(index)}, with_indices=True, features=features)
    else:
        ds = ds.cast_column("id", datasets.Value("string"))
    if classes and not streaming:
        ds.info.description = json.dumps({_SPEC_KEY: {"names": list(classes), "ignore_index": IGNORE_INDEX, "palette": None}})
    return ds


def load_unlabeled_stream(source: str, split: str = "train", image_column: str = "image"):
    """An extra unlabeled pool read as a stream (an IterableDataset of image and id).

    `source`: parquet files (a path or glob ending in .parquet), a local dataset folder (an
    imagefolder tree or files `datasets` recognises), or a Hub dataset id. Pools this large rarely
    report their size: pass the samples per epoch to TrainStreams as `unlabeled_length`.
    """
    kwargs = {"label_column": None, "image_column": image_column, "streaming": True}
    if source.endswith(".parquet") or any(char in source for char in "*?["):
        return load_hub_dataset("parquet", split, data_files=source, **kwargs)
    return load_hub_dataset(source, split, **kwargs)

