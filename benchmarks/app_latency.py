#!/usr/bin/env python
"""How long the browser page (scripts/app.py) takes to answer: one prediction of a 1-2 megapixel image.

    python benchmarks/app_latency.py --model outputs/demo/model
    python benchmarks/app_latency.py --model outputs/demo/model --width 1600 --height 1000 --threads 2

Times `cps_hf.app.Segmenter.predict` (what the page runs after an upload: normalisation, the model under its
recorded protocol, argmax, colour mask, overlay, class shares) on a random image of the given size: the
plain prediction, with the flipped image, and multi-scale (0.75, 1.0, 1.25) with the flip. Prints one JSON
line with the median seconds of each over --repeats runs, after one untimed run.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cps_hf.cli import ArgumentParser, run_cli  # noqa: E402


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="exported model folder or Hub id")
    parser.add_argument("--width", type=int, default=1600, help="image width, pixels")
    parser.add_argument("--height", type=int, default=1000, help="image height, pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed predictions per setting")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from cps_hf.app import Segmenter

    torch.set_num_threads(args.threads)
    segmenter = Segmenter.load(args.model)
    image = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    results = {"model": args.model, "width": args.width, "height": args.height,
               "megapixels": round(args.width * args.height / 1e6, 2), "threads": args.threads,
               "protocol": segmenter.protocol_for(False, False)}
    for name, flip, multi in (("plain", False, False), ("flip", True, False), ("multi_scale_flip", True, True)):
        segmenter.predict(image, flip, multi)  # untimed: first-call allocations
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            segmenter.predict(image, flip, multi)
            times.append(time.perf_counter() - start)
        results[f"{name}_seconds"] = round(statistics.median(times), 3)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    sys.exit(run_cli(lambda argv: main(argv) and 0))
