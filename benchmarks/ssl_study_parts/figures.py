"""The study's figures: miou_vs_labels.png (every method and seed against the label fraction) and
predictions.png (scripts/make_figures.py's grid on validation images picked by a fixed rule).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

from cps_hf.data.study_scenes import CLASS_WEIGHTS, STUDY_CLASSES

from . import _load_script
from .aggregate import ordered_fractions
from .runner import Run
from .settings import CPS_FAMILY, FIGURE_VARIANTS, REFERENCE, VARIANTS, fraction_value


def plot_miou(summary: dict, path: Path, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = summary["table"]
    fractions = ordered_fractions(table)
    figure = Figure(figsize=(9.5, 5.2), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_axes([0.08, 0.11, 0.58, 0.8])
    markers = "osD^v<>ph*XPd8H1234+x"
    colors = [f"C{i}" for i in range(10)] + ["black", "#8c6d31", "#7b4173", "#637939", "#e7969c",
                                             "#843c39", "#5254a3", "#8ca252", "#bd9e39",
                                             "#e6550d", "#3182bd"]  # tab10, then more: no two alike
    variants = [v for v in VARIANTS if any(v in table[f] for f in fractions)]
    for index, variant in enumerate(variants):
        offset = (index - (len(variants) - 1) / 2) * 0.035
        xs, means, lows, highs = [], [], [], []
        for f in fractions:
            cell = table[f].get(variant)
            if not cell:
                continue
            x = math.log2(fraction_value(f)) + offset
            values = [100 * v for v in cell["per_seed"].values()]
            xs.append(x)
            means.append(statistics.fmean(values))
            lows.append(means[-1] - min(values))
            highs.append(max(values) - means[-1])
            axes.scatter([x] * len(values), values, s=10, alpha=0.45, color=colors[index % len(colors)])
        line_style = "-" if variant in CPS_FAMILY or variant == "supervised" else "--"
        axes.errorbar(xs, means, yerr=[lows, highs], marker=markers[index % len(markers)], capsize=3,
                      linestyle=line_style, color=colors[index % len(colors)], label=VARIANTS[variant][2],
                      linewidth=2.2 if variant == "supervised" else 1.3)
    if REFERENCE in table and "supervised" in table[REFERENCE]:
        reference = table[REFERENCE]["supervised"]["miou"]["mean"] * 100
        axes.axhline(reference, color="black", linestyle=":", linewidth=1, label="supervised, all labels")
    axes.set_xticks([math.log2(fraction_value(f)) for f in fractions])
    axes.set_xticklabels([f"{f}\n({table[f][next(iter(table[f]))]['num_labeled']} labeled)" for f in fractions])
    axes.set_xlabel("labeled fraction of the training images")
    axes.set_ylabel("validation mIoU (%), final weights")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
                title="mean; bars: min-max over seeds;\ndots: seeds", title_fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def pick_images(voc: Path, count: int = 5) -> list[str]:
    """Validation images by a fixed rule: the first holding each of the rarest classes, then the first
    with a shaded and with a shifted object (visible >= 120 px); ids in file order."""
    scenes_file = voc / "scenes.json"
    val_ids = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    if not scenes_file.is_file():
        return val_ids[:count]
    scenes = json.loads(scenes_file.read_text())["val"]
    rarest = sorted(range(len(CLASS_WEIGHTS)), key=lambda k: CLASS_WEIGHTS[k])[:3]
    wanted = [("class", STUDY_CLASSES[k + 1]) for k in rarest] + [("mode", "shaded"), ("mode", "shifted")]
    chosen = []
    for key, value in wanted:
        for sample_id in val_ids:
            if sample_id not in chosen and any(o[key] == value and o["visible_pixels"] >= 120
                                               for o in scenes[sample_id]):
                chosen.append(sample_id)
                break
    for sample_id in val_ids:  # top up when a rule found nothing
        if len(chosen) >= count:
            break
        if sample_id not in chosen:
            chosen.append(sample_id)
    return chosen[:count]


def plot_predictions(runs: list[Run], fraction: str, data_root: Path, path: Path) -> tuple[Path | None, dict | None]:
    """make_figures.py's Figure-6 grid for seed 0 (or the lowest seed) of `fraction`, one column per method."""
    finished = {(r.variant, r.seed): r for r in runs if r.fraction == fraction and (r.folder / "model").is_dir()}
    if not finished:
        return None, None
    seed = min(s for _, s in finished)
    columns = [finished[(v, seed)] for v in FIGURE_VARIANTS if (v, seed) in finished]
    ids = pick_images(data_root / "VOCdevkit" / "VOC2012")
    make_figures = _load_script("make_figures")
    scratch = path.parent / ".predictions_tmp"
    argv = ["--models", *(str(r.folder / "model") for r in columns),
            "--titles", *(VARIANTS[r.variant][2] for r in columns),
            "--dataset", "voc", "--data_root", str(data_root), "--split", "val", "--ids", *ids,
            "--output_dir", str(scratch), "--cell_size", "192", "192"]
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # protocol lines, bars
        written = make_figures.main(argv)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(written[0]), path)
    shutil.rmtree(scratch, ignore_errors=True)
    return path, {"fraction": fraction, "seed": seed, "columns": [r.variant for r in columns], "ids": ids}

