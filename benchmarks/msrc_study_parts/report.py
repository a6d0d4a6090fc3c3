"""The MSRC study's report from its finished runs: numbers (ssl_study_parts.aggregate with this study's methods),
the labeled images per class, figures and text into the docs folder, and study.json with every number and command.
Trains nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cps_hf.errors import UserInputError

from ssl_study_parts import say
from ssl_study_parts.aggregate import aggregate, collect
from ssl_study_parts.report import relative_to_repo
from ssl_study_parts.runner import Run

from .figures import plot_by_method, plot_predictions
from .markdown import results_markdown, summary_markdown
from .settings import BASELINE, VARIANTS


def labeled_images(data_root: Path, fraction: str, seed: int, class_names: list[str]) -> dict[str, int]:
    """How many of the labeled images the trainer draws for (fraction, seed) show each class: the trainer's own
    build_datasets call, so the same images."""
    from cps_hf.data import build_datasets

    labeled = build_datasets("folder", data_root, fraction, seed=seed).labeled
    counts = dict.fromkeys(class_names, 0)
    for label in labeled["label"]:
        present = np.unique(np.asarray(label))
        for k in present[present < len(class_names)]:
            counts[class_names[k]] += 1
    return counts


def alarm_replay(runs_dir: Path) -> dict:
    """benchmarks/erasure_alarm_replay.py over the study's runs, with the trainer's default alarm settings."""
    import erasure_alarm_replay as replay  # beside msrc_study.py, which puts benchmarks/ on the path

    args = replay.parse_args(["--runs-dir", str(runs_dir)])
    judged = replay.judge_runs(runs_dir, args)
    return {**replay.counts(judged, args), "runs": judged}  # "runs": each run's classes, not only their count


def report(runs: list[Run], setting: dict, setting_name: str, docs_dir: Path, data_root: Path, data: dict,
           selection: dict | None, commands: dict, docs_link: str) -> dict:
    class_names = list(data["classes"])
    rows = collect(runs, setting["train"]["per_device_train_batch_size"], variants=VARIANTS)
    if not rows:
        raise UserInputError(f"no finished runs under {runs[0].folder.parents[1] if runs else '?'} to report on; "
                             "train them first (drop --report-only)")
    unfinished = [run for run in runs if not (run.folder / "all_results.json").is_file()]
    missing = [run.name for run in unfinished]
    summary = aggregate(rows, class_names, variants=VARIANTS)
    fractions = sorted({run.fraction for run in runs})
    summary["labeled_images"] = {f: {seed: labeled_images(data_root, f, seed, class_names) for seed in setting["seeds"]}
                                 for f in fractions}
    summary["selection"] = selection
    summary["run_wall_seconds"] = [row["wall_seconds"] for row in rows if row["wall_seconds"]]
    summary["erasure_alarm"] = alarm_replay(runs[0].folder.parents[1])
    docs_dir.mkdir(parents=True, exist_ok=True)
    plot_by_method(summary, docs_dir / "miou_by_method.png",
                   f"MSRC-21 test set, {setting['train']['max_train_steps']} steps, {setting['train']['backbone']} "
                   f"({commands['study']})")
    columns = [BASELINE, "cps_cutmix"] + ((selection or {}).get("picked") or [])[:1]
    predictions, shown = plot_predictions(runs, setting["main"], columns, data_root, docs_dir / "predictions.png")
    summary["predictions"] = shown
    data_text = relative_to_repo(str(data_root))
    (docs_dir / "results.md").write_text(results_markdown(summary, setting, class_names, commands, data, data_text,
                                                          missing))
    (docs_dir / "summary.md").write_text(summary_markdown(summary, setting, class_names, commands, docs_link, data,
                                                          unfinished))
    study = {"setting": setting_name, "settings": setting, "commands": commands, "data": data,
             "class_names": class_names,
             "variants": {name: {"method": m, "flags": f, "label": label} for name, (m, f, label) in VARIANTS.items()},
             "runs": rows, "missing": missing, "summary": summary,
             "figures": ["miou_by_method.png"] + (["predictions.png"] if predictions else [])}
    (docs_dir / "study.json").write_text(json.dumps(relative_to_repo(study), indent=1, default=str) + "\n")
    say(f"wrote {docs_dir}/results.md, summary.md, miou_by_method.png"
        f"{', predictions.png' if predictions else ''}, study.json ({len(rows)} runs, {len(missing)} missing)")
    return study
