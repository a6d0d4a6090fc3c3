#!/usr/bin/env python
"""Every training method on generated scenes where labels are scarce: table, plots, cost. Resumable.

    python benchmarks/ssl_study.py --jobs 2          # the study: 135 runs, several hours on 2 cores
    python benchmarks/ssl_study.py --quick           # pipeline check: every method, 40 steps, < 10 min
    python benchmarks/ssl_study.py --report-only     # tables and figures again from the finished runs

What runs. The data is `cps_hf.data.study_scenes` (8 classes + background: colour family x tone,
appearance modes of unequal frequency, 10:1 class imbalance, distractors; its docstring says why it
is hard and why unlabeled images help), written once to <runs-dir>/data: 800 training images
(seed 0) and 200 validation images (seed 1000, the same generator). Every method in `VARIANTS`
trains at each label fraction (1/16: 50 labeled images, 1/4: 200) with seeds 0 1 2, plus a
supervised run on all 800 labels per seed as the ceiling. A seed picks the labeled subset, the
initialisation and the data order, and is shared by every method, so a method and supervised
differ only in the method at a given seed (paired comparison). Everything else is equal for all
runs: network, steps, labeled batch, learning rate, lambda (`SETTINGS`). Each run is one
`scripts/train_cps.py` process with one torch thread, in <runs-dir>/<fraction>/<variant>_seed<k>/
(compare_methods.py's layout, one level per fraction); the score is the final weights' mIoU on
the 200 validation images (not the best evaluation, which would select on the validation set).

Cost. Seconds per training step come from the trainer's log (images_per_second over the logging
windows, evaluation and checkpoints excluded); peak memory is the run process's maximum resident
set size (os.wait4). Both are reported as ratios to supervised. With --jobs 2 two runs share the
machine, so absolute times are those of a busy machine; the ratios are what to read.

Budget (measured on the 2-core machine, one torch thread, other jobs running): at 64 px, batch 8,
timm `test_resnet` (a 0.66 M-parameter ResNet, one basic block per stage), a supervised run of the
full setting took 67 s (0.091 s/step) and a CPS run 195 s (0.354 s/step); `--quick` measured the
first ten methods' step costs at 1.0 (supervised), 2.1 (mean teacher), 3.0 (+ CutMix), 1.8 (SPS), 2.4
(+ CutMix), 3.5 (CPC), 4.3 (CPS), 4.2 (CPS + CutMix), 5.5 (n-CPS), 4.7 (threshold) supervised
steps: 32 per fraction and seed. 6 x 32.3 x 500 steps x 0.091 s + 3 ceiling runs + ~20 s of
start-up and evaluation for each of those 63 runs = ~2.8 h of one core: about 1 h 25 min with
--jobs 2 on 2 idle cores. Measured: 69 runs (11 variants x 2 fractions x 3 seeds + the ceiling) took
69 min (4,143 s) with --jobs 2 while the machine also ran tests; the two variants added after them (the
threshold with a kept-pixel mean, mean teacher + CutMix with BN trained) and a rerun of the threshold
row took 18 runs more. `--quick` took 4.5 min with --jobs 1 next to other jobs, results identical
between runs; `--quick --jobs 2` from a fresh clone took 3 min. Runs repeat bit for bit on one machine,
but not across machines: the same supervised run moved by up to 5 points between two sessions' CPUs, so
compare rows of one study, never across studies.
Why such a small network: a random-init ResNet-18 step costs ~5x more, which leaves ~100 steps
per run in the same time, and nothing learns these scenes in 100 steps from scratch. In 500 steps
the study network reaches 86.9 % mIoU with all 800 labels, 71.1 % with 1/16 (seed 0).

Resuming. A run folder with all_results.json is finished and reused (after checking that it was
made with the same settings: its study_run.json records the trainer flags; a mismatch stops the
study rather than mixing settings). An unfinished run restarts from its last complete step_N
checkpoint (`--resume_from_checkpoint latest`), or from scratch when it has none. Interrupt the
study any time and run the same command again. Delete a folder to rerun it.

Outputs (<docs-dir>, docs/study/ for the full setting): results.md (mean, spread, every seed,
paired differences, per-class IoU changes, cost), summary.md (the "Does CPS help?" section of
docs/study.md, between markers, its links relative to docs/; `--readme-fragment` prints it,
`--update-readme docs/study.md` replaces the marked block there), miou_vs_labels.png,
predictions.png (image, ground truth and several methods' predictions on validation images picked
by a fixed rule) and study.json (every number, every command). Each names the command that made it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # its parts, ssl_study_parts/, lie beside it;
    sys.path.append(str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from cps_hf.cli import run_cli  # noqa: E402
from cps_hf.errors import UserInputError  # noqa: E402
from ssl_study_parts import REPO, say  # noqa: E402
from ssl_study_parts.cli import add_study_arguments, chosen_setting, docs_link, finish_args, study_command  # noqa: E402
from ssl_study_parts.markdown import update_readme  # noqa: E402
from ssl_study_parts.report import report  # noqa: E402
from ssl_study_parts.runner import check_identity, ensure_data, plan_runs, read_record, train_all  # noqa: E402
from ssl_study_parts.settings import SETTINGS, VARIANTS, fraction_value  # noqa: E402

SUMMARY_HOME = REPO / "docs"  # docs/study.md holds the summary block: links from docs/ unless --update-readme names a page


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(parser, SETTINGS, VARIANTS, fractions=True, docs_default="docs/study", block="summary",
                        page="docs/study.md",
                        runs_help="run folders and the generated data (default: the setting's)")
    return finish_args(parser, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    setting = chosen_setting(SETTINGS, args)
    for fraction in setting["fractions"]:
        try:
            assert 0 < fraction_value(fraction) <= 1
        except (ValueError, AssertionError, ZeroDivisionError):
            raise UserInputError(f"--fractions {fraction}: give fractions such as 1/16") from None
    runs_dir = Path(args.runs_dir or REPO / setting["runs_dir"]).resolve()
    docs_dir = Path(args.docs_dir or REPO / setting["docs_dir"]).resolve()
    data_root = runs_dir / "data"
    commands = {"setting": args.setting, "study": study_command("ssl_study.py", args, report=False),
                "report": study_command("ssl_study.py", args, report=True),
                "invoked": " ".join(["python benchmarks/ssl_study.py", *argv])}
    ensure_data(data_root, setting["data"])
    runs = plan_runs(setting, runs_dir, data_root)
    for run in runs:  # refuse folders made with other settings before training or reporting anything
        check_identity(run, read_record(run.folder))
    failed = []
    if not args.report_only:
        start = time.perf_counter()
        failed = train_all(runs, args.jobs)
        say(f"training finished in {time.perf_counter() - start:.0f} s; {len(failed)} run(s) failed")
    home = Path(args.update_readme).resolve().parent if args.update_readme else SUMMARY_HOME
    report(runs, setting, args.setting, docs_dir, data_root, commands, docs_link(docs_dir, home=home))
    fragment = (docs_dir / "summary.md").read_text()
    if args.update_readme:
        update_readme(Path(args.update_readme), fragment)
        say(f"replaced the summary block in {args.update_readme}")
    if args.readme_fragment:
        print(fragment)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
