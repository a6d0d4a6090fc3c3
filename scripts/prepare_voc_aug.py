#!/usr/bin/env python
"""Write VOC 2012's train_aug labels (SegmentationClassAug, 10,582 ids) from the SBD release.

Needs the two official archives, unpacked: VOCtrainval_11-May-2012.tar (VOCdevkit/VOC2012) and
SBD's benchmark.tgz (benchmark_RELEASE). No SegmentationClassAug.zip download is needed.

    python scripts/prepare_voc_aug.py --voc_root data/VOCdevkit --sbd_root data/benchmark_RELEASE
    python scripts/check_dataset.py --dataset voc --root data/VOCdevkit --splits train_aug val

Ids labelled by both take VOC 2012's label unless `--prefer sbd`. Prints a JSON report. A root
that is not the expected tree, an SBD file that cannot be read, or a train_aug id that ends without
an image or a label stops it with `error: ...` naming the files on stderr and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys

from cps_hf.cli import ArgumentParser, run_cli
from cps_hf.data import DatasetError
from cps_hf.data.voc_aug import build_voc_aug
from cps_hf.errors import UserInputError


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--voc_root", required=True, help="folder holding VOCdevkit, VOCdevkit, or VOC2012")
    parser.add_argument("--sbd_root", required=True, help="benchmark_RELEASE (or its dataset/cls folder)")
    parser.add_argument("--prefer", choices=["voc", "sbd"], default="voc", help="label source for ids in both")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes converting the .mat labels (default: up to 8, one per core)")
    args = parser.parse_args(argv)
    for flag, root in (("--voc_root", args.voc_root), ("--sbd_root", args.sbd_root)):
        if not os.path.isdir(os.path.expanduser(root)):
            raise DatasetError(f"{flag} {root}: folder does not exist")
    if args.num_workers < 1:
        raise UserInputError(f"--num_workers must be at least 1, got {args.num_workers}")
    report = build_voc_aug(os.path.expanduser(args.voc_root), os.path.expanduser(args.sbd_root), prefer=args.prefer,
                           num_workers=args.num_workers)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
