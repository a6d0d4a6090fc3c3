#!/usr/bin/env python
"""Write the synthetic VOC-layout demo tree (see cps_hf/data/demo.py for what is in it).

    python scripts/make_demo_data.py --out data/demo [--num_train 400 --num_val 100 --seed 0]

A value that cannot work (a count or size below 1, --min_size above --max_size, --out naming a file)
is one line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cps_hf.cli import ArgumentParser, run_cli
from cps_hf.data import make_demo_voc
from cps_hf.errors import UserInputError


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder to write VOCdevkit/VOC2012 into")
    parser.add_argument("--num_train", "--num-train", type=int, default=400, help="training images")
    parser.add_argument("--num_val", "--num-val", type=int, default=100, help="validation images")
    parser.add_argument("--min_size", "--min-size", type=int, default=64, help="smallest image side, pixels")
    parser.add_argument("--max_size", "--max-size", type=int, default=96, help="largest image side, pixels")
    parser.add_argument("--seed", type=int, default=0, help="seeds the scenes: the same seed writes the same files")
    args = parser.parse_args(argv)
    for flag in ("num_train", "num_val", "min_size", "max_size"):
        if getattr(args, flag) < 1:
            raise UserInputError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.min_size > args.max_size:
        raise UserInputError(f"--min_size {args.min_size} is above --max_size {args.max_size}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserInputError(f"--out {args.out}: is a file, not a folder")
    start = time.perf_counter()
    path = make_demo_voc(args.out, args.num_train, args.num_val, (args.min_size, args.max_size), args.seed)
    print(f"wrote {args.num_train} train + {args.num_val} val images to {path} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    sys.exit(run_cli(main))
