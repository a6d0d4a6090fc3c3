"""Published partition protocols bundled with the package, and a reader for ID-list files.

Names follow `<source>/<dataset>/<split>`; see protocols/README.md for sources (MIT) and sizes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError

PROTOCOL_DIR = Path(__file__).parent / "protocols"


@dataclass(frozen=True)
class Protocol:
    """A named labeled/unlabeled partition; `unlabeled` is None when it is 'the rest'."""

    name: str
    labeled: Path | None
    unlabeled: Path | None


def _registry() -> dict[str, Protocol]:
    table: dict[str, Protocol] = {}

    def add(name, labeled, unlabeled):
        table[name] = Protocol(
            name, labeled and PROTOCOL_DIR / labeled, unlabeled and PROTOCOL_DIR / unlabeled
        )

    voc = "cps/pascal_voc/subset_train_aug"
    city = "cps/city/config_new"
    for fraction, count in zip(("1-16", "1-8", "1-4", "1-2"), (92, 183, 366, 732)):
        add(f"cps/voc/{fraction}", f"{voc}/train_aug_labeled_{fraction}.txt", f"{voc}/train_aug_unlabeled_{fraction}.txt")
        for alias in (fraction, str(count)):
            # Table 5 (PseudoSeg's protocol): labels from the 1,464 train images, "the remaining images in the
            # standard training set, together with the images in the augmented set" unlabeled: the rest of train_aug
            add(f"cps/voc-fewsup/{alias}", f"{voc}/pseudoseg_labeled_{fraction}.txt", None)
            # the official code's pseudoseg_unlabeled lists: the rest of the 1,464 train images only
            add(f"cps/voc-fewsup-train-only/{alias}", f"{voc}/pseudoseg_labeled_{fraction}.txt",
                f"{voc}/pseudoseg_unlabeled_{fraction}.txt")
        add(
            f"cps/cityscapes/{fraction}",
            f"{city}/subset_train/train_aug_labeled_{fraction}.txt",
            f"{city}/subset_train/train_aug_unlabeled_{fraction}.txt",
        )
    for size in (3000, 6000, 9000):
        add(f"cps/cityscapes-extra/{size}", None, f"{city}/coarse_split/train_extra_{size}.txt")
    for split in ("92", "183", "366", "732", "1464", "1_16", "1_8", "1_4", "u2pl_1_16", "u2pl_1_8", "u2pl_1_4"):
        add(f"unimatch/voc/{split.replace('_', '-')}", f"unimatch/pascal/{split}/labeled.txt", f"unimatch/pascal/{split}/unlabeled.txt")
    for split in ("1_30", "1_16", "1_8", "1_4", "1_2"):
        add(
            f"unimatch/cityscapes/{split.replace('_', '-')}",
            f"unimatch/cityscapes/{split}/labeled.txt",
            f"unimatch/cityscapes/{split}/unlabeled.txt",
        )
    return table


PROTOCOLS = _registry()

# Full split lists, used when a dataset tree ships without its own ImageSets files.
BUNDLED_SPLIT_LISTS = {
    ("voc", "train_aug"): PROTOCOL_DIR / "unimatch/pascal/train_aug.txt",
    ("voc", "train"): PROTOCOL_DIR / "unimatch/pascal/1464/labeled.txt",
    ("voc", "val"): PROTOCOL_DIR / "unimatch/pascal/val.txt",
}


def available_protocols() -> list[str]:
    return sorted(PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise DatasetError(f"unknown protocol {name!r}; known protocols: {', '.join(available_protocols())}") from None


_SUFFIXES = re.compile(r"(_leftImg8bit|_gtFine_labelTrainIds|_gtFine_labelIds|_gtFine|_gtCoarse)$")


def line_to_id(line: str) -> str:
    """Any published list-line format -> the sample id (`2007_000032`, `jena_000078_000019`)."""
    first = line.strip().split()[0]
    stem = first.replace("\\", "/").rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    return _SUFFIXES.sub("", stem)


def read_id_list(path: str | Path) -> list[str]:
    """Ids of a list file: one per line in any published format; blank lines and CRLF are fine."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read id list ({err})") from err
    ids = [line_to_id(line) for line in lines if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: id list is empty")
    return ids
