#!/usr/bin/env python
"""Write MSRC-21 (Microsoft Research Cambridge v2: 591 photographs) as a folder dataset, with the
TextonBoost train / val / test split (276 / 59 / 256) and void as ignore (255).

Source: a clone of the public repository TonyZZX/MultiGraph_MultiLabel_Learning, or its MSRC_v2/
folder: the original images (`Images/*.bmp`) and the cleaned-up labels of Malisiewicz and Efros
(BMVC 2007, `newsegmentations_mats/*_GT.mat`). In each .mat, `newseg` gives every pixel a segment
id 1..K and `newlabels[k-1]` the class of segment k, 1-based in the MSRC v2 order building, grass,
tree, cow, horse, sheep, sky, mountain, aeroplane, water, face, car, bicycle, flower, sign, bird,
book, chair, road, cat, dog, body, boat (the repository's MSRC_v2/README.md; checked by eye on
overlays). Segments past the end of `newlabels` are unlabeled: void.

Classes: the standard MSRC-21 set, numbered 0..20 in that order without horse and mountain, which
have too few examples and become void, as in Shotton et al. (0 building, 1 grass, 2 tree, 3 cow,
4 sheep, 5 sky, 6 aeroplane, 7 water, 8 face, 9 car, 10 bicycle, 11 flower, 12 sign, 13 bird,
14 book, 15 chair, 16 road, 17 cat, 18 dog, 19 body, 20 boat; 255 void).

Split: Shotton et al.'s TextonBoostSplits lists, bundled in cps_hf/data/protocols/msrc/ (copied
from the public repository RockStarCoders/alienMarkovNetworks, folder MSRC_dataSplit_Shotton/;
provenance in that folder's README.md).

    python scripts/prepare_msrc.py --source data/MultiGraph_MultiLabel_Learning --out data/msrc
    python scripts/check_dataset.py --dataset folder --root data/msrc --splits train val test

Writes <out>/classes.json, <out>/{train,val,test}/images/<id>.png (the BMPs, losslessly as PNG) and
labels/<id>.png (class indices, MSRC colours as palette), <out>/splits/<split>.txt, a dataset card
<out>/README.md (research-use licence) and <out>/stats.json, the JSON report it prints (images per
split, void and class pixel shares). A --source that is not that tree, an --out that is not empty,
or any image that cannot be used (no label, unreadable, sizes differ, fields missing) stops it with
`error: ...` naming every such file, before anything is written; --skip_unusable writes the rest
and lists what it left out in the report and the card.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cps_hf.cli import ArgumentParser, run_cli
from cps_hf.data import DatasetError
from cps_hf.data.classes import IGNORE_INDEX
from cps_hf.data.protocols import PROTOCOL_DIR, read_id_list
from cps_hf.data.validation import decode_image

# The 23 labels of MSRC v2, in the order `newlabels` counts them from 1, with the colour each has in
# MSRC's own colour-coded ground truth (GroundTruth/*_GT.bmp; void is black).
MSRC_V2_LABELS = (
    "building", "grass", "tree", "cow", "horse", "sheep", "sky", "mountain", "aeroplane", "water", "face",
    "car", "bicycle", "flower", "sign", "bird", "book", "chair", "road", "cat", "dog", "body", "boat",
)
MSRC_V2_COLOURS = (
    (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128), (128, 128, 128), (64, 0, 0),
    (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128), (192, 0, 128), (64, 128, 128), (192, 128, 128),
    (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 64, 128), (0, 192, 128), (128, 192, 128), (64, 64, 0), (192, 64, 0),
)
DROPPED = ("horse", "mountain")  # too rare to learn or evaluate; void in MSRC-21
MSRC21_CLASSES = [name for name in MSRC_V2_LABELS if name not in DROPPED]
SPLIT_FILES = {"train": "Train.txt", "val": "Validation.txt", "test": "Test.txt"}
SPLIT_DIR = PROTOCOL_DIR / "msrc"
SOURCE_HINT = ("pass a clone of github.com/TonyZZX/MultiGraph_MultiLabel_Learning or its MSRC_v2 folder "
               "(Images/*.bmp and newsegmentations_mats/*_GT.mat)")
SHOWN_PROBLEMS = 20


def msrc21_palette() -> list[int]:
    """MSRC's own colours for the 21 classes (index i: the colour of its MSRC v2 label), void black."""
    palette = np.zeros((256, 3), dtype=np.int64)
    for index, name in enumerate(MSRC21_CLASSES):
        palette[index] = MSRC_V2_COLOURS[MSRC_V2_LABELS.index(name)]
    return palette.ravel().tolist()


