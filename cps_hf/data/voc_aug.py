"""Build VOC 2012's `train_aug` labels (10,582 images) from the SBD release, without the dead links.

The paper trains on `train_aug`: VOC 2012 `train` plus the Semantic Boundaries Dataset (SBD,
Hariharan et al. 2011, `benchmark_RELEASE/dataset/cls/*.mat`), minus VOC `val`. Most codebases
download a ready-made `SegmentationClassAug.zip` whose link has died more than once. This module
writes that folder from the two official archives instead:

- every SBD `cls/<id>.mat` and every VOC-only `train_aug` label becomes
  `SegmentationClassAug/<id>.png` (class indices, mode "L"), so the folder is complete by itself;
- ids annotated by both take VOC 2012's own label by default (it marks object boundaries 255,
  as the val labels do); `prefer="sbd"` takes SBD's. Which one the shared zip used was not
  checked here, so the choice is explicit;
- `ImageSets/SegmentationAug/train_aug.txt` is written from the bundled list when missing;
- every `train_aug` id must end with an image and a label: the report names what is missing.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DatasetError
from .loaders import resolve_voc_root
from .protocols import BUNDLED_SPLIT_LISTS, read_id_list


def read_sbd_label(mat_path: str | Path) -> np.ndarray:
    """The class-index map of one SBD `cls/*.mat` file (its `GTcls.Segmentation` field)."""
    try:
        from scipy.io import loadmat
    except ImportError as error:
        raise ImportError("reading SBD .mat labels needs scipy: pip install scipy (or cps_hf[voc])") from error
    try:
        record = loadmat(str(mat_path), squeeze_me=True, struct_as_record=False)["GTcls"]
        label = np.asarray(record.Segmentation)
    except Exception as error:  # missing field, not a MATLAB file, truncated
        raise DatasetError(f"{mat_path}: not an SBD class label (.mat with GTcls.Segmentation): {error}") from error
    if label.ndim != 2 or label.size == 0:
        raise DatasetError(f"{mat_path}: GTcls.Segmentation has shape {label.shape}, expected an (H, W) map")
    if label.max() > 20 and not np.all((label <= 20) | (label == 255)):
        raise DatasetError(f"{mat_path}: label values {np.unique(label)[:10].tolist()} are not VOC class ids 0-20")
    return label.astype(np.uint8)


def _convert(job: tuple[str, str, str | None]) -> str | None:
    """Write one label (SBD .mat or VOC palette PNG) as an index PNG; returns an error message
    instead of raising (worker side)."""
    source, png_path, image_path = job
    try:
        if source.endswith(".mat"):
            label = read_sbd_label(source)
        else:
            with Image.open(source) as voc_label:
                label = np.asarray(voc_label if voc_label.mode in ("P", "L") else voc_label.convert("L"))
        if image_path is not None:
            with Image.open(image_path) as image:
                if image.size != (label.shape[1], label.shape[0]):
                    return f"{source}: label is {label.shape[1]}x{label.shape[0]} but {image_path} is {image.size[0]}x{image.size[1]}"
        temporary = f"{png_path}.tmp.png"
        Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), mode="L").save(temporary)
        os.replace(temporary, png_path)  # never leave a half-written label behind
    except (DatasetError, OSError, ImportError) as error:
        return str(error)
    return None


def build_voc_aug(voc_root: str | Path, sbd_root: str | Path, prefer: str = "voc", num_workers: int = 0) -> dict:
    """Write SegmentationClassAug (and the train_aug list) into the VOC tree; returns a report.

    `sbd_root` is the folder holding `dataset/cls` (benchmark_RELEASE) or `cls` itself.
    Raises `DatasetError` naming the files when a train_aug id ends without an image or a label,
    or when an SBD file cannot be converted.
    """
    if prefer not in ("voc", "sbd"):
        raise ValueError(f"prefer must be 'voc' or 'sbd', got {prefer!r}")
    voc_dir = resolve_voc_root(voc_root)
    sbd_root = Path(sbd_root)
    cls_dir = next((d for d in (sbd_root / "dataset" / "cls", sbd_root / "cls", sbd_root) if any(d.glob("*.mat"))), None)
    if cls_dir is None:
        raise DatasetError(f"{sbd_root}: no SBD labels found (looked for *.mat in dataset/cls, cls and the folder itself)")

    list_file = voc_dir / "ImageSets" / "SegmentationAug" / "train_aug.txt"
    wrote_list = False
    if not list_file.is_file():
        list_file.parent.mkdir(parents=True, exist_ok=True)
        list_file.write_text("\n".join(read_id_list(BUNDLED_SPLIT_LISTS[("voc", "train_aug")])) + "\n")
        wrote_list = True
    train_aug = read_id_list(list_file)

    out_dir = voc_dir / "SegmentationClassAug"
    out_dir.mkdir(exist_ok=True)
    sbd = {path.stem: path for path in cls_dir.glob("*.mat")}
    jobs, from_voc, from_sbd = [], 0, 0
    for sample_id in sorted(set(sbd) | set(train_aug)):
        voc_label = voc_dir / "SegmentationClass" / f"{sample_id}.png"
        use_voc = voc_label.is_file() and (prefer == "voc" or sample_id not in sbd)
        if not use_voc and sample_id not in sbd:
            continue  # reported below as a train_aug id without a label
        from_voc, from_sbd = from_voc + use_voc, from_sbd + (not use_voc)
        image = voc_dir / "JPEGImages" / f"{sample_id}.jpg"
        jobs.append((str(voc_label if use_voc else sbd[sample_id]), str(out_dir / f"{sample_id}.png"),
                     str(image) if image.is_file() else None))

    if num_workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            errors = [e for e in pool.map(_convert, jobs, chunksize=64) if e]
    else:
        errors = [e for e in map(_convert, jobs) if e]
    if errors:
        raise DatasetError(f"{len(errors)} SBD label(s) could not be converted, e.g.:\n  " + "\n  ".join(errors[:5]))

    missing_images = [i for i in train_aug if not (voc_dir / "JPEGImages" / f"{i}.jpg").is_file()]
    missing_labels = [i for i in train_aug if not (out_dir / f"{i}.png").is_file()]
    if missing_images or missing_labels:
        raise DatasetError(
            f"{voc_dir}: train_aug ({list_file}) lists {len(missing_images)} id(s) without JPEGImages/<id>.jpg "
            f"(e.g. {missing_images[:3]}) and {len(missing_labels)} without a label in SBD or SegmentationClass "
            f"(e.g. {missing_labels[:3]}); is {sbd_root} the full SBD release?"
        )
    return {
        "voc_dir": str(voc_dir),
        "train_aug_ids": len(train_aug),
        "labels_written": len(jobs),
        "from_sbd": from_sbd,
        "from_voc": from_voc,
        "prefer": prefer,
        "wrote_train_aug_list": wrote_list,
    }
