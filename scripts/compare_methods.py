#!/usr/bin/env python
"""Train the same preset with several methods (and seeds) and print their mIoU side by side.

Same data, same labeled subset, same iterations and labeled batch for every method: the only
difference is the method. This is how docs/demo.md's table is made:

    python scripts/compare_methods.py --config configs/demo.yaml --methods supervised cps_cutmix \
        --seeds 0 1 2 --output_dir outputs/demo_compare

Extra `--field value` flags after `--` go to every run (e.g. `-- --data_root demo_data`).
Each run is a separate `scripts/train_cps.py` process; results land in
<output_dir>/<method>_seed<k>/all_results.json and a summary in <output_dir>/comparison.json.
A --config that does not exist is one line `error: ...` and exit status 2; a run that fails stops
the comparison with that run's exit status after its own messages.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from cps_hf.cli import ArgumentParser, run_cli
from cps_hf.errors import UserInputError
from cps_hf.run_folder import restart_flags

TRAIN = Path(__file__).resolve().parent / "train_cps.py"


def run(config: str, method: str, seed: int, output_dir: Path, extra: list[str]) -> dict:
    out = output_dir / f"{method}_seed{seed}"
    results_file = out / "all_results.json"
    if results_file.exists():  # finished earlier: reuse (delete the folder to rerun)
        return json.loads(results_file.read_text())
    command = [sys.executable, str(TRAIN), "--config", config, "--method", method, "--seed", str(seed),
               "--output_dir", str(out), "--report_to", "none", *extra, *restart_flags(out)]  # an unfinished run
    # continues from its latest checkpoint, or starts again when it saved none
    print("$", " ".join(command), flush=True)
    status = subprocess.run(command).returncode
    if status:
        print(f"{method} seed {seed}: train_cps.py stopped with exit status {status} (its messages are above)",
              file=sys.stderr, flush=True)
        raise SystemExit(status)
    return json.loads(results_file.read_text())


def summarise(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{100 * mean:.1f}" + ("" if math.isnan(spread) else f" ± {100 * spread:.1f}")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="the preset every run trains (configs/*.yaml)")
    parser.add_argument("--methods", nargs="+", default=["supervised", "cps_cutmix"], help="--method of each run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="one run per method and seed (a seed picks the labeled subset, init and order)")
    parser.add_argument("--output_dir", default="outputs/compare",
                        help="holds <method>_seed<k>/ per run and comparison.json")
    args = parser.parse_args(argv)
    if not Path(args.config).is_file():
        raise UserInputError(f"--config {args.config}: no such file (give a preset, e.g. configs/demo.yaml)")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    table = {}
    for method in args.methods:
        runs = [run(args.config, method, seed, output_dir, extra) for seed in args.seeds]
        table[method] = {
            "final_mean_iou": [r["eval_mean_iou"] for r in runs],
            "best_mean_iou": [r["best_eval_mean_iou"] for r in runs],
            "per_category_iou_seed0": runs[0]["eval_per_category_iou"],
            "steps": runs[0]["final_step"],
        }
    summary = {"config": args.config, "seeds": args.seeds, "extra_flags": extra, "methods": table}
    (output_dir / "comparison.json").write_text(json.dumps(summary, indent=2))

    print(f"\n{args.config}, seeds {args.seeds}: val mIoU (%), mean ± std over seeds")
    print("| method | final mIoU | best mIoU | steps |")
    print("|---|---|---|---|")
    for method, row in table.items():
        print(f"| {method} | {summarise(row['final_mean_iou'])} | {summarise(row['best_mean_iou'])} | {row['steps']} |")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
