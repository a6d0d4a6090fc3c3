"""How often the erasure alarm is right: its rule replayed over a study's logged windows, against the classes
that really lost IoU.

For every run of a study (`benchmarks/ssl_study.py` or `benchmarks/msrc_study.py` layout:
<runs-dir>/<fraction>/<variant>_seed<k>/) whose log.jsonl holds the alarm's window means
(`pseudo_share_u/<class>`, `labeled_share/<class>`), this feeds each logging window to
`cps_hf.erasure_alarm.ErasureAlarm.judge` with the given settings and compares the classes it names with
the classes whose final IoU is at least `--drop` below the supervised run of the same fraction and seed.
It prints, per run, the classes named and the classes that dropped, then the counts: named and dropped
(the alarm was right), named without such a drop (a false alarm at that bar), dropped without a warning
(missed); the last line is JSON.

    python benchmarks/erasure_alarm_replay.py --runs-dir outputs/ssl_study
    python benchmarks/erasure_alarm_replay.py --runs-dir outputs/ssl_study --after 0   # no warm-up
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cps_hf.cli import ArgumentParser, run_cli  # noqa: E402
from cps_hf.erasure_alarm import LABELED, PSEUDO, ErasureAlarm  # noqa: E402


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", required=True, help="a study's run folder (outputs/ssl_study, outputs/msrc_study)")
    parser.add_argument("--fraction", type=float, default=0.25, help="the alarm's fraction (the trainer's default)")
    parser.add_argument("--patience", type=int, default=3, help="low windows in a row (the trainer's default)")
    parser.add_argument("--after", type=float, default=0.2, help="share of the steps before windows are judged")
    parser.add_argument("--drop", type=float, default=0.10, help="an IoU loss (0-1) against supervised that counts")
    return parser.parse_args(argv)


def _per_class_iou(run: Path) -> dict[str, float | None]:
    results = json.loads((run / "all_results.json").read_text())
    names = json.loads((run / "model" / "config.json").read_text())["id2label"]
    return {names[str(i)]: iou for i, iou in enumerate(results["eval_per_category_iou"])}


def replay(run: Path, args) -> list[str]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    last = max(r["step"] for r in records)
    alarm = ErasureAlarm(args.fraction, args.patience, start_step=int(args.after * last))
    for record in records:
        for key, labeled in record.items():
            if key.startswith(LABELED) and PSEUDO + key[len(LABELED):] in record:
                name = key[len(LABELED):]
                alarm.judge(record["step"], name, record[PSEUDO + name], labeled)
    return sorted(alarm.warned)


def judge_runs(root: Path, args) -> list[dict]:
    """Every run under `root` that logged the alarm's shares and has a finished supervised run of the same fraction
    and seed: the classes the alarm names, the classes that lost at least `args.drop` IoU, and those classes' IoU
    change (0-1) against supervised."""
    judged = []
    for run in sorted(root.glob("*/*_seed*")):
        log = run / "log.jsonl"
        variant, seed = run.name.rsplit("_seed", 1)
        supervised = run.parent / f"supervised_seed{seed}"
        if (not log.is_file() or PSEUDO not in log.read_text() or not (run / "all_results.json").is_file()
                or not (supervised / "all_results.json").is_file()):
            continue
        named = set(replay(run, args))
        ours, theirs = _per_class_iou(run), _per_class_iou(supervised)
        dropped = {c for c in ours if ours[c] is not None and theirs.get(c) is not None
                   and theirs[c] - ours[c] >= args.drop}
        change = {c: ours[c] - theirs[c] for c in sorted(named | dropped)
                  if ours.get(c) is not None and theirs.get(c) is not None}
        judged.append({"run": str(run.relative_to(root)), "fraction_dir": run.parent.name, "variant": variant,
                       "seed": int(seed), "named": sorted(named), "dropped": sorted(dropped), "iou_change": change})
    return judged


def counts(judged: list[dict], args) -> dict:
    right = sum(len(set(j["named"]) & set(j["dropped"])) for j in judged)
    false = sum(len(set(j["named"]) - set(j["dropped"])) for j in judged)
    missed = sum(len(set(j["dropped"]) - set(j["named"])) for j in judged)
    return {"runs": len(judged), "named_and_dropped": right, "named_without_drop": false, "dropped_without_alarm": missed,
            "settings": {"fraction": args.fraction, "patience": args.patience, "after": args.after, "drop": args.drop}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = Path(args.runs_dir)
    judged = judge_runs(root, args)
    for j in judged:
        print(f"{j['run']}: alarm {j['named']}; dropped {j['dropped']}")
    summary = counts(judged, args)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    run_cli(main)