def source_to_train_table() -> np.ndarray:
    """MSRC v2 label (1..23; 0 for void) -> MSRC-21 class (0..20) or 255 (void, horse, mountain)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for index, name in enumerate(MSRC21_CLASSES):
        table[MSRC_V2_LABELS.index(name) + 1] = index
    return table


def split_ids() -> dict[str, list[str]]:
    """The TextonBoost split as ids (file stems), in the lists' own order."""
    return {split: read_id_list(SPLIT_DIR / name) for split, name in SPLIT_FILES.items()}


def find_msrc_root(source: str | Path) -> Path:
    """The MSRC_v2 folder of a clone (or the folder itself); a wrong or partial tree says what it lacks."""
    source = Path(source).expanduser()
    if not source.is_dir():
        raise DatasetError(f"--source {source}: folder does not exist; {SOURCE_HINT}")
    for root in (source / "MSRC_v2", source):
        found = [name for name in ("Images", "newsegmentations_mats") if (root / name).is_dir()]
        if len(found) == 2:
            return root
        if found:
            missing = "newsegmentations_mats" if found == ["Images"] else "Images"
            more = (" (this looks like Microsoft's original download, whose GroundTruth/ colour images this script does "
                    "not read)") if (root / "GroundTruth").is_dir() else ""
            raise DatasetError(f"--source {source}: {root} has {found[0]}/ but no {missing}/{more}; {SOURCE_HINT}")
    raise DatasetError(f"--source {source}: no MSRC_v2 tree there (looked for Images/ and newsegmentations_mats/ in "
                       f"{source / 'MSRC_v2'} and {source}); {SOURCE_HINT}")


