"""Numbers from the finished runs: scores and per-class IoU, their statistics over seeds, paired
differences to supervised, cost ratios, and what each labeled subset holds. No text, no figures.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from cps_hf.data.study_scenes import MODES, STUDY_CLASSES

from .runner import Run, read_record
from .settings import REFERENCE, VARIANTS, fraction_value


def seconds_per_step(log_path: Path, method: str, batch: int) -> float | None:
    """Median over the log's windows of (images per step / images per second); None without a log."""
    from cps_hf.methods import METHODS

    if not log_path.is_file():
        return None
    images_per_step = batch * (1 + METHODS[method].num_unlabeled_streams)
    rates = []
    for line in log_path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if isinstance(record.get("images_per_second"), (int, float)) and record["images_per_second"] > 0:
            rates.append(images_per_step / record["images_per_second"])
    return statistics.median(rates) if rates else None


def kept_fractions(log_path: Path) -> dict[str, float] | None:
    """A thresholded run's kept pseudo labels over the second half of training: the overall fraction
    (``pseudo_kept_u``) and each class's (``pseudo_kept_u/<class>``: of the pixels predicted as the class,
    the share kept), averaged over the logged steps; None for a run that logged none."""
    if not log_path.is_file():
        return None
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records if isinstance(r.get("step"), (int, float))]
    if not steps:
        return None
    half = max(steps) / 2
    values: dict[str, list[float]] = {}
    for record in records:
        if record.get("step", 0) <= half:
            continue
        for key, value in record.items():
            if (key == "pseudo_kept_u" or key.startswith("pseudo_kept_u/")) and isinstance(value, (int, float)) \
                    and value == value:
                values.setdefault(key, []).append(value)
    if "pseudo_kept_u" not in values:
        return None
    return {key.removeprefix("pseudo_kept_u").lstrip("/") or "all": statistics.fmean(v) for key, v in values.items()}


def collect(runs: list[Run], batch: int, variants: dict = VARIANTS) -> list[dict]:
    """One entry per finished run: scores, per-class IoU, cost. `variants`: the study's table of methods
    (another study, e.g. benchmarks/msrc_study.py, passes its own)."""
    rows = []
    for run in runs:
        results_file = run.folder / "all_results.json"
        if not results_file.is_file():
            continue
        results = json.loads(results_file.read_text())
        record = read_record(run.folder) or {}
        attempts = record.get("attempts", [])
        rows.append({
            "fraction": run.fraction, "variant": run.variant, "seed": run.seed, "folder": str(run.folder),
            "mean_iou": results["eval_mean_iou"], "best_mean_iou": results.get("best_eval_mean_iou"),
            "per_class_iou": results["eval_per_category_iou"], "num_labeled": results.get("num_labeled"),
            "steps": results.get("final_step"),
            "seconds_per_step": seconds_per_step(run.folder / "log.jsonl", variants[run.variant][0], batch),
            "pseudo_kept": kept_fractions(run.folder / "log.jsonl"),
            "max_rss_mib": max((a["max_rss_mib"] for a in attempts), default=None),
            "wall_seconds": sum(a["wall_seconds"] for a in attempts) if attempts else None,
            "command": attempts[-1]["command"] if attempts else None,
        })
    return rows


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(rows: list[dict], class_names: list[str], variants: dict = VARIANTS) -> dict:
    """Per (fraction, variant): mIoU stats, per-seed values, paired differences to supervised, per-class
    means and changes; per variant: cost ratios to supervised."""
    table = {}
    by_cell = {}
    for row in rows:
        by_cell.setdefault((row["fraction"], row["variant"]), {})[row["seed"]] = row
    for (fraction, variant), seeds in by_cell.items():
        supervised = by_cell.get((fraction, "supervised"), {})
        miou = {seed: row["mean_iou"] for seed, row in sorted(seeds.items())}
        paired = {seed: miou[seed] - supervised[seed]["mean_iou"] for seed in miou if seed in supervised}
        per_class = [statistics.fmean(row["per_class_iou"][k] for row in seeds.values())
                     for k in range(len(class_names))]
        per_class_delta = None
        common = [seed for seed in seeds if seed in supervised]
        if common:
            per_class_delta = [statistics.fmean(seeds[s]["per_class_iou"][k] - supervised[s]["per_class_iou"][k]
                                                for s in common) for k in range(len(class_names))]
        table.setdefault(fraction, {})[variant] = {
            "miou": _stats(list(miou.values())), "per_seed": miou,
            "paired_delta": _stats(list(paired.values())) if paired else None, "per_seed_delta": paired,
            "wins": sum(delta > 0 for delta in paired.values()), "compared_seeds": len(paired),
            "per_class_iou": dict(zip(class_names, per_class)),
            "per_class_delta": dict(zip(class_names, per_class_delta)) if per_class_delta else None,
            "per_seed_per_class": {seed: dict(zip(class_names, row["per_class_iou"]))
                                   for seed, row in sorted(seeds.items())},
            "num_labeled": next(iter(seeds.values()))["num_labeled"],
            "pseudo_kept": _mean_kept([row.get("pseudo_kept") for row in seeds.values()]),
        }
    cost = {}
    for variant in variants:
        times = [r["seconds_per_step"] for r in rows if r["variant"] == variant and r["fraction"] != REFERENCE
                 and r["seconds_per_step"]]
        memory = [r["max_rss_mib"] for r in rows if r["variant"] == variant and r["fraction"] != REFERENCE
                  and r["max_rss_mib"]]
        if times or memory:
            cost[variant] = {"seconds_per_step": statistics.median(times) if times else None,
                             "max_rss_mib": statistics.median(memory) if memory else None}
    base = cost.get("supervised", {})
    for entry in cost.values():
        for key, ratio in (("seconds_per_step", "time_ratio"), ("max_rss_mib", "memory_ratio")):
            entry[ratio] = entry[key] / base[key] if entry.get(key) and base.get(key) else None
    return {"table": table, "cost": cost}



def _mean_kept(per_seed: list[dict | None]) -> dict[str, float] | None:
    """Mean over the seeds that logged them of each kept fraction (a class may be unpredicted on a seed)."""
    logged = [kept for kept in per_seed if kept]
    if not logged:
        return None
    keys = sorted(set().union(*logged))
    return {key: statistics.fmean(kept[key] for kept in logged if key in kept) for key in keys}


def ordered_fractions(table: dict) -> list[str]:
    return sorted((f for f in table if f != REFERENCE), key=fraction_value)



def labeled_objects(voc: Path, fraction: str, seed: int) -> dict[str, dict[str, int]] | None:
    """Objects per class and appearance mode (visible >= 20 px) among the labeled images the trainer
    draws for (fraction, seed): the same `split_labeled` call on the same id order (train_aug.txt)."""
    import datasets

    from cps_hf.data.partitions import split_labeled

    scenes_file = voc / "scenes.json"
    if not scenes_file.is_file():
        return None
    ids = (voc / "ImageSets" / "SegmentationAug" / "train_aug.txt").read_text().split()
    scenes = json.loads(scenes_file.read_text())["train"]
    chosen = ids if fraction == REFERENCE else split_labeled(datasets.Dataset.from_dict({"id": ids}), fraction,
                                                              seed=seed)[0]["id"]
    counts = {name: {mode: 0 for mode in MODES} for name in STUDY_CLASSES[1:]}
    for sample_id in chosen:
        for obj in scenes[sample_id]:
            if obj["visible_pixels"] >= 20:
                counts[obj["class"]][obj["mode"]] += 1
    return counts

