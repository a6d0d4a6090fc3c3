"""Self-training (paper Table 7) bookkeeping: which stages of a run are finished, and the stage-3 data tree.

A self-training run (scripts/self_train.py) lives in one output folder:

    OUT/stage1/                  train on the labeled images (any method); finished = all_results.json
    OUT/pseudo_labels/labels/    <id>.png: the stage-1 model's class ids for every unlabeled image
    OUT/pseudo_labels/manifest.jsonl, complete.json   one line per unlabeled image; written last
    OUT/stage3_data/             a `--dataset folder` tree: labeled images + true labels and unlabeled
                                 images + pseudo labels in train/, the original val split in val/
    OUT/stage3/                  retrain on stage3_data with every image labeled; finished = all_results.json
    OUT/self_training_results.json

This module holds no training or prediction code: it decides what a stage has left to do and
composes the stage-3 tree from the stage-1 split (a `DatasetBundle`) and the pseudo-label manifest.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import datasets

from .errors import UserInputError

STAGE1, PSEUDO_LABELS, STAGE3_DATA, STAGE3 = "stage1", "pseudo_labels", "stage3_data", "stage3"
RESULTS_FILE = "self_training_results.json"
MANIFEST, PSEUDO_MARKER, TREE_MARKER = "manifest.jsonl", "complete.json", "self_training_tree.json"


class SelfTrainingError(UserInputError):
    """A self-training run that cannot go on as asked (a pool that cannot be pseudo-labeled, a foreign folder)."""


# ---------------------------------------------------------------------- stage bookkeeping
def read_json(path: str | Path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write_json_atomic(path: str | Path, value) -> None:
    """Written in full or not at all: a crash never leaves a half marker that counts as finished."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    temporary.replace(path)


def training_finished(stage_dir: str | Path) -> bool:
    """A training stage is finished once train_cps.py wrote its all_results.json (after the model)."""
    return read_json(Path(stage_dir) / "all_results.json") is not None


def resume_flags(stage_dir: str | Path) -> list[str]:
    """`--resume_from_checkpoint latest` for an unfinished stage with a completely saved checkpoint;
    `--overwrite_output_dir` for one that stopped before its first checkpoint (it starts again)."""
    from .run_folder import restart_flags

    return restart_flags(stage_dir)


def pseudo_labels_finished(folder: str | Path, stage1_fingerprint: str | None, ids: list[str]) -> bool:
    """The manifest is complete (marker written after it) and was made by this stage-1 model for this pool."""
    folder = Path(folder)
    marker = read_json(folder / PSEUDO_MARKER)
    if marker is None or not (folder / MANIFEST).is_file():
        return False
    return marker.get("stage1_fingerprint") == stage1_fingerprint and marker.get("ids") == list(ids)


