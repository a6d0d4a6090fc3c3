"""One study's report from its finished runs: numbers, figures and text into the docs folder, and
study.json with every number and command. Trains nothing (the runner does).
"""

from __future__ import annotations

import json
from pathlib import Path

from cps_hf.data.study_scenes import STUDY_CLASSES
from cps_hf.errors import UserInputError

from . import REPO, say
from .aggregate import aggregate, collect, labeled_objects, ordered_fractions
from .figures import plot_miou, plot_predictions
from .markdown import results_markdown, summary_markdown
from .runner import Run
from .settings import VARIANTS


def relative_to_repo(value):
    """Paths inside the repository written relative to it (folders, commands), so the committed study.json and
    results.md read the same whichever machine or checkout made them."""
    if isinstance(value, dict):
        return {key: relative_to_repo(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative_to_repo(item) for item in value]
    if isinstance(value, Path):
        value = str(value)
    return value.replace(f"{REPO}/", "") if isinstance(value, str) else value


def report(runs: list[Run], setting: dict, setting_name: str, docs_dir: Path, data_root: Path,
           commands: dict, docs_link: str) -> dict:
    class_names = list(STUDY_CLASSES)
    rows = collect(runs, setting["train"]["per_device_train_batch_size"])
    if not rows:
        raise UserInputError(f"no finished runs under {runs[0].folder.parents[1] if runs else '?'} to report on; "
                             "train them first (drop --report-only)")
    missing = [run.name for run in runs if not (run.folder / "all_results.json").is_file()]
    summary = aggregate(rows, class_names)
    voc = data_root / "VOCdevkit" / "VOC2012"
    summary["labeled_objects"] = {f: {seed: labeled_objects(voc, f, seed) for seed in setting["seeds"]}
                                  for f in setting["fractions"]}
    docs_dir.mkdir(parents=True, exist_ok=True)
    plot_miou(summary, docs_dir / "miou_vs_labels.png",
              f"{setting['train']['max_train_steps']} steps, {setting['train']['backbone']} from scratch "
              f"({commands['study']})")
    fractions = ordered_fractions(summary["table"])
    predictions, shown = (plot_predictions(runs, fractions[0], data_root, docs_dir / "predictions.png")
                          if fractions else (None, None))
    summary["predictions"] = shown
    (docs_dir / "results.md").write_text(results_markdown(summary, setting, class_names, commands,
                                                          Path(relative_to_repo(str(data_root))), missing))
    (docs_dir / "summary.md").write_text(summary_markdown(summary, setting, class_names, commands, docs_link, missing))
    study = {"setting": setting_name, "settings": setting, "commands": commands, "class_names": class_names,
             "variants": {name: {"method": m, "flags": f, "label": label} for name, (m, f, label) in VARIANTS.items()},
             "runs": rows, "missing": missing, "summary": summary,
             "figures": ["miou_vs_labels.png"] + (["predictions.png"] if predictions else [])}
    (docs_dir / "study.json").write_text(json.dumps(relative_to_repo(study), indent=1, default=str) + "\n")
    say(f"wrote {docs_dir}/results.md, summary.md, miou_vs_labels.png"
        f"{', predictions.png' if predictions else ''}, study.json ({len(rows)} runs, {len(missing)} missing)")
    return study