def _loadmat():
    """scipy's .mat reader, or one line saying how to get it (it is an optional dependency)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DatasetError("reading MSRC's .mat labels needs scipy: pip install scipy (or cps_hf[voc])") from None
    return loadmat


def read_msrc_label(mat_path: str | Path) -> np.ndarray:
    """The MSRC v2 label (1..23, 0 = void) of every pixel of one Malisiewicz-Efros `*_GT.mat`."""
    loadmat = _loadmat()
    try:
        record = loadmat(str(mat_path))
    except Exception as error:  # not a MATLAB file, truncated, a Git LFS pointer
        raise DatasetError(f"{mat_path}: cannot read this .mat file ({type(error).__name__}: {error}); fetch it again") from None
    missing = [field for field in ("newseg", "newlabels") if field not in record]
    if missing:
        raise DatasetError(f"{mat_path}: no {' or '.join(missing)} field (has {sorted(k for k in record if not k.startswith('__'))}); "
                           "it is not a Malisiewicz-Efros label file: fetch it again")
    segments, labels = np.asarray(record["newseg"]), np.asarray(record["newlabels"]).ravel()
    if segments.ndim != 2 or segments.size == 0 or segments.dtype.kind not in "ui":
        raise DatasetError(f"{mat_path}: newseg is {segments.dtype} {segments.shape}, expected an (H, W) map of segment ids")
    if labels.size and (labels.dtype.kind not in "uif" or labels.min() < 1 or labels.max() > len(MSRC_V2_LABELS)
                        or np.any(labels != np.round(labels))):
        raise DatasetError(f"{mat_path}: newlabels holds {np.unique(labels)[:10].tolist()}, expected MSRC v2 labels "
                           f"1..{len(MSRC_V2_LABELS)}")
    if segments.min() < 0:
        raise DatasetError(f"{mat_path}: newseg has negative segment ids")
    table = np.zeros(int(segments.max()) + 1, dtype=np.uint8)  # segment 0 and segments past newlabels: void
    count = min(len(labels), len(table) - 1)
    table[1:count + 1] = labels[:count].astype(np.uint8)
    return table[segments]


def _load_sample(root: Path, sample_id: str) -> tuple[np.ndarray | None, list[str]]:
    """(MSRC v2 label map, problems) for one id; every problem names its file."""
    image_path, mat_path = root / "Images" / f"{sample_id}.bmp", root / "newsegmentations_mats" / f"{sample_id}_GT.mat"
    problems = [f"{path}: missing" for path in (image_path, mat_path) if not path.is_file()]
    if problems:
        return None, problems
    try:
        label = read_msrc_label(mat_path)
        height, width = decode_image(str(image_path)).shape[:2]
    except DatasetError as error:
        return None, [str(error)]
    if label.shape != (height, width):
        return None, [f"{mat_path}: label is {label.shape[1]}x{label.shape[0]} but {image_path} is {width}x{height}"]
    return label, []


def _shares(counts: np.ndarray) -> dict:
    total = int(counts.sum())
    table = source_to_train_table()
    train = np.bincount(table[np.arange(len(counts))], weights=counts, minlength=256).astype(np.int64)
    dropped = {name: int(counts[MSRC_V2_LABELS.index(name) + 1]) for name in DROPPED}
    return {
        "pixels": total,
        "void_share": round(float(train[IGNORE_INDEX] / total), 4) if total else 0.0,
        "void_pixels": {"unlabeled": int(counts[0]), **dropped},
        "class_share": {name: round(float(train[index] / total), 4) if total else 0.0
                        for index, name in enumerate(MSRC21_CLASSES)},
    }


def _dataset_card(report: dict) -> str:
    splits = report["splits"]
    rows = "\n".join(f"| {split} | {info['images']} | {info['pixels']:,} | {info['void_share']:.1%} |"
                     for split, info in splits.items())
    classes = "\n".join(f"| {index} | {name} | " + " | ".join(f"{splits[s]['class_share'][name]:.2%}" for s in splits) + " |"
                        for index, name in enumerate(MSRC21_CLASSES))
    skipped = ("\n\nLeft out (--skip_unusable), so the split sizes are not the standard ones:\n\n"
               + "\n".join(f"- {problem}" for problem in report["skipped"])) if report["skipped"] else ""
    return f"""# MSRC-21 (folder dataset)

Written by `scripts/prepare_msrc.py` of cps_hf from `{report['source']}`. Do not commit or redistribute it.

**Licence: research use only.** The images are the Microsoft Research Cambridge Object Recognition Image
Database v2 (MSRC v2), under the terms of Microsoft's original download (non-commercial research use); the
labels are the cleaned-up annotations of T. Malisiewicz and A. A. Efros, "Improving Spatial Support for
Objects via Multiple Segmentations", BMVC 2007. Cite both, and J. Shotton et al., "TextonBoost", ECCV 2006,
for the split.

- `classes.json`: the 21 MSRC-21 classes (index = class id), `ignore_index` 255, MSRC's colours as palette.
- `<split>/images/<id>.png`: the original BMPs, losslessly as PNG (id = MSRC file stem, e.g. `1_10_s`).
- `<split>/labels/<id>.png`: class ids 0..20, 255 = void: unlabeled pixels and the two rare MSRC v2 labels
  horse and mountain, which MSRC-21 leaves out.
- `splits/<split>.txt`: the ids of each split, Shotton et al.'s TextonBoost train / validation / test lists.
- `stats.json`: these counts, per split.

| split | images | pixels | void |
|---|---:|---:|---:|
{rows}

| id | class | {' | '.join(splits)} |
|---|---|{'---:|' * len(splits)}
{classes}{skipped}

