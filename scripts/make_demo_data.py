#!/usr/bin/env python
"""Write the synthetic VOC-layout demo tree (see cps_hf/data/demo.py for what is in it).

    python scripts/make_demo_data.py --out data/demo [--num-train 400 --num-val 100 --seed 0]

A value that cannot work (a count or size below 1, --min-size above --max-size, --out naming a file)
is one line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cps_hf.cli import run_cli
from cps_hf.data import make_demo_voc
from cps_hf.errors import UserInputError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write VOCdevkit/VOC2012 into")
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--min-size", type=int, default=64)
    parser.add_argument("--max-size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for flag in ("num_train", "num_val", "min_size", "max_size"):
        if getattr(args, flag) < 1:
            raise UserInputError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.min_size > args.max_size:
        raise UserInputError(f"--min-size {args.min_size} is above --max-size {args.max_size}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserInputError(f"--out {args.out}: is a file, not a folder")
    start = time.perf_counter()
    path = make_demo_voc(args.out, args.num_train, args.num_val, (args.min_size, args.max_size), args.seed)
    print(f"wrote {args.num_train} train + {args.num_val} val images to {path} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    sys.exit(run_cli(main))