def write_pseudo_label_manifest(folder: str | Path, records: list[dict], marker: dict) -> Path:
    """manifest.jsonl (one record per unlabeled image, pool order), then the completion marker."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    temporary = folder / f".{MANIFEST}.tmp"
    temporary.write_text("".join(json.dumps(record) + "\n" for record in records))
    temporary.replace(manifest)
    write_json_atomic(folder / PSEUDO_MARKER, marker)
    return manifest


def read_manifest(folder: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / MANIFEST).read_text().splitlines() if line.strip()]


def clear_pseudo_label_marker(folder: str | Path) -> None:
    (Path(folder) / PSEUDO_MARKER).unlink(missing_ok=True)


# ---------------------------------------------------------------------- files of a split
def sample_files(dataset: datasets.Dataset, column: str, what: str) -> list[tuple[str, str | None]]:
    """(id, local file) of every sample of a path-backed dataset, without decoding anything.

    The stage-3 tree links files, so a pool whose images are not files (a streamed or in-memory Hub
    dataset) cannot be self-trained on: that is a one-line error naming the pool."""
    if isinstance(dataset, datasets.IterableDataset):
        raise SelfTrainingError(f"the {what} pool is streamed (--unlabeled_stream); self-training needs a pool of "
                                "image files it can list and pseudo-label (use --unlabeled_extra or a folder)")
    if len(dataset) == 0:
        return []
    undecoded = dataset.cast_column(column, datasets.Image(decode=False))
    files = []
    for sample_id, record in zip(undecoded["id"], undecoded[column]):
        path = record.get("path") if isinstance(record, dict) else None
        if record is not None and (not path or not os.path.isfile(path)):
            raise SelfTrainingError(f"{what} sample {sample_id!r}: its {column} is not a local file "
                                    "(self-training links the image files into a folder tree; use --dataset voc, "
                                    "cityscapes or folder)")
        files.append((str(sample_id), path))
    return files


def unlabeled_files(bundle) -> list[tuple[str, str]]:
    """(id, image file) of the unlabeled pool in pool order; ids must be unique (they name the pseudo labels)."""
    files = sample_files(bundle.unlabeled, "image", "unlabeled")
    _check_unique([sample_id for sample_id, _ in files], "unlabeled pool")
    return files


def _check_unique(ids: list[str], what: str) -> None:
    twice = [sample_id for sample_id, count in Counter(ids).items() if count > 1]
    if twice:
        raise SelfTrainingError(f"{what}: ids {', '.join(twice[:5])} occur more than once; the stage-3 folder tree "
                                "names files by id")


# ---------------------------------------------------------------------- the stage-3 tree
def link_or_copy(source: str | Path, destination: Path) -> str:
    """A symlink to `source` (absolute), or a copy where the file system refuses links; returns which."""
    destination.unlink(missing_ok=True)
    try:
        os.symlink(os.path.abspath(source), destination)
        return "link"
    except (OSError, NotImplementedError):
        shutil.copy2(source, destination)
        return "copy"


def _suffix(path: str) -> str:
    return Path(path).suffix.lower() or ".png"


def _add_split(root: Path, split: str, pairs: list[tuple[str, str, str]], counts: dict) -> None:
    images, labels = root / split / "images", root / split / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for sample_id, image, label in pairs:
        for source, target in ((image, images / f"{sample_id}{_suffix(image)}"), (label, labels / f"{sample_id}.png")):
            counts[link_or_copy(source, target)] += 1


def compose_stage3_tree(root: str | Path, bundle, pseudo_records: list[dict]) -> dict:
    """Write the `--dataset folder` tree stage 3 trains on and return its summary.

    train/: the labeled images with their true labels and the pseudo-labeled images with their
    pseudo labels (manifest records without "skipped"); val/: the original val split. Files are
    symlinks (copies where links fail), named by sample id. An existing tree made by this function
    is replaced; any other existing folder is refused, never deleted."""
    root = Path(root)
    if root.exists():
        if not (root / TREE_MARKER).is_file():
            raise SelfTrainingError(f"{root} exists and was not made by self-training; move it away")
        shutil.rmtree(root)  # links only: rmtree removes links, never what they point to
    labeled = [(i, image, label) for (i, image), (_, label) in
               zip(sample_files(bundle.labeled, "image", "labeled"), sample_files(bundle.labeled, "label", "labeled"))]
    pseudo = [(r["id"], r["input"], r["label"]) for r in pseudo_records if "skipped" not in r]
    val = [(i, image, label) for (i, image), (_, label) in
           zip(sample_files(bundle.val, "image", "val"), sample_files(bundle.val, "label", "val"))]
    unlabeled_val = [i for i, _, label in val if label is None] + [i for i, _, label in labeled if label is None]
    if unlabeled_val:
        raise SelfTrainingError(f"samples without a label file in the labeled or val split, e.g. {unlabeled_val[0]}")
    _check_unique([i for i, _, _ in labeled] + [i for i, _, _ in pseudo], "labeled + pseudo-labeled images")
    _check_unique([i for i, _, _ in val], "val split")

    building = root.with_name(f".{root.name}.building")
    if building.exists():
        shutil.rmtree(building)
    building.mkdir(parents=True)
    counts = {"link": 0, "copy": 0}
    _add_split(building, "train", labeled + pseudo, counts)
    _add_split(building, "val", val, counts)
    classes = {"classes": list(bundle.class_names), "ignore_index": bundle.ignore_index}
    if bundle.palette:
        classes["palette"] = list(bundle.palette)
    (building / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")
    summary = {
        "labeled_ids": [i for i, _, _ in labeled],
        "pseudo_labeled_ids": [i for i, _, _ in pseudo],
        "val_ids": [i for i, _, _ in val],
        "symlinks": counts["link"],
        "copies": counts["copy"],
    }
    write_json_atomic(building / TREE_MARKER, summary)
    building.rename(root)
    return summary


def stage3_data_flags(data_root: str | Path) -> list[str]:
    """The flags that point a training run at the stage-3 tree with every training image labeled.

    They go after the user's flags (the last value of a flag wins), so the stage-1 data flags of a
    preset (dataset, protocol, extra pools, splits) do not leak into stage 3."""
    return ["--dataset", "folder", "--data_root", str(data_root), "--labeled", "1.0", "--train_split", "train",
            "--val_split", "val", "--unlabeled_extra", "none", "--unlabeled_stream", "none"]