Check it with `python scripts/check_dataset.py --dataset folder --root <this folder> --splits train val test`.
"""


def prepare_msrc(source: str | Path, out: str | Path, skip_unusable: bool = False) -> dict:
    """Check every image of the split first, then write the folder dataset; returns the report."""
    root = find_msrc_root(source)
    _loadmat()  # once, not once per file
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"--out {out}: {'is a file' if not out.is_dir() else 'is not empty'}; "
                           "give a new or empty folder")
    splits = split_ids()
    wanted = {sample_id for ids in splits.values() for sample_id in ids}
    labels, problems = {}, {}
    for sample_id in sorted(wanted):
        label, found = _load_sample(root, sample_id)
        if found:
            problems[sample_id] = found
        else:
            labels[sample_id] = label
    present = {path.stem for path in (root / "Images").iterdir() if path.suffix.lower() == ".bmp"}
    unused = sorted(present - wanted)
    if problems and not skip_unusable:
        lines = [line for found in problems.values() for line in found]
        shown = "\n  ".join(lines[:SHOWN_PROBLEMS]) + (f"\n  ... and {len(lines) - SHOWN_PROBLEMS} more"
                                                       if len(lines) > SHOWN_PROBLEMS else "")
        raise DatasetError(
            f"{root}: {len(problems)} of the {len(wanted)} MSRC images cannot be used; nothing was written. "
            f"Fetch the source again (a clone without Git LFS/large files is partial), or pass --skip_unusable "
            f"to write the rest:\n  {shown}"
        )
    table, palette = source_to_train_table(), msrc21_palette()
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.json").write_text(json.dumps(
        {"classes": MSRC21_CLASSES, "ignore_index": IGNORE_INDEX, "palette": palette}, indent=1) + "\n")
    (out / "splits").mkdir()
    report = {"source": str(root), "out": str(out), "classes": MSRC21_CLASSES, "ignore_index": IGNORE_INDEX,
              "void_as_ignore": ["unlabeled", *DROPPED], "split_source": "Shotton et al. TextonBoost (ECCV 2006), "
              "cps_hf/data/protocols/msrc", "splits": {}, "skipped": [line for found in problems.values() for line in found],
              "not_in_split": unused}
    total = np.zeros(len(MSRC_V2_LABELS) + 1, dtype=np.int64)
    for split, ids in splits.items():
        kept = [sample_id for sample_id in ids if sample_id in labels]
        (out / split / "images").mkdir(parents=True)
        (out / split / "labels").mkdir()
        counts = np.zeros(len(MSRC_V2_LABELS) + 1, dtype=np.int64)
        for sample_id in kept:
            with Image.open(root / "Images" / f"{sample_id}.bmp") as image:
                image.convert("RGB").save(out / split / "images" / f"{sample_id}.png")
            source_label = labels[sample_id]
            counts += np.bincount(source_label.ravel(), minlength=len(counts))
            label = Image.fromarray(table[source_label])
            label.putpalette(palette)  # mode P: the class ids stay the pixel values
            label.save(out / split / "labels" / f"{sample_id}.png")
        (out / "splits" / f"{split}.txt").write_text("\n".join(kept) + "\n")
        report["splits"][split] = {"images": len(kept), "left_out": len(ids) - len(kept), **_shares(counts)}
        total += counts
    report["total_images"] = sum(info["images"] for info in report["splits"].values())
    report["all"] = _shares(total)
    (out / "stats.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(_dataset_card(report))
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--source", required=True,
                        help="clone of TonyZZX/MultiGraph_MultiLabel_Learning, or its MSRC_v2 folder")
    parser.add_argument("--out", required=True, help="new (or empty) folder to write the dataset into")
    parser.add_argument("--skip_unusable", action="store_true",
                        help="write the images that can be used and list the others, instead of stopping")
    args = parser.parse_args(argv)
    report = prepare_msrc(args.source, args.out, skip_unusable=args.skip_unusable)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
